"""The multi-row int16-activation 4-bit kernel, compiled alone and in the row-count dispatch,
checked against NumPy."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from test_q4_gemv import TARGET, _matmul_func, assert_int16_result, packed_weight, run_kernel
from tvm import te

from mlc_engine.engine import q4_gemm, schedule
from mlc_engine.engine.model.layers import DEQUANTIZE_BLOCK, MATMUL_BLOCK, _q4_value
from mlc_engine.engine.quantization import GROUP_SIZE, dequantize

pytestmark = pytest.mark.skipif(
    not tvm.target.codegen.llvm_cpu_has_features(["avx2"], TARGET), reason="needs AVX2"
)
# Whole 8 x 8 blocks of packed words and tasks of 16 columns (N is test_q4_gemv's).
K, N = 128, 48


@pytest.mark.parametrize(
    ("has_minimum", "has_residual", "rows"),
    # Whole row tiles, and every kind of remainder (tiles of 4, 2 and 1 after them).
    [(True, True, 13), (True, False, 6), (False, True, 9), (False, False, 17), (True, True, 3)],
)
def test_kernel_rounds_activations_to_int16_and_nothing_else(
    has_minimum: bool, has_residual: bool, rows: int
) -> None:
    func = _matmul_func(has_minimum, has_residual, rows=rows, k_size=K)
    assert q4_gemm.applies(func, TARGET)
    rng = np.random.default_rng(rows)
    packed = packed_weight(has_minimum, rng, K)
    x = rng.standard_normal((rows, K)).astype(np.float32)
    x[1, 5] = 40.0  # an outlier: its group's other activations get coarser steps
    residual = rng.standard_normal((rows, N)).astype(np.float32) if has_residual else None
    got = run_kernel(func.with_body(q4_gemm.multi_row_body(func, TARGET)), x, packed, residual)
    assert_int16_result(got, x, packed)


def _symbolic_rows_func() -> tvm.tirx.PrimFunc:
    """x [rows, 1, K] @ W.T for a row count known only at run time, as in a decode step."""

    def int64(value: int) -> tvm.tirx.IntImm:  # Relax gives every dimension as int64
        return tvm.tirx.IntImm("int64", value)

    rows = tvm.tirx.Var("rows", "int64")
    x = te.placeholder((rows, int64(1), int64(K)), "float32", name="x")
    codes = te.placeholder((int64(N), int64(K // 8)), "uint32", name="codes")
    scale = te.placeholder((int64(N), int64(K // GROUP_SIZE)), "float32", name="scale")
    minimum = te.placeholder((int64(N), int64(K // GROUP_SIZE)), "float32", name="minimum")
    weight = te.compute(
        (int64(N), int64(K)),
        lambda n, k: _q4_value(codes, scale, minimum, n, k),
        name=DEQUANTIZE_BLOCK,
    )
    k = te.reduce_axis((int64(0), int64(K)), name="k")
    out = te.compute(
        (rows, int64(1), int64(N)),
        lambda a, b, n: te.sum(x[a, b, k] * weight[n, k], axis=k),
        name=MATMUL_BLOCK,
    )
    return te.create_prim_func([x, codes, scale, minimum, out])


def test_row_counts_between_9_and_64_take_the_int16_kernel_others_the_float_ones() -> None:
    func = schedule._schedule_matmul(_symbolic_rows_func(), 8, TARGET)
    rng = np.random.default_rng(0)
    packed = packed_weight(True, rng, K)
    run = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), TARGET)
    device = tvm.cpu()
    weights = [tvm.runtime.tensor(a, device) for a in (packed.weight, packed.scale, packed.minimum)]
    for rows in (1, 8, 9, 16, 64, 65, 100):
        x = rng.standard_normal((rows, K)).astype(np.float32)
        out = tvm.runtime.tensor(np.zeros((rows, 1, N), np.float32), device)
        run["main"](tvm.runtime.tensor(x[:, None, :], device), *weights, out)
        got = out.numpy()[:, 0, :]
        if 8 < rows <= q4_gemm.MAX_ROWS:
            assert_int16_result(got, x, packed)
        else:
            exact = x.astype(np.float64) @ dequantize(packed).T.astype(np.float64)
            assert np.abs(got - exact).max() < 1e-5 * np.abs(exact).max(), rows
