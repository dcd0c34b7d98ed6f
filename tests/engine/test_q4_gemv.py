"""The single-row int16-activation 4-bit kernel, compiled alone and checked against NumPy."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import te

from mlc_engine.common.device import Device, tvm_target
from mlc_engine.engine import q4_gemv
from mlc_engine.engine.model.layers import DEQUANTIZE_BLOCK, MATMUL_BLOCK, _q4_value
from mlc_engine.engine.quantization import (
    GROUP_SIZE,
    PackedQ4,
    dequantize,
    pack_codes,
    quantize_asymmetric,
    quantize_symmetric,
    unpack_codes,
)

TARGET = tvm_target(Device("cpu"))
pytestmark = pytest.mark.skipif(
    not tvm.target.codegen.llvm_cpu_has_features(["avx2"], TARGET), reason="needs AVX2"
)
K, N = 320, 48


def _matmul_func(
    has_minimum: bool, has_residual: bool, rows: int = 1, k_size: int = K
) -> tvm.tirx.PrimFunc:
    """The fused function the model pipeline hands the schedule: x @ W.T (+ residual)."""
    x = te.placeholder((rows, 1, k_size), "float32", name="x")
    codes = te.placeholder((N, k_size // 8), "uint32", name="codes")
    scale = te.placeholder((N, k_size // GROUP_SIZE), "float32", name="scale")
    minimum = te.placeholder((N, k_size // GROUP_SIZE), "float32", name="minimum")
    weights = [codes, scale, minimum] if has_minimum else [codes, scale]
    weight = te.compute(
        (N, k_size),
        lambda n, k: _q4_value(codes, scale, minimum if has_minimum else None, n, k),
        name=DEQUANTIZE_BLOCK,
    )
    k = te.reduce_axis((0, k_size), name="k")
    out = te.compute(
        (rows, 1, N), lambda a, b, n: te.sum(x[a, b, k] * weight[n, k], axis=k), name=MATMUL_BLOCK
    )
    if not has_residual:
        return te.create_prim_func([x, *weights, out])
    residual = te.placeholder((rows, 1, N), "float32", name="residual")
    added = te.compute((rows, 1, N), lambda *i: residual[i] + out[i], name=q4_gemv.RESIDUAL_BLOCK)
    return te.create_prim_func([x, *weights, residual, added])


def _int16_reference(x: np.ndarray, packed: PackedQ4) -> np.ndarray:
    """x @ W.T for rows of x the int16 kernels' way: W = scale * code + offset, the codes meeting
    each row rounded to int16 per group of 32, the offsets meeting x itself (through each
    group's sum)."""
    groups = x.reshape(len(x), -1, GROUP_SIZE)
    largest = np.abs(groups).max(axis=2, keepdims=True)
    rounded = np.rint(groups * (np.float32(32767) / largest)) * (largest / np.float32(32767))
    scaled_codes = np.repeat(packed.scale, GROUP_SIZE, axis=1).astype(np.float64)
    scaled_codes *= unpack_codes(packed.weight)
    offset = packed.minimum if packed.minimum is not None else -8 * packed.scale
    offsets = np.repeat(offset, GROUP_SIZE, axis=1).astype(np.float64)
    return rounded.reshape(x.shape) @ scaled_codes.T + x.astype(np.float64) @ offsets.T


def packed_weight(has_minimum: bool, rng: np.random.Generator, k: int) -> PackedQ4:
    """A random [N, k] matrix, packed to 4 bits (asymmetric, or symmetric)."""
    float_weight = rng.standard_normal((N, k)).astype(np.float32)
    if has_minimum:
        codes, scale, minimum = quantize_asymmetric(float_weight)
        return PackedQ4(pack_codes(codes), scale, minimum)
    codes, scale = quantize_symmetric(float_weight)
    return PackedQ4(pack_codes(codes), scale, None)


def run_kernel(
    func: tvm.tirx.PrimFunc, x: np.ndarray, packed: PackedQ4, residual: np.ndarray | None
) -> np.ndarray:
    """`func` compiled alone and run on rows x [rows, k]: x @ W.T, the residual taken off."""
    run = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), TARGET)
    operands = [x[:, None, :], packed.weight, packed.scale]
    operands += [packed.minimum] if packed.minimum is not None else []
    operands += [residual[:, None, :]] if residual is not None else []
    device = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros((len(x), 1, N), np.float32), device)
    run["main"](*(tvm.runtime.tensor(np.ascontiguousarray(a), device) for a in operands), out)
    return out.numpy()[:, 0, :] - (residual if residual is not None else 0)


def assert_int16_result(got: np.ndarray, x: np.ndarray, packed: PackedQ4) -> None:
    """`got` is x @ W.T with each row rounded to int16 per group, and only that."""
    weight = dequantize(packed).astype(np.float64)
    exact = x.astype(np.float64) @ weight.T
    scale = np.abs(exact).max()
    assert np.abs(got - _int16_reference(x, packed)).max() < 1e-5 * scale
    # Each activation is off by at most half a step (1/65534 of its group's largest).
    largest = np.repeat(np.abs(x.reshape(len(x), -1, GROUP_SIZE)).max(axis=2), GROUP_SIZE, axis=1)
    bound = (largest / 65534) @ np.abs(weight).T + 1e-5 * scale
    assert np.all(np.abs(got - exact) <= bound)
    assert np.abs(got - exact).max() > 1e-7 * scale  # the rounding is really there


@pytest.mark.parametrize(
    ("has_minimum", "has_residual", "k_size"),
    # 1536: long columns, worked on one at a time (TILE_SPAN_BYTES).
    [(True, True, K), (True, False, K), (False, True, K), (False, False, K), (True, True, 1536)],
)
def test_kernel_rounds_activations_to_int16_and_nothing_else(
    has_minimum: bool, has_residual: bool, k_size: int
) -> None:
    func = _matmul_func(has_minimum, has_residual, k_size=k_size)
    assert q4_gemv.applies(func, TARGET)
    rng = np.random.default_rng(7)
    packed = packed_weight(has_minimum, rng, k_size)
    x = rng.standard_normal((1, k_size)).astype(np.float32)
    x[0, 5] = 40.0  # an outlier: its group's other activations get coarser steps
    residual = rng.standard_normal((1, N)).astype(np.float32) if has_residual else None
    got = run_kernel(q4_gemv.single_row_q4_matmul(func, TARGET), x, packed, residual)
    assert_int16_result(got, x, packed)


def test_other_matmuls_keep_the_float_schedule() -> None:
    assert not q4_gemv.applies(_matmul_func(True, True, rows=4), TARGET)
    x = te.placeholder((1, K), "float32", name="x")
    w = te.placeholder((N, K), "float32", name="w")
    k = te.reduce_axis((0, K), name="k")
    out = te.compute((1, N), lambda i, n: te.sum(x[i, k] * w[n, k], axis=k), name=MATMUL_BLOCK)
    assert not q4_gemv.applies(te.create_prim_func([x, w, out]), TARGET)
