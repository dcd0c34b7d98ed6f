"""4-bit matmul over 9 to 64 rows on x86 AVX2, with the activations rounded to int16 per group.

Used for batched decode steps and short prefill chunks (`schedule.py` picks it by row count).
The float schedule runs rows through FMAs, 8 products each. Here the 32 activations of each
row's quantization group are rounded to int16, as in `q4_gemv.py` (within 1/65534 of the group's
largest), and meet the codes in `vpmaddwd`, 16 products each, with columns in the SIMD lanes:

    dot[r, n] += pmaddwd(codes of 8 columns at k and k', broadcast(xq[r, k], xq[r, k']))

Each int32 lane of a code register holds one column's codes for a pair of k, the low half for k
and the high half for k'. A packed word holds 8 consecutive codes of one column (nibble j is
k = 8w + j); shifting it right by 4j and masking with 0x000F000F leaves nibble j in the low half
and nibble j + 4 in the high one, so the pairs are (8w + j, 8w + j + 4), and the int16
activations are stored in that order: x[0], x[4], x[1], x[5], x[2], x[6], x[3], x[7] per word.

A column's codes lie in a row of the packed matrix, so each task first transposes the words of
its 16 columns into a small buffer (a word of each of 8 columns per SIMD load), with their scales
and minimums, and then runs every row over it: tiles of 6 rows by 8 columns, whose int32 sums
are turned to float and scaled once per group:

    out[r, n] = sum_g scale[n, g] * sx[r, g] * dot[r, n, g] + minimum[n, g] * sum_{k in g} x[r, k]

Measured on SmolLM2's shapes (Zen 3, one thread), it does 1.1-1.25x the float schedule's work
per second from 12 to 64 rows; beyond 64 rows the float one is as fast, and up to 8 the float
matrix-vector schedule is faster. The transposition, paid once per call, is about a tenth of the
time at 16 rows.
"""

from __future__ import annotations

import tvm
from tvm import tirx
from tvm.script import tirx as T

from mlc_engine.engine import q4_gemv
from mlc_engine.engine.quantization import CODES_PER_WORD, GROUP_SIZE

