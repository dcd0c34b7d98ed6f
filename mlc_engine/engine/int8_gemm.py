"""4- and 8-bit float32 matmuls on x86 AVX2 (and AVX-512), with the activations rounded to int8.

Every quantized float32 matmul of a library for AVX2 runs here (`schedule.py`): decode steps,
alone or batched, and prefill chunks. The float schedules turn every 4-bit code into a float and
multiply it in, 8 products per FMA. Here each row's 32 activations of a quantization group are
rounded to int8 against the group's largest magnitude, as llama.cpp does on CPUs (within 1/254
of it), and meet the codes in `vpmaddubsw`, 32 products (unsigned codes by signed activations)
each:

    out[r, n] = sum_g sx[r, g] * (scale[n, g] * dot[r, n, g] + offset[n, g] * sum_{k in g} xq[r, k])

with `x[r, k] ~= sx[r, g] * xq[r, k]`, `dot` the integer sum of code * xq over the group, and
`offset` the group's minimum (or -8 * scale for symmetric codes): exactly the matmul of the
rounded rows. On SmolLM2 this moved perplexity by 0.3-0.4%, where the 4-bit weights themselves
cost 7% (q4f32_m) and 49% (q4f32_1) (benchmarks/README.md).

Columns sit in the SIMD lanes, and the weights come in blocks of 16 columns, word-major (the
library asks the runtime for `quantization.COLUMN_BLOCK` blocks), so a load gives one packed
word of each of 8 columns: 8 consecutive codes of a column, code j in nibble j. Masked with
0x0F0F0F0F it leaves codes 0, 2, 4, 6 in its bytes; shifted right by 4 first, codes 1, 3, 5,
7. Each meets a broadcast of the row's 4 matching int8 activations (stored in that order,
evens then odds, per word), and `vpmaddubsw` leaves two int16 sums of two products per column.
A group puts 16 products into each int16 lane (4 words, their even and odd codes), at most
16 * 15 * 127 = 30480 < 2^15, so they are added as int16 and widened (`vpmaddwd` by ones) once
per group, then scaled in float.

8-bit weights (GGUF's Q8_0: `w = scale * code`, codes signed) come four codes to a word, so a
load gives 4 consecutive codes of each of 8 columns, and they meet a broadcast of the row's 4
matching activations. `vpmaddubsw` and `vpdpbusd` multiply unsigned by signed bytes. With
VNNI, the codes go in with their sign bit flipped (code + 128, unsigned), so a word meets each
row in one `vpdpbusd`, and each group's int32 sums start from -128 times the sum of its rounded
activations, which takes the 128s out again, exactly: a third of the instructions of the signs
below (Q8_0: prefill 1.25x, decode x16 1.26x). Without it, as llama.cpp's q8_0 dot
does, the activations go in as magnitudes (`|xq|`, kept beside `xq`) and the codes take their
signs (`vpsignb`); two such products reach 2 * 127 * 128, so each word's int16 sums are widened
at once, and a group's are added as int32. 8-bit codes may have a minimum (GGUF's Q5_1,
and Q5_K's sub-blocks), which adds the offset term as for 4-bit codes, and a scale per 16
(Q6_K's sub-blocks): activations are still rounded in groups of 32, each covering two weight
groups, with a sum of its rounded values per weight group.

Rows go through in tiles of 4 (their int16 sums and float accumulators, one register each, with
the codes and a broadcast, fill the 16 AVX2 registers; 3 to 6 rows ran as fast), or 8 where
AVX-512 gives 32 registers, then the rest in tiles of 4, 2 and 1. (Tiles over both column
registers of a block ran a single row 1.2x faster with the weights in cache, but no faster in a
decode, where they come from memory.)

With AVX512-VNNI (and AVX512BW: Cascade Lake and later; Zen 4 too, not measured) it runs on
512-bit registers: one holds a whole block of 16 columns, so each `vpdpbusd` does 64 products,
each broadcast of a row's 4 activations (folded into the `vpdpbusd` as a memory operand) serves
16 columns, and the codes' masks, shifts and XORs and the float steps per group are half as
many. On the Xeon, against the same kernel on 256-bit registers in one process: SmolLM2's
matmuls alone 1.09-1.35x (576 to 3072, 960 and 576, 1536 to 576, at 1, 16 and 512 rows, 4- and
8-bit codes alike); in the library, decode x1 1.07-1.11x, decode x16 1.15-1.18x, prefill 512
1.16-1.21x (q4f32_m and a Q8_0 file). Tiles stay at 8 rows: 10 and 12 ran 0.95-1.08x of 8 at
64 and 512 rows and 0.89-1.01x at 16; 16 rows 0.87-1.01x at 512 and 0.73-0.87x at one row. The
paths without VNNI stay on 256-bit registers (AVX-512 has no `vpsignb`), as does AVX-VNNI
without AVX-512.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import tvm
from tvm import s_tir, tirx
from tvm.script import tirx as T

from mlc_engine.engine.model.layers import DEQUANTIZE_BLOCK, MATMUL_BLOCK
from mlc_engine.engine.quantization import COLUMN_BLOCK, GROUP_SIZE, Quantization
from mlc_engine.engine.tvm_compat import Analyzer, region_buffer

LARGEST_CODE = 127  # int8 activations
# Rows a tile runs over the same codes: each takes two registers (its float and int sums), so 4
# fill AVX2's 16 with the codes and broadcasts; with AVX-512's 32, 8 (on ymm registers, decode
# x16 1.08x on the Xeon; on zmm, 10, 12 or 16 rows ran no faster).
ROW_TILE = 4
WIDE_ROW_TILE = 8
# From this many rows, the activations are rounded in parallel (at fewer, a launch costs more).
PARALLEL_ROUNDING_ROWS = 4
LANES = 8  # int32 / float32 lanes of an AVX2 register
WIDE_LANES = 16  # of an AVX-512 one: a whole block of COLUMN_BLOCK columns
# The order of a 4-bit word's activations: its even codes (low nibbles of its bytes), then its
# odd. 8-bit words keep theirs in order.
WORD_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
RESIDUAL_BLOCK = "T_add"


def column_block(quant: Quantization, target: tvm.target.Target) -> int:
    """The layout of quantized arrays a library for `target` asks for: blocks of COLUMN_BLOCK
    columns where this kernel runs (float32 quantized matmuls on AVX2), else 0 (row by row)."""
    from tvm.target import codegen

    if not quant.quantized or quant.dtype != "float32" or target.kind.name != "llvm":
        return 0
    return COLUMN_BLOCK if codegen.llvm_cpu_has_features(["avx2"], target) else 0


@dataclasses.dataclass(frozen=True)
class Operands:
    """The shape of a quantized float32 matmul this kernel can stand in for."""

    rows: tirx.PrimExpr  # rows of x (a constant, or symbolic)
    k: int
    n: int
    bits: int  # of a weight code: 4 or 8
    has_minimum: bool
    group: int  # elements per scale (and minimum) of the weights: 32, or 16 for 8-bit codes
    has_residual: bool
    vnni: bool  # vpdpbusd: 4 products of unsigned by signed bytes added into each int32 lane
    row_tile: int  # ROW_TILE, or WIDE_ROW_TILE where the target has 32 vector registers
    lanes: int = LANES  # of a register: LANES, or WIDE_LANES where `has_wide_vnni`

    @property
    def codes_per_word(self) -> int:
        return 32 // self.bits

    @property
    def words_per_group(self) -> int:
        """Words of codes per weight group."""
        return self.group // self.codes_per_word


def operands(func: tirx.PrimFunc, target: tvm.target.Target) -> Operands | None:
    """What the kernel needs to know of `func`, when it is a matmul of float32 rows by a 4- or
    8-bit matrix in blocks of COLUMN_BLOCK columns (of constant shape), optionally plus a
    residual, on AVX2; else None."""
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
    weights = [region_buffer(region) for region in dequantize.reads]
    written = region_buffer(dequantize.writes[0]).name
    x = next(region_buffer(r) for r in matmul.reads if region_buffer(r).name != written)
    params = list(func.params)
    packed = next((b for b in weights if b.dtype == "uint32"), None)
    expected = len(weights) + 2 + has_residual
    if packed is None or len(params) != expected or not params[0].same_as(x):
        return None
    if any(str(p.dtype) != "float32" for p in params if not p.same_as(packed)):
        return None
    if not all(isinstance(d, tirx.IntImm) for p in [*weights, x] for d in p.shape[-1:]):
        return None
    if not all(isinstance(d, tirx.IntImm) for p in weights for d in p.shape):
        return None
    if len(packed.shape) != 3 or int(packed.shape[2]) != COLUMN_BLOCK:
        return None
    blocks_of_columns, words, _ = (int(d) for d in packed.shape)
    k = int(x.shape[-1])
    bits = 32 * words // k
    if bits not in (4, 8):
        return None
    # The kernel declares x, codes, scale, [minimum], [residual], out: the weights in the order
    # `QuantizedWeight.tensors()` passes them.
    weight_params = params[1 : 1 + len(weights)]
    if not weight_params[0].same_as(packed) or {p.name for p in weight_params} != {
        b.name for b in weights
    }:
        return None
    scale = params[2]
    if len(scale.shape) != 3:
        return None
    group = k // int(scale.shape[1])
    if group not in (16, GROUP_SIZE) or (bits == 4 and group != GROUP_SIZE):
        return None
    rows: tirx.PrimExpr = tirx.IntImm("int64", 1)
    for d in x.shape[:-1]:
        rows = rows * d.astype("int64")
    rows = Analyzer().simplify(rows)
    n = blocks_of_columns * COLUMN_BLOCK
    wide = codegen.llvm_cpu_has_features(["avx512vl"], target)
    row_tile = WIDE_ROW_TILE if wide else ROW_TILE
    has_minimum = len(weights) == 3
    lanes = WIDE_LANES if has_wide_vnni(target) else LANES
    return Operands(
        rows, k, n, bits, has_minimum, group, has_residual, has_vnni(target), row_tile, lanes
    )


def has_vnni(target: tvm.target.Target) -> bool:
    """Whether the target has vpdpbusd on 256-bit registers (AVX-VNNI, or AVX512-VNNI with
    AVX512VL)."""
    from tvm.target import codegen

    return codegen.llvm_cpu_has_features(["avxvnni"], target) or codegen.llvm_cpu_has_features(
        ["avx512vnni", "avx512vl"], target
    )


def has_wide_vnni(target: tvm.target.Target) -> bool:
    """Whether the target has vpdpbusd on 512-bit registers (AVX512-VNNI with AVX512BW, for
    the byte operations on them)."""
    from tvm.target import codegen

    return codegen.llvm_cpu_has_features(["avx512vnni", "avx512bw"], target)


def applies(func: tirx.PrimFunc, target: tvm.target.Target) -> bool:
    """Whether `func` is a quantized float32 matmul (plus residual) this kernel serves."""
    return operands(func, target) is not None


def _llvm_major() -> int:
    from tvm.target import codegen

    return int(codegen.llvm_version_major())


def _tree(
    combine: Callable[[tirx.PrimExpr, tirx.PrimExpr], tirx.PrimExpr], terms: list[tirx.PrimExpr]
) -> tirx.PrimExpr:
    """The terms combined pairwise, as a balanced tree."""
    while len(terms) > 1:
        terms = [combine(terms[i], terms[i + 1]) for i in range(0, len(terms), 2)]
    return terms[0]


def _largest_at(x: tirx.Buffer, start: tirx.PrimExpr) -> tirx.PrimExpr:
    """The largest magnitude in the group of x that begins at `start`."""
    return _tree(tirx.max, [tirx.abs(x[start + j]) for j in range(GROUP_SIZE)])


def matmul_body(func: tirx.PrimFunc, operands: Operands) -> tirx.Stmt:
    """The kernel's body over `func`'s own parameters (`operands`: what `operands()` found in
    it), for any number of rows."""
    rows, k, n = operands.rows, operands.k, operands.n
    has_minimum, has_residual = operands.has_minimum, operands.has_residual
    eight_bit = operands.bits == 8
    vnni = operands.vnni
    # With VNNI, 8-bit codes meet the activations with their sign bit flipped (code + 128,
    # unsigned), and each group's integer sums start from -128 times the sum of its rounded
    # activations, which takes the 128s out again exactly; without it, the codes take the signs
    # of the activations (vpsignb) and meet their magnitudes, kept beside xq.
    flipped = eight_bit and vnni
    signed_eight_bit = eight_bit and not vnni
    # Symmetric 4-bit codes centre on 8, so they have an offset term as minimums do.
    has_offset = has_minimum or not eight_bit
    per_word = operands.codes_per_word
    group = operands.group
    words_per_group = operands.words_per_group
    word_order = list(range(per_word)) if eight_bit else WORD_ORDER
    pmaddwd = tvm.target.codegen.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd")
    pmaddubsw = tvm.target.codegen.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw")
    psignb = tvm.target.codegen.llvm_lookup_intrinsic_id("llvm.x86.avx2.psign.b")
    width = operands.lanes
    # 512-bit registers only with VNNI: the paths without it use AVX2's 256-bit pmaddubsw and
    # psignb (AVX-512 has no vpsignb).
    assert width == LANES or vnni
    vpdpbusd = tvm.target.codegen.llvm_lookup_intrinsic_id(f"llvm.x86.avx512.vpdpbusd.{32 * width}")
    tile_rows = operands.row_tile
    params = list(func.params)
    x_param, codes_param, scale_param = params[:3]
    minimum_param = params[3] if has_minimum else scale_param
    out_param = params[-1]
    residual_param = params[-2] if has_residual else out_param
    # Activations are rounded in groups of GROUP_SIZE, the weights scaled in groups of `group`
    # (GROUP_SIZE, or half of it): each activation group covers `subgroups` weight groups.
    x_groups = k // GROUP_SIZE
    groups = k // group
    subgroups = GROUP_SIZE // group
    words = k // per_word
    m = rows.astype("int32")
    registers = COLUMN_BLOCK // width

    def lanes(start: tirx.PrimExpr) -> tirx.PrimExpr:
        return T.ramp(start, 1, width)

    def broadcast_bytes(quad):
        """4 int8 activations (one int32) in every lane, as 32 bytes."""
        return T.reinterpret(f"int8x{4 * width}", T.Broadcast(quad, width))

    def weight_word(codes, block, g, w, c):
        """Word w of group g for the columns c of the block (a register's)."""
        return codes[lanes((block * words + g * words_per_group + w) * COLUMN_BLOCK + c * width)]

    def quad_at(r, g, w, odd):
        """The index, in 4-byte units, of the 4 activations meeting a word's (odd) codes."""
        return (r * k + g * group + w * per_word) // 4 + odd

    def quad_products(codes, xq32, block, g, w, c, odd, row):
        """vpmaddubsw of one 4-bit word's even (or odd) codes for 8 columns with the row's 4
        matching int8 activations: two int16 sums of two products per column."""
        return T.call_llvm_pure_intrin(
            f"int16x{2 * width}",
            pmaddubsw,
            T.reinterpret(f"int8x{4 * width}", nibbles(codes, block, g, w, c, odd)),
            broadcast_bytes(xq32[quad_at(row, g, w, odd)]),
        )

    def nibbles(codes, block, g, w, c, odd):
        """A 4-bit word's even (or odd) codes for a register's columns, one per byte."""
        word = weight_word(codes, block, g, w, c)
        if odd:
            word = T.shift_right(word, T.Broadcast(T.uint32(4), width))
        return T.bitwise_and(word, T.Broadcast(T.uint32(0x0F0F0F0F), width))

    # LLVM declares vpdpbusd's byte operands as bytes since version 21, as int32 lanes before
    # (the source-built TVM links LLVM 15, the wheel 22).
    byte_operands = f"int8x{4 * width}" if _llvm_major() >= 21 else f"int32x{width}"

    def dpbusd(dots, unsigned, signed):
        """dots plus, in each int32 lane, the 4 products of its unsigned by its signed bytes."""
        return T.call_llvm_pure_intrin(
            f"int32x{width}",
            vpdpbusd,
            dots,
            T.reinterpret(byte_operands, unsigned),
            T.reinterpret(byte_operands, signed),
        )

    def signed_codes(codes, xq32, block, g, w, c, row):
        """An 8-bit word's codes for 8 columns, each with the sign of its activation (as
        vpmaddubsw and vpdpbusd want it: the magnitudes of x unsigned, the codes signed)."""
        return T.call_llvm_pure_intrin(
            f"int8x{4 * width}",
            psignb,
            T.reinterpret(f"int8x{4 * width}", weight_word(codes, block, g, w, c)),
            broadcast_bytes(xq32[quad_at(row, g, w, 0)]),
        )

    def flipped_codes(codes, block, g, w, c):
        """An 8-bit word's codes for a register's columns plus 128: unsigned bytes, as vpdpbusd
        wants."""
        return T.bitwise_xor(
            weight_word(codes, block, g, w, c), T.Broadcast(T.uint32(0x80808080), width)
        )

    def magnitudes(xq32, g, w, row):
        """|x| of the row's 4 activations meeting an 8-bit word (`m * k` bytes on in xq)."""
        return broadcast_bytes(xq32[m * k // 4 + quad_at(row, g, w, 0)])

    def add_word(dots, codes, xq32, block, g, w, c, row):
        """dots plus one word's products for a register's columns with the row's matching
        activations: one int32 sum per column."""
        if not eight_bit:  # VNNI only: without it, 4-bit words go through int16 sums
            for odd in (0, 1):
                activations = T.Broadcast(xq32[quad_at(row, g, w, odd)], width)
                dots = dpbusd(dots, nibbles(codes, block, g, w, c, odd), activations)
            return dots
        if vnni:
            activations = T.Broadcast(xq32[quad_at(row, g, w, 0)], width)
            return dpbusd(dots, flipped_codes(codes, block, g, w, c), activations)
        signed = signed_codes(codes, xq32, block, g, w, c, row)
        pairs = T.call_llvm_pure_intrin(
            f"int16x{2 * width}", pmaddubsw, magnitudes(xq32, g, w, row), signed
        )
        ones = T.Broadcast(T.int16(1), 2 * width)
        return dots + T.call_llvm_pure_intrin(f"int32x{width}", pmaddwd, pairs, ones)

    # In the kernel, names bound to expressions become variables stored in memory (allocated per
    # task), so the expressions are built by these functions and written out in place.
    def group_lanes(block, g, c):
        """The columns c of the block, in a per-group array (scale, minimum) at group g."""
        return lanes((block * groups + g) * COLUMN_BLOCK + c * width)

    def offsets(scale, minimum, block, g, c):
        """The weight a code of 0 stands for, for a register's columns (symmetric codes centre
        on 8)."""
        if has_minimum:
            return minimum[group_lanes(block, g, c)]
        return scale[group_lanes(block, g, c)] * T.Broadcast(T.float32(-8), width)

    def dot_lanes(r):
        return T.ramp(r * 2 * width, 1, 2 * width)

    def widened(dots, r):
        """Row r's int16 sums, pairwise into int32: one sum per column."""
        ones = T.Broadcast(T.int16(1), 2 * width)
        return T.call_llvm_pure_intrin(f"int32x{width}", pmaddwd, dots[dot_lanes(r)], ones)

    def out_lanes(block, c, row):
        return lanes(row * n + block * COLUMN_BLOCK + c * width)

    def group_start(r, g):
        return r * k + g * GROUP_SIZE

    @T.macro
    def store_tile(out, residual, acc, block, c, r0, tile):
        """The tile's accumulators into out (plus the residual, where there is one)."""
        for r in T.unroll(tile):
            if has_residual:
                out[out_lanes(block, c, r0 + r)] = (
                    residual[out_lanes(block, c, r0 + r)] + acc[lanes(r * width)]
                )
            else:
                out[out_lanes(block, c, r0 + r)] = acc[lanes(r * width)]

    def group_sum(sums, scale, minimum, x_scale, x_sum, block, g, c, row):
        """A weight group's int32 sums for a register's columns as floats: scaled, plus the
        codes' offset (a minimum, or symmetric 4-bit codes' centre) times the sum of the row's
        rounded activations over the group."""
        x_group_scale = x_scale[row * x_groups + g // subgroups]
        scaled = T.Cast(f"float32x{width}", sums) * (
            scale[group_lanes(block, g, c)] * T.Broadcast(x_group_scale, width)
        )
        if not has_offset:
            return scaled
        return scaled + offsets(scale, minimum, block, g, c) * T.Broadcast(
            x_sum[row * groups + g], width
        )

    prefetch = tvm.target.codegen.llvm_lookup_intrinsic_id("llvm.prefetch")

    def fetch(address):
        """Ask for the cache line at `address` (a read, to be kept in every cache level)."""
        return T.call_llvm_intrin("void", prefetch, address, T.int32(0), T.int32(3), T.int32(1))

    @T.macro
    def prefetch_group(codes, scale, minimum, block, g):
        """The next block's words, scales and minimums of group g, into the cache: a task
        reads a block's weights once from memory (a 16-row tile reuses them in cache), and the
        hardware had not fetched the next block ahead (decode x1 and x16 1.1x)."""
        for w in T.unroll(words_per_group):
            T.evaluate(
                fetch(
                    T.address_of(
                        codes[((block + 1) * words + g * words_per_group + w) * COLUMN_BLOCK]
                    )
                )
            )
        T.evaluate(fetch(T.address_of(scale[group_lanes(block + 1, g, 0)])))
        if has_minimum:
            T.evaluate(fetch(T.address_of(minimum[group_lanes(block + 1, g, 0)])))

    @T.macro
    def row_tile_int16(buffers, block, c, r0, tile):
        """Rows r0 .. r0 + tile - 1 by the 8 columns c of the block, 4-bit codes without VNNI:
        a group's products added as int16 (at most 16 * 15 * 127 per lane), widened once."""
        codes, scale, minimum, xq32, x_scale, x_sum, x_bias, out, residual = buffers
        acc = T.alloc_buffer((tile * width,), "float32")
        dots = T.alloc_buffer((tile * 2 * width,), "int16")
        for r in T.unroll(tile):
            acc[lanes(r * width)] = T.Broadcast(T.float32(0), width)
        for g in range(groups):
            prefetch_group(codes, scale, minimum, block, g)
            for r in T.unroll(tile):
                dots[dot_lanes(r)] = T.Broadcast(T.int16(0), 2 * width)
            for w in range(words_per_group):
                for r in T.unroll(tile):
                    dots[dot_lanes(r)] = (
                        dots[dot_lanes(r)]
                        + quad_products(codes, xq32, block, g, w, c, 0, r0 + r)
                        + quad_products(codes, xq32, block, g, w, c, 1, r0 + r)
                    )
            for r in T.unroll(tile):
                acc[lanes(r * width)] = acc[lanes(r * width)] + group_sum(
                    widened(dots, r), scale, minimum, x_scale, x_sum, block, g, c, r0 + r
                )
        store_tile(out, residual, acc, block, c, r0, tile)

    @T.macro
    def row_tile_int32(buffers, block, c, r0, tile):
        """Rows r0 .. r0 + tile - 1 by the columns c of the block (a register's), each word's
        products added as int32 (8-bit codes, and 4-bit ones with VNNI)."""
        codes, scale, minimum, xq32, x_scale, x_sum, x_bias, out, residual = buffers
        acc = T.alloc_buffer((tile * width,), "float32")
        dots = T.alloc_buffer((tile * width,), "int32")
        for r in T.unroll(tile):
            acc[lanes(r * width)] = T.Broadcast(T.float32(0), width)
        for g in range(groups):
            prefetch_group(codes, scale, minimum, block, g)
            for r in T.unroll(tile):
                if flipped:
                    dots[lanes(r * width)] = T.Broadcast(x_bias[(r0 + r) * groups + g], width)
                else:
                    dots[lanes(r * width)] = T.Broadcast(T.int32(0), width)
            for w in range(words_per_group):
                for r in T.unroll(tile):
                    dots[lanes(r * width)] = add_word(
                        dots[lanes(r * width)], codes, xq32, block, g, w, c, r0 + r
                    )
            for r in T.unroll(tile):
                acc[lanes(r * width)] = acc[lanes(r * width)] + group_sum(
                    dots[lanes(r * width)], scale, minimum, x_scale, x_sum, block, g, c, r0 + r
                )
        store_tile(out, residual, acc, block, c, r0, tile)

    row_tile = row_tile_int32 if eight_bit or vnni else row_tile_int16

    @T.macro
    def round_group(buffers, r, g):
        """Group g of row r rounded to int8 (`xq`, each word's in `word_order`), with its scale,
        the magnitudes of its rounded values (signed 8-bit codes, `m * k` on), and over each
        weight group it covers, the sum of its rounded values (scaled, where the codes have an
        offset; times -128, for flipped codes)."""
        x, xq, x_scale, x_sum, x_bias = buffers
        largest = T.alloc_buffer((1,), "float32")
        x_inverse = T.alloc_buffer((1,), "float32")
        largest[0] = _largest_at(x, group_start(r, g))
        x_scale[r * x_groups + g] = largest[0] / T.float32(LARGEST_CODE)
        x_inverse[0] = T.if_then_else(  # 0 for a group of zeros
            largest[0] > 0, T.float32(LARGEST_CODE) / largest[0], 0.0
        )
        for w in range(GROUP_SIZE // per_word):
            xq[T.ramp(group_start(r, g) + w * per_word, 1, per_word)] = T.Cast(
                f"int8x{per_word}",
                T.round(
                    T.Shuffle(
                        [x[T.ramp(group_start(r, g) + w * per_word, 1, per_word)]],
                        word_order,
                    )
                    * T.Broadcast(x_inverse[0], per_word)
                ),
            )
        if signed_eight_bit:
            xq[T.ramp(m * k + group_start(r, g), 1, GROUP_SIZE)] = T.abs(
                xq[T.ramp(group_start(r, g), 1, GROUP_SIZE)]
            )
        for sub in range(subgroups):
            rounded_sum = _tree(
                T.Add,
                [T.Cast("int32", xq[group_start(r, g) + sub * group + i]) for i in range(group)],
            )
            if has_offset:
                # The sum of the rounded activations, so that the result is exactly that of
                # the rounded row (as llama.cpp's); the sum of x itself would leave the codes'
                # offset out of the rounding error, which grows it (codes are all positive).
                x_sum[(r * x_groups + g) * subgroups + sub] = x_scale[r * x_groups + g] * T.Cast(
                    "float32", rounded_sum
                )
            if flipped:
                x_bias[(r * x_groups + g) * subgroups + sub] = rounded_sum * -128

    @T.prim_func(private=True, check_well_formed=False)
    def kernel():
        x = T.decl_buffer((m * k,), "float32", data=x_param.data)
        codes = T.decl_buffer((n * words,), "uint32", data=codes_param.data)
        scale = T.decl_buffer((n * groups,), "float32", data=scale_param.data)
        minimum = T.decl_buffer((n * groups,), "float32", data=minimum_param.data)
        out = T.decl_buffer((m * n,), "float32", data=out_param.data)
        residual = T.decl_buffer((m * n,), "float32", data=residual_param.data)
        # The rounded activations, and for 8-bit weights their magnitudes after them.
        xq = T.alloc_buffer((m * k * (2 if signed_eight_bit else 1),), "int8")
        xq32 = T.decl_buffer((m * k // 4 * (2 if signed_eight_bit else 1),), "int32", data=xq.data)
        x_scale = T.alloc_buffer((m * x_groups,), "float32")
        x_sum = T.alloc_buffer((m * groups,), "float32")
        x_bias = T.alloc_buffer((m * groups if flipped else 1,), "int32")  # flipped codes only
        buffers = (x, xq, x_scale, x_sum, x_bias)
        # Rounded in parallel, the down projection ran 5-8% faster at 16 and 512 rows (its
        # k = 1536 makes rounding the largest share of a call).
        if m >= PARALLEL_ROUNDING_ROWS:
            for task in T.parallel(m * x_groups):
                round_group(buffers, task // x_groups, task % x_groups)
        else:
            for r, g in T.grid(m, x_groups):
                round_group(buffers, r, g)
        for block in T.parallel(n // COLUMN_BLOCK):
            buffers = (codes, scale, minimum, xq32, x_scale, x_sum, x_bias, out, residual)
            for c in range(registers):
                for t in range(m // tile_rows):
                    row_tile(buffers, block, c, t * tile_rows, tile_rows)
                # The last m % tile_rows rows, in tiles of 4, 2 and 1 (sizes known when
                # compiled): the binary digits of the rest.
                if m % tile_rows % 8 >= 4:
                    row_tile(buffers, block, c, m - m % tile_rows % 8, 4)
                if m % tile_rows % 4 >= 2:
                    row_tile(buffers, block, c, m - m % tile_rows % 4, 2)
                if m % tile_rows % 2 == 1:
                    row_tile(buffers, block, c, m - 1, 1)

    return kernel.body
