"""Compile a model folder into a model library (`.so`) with TVM, and cache the result.

The library is keyed by the model's architecture, its quantization, the target and the TVM
version, so any model folder with the same shape reuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as generic

from mlc_engine.common.config import ModelConfig
from mlc_engine.engine.model.llama import LlamaForCausalLM
from mlc_engine.engine.schedule import schedule_cpu_kernels
from mlc_engine.engine.tvm_compat import StringImm

# The sources whose change changes the compiled code: part of every library's cache key, so a
# changed schedule or model definition never runs from a stale library.
_CODEGEN_SOURCES = (
    "compiler.py",
    "schedule.py",
    "int8_gemm.py",
    "quantization.py",
    "model/*.py",
    "tvm_compat.py",
)


def _codegen_fingerprint() -> str:
    root = Path(__file__).parent
    digest = hashlib.sha256()
    for pattern in _CODEGEN_SOURCES:
        for source in sorted(root.glob(pattern)):
            digest.update(source.read_bytes())
    return digest.hexdigest()


# Taken when this module is imported, beside the code generators it imports: the key must name
# the code this process compiles with, even if the files change on disk while it runs.
_CODEGEN_FINGERPRINT = _codegen_fingerprint()


def library_key(config: ModelConfig, target: tvm.target.Target) -> str:
    """A short hash naming everything the compiled library depends on."""
    blob = json.dumps(
        {
            "arch": config.architecture_key(),
            "target": str(target),
            "tvm": tvm.__version__,
            "codegen": _CODEGEN_FINGERPRINT,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    """TVM's CPU pipeline with our schedules between legalization and lowering. (tvm.compile's
    default pipeline would fuse operators a second time, after the schedules, unscheduling the
    matmuls.)"""
    if target.kind.name == "llvm":
        schedule = schedule_cpu_kernels(target)
    else:
        from tvm.s_tir import dlight as dl

        schedule = dl.ApplyDefaultSchedule(
            dl.gpu.Matmul(),
            dl.gpu.GEMV(),
            dl.gpu.Reduction(),
            dl.gpu.GeneralReduction(),
            dl.gpu.Fallback(),
        )
    legalize, annotate, fold, *fuse = generic.legalize_passes(target)
    return tvm.transform.Sequential(
        [
            legalize,
            annotate,
            fold,
            # Reshapes become views before fusion: fused in pairs (the qkv split around the
            # attention call), they had been copy kernels, 60 launches per decode step.
            relax.transform.RewriteDataflowReshape(),
            *fuse,
            relax.transform.DeadCodeElimination(),
            schedule,
            *_narrowed_indices(target),
            *generic.dataflow_lower_passes(target),
            *generic.finalize_passes(target),
        ]
    )


def _narrowed_indices(target: tvm.target.Target) -> list[tvm.transform.Pass]:
    """On Vulkan, every kernel's indices as int32: Mesa's lavapipe computed the kernels' bounds
    checks on int64 thread indices wrongly (a 64-thread gather in a 256-thread block wrote
    nothing), and 32-bit indices are what GPUs compute fastest. Every tensor of the models we
    serve has fewer than 2**31 elements."""
    if target.kind.name != "vulkan":
        return []
    return [tvm.tirx.transform.ForceNarrowIndexToInt32()]


METADATA_FUNCTION = "_metadata"

# Upper bounds on the VM functions' symbolic sizes. With them the memory planner gives every
# intermediate one storage of its largest size, reused by each call; without them the VM's pooled
# allocator kept a buffer for every distinct prefill length and batch size it had seen, and an
# engine's RSS grew by hundreds of MB a round under mixed load (benchmarks/soak.py). Only the
# pages a call touches become resident. `ModelRuntime` refuses a KV cache that could exceed them.
MAX_PREFILL_TOKENS = 4096  # prefill: new tokens of all sequences together (and logit rows)
MAX_DECODE_BATCH = 256  # decode: sequences in one step


def library_metadata(model: LlamaForCausalLM) -> dict[str, Any]:
    """What a library records: the model it was built for, to check it against later, and the
    layout it wants 4-bit weights in (`quantization.to_storage_layout`)."""
    return {
        "architecture": model.config.architecture_key(),
        "column_block": model.quant.column_block,
        "kv_dtype": model.quant.kv_dtype,
        "max_prefill_tokens": MAX_PREFILL_TOKENS,
        "max_decode_batch": MAX_DECODE_BATCH,
    }


def _with_size_bounds(mod: tvm.IRModule) -> tvm.IRModule:
    """Annotate prefill's and decode's symbolic sizes with their upper bounds, for
    StaticPlanBlockMemory."""
    bounds = {
        "prefill": {"seq_len": MAX_PREFILL_TOKENS, "num_logits": MAX_PREFILL_TOKENS},
        "decode": {"batch_size": MAX_DECODE_BATCH},
    }
    for name, bound in bounds.items():
        func = mod[name].with_attr("tir_var_upper_bound", bound)
        mod[name] = func.with_attr("tir_non_negative_var", list(bound))
    return mod


def _with_metadata(mod: tvm.IRModule, model: LlamaForCausalLM) -> tvm.IRModule:
    builder = relax.BlockBuilder()
    with builder.function(METADATA_FUNCTION, []):
        builder.emit_func_output(StringImm(json.dumps(library_metadata(model))))
    mod[METADATA_FUNCTION] = builder.get()[METADATA_FUNCTION]
    return mod


def compile_model(
    config: ModelConfig,
    target: tvm.target.Target,
    output: Path,
    progress: Callable[[str], None] = lambda _: None,
    kv_dtype: str = "",
) -> float:
    """Build the library for `config` on `target` into `output`; returns the seconds taken.
    `kv_dtype`: the KV cache's dtype, if not the quantization's default (tests compare a
    float32 cache with a NumPy reference exactly)."""
    start = time.perf_counter()
    progress("exporting the model graph")
    model = LlamaForCausalLM(config, target, kv_dtype)
    mod, _ = model.export_tvm(spec=model.get_default_spec())
    mod = _with_size_bounds(_with_metadata(mod, model))
    progress("optimizing and scheduling kernels")
    with target:
        mod = _pipeline(target)(mod)
    progress("generating machine code")
    executable = tvm.compile(mod, target, relax_pipeline=None)
    output.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a crash or a concurrent build never leaves half a library behind.
    partial = output.with_name(f".{output.name}.{os.getpid()}.partial.so")
    executable.export_library(str(partial))
    partial.replace(output)
    return time.perf_counter() - start