# Rows per register tile: their int32 sums and float accumulators, one register each, with the
# code word, its pair and a broadcast pair, fill the 16 AVX2 registers. (6 rows ran 4% faster
# than 4. Two column registers per tile, or the group's words unrolled, spilled registers.)
ROW_TILE = 6
# Row counts up to this go to this kernel (above the float matrix-vector schedule's 8); beyond
# it the float matrix-matrix schedule is as fast.
MAX_ROWS = 64
LANES = 8
# Columns per parallel task: two SIMD registers of them.
COLUMNS_PER_TASK = 2 * LANES
WORDS_PER_GROUP = GROUP_SIZE // CODES_PER_WORD
HALF_WORD = CODES_PER_WORD // 2
# The pair order within a word, as positions in x: (j, j + 4) for j = 0..3.
PAIR_ORDER = [i // 2 + (i % 2) * HALF_WORD for i in range(CODES_PER_WORD)]


def applies(func: tirx.PrimFunc, target: tvm.target.Target) -> bool:
    """Whether `func` is a 4-bit float32 matmul (plus residual) this kernel serves."""
    operands = q4_gemv.q4_operands(func, target)
    return (
        operands is not None
        and operands.n % COLUMNS_PER_TASK == 0
        and operands.k % (LANES * CODES_PER_WORD) == 0  # whole 8 x 8 blocks of words
    )


def multi_row_body(func: tirx.PrimFunc, target: tvm.target.Target) -> tirx.Stmt:
    """The kernel's body over `func`'s own parameters, for any number of rows."""
    operands = q4_gemv.q4_operands(func, target)
    assert operands is not None and applies(func, target), "check applies() first"
    rows, k, n = operands.rows, operands.k, operands.n
    has_minimum, has_residual = operands.has_minimum, operands.has_residual
    pmaddwd = tvm.target.codegen.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd")
    params = list(func.params)
    x_param, codes_param, scale_param = params[:3]
    minimum_param = params[3] if has_minimum else scale_param
    out_param = params[-1]
    residual_param = params[-2] if has_residual else out_param
    groups = k // GROUP_SIZE
    words = k // CODES_PER_WORD
    m = rows.astype("int32")
    columns = COLUMNS_PER_TASK
    registers = columns // LANES

    def pair_products(codes_t, xq32, g, w, c, j, row):
        """pmaddwd of one word's pair j for 8 columns with row's matching int16 pair."""
        word_vector = codes_t[T.ramp((g * WORDS_PER_GROUP + w) * columns + c * LANES, 1, LANES)]
        pair_codes = T.bitwise_and(
            T.shift_right(word_vector, T.Broadcast(T.uint32(4 * j), LANES)),
            T.Broadcast(T.uint32(0x000F000F), LANES),
        )
        pair_x = T.Broadcast(xq32[(row * k + g * GROUP_SIZE + w * CODES_PER_WORD) // 2 + j], LANES)
        return T.call_llvm_pure_intrin(
            "int32x8",
            pmaddwd,
            T.reinterpret("int16x16", pair_codes),
            T.reinterpret("int16x16", pair_x),
        )

    @T.macro
    def row_tile(buffers, task, c, r0, tile):
        """Rows r0 .. r0 + tile - 1 by the 8 columns c of the task."""
        codes_t, scales_t, offsets_t, xq32, x_scale, x_sum, out, residual = buffers
        acc = T.alloc_buffer((tile * LANES,), "float32")
        dots = T.alloc_buffer((tile * LANES,), "int32")
        for r in T.unroll(tile):
            acc[T.ramp(r * LANES, 1, LANES)] = T.Broadcast(T.float32(0), LANES)
        for g in range(groups):
            for r in T.unroll(tile):
                dots[T.ramp(r * LANES, 1, LANES)] = T.Broadcast(T.int32(0), LANES)
            for w in range(WORDS_PER_GROUP):
                for j in T.unroll(HALF_WORD):
                    for r in T.unroll(tile):
                        dots[T.ramp(r * LANES, 1, LANES)] = dots[
                            T.ramp(r * LANES, 1, LANES)
                        ] + pair_products(codes_t, xq32, g, w, c, j, r0 + r)
            for r in T.unroll(tile):
                acc[T.ramp(r * LANES, 1, LANES)] = (
                    acc[T.ramp(r * LANES, 1, LANES)]
                    + T.Cast("float32x8", dots[T.ramp(r * LANES, 1, LANES)])
                    * (
                        scales_t[T.ramp(g * columns + c * LANES, 1, LANES)]
                        * T.Broadcast(x_scale[(r0 + r) * groups + g], LANES)
                    )
                    + offsets_t[T.ramp(g * columns + c * LANES, 1, LANES)]
                    * T.Broadcast(x_sum[(r0 + r) * groups + g], LANES)
                )
        for r in T.unroll(tile):
            if has_residual:
                out[T.ramp((r0 + r) * n + task * columns + c * LANES, 1, LANES)] = (
                    residual[T.ramp((r0 + r) * n + task * columns + c * LANES, 1, LANES)]
                    + acc[T.ramp(r * LANES, 1, LANES)]
                )
            else:
                out[T.ramp((r0 + r) * n + task * columns + c * LANES, 1, LANES)] = acc[
                    T.ramp(r * LANES, 1, LANES)
                ]

    @T.prim_func(private=True, check_well_formed=False)
    def kernel():
        x = T.decl_buffer((m * k,), "float32", data=x_param.data)
        codes = T.decl_buffer((n * words,), "uint32", data=codes_param.data)
        scale = T.decl_buffer((n * groups,), "float32", data=scale_param.data)
        minimum = T.decl_buffer((n * groups,), "float32", data=minimum_param.data)
        out = T.decl_buffer((m * n,), "float32", data=out_param.data)
        residual = T.decl_buffer((m * n,), "float32", data=residual_param.data)
        xq = T.alloc_buffer((m * k,), "int16")
        xq32 = T.decl_buffer((m * k // 2,), "int32", data=xq.data)
        x_scale = T.alloc_buffer((m * groups,), "float32")
        x_sum = T.alloc_buffer((m * groups,), "float32")
        for r, g in T.grid(m, groups):
            base = r * k + g * GROUP_SIZE
            x_sum[r * groups + g] = q4_gemv.tree(T.Add, [x[base + i] for i in range(GROUP_SIZE)])
            x_scale[r * groups + g] = q4_gemv.largest_at(x, base) / T.float32(q4_gemv.INT16_MAX)
            for w in range(WORDS_PER_GROUP):
                xq[T.ramp(base + w * CODES_PER_WORD, 1, CODES_PER_WORD)] = T.Cast(
                    "int16x8",
                    T.round(
                        T.Shuffle(
                            [x[T.ramp(base + w * CODES_PER_WORD, 1, CODES_PER_WORD)]], PAIR_ORDER
                        )
                        * T.Broadcast(
                            T.if_then_else(
                                x_scale[r * groups + g] > 0,
                                T.float32(q4_gemv.INT16_MAX) / q4_gemv.largest_at(x, base),
                                0.0,
                            ),
                            CODES_PER_WORD,
                        )
                    ),
                )
        for task in T.parallel(n // columns):
            codes_t = T.alloc_buffer((words * columns,), "uint32")
            scales_t = T.alloc_buffer((groups * columns,), "float32")
            offsets_t = T.alloc_buffer((groups * columns,), "float32")
            # 8 words of 8 columns at a time: eight loads, one shuffle per transposed vector.
            for wb, cb in T.grid(words // LANES, registers):
                for w in T.unroll(LANES):
                    codes_t[T.ramp((wb * LANES + w) * columns + cb * LANES, 1, LANES)] = T.Shuffle(
                        [
                            codes[
                                T.ramp(
                                    (task * columns + cb * LANES + c) * words + wb * LANES, 1, LANES
                                )
                            ]
                            for c in range(LANES)
                        ],
                        [c * LANES + w for c in range(LANES)],
                    )
            for c, g in T.grid(columns, groups):
                scales_t[g * columns + c] = scale[(task * columns + c) * groups + g]
                offsets_t[g * columns + c] = (
                    minimum[(task * columns + c) * groups + g]
                    if has_minimum
                    else T.float32(-8) * scale[(task * columns + c) * groups + g]
                )
            buffers = (codes_t, scales_t, offsets_t, xq32, x_scale, x_sum, out, residual)
            for c in range(registers):
                for t in range(m // ROW_TILE):
                    row_tile(buffers, task, c, t * ROW_TILE, ROW_TILE)
                # The last m % ROW_TILE rows, as tiles of 4, 2 and 1 (sizes known when compiled).
                if ROW_TILE > 4 and m % ROW_TILE >= 4:
                    row_tile(buffers, task, c, m // ROW_TILE * ROW_TILE, 4)
                if ROW_TILE > 2 and m % ROW_TILE % 4 >= 2:
                    row_tile(buffers, task, c, m - m % 2 - 2, 2)
                if m % 2 == 1:
                    row_tile(buffers, task, c, m - 1, 1)

    return kernel.body
