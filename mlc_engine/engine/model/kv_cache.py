"""The paged KV cache of our models: TVM's `TIRPagedKVCache`, with our attention kernels on CPU.

TVM builds the cache's kernels into the module being exported and hands them to the runtime
(`vm.builtin.paged_attention_kv_cache_create`). For llvm targets we then swap, by the names
TVM gives them, its three attention kernels for the faster ones in `attention.py`, its RoPE
kernel for the one in `rope.py` and its append kernel for `kv_append` below (same arguments,
same results). On other targets TVM's kernels stay as they are.
"""

from __future__ import annotations

import math
from typing import Any

from tvm import relax, tirx
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache
from tvm.script import tirx as T
from tvm.target import Target

from mlc_engine.common.config import ModelConfig
from mlc_engine.engine.model.attention import (
    PAGE_SIZE,
    attention_decode_paged,
    attention_prefill_paged,
    attention_prefill_ragged,
)
from mlc_engine.engine.model.rope import rope_cpu
from mlc_engine.engine.schedule import vector_lanes

# The names `TIRPagedKVCache` gives the kernels we replace on llvm targets.
RAGGED_PREFILL = "tir_attention_prefill_ragged_cpu"
PAGED_PREFILL = "tir_attention_prefill_cpu"
PAGED_DECODE = "tir_attention_decode_cpu"
ROPE = "tir_split_rotary"
APPEND = "kv_cache_transpose_append"


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
        _use_our_cpu_kernels(config, dtype, target, rope_scaling)
    return cache


def _use_our_cpu_kernels(
    config: ModelConfig, dtype: str, target: Target, rope_scaling: dict[str, Any]
) -> None:
    """Replace TVM's CPU attention and RoPE kernels, which `TIRPagedKVCache` just added to the
    module. The sliding-window and tree-attention variants stay TVM's: our models use neither."""
    h_kv, h_q, d = config.num_key_value_heads, config.num_attention_heads, config.head_dim
    lanes = vector_lanes(target)
    builder = relax.BlockBuilder.current()
    added = {gvar.name_hint: gvar for gvar in builder.get().get_global_vars()}
    missing = {RAGGED_PREFILL, PAGED_PREFILL, PAGED_DECODE, ROPE, APPEND} - added.keys()
    if missing:
        raise RuntimeError(f"TIRPagedKVCache no longer adds kernels named {sorted(missing)}")
    ours = {
        RAGGED_PREFILL: attention_prefill_ragged(h_kv, h_q, d, d, dtype, lanes),
        PAGED_PREFILL: attention_prefill_paged(h_kv, h_q, d, dtype, lanes),
        PAGED_DECODE: attention_decode_paged(h_kv, h_q, d, dtype, lanes),
        ROPE: rope_cpu(
            config.rope_theta, 1.0, d, h_q, h_kv, dtype, _yarn_ready(rope_scaling, config)
        ),
        APPEND: kv_append(h_kv, d, dtype),
    }
    for name, kernel in ours.items():
        builder.update_func(added[name], kernel)


def _yarn_ready(rope_scaling: dict[str, Any], config: ModelConfig) -> dict[str, Any]:
    """The scaling dict as `TIRPagedKVCache` hands it to its RoPE kernel: YaRN's frequencies
    need 1 / (2 ln theta) in it."""
    if rope_scaling.get("rope_type") != "yarn" or "inv_theta_log_scale" in rope_scaling:
        return rope_scaling
    return {**rope_scaling, "inv_theta_log_scale": 1.0 / (2 * math.log(config.rope_theta))}


def kv_append(h_kv: int, d: int, dtype: str) -> tirx.PrimFunc:
    """In place of TVM's `_kv_cache_transpose_append`: each new token's keys and values, head
    by head, copied to its slot in the pages (position_map: page * PAGE_SIZE + offset, or -1
    for a token not to store). TVM's loop copies one scalar at a time and works out the slot
    for each (about 1% of a 16-sequence decode step); here a head's row is one vector copy."""

    @T.prim_func(s_tir=True)
    def tir_kv_cache_transpose_append(
        var_pages: T.handle,  # [num_pages, 2, h_kv, PAGE_SIZE, d]
        var_k_data: T.handle,  # [n_tokens, h_kv, d]
        var_v_data: T.handle,  # [n_tokens, h_kv, d]
        var_position_map: T.handle,  # [n_tokens]
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        n_tokens = T.int64()
        num_pages = T.int64()
        pages = T.match_buffer(
            var_pages, (num_pages, 2, h_kv, PAGE_SIZE, d), dtype, elem_offset=T.int64()
        )
        k_data = T.match_buffer(var_k_data, (n_tokens, h_kv, d), dtype)
        v_data = T.match_buffer(var_v_data, (n_tokens, h_kv, d), dtype)
        position_map = T.match_buffer(var_position_map, (n_tokens,), "int32", elem_offset=T.int32())
        for token, h in T.grid(n_tokens, h_kv):
            with T.sblock("append"):
                T.reads()  # where a row goes depends on a value read: declare none
                T.writes()
                if position_map[token] != -1:
                    page: T.let[T.int32] = position_map[token] // PAGE_SIZE
                    slot: T.let[T.int32] = position_map[token] % PAGE_SIZE
                    for i in T.vectorized(d):
                        pages[page, 0, h, slot, i] = k_data[token, h, i]
                    for i in T.vectorized(d):
                        pages[page, 1, h, slot, i] = v_data[token, h, i]

    return tir_kv_cache_transpose_append
