"""The int8-activation 4-bit kernel, compiled alone and in the row-count dispatch, checked
against NumPy."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import te

from mlc_engine.common.device import Device, tvm_target
from mlc_engine.engine import q4_gemm, schedule
from mlc_engine.engine.model.layers import DEQUANTIZE_BLOCK, MATMUL_BLOCK, _q4_value
from mlc_engine.engine.quantization import (
    COLUMN_BLOCK,
    GROUP_SIZE,
    PackedQ4,
    blocked_shape,
    dequantize,
    get_quantization,
    pack_codes,
    quantize_asymmetric,
    quantize_symmetric,
    to_storage_layout,
)

TARGET = tvm_target(Device("cpu"))
pytestmark = pytest.mark.skipif(
    not tvm.target.codegen.llvm_cpu_has_features(["avx2"], TARGET), reason="needs AVX2"
)
K, N = 320, 48  # 10 groups, 3 blocks of columns


def _int64(value: int) -> tvm.tirx.IntImm:  # Relax gives every dimension as int64
    return tvm.tirx.IntImm("int64", value)


def _matmul_func(
    has_minimum: bool,
    has_residual: bool,
    rows: int | tvm.tirx.Var = 1,
    k_size: int = K,
    column_block: int = COLUMN_BLOCK,
) -> tvm.tirx.PrimFunc:
    """The fused function the model pipeline hands the schedule: x [rows, 1, k] @ W.T (+ a
    residual), W in the layout a library with `column_block` reads it."""
    codes = te.placeholder(blocked_shape((N, k_size // 8), column_block), "uint32", name="codes")
    groups = blocked_shape((N, k_size // GROUP_SIZE), column_block)
    scale = te.placeholder(groups, "float32", name="scale")
    minimum = te.placeholder(groups, "float32", name="minimum")
    weights = [codes, scale, minimum] if has_minimum else [codes, scale]
    weight = te.compute(
        (_int64(N), _int64(k_size)),
        lambda n, k: _q4_value(codes, scale, minimum if has_minimum else None, n, k),
        name=DEQUANTIZE_BLOCK,
    )
    x = te.placeholder((rows, _int64(1), _int64(k_size)), "float32", name="x")
    k = te.reduce_axis((_int64(0), _int64(k_size)), name="k")
    out = te.compute(
        (rows, _int64(1), _int64(N)),
        lambda a, b, n: te.sum(x[a, b, k] * weight[n, k], axis=k),
        name=MATMUL_BLOCK,
    )
    if not has_residual:
        return te.create_prim_func([x, *weights, out])
    residual = te.placeholder((rows, _int64(1), _int64(N)), "float32", name="residual")
    added = te.compute(out.shape, lambda *i: residual[i] + out[i], name=q4_gemm.RESIDUAL_BLOCK)
    return te.create_prim_func([x, *weights, residual, added])


def _packed_weight(has_minimum: bool, rng: np.random.Generator, k: int) -> PackedQ4:
    """A random [N, k] matrix, packed to 4 bits (asymmetric, or symmetric)."""
    float_weight = rng.standard_normal((N, k)).astype(np.float32)
    if has_minimum:
        codes, scale, minimum = quantize_asymmetric(float_weight)
        return PackedQ4(pack_codes(codes), scale, minimum)
    codes, scale = quantize_symmetric(float_weight)
    return PackedQ4(pack_codes(codes), scale, None)


def _compile(func: tvm.tirx.PrimFunc) -> tvm.ffi.Function:
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), TARGET)[
        "main"
    ]


def _run(
    run: tvm.ffi.Function, x: np.ndarray, packed: PackedQ4, residual: np.ndarray | None = None
) -> np.ndarray:
    """x [rows, k] @ W.T through a compiled kernel, the weights blocked as a library wants
    them and the residual taken off again."""
    arrays = [packed.weight, packed.scale]
    arrays += [packed.minimum] if packed.minimum is not None else []
    operands = [x[:, None, :]] + [to_storage_layout(a, COLUMN_BLOCK) for a in arrays]
    operands += [residual[:, None, :]] if residual is not None else []
    device = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros((len(x), 1, N), np.float32), device)
    run(*(tvm.runtime.tensor(np.ascontiguousarray(a), device) for a in operands), out)
    return out.numpy()[:, 0, :] - (residual if residual is not None else 0)


def int8_rounded(x: np.ndarray) -> np.ndarray:
    """x as the kernel rounds it: each group of 32 to int8 steps of its largest magnitude / 127."""
    groups = x.reshape(*x.shape[:-1], -1, GROUP_SIZE)
    largest = np.abs(groups).max(axis=-1, keepdims=True)
    step = largest / np.float32(q4_gemm.LARGEST_CODE)
    inverse = np.float32(q4_gemm.LARGEST_CODE) / np.where(largest > 0, largest, 1)
    return (np.rint(groups * inverse) * step).reshape(x.shape)


def _assert_int8_result(got: np.ndarray, x: np.ndarray, packed: PackedQ4) -> None:
    """`got` is x @ W.T with x rounded to int8 per group, and only that."""
    weight = dequantize(packed).astype(np.float64)
    exact = x.astype(np.float64) @ weight.T
    scale = np.abs(exact).max()
    assert np.abs(got - int8_rounded(x).astype(np.float64) @ weight.T).max() < 1e-5 * scale
    # Each activation is off by at most half a step (1/254 of its group's largest).
    largest = np.repeat(np.abs(x.reshape(len(x), -1, GROUP_SIZE)).max(axis=2), GROUP_SIZE, axis=1)
    bound = (largest / (2 * q4_gemm.LARGEST_CODE)) @ np.abs(weight).T + 1e-5 * scale
    assert np.all(np.abs(got - exact) <= bound)
    assert np.abs(got - exact).max() > 1e-5 * scale  # the rounding is really there


@pytest.mark.parametrize(
    ("has_minimum", "has_residual", "rows", "k_size"),
    # Whole row tiles, and every kind of remainder (tiles of 2 and 1 after them); one row (a
    # single decode, its row count known when compiled); a long reduction (k = 1536).
    [
        (True, True, 13, K),
        (True, False, 6, K),
        (False, True, 9, K),
        (False, False, 17, K),
        (True, True, 3, K),
        (False, True, 1, K),
        (True, False, 4, 1536),
    ],
)
def test_kernel_rounds_activations_to_int8_and_nothing_else(
    has_minimum: bool, has_residual: bool, rows: int, k_size: int
) -> None:
    func = _matmul_func(has_minimum, has_residual, _int64(rows), k_size)
    operands = q4_gemm.q4_operands(func, TARGET)
    assert operands is not None  # the kernel applies
    rng = np.random.default_rng(rows)
    packed = _packed_weight(has_minimum, rng, k_size)
    x = rng.standard_normal((rows, k_size)).astype(np.float32)
    x[0, 5] = 40.0  # an outlier: its group's other activations get coarser steps
    x[-1, GROUP_SIZE : 2 * GROUP_SIZE] = 0.0  # a group of zeros: scale 0, nothing divided by it
    residual = rng.standard_normal((rows, N)).astype(np.float32) if has_residual else None
    run = _compile(func.with_body(q4_gemm.q4_matmul_body(func, operands)))
    _assert_int8_result(_run(run, x, packed, residual), x, packed)


def test_every_row_count_takes_the_int8_kernel() -> None:
    """One kernel for a row count known only at run time, as in a decode step or a prefill."""
    func = schedule._schedule_matmul(
        _matmul_func(True, False, tvm.tirx.Var("rows", "int64")), 8, TARGET
    )
    run = _compile(func)
    rng = np.random.default_rng(0)
    packed = _packed_weight(True, rng, K)
    for rows in (1, 2, 8, 9, 64, 65, 100):
        x = rng.standard_normal((rows, K)).astype(np.float32)
        _assert_int8_result(_run(run, x, packed), x, packed)


def test_row_by_row_weights_keep_the_float_schedules() -> None:
    """A library without blocks (float16, no AVX2) reads the same codes row by row."""
    func = schedule._schedule_matmul(
        _matmul_func(True, False, tvm.tirx.Var("rows", "int64"), column_block=0), 8, TARGET
    )
    run = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), TARGET)
    rng = np.random.default_rng(2)
    packed = _packed_weight(True, rng, K)
    device = tvm.cpu()
    weights = [tvm.runtime.tensor(a, device) for a in (packed.weight, packed.scale, packed.minimum)]
    for rows in (1, 8, 100):
        x = rng.standard_normal((rows, K)).astype(np.float32)
        out = tvm.runtime.tensor(np.zeros((rows, 1, N), np.float32), device)
        run["main"](tvm.runtime.tensor(x[:, None, :], device), *weights, out)
        exact = x.astype(np.float64) @ dequantize(packed).T.astype(np.float64)
        assert np.abs(out.numpy()[:, 0, :] - exact).max() < 1e-5 * np.abs(exact).max(), rows


def test_each_row_gets_the_same_result_whatever_the_batch() -> None:
    """Rounding is per row and the sums run in one order, so a sequence's logits do not depend
    on what else is decoded beside it."""
    run = _compile(
        schedule._schedule_matmul(
            _matmul_func(False, True, tvm.tirx.Var("rows", "int64")), 8, TARGET
        )
    )
    rng = np.random.default_rng(1)
    packed = _packed_weight(False, rng, K)
    x = rng.standard_normal((37, K)).astype(np.float32)
    residual = rng.standard_normal((37, N)).astype(np.float32)
    together = _run(run, x, packed, residual)
    for row in (0, 5, 36):
        alone = _run(run, x[row : row + 1], packed, residual[row : row + 1])
        np.testing.assert_array_equal(alone[0], together[row])


def test_other_matmuls_keep_the_float_schedules() -> None:
    assert not q4_gemm.applies(_matmul_func(True, True, column_block=0), TARGET)
    x = te.placeholder((1, K), "float32", name="x")
    w = te.placeholder((N, K), "float32", name="w")
    k = te.reduce_axis((0, K), name="k")
    out = te.compute((1, N), lambda i, n: te.sum(x[i, k] * w[n, k], axis=k), name=MATMUL_BLOCK)
    assert not q4_gemm.applies(te.create_prim_func([x, w, out]), TARGET)


def test_libraries_ask_for_blocks_only_where_the_kernel_runs() -> None:
    q4f32 = get_quantization("q4f32_1")
    assert q4_gemm.column_block(q4f32, TARGET) == COLUMN_BLOCK
    assert q4_gemm.column_block(get_quantization("q4f16_1"), TARGET) == 0
    assert q4_gemm.column_block(get_quantization("q0f32"), TARGET) == 0
    without_avx2 = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64"})
    assert q4_gemm.column_block(q4f32, without_avx2) == 0


def test_blocks_of_columns_hold_each_column_word_major() -> None:
    words = np.arange(2 * COLUMN_BLOCK * 3, dtype=np.uint32).reshape(2 * COLUMN_BLOCK, 3)
    blocked = to_storage_layout(words, COLUMN_BLOCK)
    assert blocked.shape == (2, 3, COLUMN_BLOCK)
    assert blocked[1, 2, 5] == words[COLUMN_BLOCK + 5, 2]
    odd = np.zeros((COLUMN_BLOCK + 1, 3), np.uint32)  # rows that do not fill blocks stay rows
    assert to_storage_layout(odd, COLUMN_BLOCK) is odd
