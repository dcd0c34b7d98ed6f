"""The int8-activation kernel for 4- and 8-bit weights, compiled alone and in the row-count
dispatch, checked against NumPy."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import te

from mlc_engine.common.device import Device, tvm_target
from mlc_engine.engine import int8_gemm, schedule
from mlc_engine.engine.model.layers import DEQUANTIZE_BLOCK, MATMUL_BLOCK, _value_reader
from mlc_engine.engine.quantization import (
    COLUMN_BLOCK,
    GROUP_SIZE,
    Q4_0,
    Q4_1,
    Q8_0,
    Q8_0_G16,
    Q8_1,
    Q8_1_G16,
    PackedWeight,
    blocked_shape,
    codes_per_word,
    dequantize,
    get_quantization,
    group_size,
    has_minimum,
    pack_codes,
    pack_q8,
    quantize_asymmetric,
    quantize_q8,
    quantize_symmetric,
    to_storage_layout,
)

TARGET = tvm_target(Device("cpu"))
pytestmark = pytest.mark.skipif(
    not tvm.target.codegen.llvm_cpu_has_features(["avx2"], TARGET), reason="needs AVX2"
)
K, N = 320, 48  # 10 groups, 3 blocks of columns


def _cpu_target(mcpu: str) -> tvm.target.Target:
    return tvm.target.Target(
        {"kind": "llvm", "mcpu": mcpu, "mtriple": str(TARGET.attrs["mtriple"]), "num-cores": 2}
    )


def _runs_here(features: list[str]) -> pytest.MarkDecorator:
    """Skips a target's case where this host lacks the features its code needs."""
    missing = not tvm.target.codegen.llvm_cpu_has_features(features, TARGET)
    return pytest.mark.skipif(missing, reason=f"this host lacks {' + '.join(features)}")


# Each code path on its own, whatever this host has: AVX2 alone (no VNNI, no AVX-512); VNNI on
# 256-bit registers (AVX-VNNI, no AVX-512); VNNI on 512-bit registers (AVX512-VNNI).
AVX2 = _cpu_target("haswell")
AVX_VNNI = _cpu_target("alderlake")
AVX512_VNNI = _cpu_target("cascadelake")
TARGETS = [
    pytest.param(TARGET, id="host"),
    pytest.param(AVX2, id="avx2"),
    pytest.param(AVX_VNNI, id="avx-vnni", marks=_runs_here(["avxvnni"])),
    pytest.param(
        AVX512_VNNI, id="avx512-vnni", marks=_runs_here(["avx512vnni", "avx512bw", "avx512vl"])
    ),
]


def _int64(value: int) -> tvm.tirx.IntImm:  # Relax gives every dimension as int64
    return tvm.tirx.IntImm("int64", value)


