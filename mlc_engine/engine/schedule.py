"""CPU schedules for the compiled kernels, chosen by the kernel's structure, not by layer name.

Matmuls (`NT_matmul` fed by a `dequantize` block, see `model/layers.py`):
- 4-bit float32 ones on AVX2 run the int8-activation kernel of `int8_gemm.py`, whatever their row
  count, on weights in blocks of 16 columns.
- the others (float weights, float16, no AVX2) get several schedules in one kernel, picked at
  run time by the number of rows (tokens) they multiply:
  - up to 8 rows (decode): matrix-vector schedules. The dequantization is inlined; output
    columns run in parallel tasks, and each step along k decodes a quantization group of weights
    (a few SIMD vectors, sharing one scale and minimum) per column and multiplies it into a
    register tile of partial sums (rows x columns, one register each). The rows are padded to
    the tile (1, 4 or 8), so that every decoded weight serves all of them.
  - more rows (prefill, large batches): each parallel task dequantizes a tile of columns once,
    into a transposed local buffer (columns in SIMD lanes), then runs a 6-row x 16-column
    register tile of accumulators over it, so that the 4-bit decoding is paid once per weight
    rather than once per row and each weight vector loaded feeds six FMAs.

Row padding goes through `pad_einsum`: x is copied into a zero-padded buffer and the result is
copied out, which costs little beside the matmul and keeps predicates out of the inner loops
(TVM does not vectorize under a predicate on a symbolic row count).
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx

from mlc_engine.engine import int8_gemm
from mlc_engine.engine.model.layers import DEQUANTIZE_BLOCK, MATMUL_BLOCK
from mlc_engine.engine.quantization import CODES_PER_WORD, GROUP_SIZE
from mlc_engine.engine.tvm_compat import (
    Analyzer,
    BufferLoad,
    SBlock,
    SBlockRealize,
    region_buffer,
)

GEMV_COLUMNS_PER_TASK = 16
# Columns a matrix-vector tile works on at once, by its row tile (the accumulators in flight are
# rows x columns). Each step covers a whole quantization group, so the tile also holds the group's
# x vectors (one per row and step) and each column's scale and minimum in SIMD registers: with
# 8 columns for one row they no longer fit in 16 and spilled (1.25x slower than 4 columns).
GEMV_COLUMNS = {1: 4, 4: 2, 8: 1}
GEMM_COLUMNS_PER_TASK = 32
# The matrix-matrix register tile: 6 rows x 16 columns = 12 AVX2 accumulators, plus two weight
# vectors and one broadcast row value.
GEMM_ROW_TILE = 6
GEMM_COLUMN_TILE = 16
# Row counts up to each bound go to the matrix-vector schedule with that row tile (measured on
# AVX2, SmolLM2 shapes); beyond the last, the matrix-matrix schedule.
GEMV_ROW_TILES = tuple(GEMV_COLUMNS)
# Scope of the register tiles. A small constant-size "global" allocation becomes a stack array,
# which LLVM promotes to registers; a "local" one becomes a heap workspace, and in a library of
# many kernels (whose arguments LLVM cannot assume unaliased) every partial sum is then stored
# back on every step of k: prefill ran 3x slower that way.
REGISTER_SCOPE = "global"
# Elements (or reduction rows x elements) below which a norm or activation runs on one thread:
# waking the thread pool costs a few microseconds, about what 8192 elements take.
PARALLEL_MIN_WORK = 8192


def vector_lanes(target: tvm.target.Target) -> int:
    """float32 lanes in one SIMD register of the target (read from its features)."""
    from tvm.target import codegen

    for feature, lanes in (("avx512f", 16), ("avx", 8), ("neon", 4), ("sse2", 4)):
        if codegen.llvm_cpu_has_features([feature], target):
            return lanes
    return 4


def _pad_rows(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, tile: int) -> None:
    """Pad the (symbolic) rows of the matmul to a multiple of `tile`, so that a register tile of
    rows needs no predicate: x is copied into a zero-padded buffer and the result copied out."""
    *spatial, _, _ = sch.get_loops(block)
    padding = [1] * (len(spatial) + 2)
    symbolic = [
        i for i, loop in enumerate(spatial) if not isinstance(sch.get(loop).extent, tirx.IntImm)
    ]
    padding[symbolic[-1] if symbolic else len(spatial) - 1] = tile
    sch.pad_einsum(block, padding)


def _vectors_per_step(k: tirx.PrimExpr, lanes: int) -> int:
    """SIMD vectors of k a matrix-vector step covers: a whole quantization group where k is made
    of them (always, for 4-bit weights), else one."""
    if isinstance(k, tirx.IntImm) and k.value % GROUP_SIZE == 0 and GROUP_SIZE % lanes == 0:
        return GROUP_SIZE // lanes
    return 1


def _schedule_gemv(sch: s_tir.Schedule, lanes: int, row_tile: int) -> None:
    """Matrix-vector schedule for up to `row_tile` rows at a time (weights decoded inline)."""
    column_unroll = GEMV_COLUMNS[row_tile]
    block = sch.get_sblock(MATMUL_BLOCK)
    epilogues = sch.get_consumers(block)
    if row_tile > 1:
        _pad_rows(sch, block, row_tile)
        (unpad,) = sch.get_consumers(block)
        for epilogue in epilogues:
            sch.reverse_compute_inline(epilogue)
        epilogues = [unpad]
    sch.compute_inline(sch.get_sblock(DEQUANTIZE_BLOCK))
    *spatial, column, k = sch.get_loops(block)
    rows = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
    row_tiles, row_inner = sch.split(rows, [None, row_tile])
    column_tasks, column_group, column_inner = sch.split(
        column, [None, GEMV_COLUMNS_PER_TASK // column_unroll, column_unroll]
    )
    k_group, k_step, k_inner = sch.split(
        k, [None, _vectors_per_step(sch.get(k).extent, lanes), lanes]
    )
    # Several columns (and rows) per step of k: independent FMA chains hide the FMA latency,
    # and each decoded weight vector serves every row of the tile. With several rows, a group's
    # steps run outside the columns, so that each x vector loaded serves every column (1.1x for
    # 4 rows); with one, inside, so that each column's scale and minimum are loaded once.
    steps_then_columns = [k_step, column_inner] if row_tile > 1 else [column_inner, k_step]
    sch.reorder(
        column_tasks, row_tiles, column_group, k_group, *steps_then_columns, row_inner, k_inner
    )
    partial = sch.rfactor(k_inner, 0)
    tasks, _, group, k_outer, *tile, vector = sch.get_loops(partial)
    sch.parallel(tasks)
    sch.set_scope(partial, 0, REGISTER_SCOPE)
    # Partial sums with the SIMD lanes innermost, so that each is one contiguous vector.
    sch.transform_layout(partial, ("write", 0), lambda lane, *rest: (*rest, lane))
    sch.reverse_compute_at(block, group)
    # Vectorize before splitting off the init: afterwards the update block fails the check.
    sch.vectorize(vector)
    # The columns, rows and vectors of a group's step, unrolled: a whole quantization group per
    # step loads its scale and minimum once, not once per vector.
    for loop in tile:
        sch.unroll(loop)
    sch.decompose_reduction(partial, k_outer)
    for epilogue in epilogues:
        sch.reverse_compute_at(epilogue, group)


def _vectorize_dequantize(sch: s_tir.Schedule, weight: s_tir.schedule.SBlockRV, lanes: int) -> None:
    """Decode the weight tile with columns in SIMD lanes: one packed word per column serves the
    CODES_PER_WORD rows of the tile it holds, each written as a contiguous run of lanes."""
    column, k = sch.get_loops(weight)[-2:]
    word, code = sch.split(k, [None, CODES_PER_WORD])
    column_outer, column_lanes = sch.split(column, [None, lanes])
    sch.reorder(word, column_outer, code, column_lanes)
    # The words, scales (and minimums) of a vector of columns, gathered once into registers:
    # left in memory, they were gathered again for every code, the tile's stores possibly
    # aliasing them for LLVM.
    for index, region in enumerate(sch.get(weight).reads):
        if len(region_buffer(region).shape) == 3:
            # Blocks of columns (quantization.py): a vector of columns is already contiguous,
            # and TVM cannot narrow a cache of it to one (it caches the whole array).
            continue
        cached = sch.cache_read(weight, index, REGISTER_SCOPE)
        sch.compute_at(cached, column_outer)
        sch.vectorize(sch.get_loops(cached)[-1])
    sch.unroll(code)
    sch.vectorize(column_lanes)


def _schedule_gemm(sch: s_tir.Schedule, lanes: int) -> None:
    """Matrix-matrix schedule: a decoded weight tile per task, a register tile of rows over it."""
    block = sch.get_sblock(MATMUL_BLOCK)
    weight = sch.get_sblock(DEQUANTIZE_BLOCK)
    epilogues = sch.get_consumers(block)
    _pad_rows(sch, block, GEMM_ROW_TILE)
    (unpad,) = sch.get_consumers(block)
    for epilogue in epilogues:
        sch.reverse_compute_inline(epilogue)
    *spatial, column, k = sch.get_loops(block)
    rows = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
    column_tasks, column_tile, column_lanes = sch.split(
        column, [None, GEMM_COLUMNS_PER_TASK // GEMM_COLUMN_TILE, GEMM_COLUMN_TILE]
    )
    row_tiles, row_inner = sch.split(rows, [None, GEMM_ROW_TILE])
    sch.reorder(column_tasks, row_tiles, column_tile, k, row_inner, column_lanes)
    sch.parallel(column_tasks)
    # The accumulators: a row tile x column tile block, kept in registers once unrolled.
    sch.reverse_compute_at(unpad, column_tile)
    sch.set_scope(block, 0, REGISTER_SCOPE)
    # The weight tile, transposed so that a row of it is a run of SIMD lanes.
    sch.transform_layout(weight, ("write", 0), lambda n, kk: (kk, n))
    sch.compute_at(weight, column_tasks)
    sch.set_scope(weight, 0, "local")
    _vectorize_dequantize(sch, weight, lanes)
    sch.unroll(row_inner)
    sch.vectorize(column_lanes)
    sch.decompose_reduction(block, k)


def _row_count(func: tirx.PrimFunc) -> tirx.PrimExpr:
    sch = s_tir.Schedule(func)
    *spatial, _, _ = sch.get_loops(sch.get_sblock(MATMUL_BLOCK))
    return _extent_product(sch, spatial)


def _schedule_matmul(func: tirx.PrimFunc, lanes: int, target: tvm.target.Target) -> tirx.PrimFunc:
    """One kernel holding a schedule per range of row counts, picked at run time."""
    operands = int8_gemm.operands(func, target)
    if operands is not None:
        return func.with_body(int8_gemm.matmul_body(func, operands))
    variants: list[tuple[int | None, tirx.Stmt]] = []
    for row_tile in GEMV_ROW_TILES:
        sch = s_tir.Schedule(func)
        _schedule_gemv(sch, lanes, row_tile)
        variants.append((row_tile, sch.mod["main"].body))
    sch = s_tir.Schedule(func)
    _schedule_gemm(sch, lanes)
    variants.append((None, sch.mod["main"].body))
    rows = _row_count(func)
    if isinstance(rows, tirx.IntImm):
        return func.with_body(
            next(body for bound, body in variants if bound is None or rows.value <= bound)
        )
    # Dispatch on the row count at run time (as MLC-LLM does for low-batch GEMV on GPUs).
    body = variants[-1][1]
    for bound, variant in reversed(variants[:-1]):
        body = tirx.IfThenElse(rows <= bound, variant, body)
    root = SBlockRealize([], True, SBlock([], [], [], "root", body))
    return func.with_body(root).with_attr("tirx.HoistIfThenElseExprWithBlock", 1)


def _extent_product(sch: s_tir.Schedule, loops: list[s_tir.schedule.LoopRV]) -> tirx.PrimExpr:
    count: tirx.PrimExpr = tirx.IntImm("int64", 1)
    for loop in loops:
        count = count * sch.get(loop).extent.astype("int64")
    return Analyzer().simplify(count)


def _blocks(sch: s_tir.Schedule) -> list[s_tir.schedule.SBlockRV]:
    return list(sch.get_child_blocks(sch.get_sblock("root")))


def _inline_elementwise(sch: s_tir.Schedule) -> None:
    """Fold each elementwise step into the one that reads it, where that computes it no more
    often: a split, a cast or a sigmoid is then worked out in the loop that uses it, rather than
    written to a buffer of its own. (A row's norm factor stays apart from the row's elements.)
    A step that only copies (or casts) what it reads is folded in always: a norm's copy of its
    weight vector had been a loop of its own."""
    for block in _blocks(sch):
        consumers = sch.get_consumers(block)
        size = _extent_product(sch, sch.get_loops(block))
        larger = [
            c
            for c in consumers
            if not Analyzer().can_prove(_extent_product(sch, sch.get_loops(c)) <= size)
        ]
        if not consumers or (larger and not _copies(sch.get(block))):
            continue
        try:
            sch.compute_inline(block)
        except s_tir.schedule.ScheduleError:
            continue


def _copies(block: SBlock) -> bool:
    """Whether the block stores a value it loads (maybe cast), computing nothing."""
    value = block.body.value if isinstance(block.body, tirx.BufferStore) else None
    while isinstance(value, tirx.Cast):
        value = value.value
    return isinstance(value, BufferLoad)


def _split_reductions(sch: s_tir.Schedule, lanes: int) -> list[s_tir.schedule.SBlockRV]:
    """SIMD for each reduction over a constant multiple of the vector width: `lanes` partial
    results, one per lane (rfactor), then combined. (A row's sum of squares had been one scalar
    chain of additions.) The blocks of partial results, to vectorize once they are in place."""
    partials = []
    for block in _blocks(sch):
        loops = sch.get_loops(block)
        kinds = [iv.iter_type for iv in sch.get(block).iter_vars]
        if not loops or kinds[-1:] != [tirx.IterVar.CommReduce]:
            continue
        extent = sch.get(loops[-1]).extent
        if not isinstance(extent, tirx.IntImm) or extent.value % lanes or extent.value <= lanes:
            continue
        try:
            lane = sch.split(loops[-1], [None, lanes])[1]
            partials.append(sch.rfactor(lane, factor_axis=len(kinds) - 1))
        except s_tir.schedule.ScheduleError:
            continue
    return partials


def _vectorize_partials(
    sch: s_tir.Schedule, partials: list[s_tir.schedule.SBlockRV], lanes: int
) -> None:
    """The lanes' loop of each block of partial results innermost (rfactor puts it first),
    vectorized."""
    for block in partials:
        loops = sch.get_loops(block)
        at = next(i for i, loop in enumerate(loops) if _extent(sch, loop) == lanes)
        if at + 1 < len(loops):
            sch.reorder(*loops[at + 1 :], loops[at])
        sch.vectorize(loops[at])


def _extent(sch: s_tir.Schedule, loop: s_tir.schedule.LoopRV) -> int | None:
    extent = sch.get(loop).extent
    return extent.value if isinstance(extent, tirx.IntImm) else None


def _rows_together(sch: s_tir.Schedule) -> s_tir.schedule.LoopRV | None:
    """Run every block of the kernel row by row in one loop: the last block's loops but its
    innermost (a row's elements), fused, with each earlier block computed inside it for the row
    (a norm's sum of squares, its factor, then the row scaled, while the row is in cache, and
    one parallel launch rather than one per block). That loop; None where the kernel has one
    block, or a block that cannot go row by row (the kernel is then left as it was)."""
    blocks = _blocks(sch)
    loops = sch.get_loops(blocks[-1])
    kinds = [iv.iter_type for iv in sch.get(blocks[-1]).iter_vars]
    if len(blocks) < 2 or len(loops) < 2 or any(kinds):
        return None
    rows = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
    for block in reversed(blocks[:-1]):
        sch.compute_at(block, rows, preserve_unit_loops=True)
    return rows


def _parallelize_rows(sch: s_tir.Schedule) -> None:
    """Run each block's leading data-parallel loops, fused, as parallel tasks (a reduction's
    rows, or every element of an elementwise step), where they are not a few constant ones."""
    for block in _blocks(sch):
        loops = sch.get_loops(block)
        kinds = [iv.iter_type for iv in sch.get(block).iter_vars]
        spatial = 0
        while spatial < min(len(loops), len(kinds)) and kinds[spatial] == 0:  # data-parallel
            spatial += 1
        work = _extent_product(sch, loops)
        if not spatial or (isinstance(work, tirx.IntImm) and work.value < PARALLEL_MIN_WORK):
            continue
        try:
            sch.parallel(sch.fuse(*loops[:spatial]) if spatial > 1 else loops[0])
        except s_tir.schedule.ScheduleError:
            continue


def _vectorize_rows(sch: s_tir.Schedule, lanes: int) -> None:
    """SIMD along each elementwise block's innermost loop, where its length is a constant
    multiple of the vector width."""
    for block in _blocks(sch):
        loops = sch.get_loops(block)
        kinds = [iv.iter_type for iv in sch.get(block).iter_vars]
        extent = sch.get(loops[-1]).extent if loops else None
        if not isinstance(extent, tirx.IntImm) or extent.value % lanes or any(kinds):
            continue
        try:
            sch.vectorize(sch.split(loops[-1], [None, lanes])[1])
        except s_tir.schedule.ScheduleError:
            continue


def _schedule_elementwise(func: tirx.PrimFunc, lanes: int) -> tirx.PrimFunc:
    """Norms, activations and copies: elementwise steps folded into their readers, reductions in
    SIMD lanes, every block run row by row in one loop where it can be, and the rows run in
    parallel where there are enough of them (decided at run time when the row count is
    symbolic; a parallel launch costs more than a few rows of work)."""
    if "global_symbol" in func.attrs:
        return func  # the KV cache's own kernels (TVM's, written by hand), not a model op
    serial, work = _rowwise(func, lanes, parallel=False)
    parallel, _ = _rowwise(func, lanes, parallel=True)
    # The largest block decides. A symbolic size ranks as the threshold: a constant block
    # larger than that makes the kernel parallel always; otherwise the symbolic size decides
    # at run time.
    if isinstance(work, tirx.IntImm):
        return parallel if work.value >= PARALLEL_MIN_WORK else serial
    # The variants' intermediate buffers, allocated once in a root block around both.
    serial_root, parallel_root = serial.body.block, parallel.body.block
    buffers = list(serial_root.alloc_buffers)
    buffers += [b for b in parallel_root.alloc_buffers if not any(b.same_as(a) for a in buffers)]
    body = tirx.IfThenElse(work >= PARALLEL_MIN_WORK, parallel_root.body, serial_root.body)
    root = SBlock([], [], [], "root", body, alloc_buffers=buffers)
    realize = SBlockRealize([], True, root)
    return func.with_body(realize).with_attr("tirx.HoistIfThenElseExprWithBlock", 1)


def _rowwise(
    func: tirx.PrimFunc, lanes: int, parallel: bool
) -> tuple[tirx.PrimFunc, tirx.PrimExpr]:
    """`func` scheduled, its rows in parallel or not; and the iterations of its largest block."""
    sch = s_tir.Schedule(func)
    _inline_elementwise(sch)
    work = _work(sch)
    partials = _split_reductions(sch, lanes)
    try:
        rows = _rows_together(sch)
    except s_tir.schedule.ScheduleError:  # block by block, as it was
        sch, partials, rows = s_tir.Schedule(func), [], None
        _inline_elementwise(sch)
    _vectorize_partials(sch, partials, lanes)
    _vectorize_rows(sch, lanes)
    if parallel and rows is not None:
        sch.parallel(rows)
    elif parallel:
        _parallelize_rows(sch)
    return sch.mod["main"], work


def _work(sch: s_tir.Schedule) -> tirx.PrimExpr:
    """The iterations of the kernel's largest block (a symbolic size ranks as the threshold)."""
    return max(
        (_extent_product(sch, sch.get_loops(b)) for b in _blocks(sch)),
        key=lambda w: w.value if isinstance(w, tirx.IntImm) else PARALLEL_MIN_WORK,
        default=tirx.IntImm("int64", 0),
    )


def _has_matmul(func: tirx.PrimFunc) -> bool:
    try:
        s_tir.Schedule(func).get_sblock(MATMUL_BLOCK)
    except s_tir.schedule.ScheduleError:
        return False
    return True


def schedule_cpu_kernels(target: tvm.target.Target) -> tvm.transform.Pass:
    """A module pass scheduling every unscheduled kernel it has a rule for."""
    lanes = vector_lanes(target)

    @tvm.transform.module_pass(opt_level=0, name="ScheduleCPUKernels")
    def schedule(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        for gvar, func in list(mod.functions_items()):
            if not isinstance(func, tirx.PrimFunc) or func.attrs.get("tirx.is_scheduled", False):
                continue
            if _has_matmul(func):
                mod[gvar] = _schedule_matmul(func, lanes, target)
            else:
                mod[gvar] = _schedule_elementwise(func, lanes)
            mod[gvar] = mod[gvar].with_attr("tirx.is_scheduled", True)
        return mod

    return schedule
