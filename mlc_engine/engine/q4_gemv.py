"""Single-row 4-bit matmul on x86 AVX2, with the activations rounded to int16 per group.

At decode of one sequence each weight is used once, so the cost of a matmul is decoding the
weights. The float schedule (`schedule.py`) turns every 4-bit code into a float and multiplies
it into the sum; here the 32 activations of a quantization group are rounded to int16 once,
against the group's largest magnitude, and each group of codes meets them in two `vpmaddwd`
(16 products of int16 pairs summed into 8 int32 each), so that a group costs about 13
instructions where the float way takes about 24. Per column and group:

    sum_k w[n, k] x[k] = scale[n, g] * sx[g] * sum_k code[n, k] xq[k] + min[n, g] * sum_k x[k]

with `x[k] ~= sx[g] * xq[k]`, |xq| <= 32767: each activation is off by at most 1/65534 of
its group's largest. A single-sequence decode of SmolLM2 then moves its logits by about 2e-4
of the largest one, against 1e-6 for the float schedule. (int8 activations, as llama.cpp uses,
would be off by 1/254 of the largest, and were not taken for that reason.)

A group's 16 bytes of codes hold its even elements in their low nibbles and its odd ones in
their high nibbles (eight codes per little-endian uint32, see `quantization.py`), so the int16
activations of each group are stored evens first, then odds: each half then lines up with one
register of widened nibbles.

The kernel replaces the whole fused function: matmul, then an optional residual add.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import tvm
from tvm import s_tir, tirx
from tvm.script import tirx as T

from mlc_engine.engine.model.layers import DEQUANTIZE_BLOCK, MATMUL_BLOCK
from mlc_engine.engine.quantization import CODES_PER_WORD, GROUP_SIZE

INT16_MAX = 32767.0
# Columns per parallel task.
COLUMNS_PER_TASK = 16
# A task works on up to 4 columns at once (independent chains of multiply-adds), while their
# codes lie within this many bytes: the columns are read side by side, and with weights coming
# from memory rather than cache, 4 columns of 768 bytes (k = 1536) streamed at half the speed of
# 4 of 288 bytes, or of one column of 768 at a time.
TILE_SPAN_BYTES = 1152
HALF = GROUP_SIZE // 2  # int16 lanes in one AVX2 register
LANES = 8  # int32 / float32 lanes in one AVX2 register
RESIDUAL_BLOCK = "T_add"


def applies(func: tirx.PrimFunc, target: tvm.target.Target) -> bool:
    """Whether `func` is a one-row 4-bit float32 matmul (plus residual) this kernel serves."""
    operands = q4_operands(func, target)
    return (
        operands is not None
        and isinstance(operands.rows, tirx.IntImm)
        and operands.rows.value == 1
        and operands.n % COLUMNS_PER_TASK == 0
        and all(isinstance(d, tirx.IntImm) for p in func.params for d in p.shape)
    )


def single_row_q4_matmul(func: tirx.PrimFunc, target: tvm.target.Target) -> tirx.PrimFunc:
    """The int16-activation kernel standing in for `func` (same parameters, same result)."""
    operands = q4_operands(func, target)
    assert operands is not None and applies(func, target), "check applies() first"
    return _kernel(func, operands.k, operands.n, operands.has_minimum, operands.has_residual)


@dataclasses.dataclass(frozen=True)
class Q4Operands:
    """The shape of a 4-bit float32 matmul the int16 kernels can stand in for."""

    rows: tirx.PrimExpr  # rows of x (a constant, or symbolic)
    k: int
    n: int
    has_minimum: bool
    has_residual: bool


def q4_operands(func: tirx.PrimFunc, target: tvm.target.Target) -> Q4Operands | None:
    """What the int16 kernels need to know of `func`, when it is a matmul of float32 rows by a
    4-bit matrix (whose shape is constant), optionally plus a residual, on AVX2; else None."""
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
    if not all(isinstance(d, tirx.IntImm) for p in weights for d in p.shape):
        return None
    n, k = (int(d) for d in packed.shape)
    k *= CODES_PER_WORD
    if k % GROUP_SIZE:
        return None
    # The kernels declare x, codes, scale, [minimum], [residual], out: the weights in the order
    # `Q4Weight.tensors()` passes them.
    operands = params[1 : 1 + len(weights)]
    if not operands[0].same_as(packed) or {p.name for p in operands} != {b.name for b in weights}:
        return None
    rows: tirx.PrimExpr = tirx.IntImm("int64", 1)
    for d in x.shape[:-1]:
        rows = rows * d.astype("int64")
    rows = tvm.sym.Analyzer().simplify(rows)
    return Q4Operands(rows, k, n, len(weights) == 3, has_residual)


def _group_dot(
    code_bytes: tirx.Buffer, xq: tirx.Buffer, column: tirx.PrimExpr, g: tirx.PrimExpr, k: int
) -> tirx.PrimExpr:
    """sum_k code[column, k] * xq[k] over group g, as 8 int32 partial sums."""
    pmaddwd = tvm.target.codegen.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd")
    # Each byte widened to 16 bits, then split: its low nibble, and (shifted down) its high one.
    widened = code_bytes[tirx.Ramp(column * (k // 2) + g * HALF, 1, HALF)].astype("int16x16")
    evens = widened & tirx.Broadcast(tirx.const(15, "int16"), HALF)
    odds = tirx.shift_right(widened, tirx.Broadcast(tirx.const(4, "int16"), HALF))
    return tirx.call_llvm_pure_intrin(
        "int32x8", pmaddwd, evens, xq[tirx.Ramp(g * GROUP_SIZE, 1, HALF)]
    ) + tirx.call_llvm_pure_intrin(
        "int32x8", pmaddwd, odds, xq[tirx.Ramp(g * GROUP_SIZE + HALF, 1, HALF)]
    )


def tree(
    combine: Callable[[tirx.PrimExpr, tirx.PrimExpr], tirx.PrimExpr], terms: list[tirx.PrimExpr]
) -> tirx.PrimExpr:
    """The terms combined pairwise, as a balanced tree."""
    while len(terms) > 1:
        terms = [combine(terms[i], terms[i + 1]) for i in range(0, len(terms), 2)]
    return terms[0]


def largest_at(x: tirx.Buffer, start: tirx.PrimExpr) -> tirx.PrimExpr:
    """The largest magnitude in the group of x that begins at `start`."""
    values = [tirx.abs(x[start + j]) for j in range(GROUP_SIZE)]
    return tree(tirx.max, values)


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
    total = minimums[c] + tree(tirx.Add, [sums[c, lane] for lane in range(LANES)])
    return residual[column] + total if has_residual else total


def _kernel(
    func: tirx.PrimFunc, k: int, n: int, has_minimum: bool, has_residual: bool
) -> tirx.PrimFunc:
    groups = k // GROUP_SIZE
    column_tile = next(t for t in (4, 2, 1) if t == 1 or t * k // 2 <= TILE_SPAN_BYTES)
    tiles = COLUMNS_PER_TASK // column_tile
    shapes = [[int(d) for d in p.shape] for p in func.params]
    x_shape, scale_shape, out_shape = shapes[0], shapes[2], shapes[-1]

    def column(task: tirx.PrimExpr, tile: tirx.PrimExpr, c: tirx.PrimExpr) -> tirx.PrimExpr:
        return task * COLUMNS_PER_TASK + tile * column_tile + c

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
        # Each group's largest magnitude and sum, as expression trees over its 32 values
        # (which LLVM vectorizes), then its evens and its odds rounded 16 at a time.
        for g in range(groups):
            x_sum[g] = tree(T.Add, [x[g * GROUP_SIZE + j] for j in range(GROUP_SIZE)])
            x_scale[g] = largest_at(x, g * GROUP_SIZE) / T.float32(INT16_MAX)
            for half in range(2):
                xq[T.ramp(g * GROUP_SIZE + half * HALF, 1, HALF)] = T.Cast(
                    "int16x16",
                    T.round(
                        x[T.ramp(g * GROUP_SIZE + half, 2, HALF)]
                        * T.Broadcast(
                            T.if_then_else(
                                x_scale[g] > 0,
                                T.float32(INT16_MAX) / largest_at(x, g * GROUP_SIZE),
                                0.0,
                            ),
                            HALF,
                        )
                    ),
                )
        for task in T.parallel(n // COLUMNS_PER_TASK):
            sums = T.alloc_buffer((column_tile, LANES), "float32")
            minimums = T.alloc_buffer((column_tile,), "float32")
            for tile in range(tiles):
                for c in range(column_tile):
                    for lane in T.vectorized(LANES):
                        sums[c, lane] = T.float32(0)
                    minimums[c] = T.float32(0)
                for g in range(groups):
                    for c in T.unroll(column_tile):
                        # Expressions are written out, not bound to names: TVM stores a named
                        # value to memory and loads it back.
                        sums[c, T.ramp(0, 1, LANES)] = sums[c, T.ramp(0, 1, LANES)] + T.Cast(
                            "float32x8",
                            _group_dot(code_bytes, xq, column(task, tile, c), g, k),
                        ) * T.Broadcast(
                            scale[column(task, tile, c), g] * x_scale[g],
                            LANES,
                        )
                        minimums[c] += (
                            _minimum(scale, minimum, column(task, tile, c), g, has_minimum)
                            * x_sum[g]
                        )
                for c in range(column_tile):
                    out[column(task, tile, c)] = _total(
                        sums, minimums, residual, column(task, tile, c), c, has_residual
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
