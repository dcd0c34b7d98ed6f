"""Single-row 4-bit matmul on x86 AVX2, with the activations rounded to int16 per group.

At decode of one sequence each weight is used once, so the cost of a matmul is decoding the
weights. The float schedule (`schedule.py`) turns every 4-bit code into a float and multiplies
it into the sum; here the 32 activations of a quantization group are rounded to int16 once,
against the group's largest magnitude, and each group of codes meets them in two `vpmaddwd`
(16 products of int16 pairs summed into 8 int32 each), so that a group costs about 13
instructions where the float way takes about 24. Per column and group:

    sum_k w[n, k] x[k] = scale[n, g] * sx[g] * sum_k code[n, k] xq[k] + min[n, g] * sum_k x[k]

with `x[k] ~= sx[g] * xq[k]`, |xq| <= 32767: each activation is off by at most 1/65534 of
its group's largest, which keeps a 4-bit model within 1e-4 of its float reference. (int8
activations, as llama.cpp uses, would be off by 1/254, and were not taken for that reason.)

A group's 16 bytes of codes hold its even elements in their low nibbles and its odd ones in
their high nibbles (eight codes per little-endian uint32, see `quantization.py`), so the int16
activations of each group are stored evens first, then odds: each half then lines up with one
register of widened nibbles.

The kernel replaces the whole fused function: matmul, then an optional residual add.
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.script import tirx as T

from mlc_engine.engine.model.layers import DEQUANTIZE_BLOCK, MATMUL_BLOCK
from mlc_engine.engine.quantization import GROUP_SIZE

INT16_MAX = 32767.0
# Columns per parallel task, and columns one task works on at once (independent chains of
# multiply-adds; 4 measured best beside 2 and 8).
COLUMNS_PER_TASK = 16
COLUMN_TILE = 4
HALF = GROUP_SIZE // 2  # int16 lanes in one AVX2 register
LANES = 8  # int32 / float32 lanes in one AVX2 register
RESIDUAL_BLOCK = "T_add"


def applies(func: tirx.PrimFunc, target: tvm.target.Target) -> bool:
    """Whether `func` is a one-row 4-bit float32 matmul (plus residual) this kernel serves."""
    return _operands(func, target) is not None


def single_row_q4_matmul(func: tirx.PrimFunc, target: tvm.target.Target) -> tirx.PrimFunc:
    """The int16-activation kernel standing in for `func` (same parameters, same result)."""
    operands = _operands(func, target)
    assert operands is not None, "check applies() first"
    return _kernel(func, *operands)


def _operands(func: tirx.PrimFunc, target: tvm.target.Target) -> tuple[int, int, bool, bool] | None:
    """(k, n, has_minimum, has_residual) when `func` has the expected shape, else None."""
    from tvm.target import codegen

    if not codegen.llvm_cpu_has_features(["avx2"], target):
        return None
    sch = s_tir.Schedule(func)
    try:
        matmul = sch.get(sch.get_sblock(MATMUL_BLOCK))
        dequantize = sch.get(sch.get_sblock(DEQUANTIZE_BLOCK))
    except s_tir.schedule.ScheduleError:
        return None
    blocks = {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}
    if blocks - {"root", MATMUL_BLOCK, DEQUANTIZE_BLOCK, RESIDUAL_BLOCK}:
        return None
    has_residual = RESIDUAL_BLOCK in blocks
    weights = [region.source for region in dequantize.reads]
    x = next(r.source for r in matmul.reads if r.source.name != dequantize.writes[0].source.name)
    params = list(func.params)
    packed = next((b for b in weights if b.dtype == "uint32"), None)
    expected = len(weights) + 2 + has_residual
    if packed is None or len(params) != expected or not params[0].same_as(x):
        return None
    if any(str(p.dtype) != "float32" for p in params if not p.same_as(packed)):
        return None
    if not all(isinstance(d, tirx.IntImm) for p in params for d in p.shape):
        return None
    rows = 1
    for d in x.shape[:-1]:
        rows *= int(d)
    n, k = (int(d) for d in packed.shape)
    k *= 32 // 4  # eight codes per word
    if rows != 1 or n % COLUMNS_PER_TASK or k % GROUP_SIZE:
        return None
    # The kernel declares x, codes, scale, [minimum], [residual], out: the weights in the order
    # `Q4Weight.tensors()` passes them.
    operands = params[1 : 1 + len(weights)]
    if not operands[0].same_as(packed) or {p.name for p in operands} != {b.name for b in weights}:
        return None
    return k, n, len(weights) == 3, has_residual


def _group_dot(
    code_bytes: tirx.Buffer, xq: tirx.Buffer, column: tirx.PrimExpr, g: tirx.PrimExpr, k: int
) -> tirx.PrimExpr:
    """sum_k code[column, k] * xq[k] over group g, as 8 int32 partial sums."""
    pmaddwd = tvm.target.codegen.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd")
    packed = code_bytes[tirx.Ramp(column * (k // 2) + g * HALF, 1, HALF)]
    low = tirx.const(15, "uint8")
    evens = (packed & tirx.Broadcast(low, HALF)).astype("int16x16")
    odds = tirx.shift_right(packed, tirx.Broadcast(tirx.const(4, "uint8"), HALF)).astype("int16x16")
    return tirx.call_llvm_pure_intrin(
        "int32x8", pmaddwd, evens, xq[tirx.Ramp(g * GROUP_SIZE, 1, HALF)]
    ) + tirx.call_llvm_pure_intrin(
        "int32x8", pmaddwd, odds, xq[tirx.Ramp(g * GROUP_SIZE + HALF, 1, HALF)]
    )


def _minimum(
    scale: tirx.Buffer,
    minimum: tirx.Buffer,
    column: tirx.PrimExpr,
    g: tirx.PrimExpr,
    has_minimum: bool,
) -> tirx.PrimExpr:
    """The weight a code of 0 stands for, in column's group g (symmetric codes centre on 8)."""
    if has_minimum:
        return minimum[column, g]
    return tirx.const(-8.0, "float32") * scale[column, g]


