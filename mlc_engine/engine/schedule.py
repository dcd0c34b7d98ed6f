"""CPU schedules for the compiled kernels, chosen by the kernel's structure, not by layer name.

Matmuls (`NT_matmul` fed by a `dequantize` block, see `model/layers.py`) get two schedules in
one kernel, picked at run time by the number of rows (tokens) it multiplies:
- few rows (decode): a matrix-vector schedule. The dequantization is inlined; output columns run
  in parallel tasks and each dot product accumulates in one SIMD register of partial sums.
- many rows (prefill, large batches): each parallel task dequantizes a tile of columns once, into
  a transposed local buffer, and runs every row against it with the columns in SIMD lanes, so the
  4-bit decoding is paid once per weight rather than once per row.
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx

from mlc_engine.engine.model.layers import DEQUANTIZE_BLOCK, MATMUL_BLOCK

GEMV_COLUMNS_PER_TASK = 8
GEMM_COLUMNS_PER_TASK = 32
# Up to this many rows the matrix-vector schedule wins (measured on AVX2, SmolLM2 shapes).
MAX_GEMV_ROWS = 8


def vector_lanes(target: tvm.target.Target) -> int:
    """float32 lanes in one SIMD register of the target (read from its features)."""
    from tvm.target import codegen

    for feature, lanes in (("avx512f", 16), ("avx", 8), ("neon", 4), ("sse2", 4)):
        if codegen.llvm_cpu_has_features([feature], target):
            return lanes
    return 4


def _schedule_gemv(sch: s_tir.Schedule, lanes: int) -> None:
    sch.compute_inline(sch.get_sblock(DEQUANTIZE_BLOCK))
    block = sch.get_sblock(MATMUL_BLOCK)
    epilogues = sch.get_consumers(block)
    *spatial, column, k = sch.get_loops(block)
    rows = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
    column_tasks, column_inner = sch.split(column, [None, GEMV_COLUMNS_PER_TASK])
    k_outer, k_inner = sch.split(k, [None, lanes])
    sch.reorder(column_tasks, rows, column_inner, k_outer, k_inner)
    partial = sch.rfactor(k_inner, 0)
    tasks, _, inner, k_outer, vector = sch.get_loops(partial)
    sch.parallel(tasks)
    sch.set_scope(partial, 0, "local")
    sch.reverse_compute_at(block, inner)
    # Vectorize before splitting off the init: afterwards the update block fails the check.
    sch.vectorize(vector)
    sch.decompose_reduction(partial, k_outer)
    for epilogue in epilogues:
        sch.reverse_compute_at(epilogue, inner)


def _schedule_gemm(sch: s_tir.Schedule) -> None:
    block = sch.get_sblock(MATMUL_BLOCK)
    weight = sch.get_sblock(DEQUANTIZE_BLOCK)
    epilogues = sch.get_consumers(block)
    *spatial, column, k = sch.get_loops(block)
    rows = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
    column_tasks, column_inner = sch.split(column, [None, GEMM_COLUMNS_PER_TASK])
    sch.reorder(column_tasks, rows, k, column_inner)
    sch.parallel(column_tasks)
    write_back = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(write_back, rows)
    for epilogue in epilogues:
        sch.reverse_compute_inline(epilogue)
    # The weight tile, transposed so that a row of it is a run of SIMD lanes.
    sch.transform_layout(weight, ("write", 0), lambda n, kk: (kk, n))
    sch.compute_at(weight, column_tasks)
    sch.set_scope(weight, 0, "local")
    sch.vectorize(column_inner)
    sch.decompose_reduction(block, k)


def _row_count(func: tirx.PrimFunc) -> tirx.PrimExpr:
    sch = s_tir.Schedule(func)
    *spatial, _, _ = sch.get_loops(sch.get_sblock(MATMUL_BLOCK))
    count: tirx.PrimExpr = tirx.IntImm("int64", 1)
    for loop in spatial:
        count = count * sch.get(loop).extent
    return tvm.sym.Analyzer().simplify(count)


def _schedule_matmul(func: tirx.PrimFunc, lanes: int) -> tirx.PrimFunc:
    gemv, gemm = s_tir.Schedule(func), s_tir.Schedule(func)
    _schedule_gemv(gemv, lanes)
    _schedule_gemm(gemm)
    rows = _row_count(func)
    if isinstance(rows, tirx.IntImm):
        chosen = gemv if rows.value <= MAX_GEMV_ROWS else gemm
        return chosen.mod["main"]
    # Both bodies in one kernel, dispatched on the row count at run time (as MLC-LLM does
    # for low-batch GEMV on GPUs).
    body = tirx.IfThenElse(rows <= MAX_GEMV_ROWS, gemv.mod["main"].body, gemm.mod["main"].body)
    root = s_tir.SBlockRealize([], True, s_tir.SBlock([], [], [], "root", body))
    return func.with_body(root).with_attr("tirx.HoistIfThenElseExprWithBlock", 1)


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
                mod[gvar] = _schedule_matmul(func, lanes).with_attr("tirx.is_scheduled", True)
        return mod

    return schedule