def _matmul_func(
    storage: str,
    has_residual: bool,
    rows: int | tvm.tirx.Var = 1,
    k_size: int = K,
    column_block: int = COLUMN_BLOCK,
) -> tvm.tirx.PrimFunc:
    """The fused function the model pipeline hands the schedule: x [rows, 1, k] @ W.T (+ a
    residual), W stored as `storage` in the layout a library with `column_block` reads it."""
    words = (N, k_size // codes_per_word(storage))
    codes = te.placeholder(blocked_shape(words, column_block), "uint32", name="codes")
    groups = blocked_shape((N, k_size // group_size(storage)), column_block)
    scale = te.placeholder(groups, "float32", name="scale")
    minimum = te.placeholder(groups, "float32", name="minimum")
    weights = [codes, scale, minimum] if has_minimum(storage) else [codes, scale]
    read = _value_reader(codes, tuple(weights[1:]), storage)
    weight = te.compute((_int64(N), _int64(k_size)), read, name=DEQUANTIZE_BLOCK)
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
    added = te.compute(out.shape, lambda *i: residual[i] + out[i], name=int8_gemm.RESIDUAL_BLOCK)
    return te.create_prim_func([x, *weights, residual, added])


def _packed_weight(storage: str, rng: np.random.Generator, k: int) -> PackedWeight:
    """A random [N, k] matrix, quantized as `storage`."""
    float_weight = rng.standard_normal((N, k)).astype(np.float32)
    if storage in (Q8_0, Q8_0_G16, Q8_1, Q8_1_G16):
        codes, scale = quantize_q8(float_weight, group_size(storage))
        if not has_minimum(storage):
            return PackedWeight(storage, pack_q8(codes), scale)
        # Unsigned 5-bit codes with a minimum, as GGUF's Q5_1 and Q5_K hold them.
        codes = (codes.astype(np.int16) + 128) // 8
        minimum = rng.standard_normal(scale.shape).astype(np.float32)
        return PackedWeight(storage, pack_q8(codes.astype(np.int8)), scale, minimum)
    if storage == Q4_1:
        codes, scale, minimum = quantize_asymmetric(float_weight)
        return PackedWeight(storage, pack_codes(codes), scale, minimum)
    codes, scale = quantize_symmetric(float_weight)
    return PackedWeight(storage, pack_codes(codes), scale)


def _compile(func: tvm.tirx.PrimFunc, target: tvm.target.Target = TARGET) -> tvm.ffi.Function:
    module = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    return tvm.compile(module, target)["main"]


def _run(
    run: tvm.ffi.Function, x: np.ndarray, packed: PackedWeight, residual: np.ndarray | None = None
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
    step = largest / np.float32(int8_gemm.LARGEST_CODE)
    inverse = np.float32(int8_gemm.LARGEST_CODE) / np.where(largest > 0, largest, 1)
    return (np.rint(groups * inverse) * step).reshape(x.shape)


def _assert_int8_result(got: np.ndarray, x: np.ndarray, packed: PackedWeight) -> None:
    """`got` is x @ W.T with x rounded to int8 per group, and only that."""
    weight = dequantize(packed).astype(np.float64)
    exact = x.astype(np.float64) @ weight.T
    scale = np.abs(exact).max()
    assert np.abs(got - int8_rounded(x).astype(np.float64) @ weight.T).max() < 1e-5 * scale
    # Each activation is off by at most half a step (1/254 of its group's largest).
    largest = np.repeat(np.abs(x.reshape(len(x), -1, GROUP_SIZE)).max(axis=2), GROUP_SIZE, axis=1)
    bound = (largest / (2 * int8_gemm.LARGEST_CODE)) @ np.abs(weight).T + 1e-5 * scale
    assert np.all(np.abs(got - exact) <= bound)
    assert np.abs(got - exact).max() > 1e-5 * scale  # the rounding is really there


@pytest.mark.parametrize(
    ("storage", "has_residual", "rows", "k_size"),
    # Whole row tiles, and every kind of remainder (tiles of 2 and 1 after them); one row (a
    # single decode, its row count known when compiled); a long reduction (k = 1536).
    [
        (Q4_1, True, 13, K),
        (Q4_1, False, 6, K),
        (Q4_0, True, 9, K),
        (Q4_0, False, 17, K),
        (Q4_1, True, 3, K),
        (Q4_0, True, 1, K),
        (Q4_1, False, 4, 1536),
        (Q8_0, True, 13, K),
        (Q8_0, False, 6, K),
        (Q8_0, True, 3, K),
        (Q8_0, False, 1, K),
        (Q8_0, False, 4, 1536),
        (Q8_1, True, 13, K),
        (Q8_1, False, 1, K),
        (Q8_0_G16, True, 9, K),
        (Q8_0_G16, False, 1, K),
        (Q8_1_G16, False, 6, K),
        (Q8_1_G16, True, 1, 1536),
    ],
)
@pytest.mark.parametrize("target", TARGETS)
def test_kernel_rounds_activations_to_int8_and_nothing_else(
    storage: str, has_residual: bool, rows: int, k_size: int, target: tvm.target.Target
) -> None:
    func = _matmul_func(storage, has_residual, _int64(rows), k_size)
    operands = int8_gemm.operands(func, target)
    assert operands is not None  # the kernel applies
    assert operands.bits == (4 if storage in (Q4_0, Q4_1) else 8)
    assert (operands.group, operands.has_minimum) == (group_size(storage), has_minimum(storage))
    assert operands.vnni == int8_gemm.has_vnni(target)
    wide = int8_gemm.has_wide_vnni(target)
    assert operands.lanes == (int8_gemm.WIDE_LANES if wide else int8_gemm.LANES)
    rng = np.random.default_rng(rows)
    packed = _packed_weight(storage, rng, k_size)
    x = rng.standard_normal((rows, k_size)).astype(np.float32)
    x[0, 5] = 40.0  # an outlier: its group's other activations get coarser steps
    x[-1, GROUP_SIZE : 2 * GROUP_SIZE] = 0.0  # a group of zeros: scale 0, nothing divided by it
    residual = rng.standard_normal((rows, N)).astype(np.float32) if has_residual else None
    run = _compile(func.with_body(int8_gemm.matmul_body(func, operands)), target)
    _assert_int8_result(_run(run, x, packed, residual), x, packed)


@pytest.mark.parametrize("storage", [Q4_1, Q8_0, Q8_1_G16])
def test_every_row_count_takes_the_int8_kernel(storage: str) -> None:
    """One kernel for a row count known only at run time, as in a decode step or a prefill."""
    func = schedule._schedule_matmul(
        _matmul_func(storage, False, tvm.tirx.Var("rows", "int64")), 8, TARGET
    )
    run = _compile(func)
    rng = np.random.default_rng(0)
    packed = _packed_weight(storage, rng, K)
    for rows in (1, 2, 8, 9, 64, 65, 100):
        x = rng.standard_normal((rows, K)).astype(np.float32)
        _assert_int8_result(_run(run, x, packed), x, packed)


@pytest.mark.parametrize("storage", [Q4_1, Q8_0, Q8_1_G16])
def test_row_by_row_weights_keep_the_float_schedules(storage: str) -> None:
    """A library without blocks (float16, no AVX2) reads the same codes row by row."""
    func = schedule._schedule_matmul(
        _matmul_func(storage, False, tvm.tirx.Var("rows", "int64"), column_block=0), 8, TARGET
    )
    run = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), TARGET)
    rng = np.random.default_rng(2)
    packed = _packed_weight(storage, rng, K)
    device = tvm.cpu()
    arrays = (packed.weight, packed.scale, packed.minimum)
    weights = [tvm.runtime.tensor(a, device) for a in arrays if a is not None]
    for rows in (1, 8, 100):
        x = rng.standard_normal((rows, K)).astype(np.float32)
        out = tvm.runtime.tensor(np.zeros((rows, 1, N), np.float32), device)
        run["main"](tvm.runtime.tensor(x[:, None, :], device), *weights, out)
        exact = x.astype(np.float64) @ dequantize(packed).T.astype(np.float64)
        assert np.abs(out.numpy()[:, 0, :] - exact).max() < 1e-5 * np.abs(exact).max(), rows


@pytest.mark.parametrize("storage", [Q4_0, Q8_0])
def test_each_row_gets_the_same_result_whatever_the_batch(storage: str) -> None:
    """Rounding is per row and the sums run in one order, so a sequence's logits do not depend
    on what else is decoded beside it."""
    run = _compile(
        schedule._schedule_matmul(
            _matmul_func(storage, True, tvm.tirx.Var("rows", "int64")), 8, TARGET
        )
    )
    rng = np.random.default_rng(1)
    packed = _packed_weight(storage, rng, K)
    x = rng.standard_normal((37, K)).astype(np.float32)
    residual = rng.standard_normal((37, N)).astype(np.float32)
    together = _run(run, x, packed, residual)
    for row in (0, 5, 36):
        alone = _run(run, x[row : row + 1], packed, residual[row : row + 1])
        np.testing.assert_array_equal(alone[0], together[row])


def test_other_matmuls_keep_the_float_schedules() -> None:
    assert not int8_gemm.applies(_matmul_func(Q4_1, True, column_block=0), TARGET)
    x = te.placeholder((1, K), "float32", name="x")
    w = te.placeholder((N, K), "float32", name="w")
    k = te.reduce_axis((0, K), name="k")
    out = te.compute((1, N), lambda i, n: te.sum(x[i, k] * w[n, k], axis=k), name=MATMUL_BLOCK)
    assert not int8_gemm.applies(te.create_prim_func([x, w, out]), TARGET)


def test_libraries_ask_for_blocks_only_where_the_kernel_runs() -> None:
    q4f32 = get_quantization("q4f32_1")
    assert int8_gemm.column_block(q4f32, TARGET) == COLUMN_BLOCK
    assert int8_gemm.column_block(get_quantization("q4f16_1"), TARGET) == 0
    assert int8_gemm.column_block(get_quantization("q0f32"), TARGET) == 0
    without_avx2 = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64"})
    assert int8_gemm.column_block(q4f32, without_avx2) == 0
    assert not int8_gemm.has_vnni(AVX2)
    assert int8_gemm.has_vnni(tvm.target.Target({"kind": "llvm", "mcpu": "alderlake"}))
    assert int8_gemm.has_vnni(tvm.target.Target({"kind": "llvm", "mcpu": "znver4"}))
    # 512-bit registers where AVX512-VNNI is there; AVX-VNNI alone keeps 256-bit ones.
    assert int8_gemm.has_wide_vnni(AVX512_VNNI)
    assert not int8_gemm.has_wide_vnni(AVX_VNNI)
    assert not int8_gemm.has_wide_vnni(
        tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})
    )


def test_blocks_of_columns_hold_each_column_word_major() -> None:
    words = np.arange(2 * COLUMN_BLOCK * 3, dtype=np.uint32).reshape(2 * COLUMN_BLOCK, 3)
    blocked = to_storage_layout(words, COLUMN_BLOCK)
    assert blocked.shape == (2, 3, COLUMN_BLOCK)
    assert blocked[1, 2, 5] == words[COLUMN_BLOCK + 5, 2]
    odd = np.zeros((COLUMN_BLOCK + 1, 3), np.uint32)  # rows that do not fill blocks stay rows
    assert to_storage_layout(odd, COLUMN_BLOCK) is odd