def _total(
    sums: tirx.Buffer,
    minimums: tirx.Buffer,
    residual: tirx.Buffer,
    column: tirx.PrimExpr,
    c: tirx.PrimExpr,
    has_residual: bool,
) -> tirx.PrimExpr:
    lanes = [sums[c, lane] for lane in range(LANES)]
    while len(lanes) > 1:
        lanes = [lanes[i] + lanes[i + 1] for i in range(0, len(lanes), 2)]
    total = minimums[c] + lanes[0]
    return residual[column] + total if has_residual else total


def _kernel(
    func: tirx.PrimFunc, k: int, n: int, has_minimum: bool, has_residual: bool
) -> tirx.PrimFunc:
    groups = k // GROUP_SIZE
    tiles = COLUMNS_PER_TASK // COLUMN_TILE
    shapes = [[int(d) for d in p.shape] for p in func.params]
    x_shape, scale_shape, out_shape = shapes[0], shapes[2], shapes[-1]

    @T.macro
    def body(x_arg, codes_arg, scale_arg, minimum_arg, residual_arg, out_arg):
        x_in = T.match_buffer(x_arg, x_shape, "float32")
        codes = T.match_buffer(codes_arg, (n, k // 8), "uint32")
        scale = T.match_buffer(scale_arg, scale_shape, "float32")
        minimum = T.match_buffer(minimum_arg, scale_shape, "float32") if has_minimum else scale
        out_in = T.match_buffer(out_arg, out_shape, "float32")
        residual_in = T.match_buffer(residual_arg, out_shape, "float32") if has_residual else out_in
        x = T.decl_buffer((k,), "float32", data=x_in.data)
        out = T.decl_buffer((n,), "float32", data=out_in.data)
        residual = T.decl_buffer((n,), "float32", data=residual_in.data)
        code_bytes = T.decl_buffer((n * k // 2,), "uint8", data=codes.data)
        xq = T.alloc_buffer((k,), "int16")
        x_scale = T.alloc_buffer((groups,), "float32")
        x_sum = T.alloc_buffer((groups,), "float32")
        largest = T.alloc_buffer((1,), "float32")
        for g in range(groups):
            largest[0] = T.float32(0)
            x_sum[g] = T.float32(0)
            for j in range(GROUP_SIZE):
                largest[0] = T.max(largest[0], T.fabs(x[g * GROUP_SIZE + j]))
                x_sum[g] += x[g * GROUP_SIZE + j]
            x_scale[g] = largest[0] / T.float32(INT16_MAX)
            for j in range(GROUP_SIZE):
                xq[g * GROUP_SIZE + (j % 2) * HALF + j // 2] = T.Cast(
                    "int16",
                    T.round(
                        x[g * GROUP_SIZE + j]
                        * T.if_then_else(
                            largest[0] > 0, T.float32(INT16_MAX) / largest[0], T.float32(0)
                        )
                    ),
                )
        for task in T.parallel(n // COLUMNS_PER_TASK):
            sums = T.alloc_buffer((COLUMN_TILE, LANES), "float32")
            minimums = T.alloc_buffer((COLUMN_TILE,), "float32")
            for tile in range(tiles):
                for c in range(COLUMN_TILE):
                    for lane in T.vectorized(LANES):
                        sums[c, lane] = T.float32(0)
                    minimums[c] = T.float32(0)
                for g in range(groups):
                    for c in T.unroll(COLUMN_TILE):
                        # Expressions are written out, not bound to names: TVM stores a named
                        # value to memory and loads it back.
                        sums[c, T.ramp(0, 1, LANES)] = sums[c, T.ramp(0, 1, LANES)] + T.Cast(
                            "float32x8",
                            _group_dot(
                                code_bytes,
                                xq,
                                task * COLUMNS_PER_TASK + tile * COLUMN_TILE + c,
                                g,
                                k,
                            ),
                        ) * T.Broadcast(
                            scale[task * COLUMNS_PER_TASK + tile * COLUMN_TILE + c, g] * x_scale[g],
                            LANES,
                        )
                        minimums[c] += (
                            _minimum(
                                scale,
                                minimum,
                                task * COLUMNS_PER_TASK + tile * COLUMN_TILE + c,
                                g,
                                has_minimum,
                            )
                            * x_sum[g]
                        )
                for c in range(COLUMN_TILE):
                    out[task * COLUMNS_PER_TASK + tile * COLUMN_TILE + c] = _total(
                        sums,
                        minimums,
                        residual,
                        task * COLUMNS_PER_TASK + tile * COLUMN_TILE + c,
                        c,
                        has_residual,
                    )

    # One parameter list per variant; absent operands are None (the body never reads them).
    if has_minimum and has_residual:

        @T.prim_func(private=True)
        def kernel(
            x: T.handle,
            codes: T.handle,
            scale: T.handle,
            minimum: T.handle,
            residual: T.handle,
            out: T.handle,
        ):
            body(x, codes, scale, minimum, residual, out)

    elif has_minimum:

        @T.prim_func(private=True)
        def kernel(x: T.handle, codes: T.handle, scale: T.handle, minimum: T.handle, out: T.handle):
            body(x, codes, scale, minimum, None, out)

    elif has_residual:

        @T.prim_func(private=True)
        def kernel(
            x: T.handle, codes: T.handle, scale: T.handle, residual: T.handle, out: T.handle
        ):
            body(x, codes, scale, None, residual, out)

    else:

        @T.prim_func(private=True)
        def kernel(x: T.handle, codes: T.handle, scale: T.handle, out: T.handle):
            body(x, codes, scale, None, None, out)

    return kernel.with_attrs(func.attrs)
