"""CPU schedules for the compiled kernels, chosen by the kernel's structure, not by layer name.

A first, simple set: matmuls (one `NT_matmul` reduction, see `model/layers.py`) run their output
columns in parallel tasks with the reduction innermost, split into vector-wide partial sums.
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx

MATMUL_BLOCK = "NT_matmul"
COLUMNS_PER_TASK = 8


def vector_lanes(target: tvm.target.Target) -> int:
    """float32 lanes in one SIMD register of the target (read from its features)."""
    from tvm.target import codegen

    for feature, lanes in (("avx512f", 16), ("avx", 8), ("neon", 4), ("sse2", 4)):
        if codegen.llvm_cpu_has_features([feature], target):
            return lanes
    return 4


def _schedule_matmul(sch: s_tir.Schedule, lanes: int) -> None:
    """Columns in parallel tasks; each dot product split into `lanes` partial sums (rfactor),
    one vector register accumulating over the reduction."""
    block = sch.get_sblock(MATMUL_BLOCK)
    epilogues = sch.get_consumers(block)
    *spatial, column, k = sch.get_loops(block)
    rows = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
    column_tasks, column_inner = sch.split(column, [None, COLUMNS_PER_TASK])
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


def _matmul_schedule(func: tirx.PrimFunc) -> s_tir.Schedule | None:
    sch = s_tir.Schedule(func)
    try:
        sch.get_sblock(MATMUL_BLOCK)
    except s_tir.schedule.ScheduleError:
        return None
    return sch


def schedule_cpu_kernels(target: tvm.target.Target) -> tvm.transform.Pass:
    """A module pass scheduling every unscheduled kernel it has a rule for."""
    lanes = vector_lanes(target)

    @tvm.transform.module_pass(opt_level=0, name="ScheduleCPUKernels")
    def schedule(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        for gvar, func in list(mod.functions_items()):
            if not isinstance(func, tirx.PrimFunc) or func.attrs.get("tirx.is_scheduled", False):
                continue
            sch = _matmul_schedule(func)
            if sch is not None:
                _schedule_matmul(sch, lanes)
                mod[gvar] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
        return mod

    return schedule
