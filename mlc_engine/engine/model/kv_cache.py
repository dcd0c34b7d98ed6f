"""The paged KV cache of our models: TVM's `TIRPagedKVCache`, with our attention kernels on CPU.

TVM builds the cache's kernels into the module being exported and hands them to the runtime
(`vm.builtin.paged_attention_kv_cache_create`). For llvm targets we then swap, by the names
TVM gives them, its three attention kernels for the faster ones in `attention.py` (same
arguments, same results) and its RoPE kernel for a parallel schedule of itself. On other
targets TVM's kernels stay as they are.
"""

from __future__ import annotations

from typing import Any

from tvm import relax, s_tir, tirx
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache
from tvm.target import Target

from mlc_engine.common.config import ModelConfig
from mlc_engine.engine.model.attention import (
    attention_decode_paged,
    attention_prefill_paged,
    attention_prefill_ragged,
)
from mlc_engine.engine.schedule import vector_lanes

# The names `TIRPagedKVCache` gives the kernels we replace on llvm targets.
RAGGED_PREFILL = "tir_attention_prefill_ragged_cpu"
PAGED_PREFILL = "tir_attention_prefill_cpu"
PAGED_DECODE = "tir_attention_decode_cpu"
ROPE = "tir_split_rotary"


def create_paged_kv_cache(
    config: ModelConfig,
    dtype: str,
    target: Target,
    max_batch_size: tirx.Var,
    max_total_seq_len: tirx.Var,
    prefill_chunk_size: tirx.Var,
    page_size: tirx.Var,
    support_sliding_window: tirx.Var,
    rope_scaling: dict[str, Any],
) -> PagedKVCache:
    """The KV cache for `config`, RoPE applied to q and k before attention (`RopeMode.NORMAL`).
    Must run inside the module export (it adds its kernels to the current BlockBuilder)."""
    cache = TIRPagedKVCache(
        attn_kind="mha",
        max_batch_size=max_batch_size,
        max_total_seq_len=max_total_seq_len,
        prefill_chunk_size=prefill_chunk_size,
        page_size=page_size,
        support_sliding_window=support_sliding_window,
        layer_partition=relax.ShapeExpr([0, config.num_hidden_layers]),
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        qk_head_dim=config.head_dim,
        v_head_dim=config.head_dim,
        mla_original_qk_head_dim=0,
        mla_original_v_head_dim=0,
        rope_mode=RopeMode.NORMAL,  # our kernels rely on it: they refuse in-kernel RoPE
        rope_scale=1,
        rope_theta=config.rope_theta,
        rope_scaling=rope_scaling,
        rope_ext_factors=relax.prim_value(0),  # no longrope factors
        rotary_dim=config.head_dim,
        enable_disaggregation=False,
        dtype=dtype,
        target=target,
    )
    if target.kind.name == "llvm":
        _use_our_cpu_kernels(config, dtype, target)
    return cache


def _use_our_cpu_kernels(config: ModelConfig, dtype: str, target: Target) -> None:
    """Replace TVM's CPU attention kernels, which `TIRPagedKVCache` just added to the module,
    and run its RoPE kernel in parallel. The sliding-window and tree-attention variants stay
    TVM's: our models use neither."""
    h_kv, h_q, d = config.num_key_value_heads, config.num_attention_heads, config.head_dim
    lanes = vector_lanes(target)
    builder = relax.BlockBuilder.current()
    added = {gvar.name_hint: gvar for gvar in builder.get().get_global_vars()}
    missing = {RAGGED_PREFILL, PAGED_PREFILL, PAGED_DECODE, ROPE} - added.keys()
    if missing:
        raise RuntimeError(f"TIRPagedKVCache no longer adds kernels named {sorted(missing)}")
    ours = {
        RAGGED_PREFILL: attention_prefill_ragged(h_kv, h_q, d, d, dtype, lanes),
        PAGED_PREFILL: attention_prefill_paged(h_kv, h_q, d, dtype, lanes),
        PAGED_DECODE: attention_decode_paged(h_kv, h_q, d, dtype, lanes),
        ROPE: _parallel_rope(builder.get()[added[ROPE]]),
    }
    for name, kernel in ours.items():
        builder.update_func(added[name], kernel)


def _parallel_rope(rope: tirx.PrimFunc) -> tirx.PrimFunc:
    """TVM's RoPE kernel (`llama_rope_with_position_map`) unchanged, but with its (token, head)
    loops run in parallel: it computes a power and a sine per element, one thread otherwise."""
    sch = s_tir.Schedule(rope)
    token, head, _ = sch.get_loops(sch.get_sblock("llama_fused_rope"))
    sch.parallel(sch.fuse(token, head))
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)
