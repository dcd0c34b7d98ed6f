"""The Llama family (SmolLM2, TinyLlama, Llama 2/3, Mistral), Qwen2 and Qwen3, on TVM's paged
KV cache.

Qwen2 is a Llama with a bias on the q/k/v projection, and Qwen3 one that RMS-normalizes each
head of q and k before RoPE, so one definition serves all three. The
projections are fused as in MLC: q, k and v into `qkv_proj`, gate and up into `gate_up_proj`.
Each weight is built in the storage the model folder records for it, by its parameter prefix
(`quantization.storage_of`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tvm import tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache
from tvm.target import Target

from mlc_engine.common.config import ModelConfig
from mlc_engine.engine import int8_gemm
from mlc_engine.engine.model.kv_cache import create_paged_kv_cache
from mlc_engine.engine.model.layers import Embedding, Linear, swiglu
from mlc_engine.engine.quantization import Quantization, get_quantization, storage_of


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, quant: Quantization, prefix: str):
        self.head_dim = config.head_dim
        self.num_q_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        qkv_rows = (self.num_q_heads + 2 * self.num_kv_heads) * self.head_dim
        self.qkv_proj = Linear(
            config.hidden_size,
            qkv_rows,
            config.attention_bias,
            quant,
            storage_of(config, f"{prefix}.qkv_proj"),
        )
        self.o_proj = Linear(
            self.num_q_heads * self.head_dim,
            config.hidden_size,
            False,
            quant,
            storage_of(config, f"{prefix}.o_proj"),
        )
        self.dtype, self.kv_dtype = quant.dtype, quant.kv_dtype
        self.q_norm: nn.RMSNorm | None = None
        self.k_norm: nn.RMSNorm | None = None
        if config.qk_norm:
            eps, dtype = config.rms_norm_eps, quant.dtype
            self.q_norm = nn.RMSNorm(self.head_dim, -1, eps, bias=False, dtype=dtype)
            self.k_norm = nn.RMSNorm(self.head_dim, -1, eps, bias=False, dtype=dtype)

    def forward(self, x: nn.Tensor, kv_cache: PagedKVCache, layer_id: int) -> nn.Tensor:
        batch, seq_len, _ = x.shape
        heads = self.num_q_heads + 2 * self.num_kv_heads
        qkv = op.reshape(self.qkv_proj(x), (batch, seq_len, heads, self.head_dim))
        if self.q_norm is not None and self.k_norm is not None:
            ends = [self.num_q_heads, self.num_q_heads + self.num_kv_heads]
            q, k, v = op.split(qkv, ends, axis=2)
            qkv = op.concat([self.q_norm(q), self.k_norm(k), v], dim=2)
        # The cache's kernels take q, k and v in its dtype (they compute in float32).
        out = kv_cache.attention_with_fused_qkv(
            layer_id, qkv.astype(self.kv_dtype), self.num_q_heads, sm_scale=self.head_dim**-0.5
        ).astype(self.dtype)
        return self.o_proj(op.reshape(out, (batch, seq_len, self.num_q_heads * self.head_dim)))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, quant: Quantization, prefix: str):
        size, hidden = config.intermediate_size, config.hidden_size
        gate_up, down = (
            storage_of(config, f"{prefix}.{name}") for name in ("gate_up_proj", "down_proj")
        )
        self.gate_up_proj = Linear(hidden, 2 * size, False, quant, gate_up)
        self.down_proj = Linear(size, hidden, False, quant, down)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return self.down_proj(swiglu(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, quant: Quantization, prefix: str):
        eps = config.rms_norm_eps
        self.self_attn = Attention(config, quant, f"{prefix}.self_attn")
        self.mlp = MLP(config, quant, f"{prefix}.mlp")
        hidden, dtype = config.hidden_size, quant.dtype
        self.input_layernorm = nn.RMSNorm(hidden, -1, eps, bias=False, dtype=dtype)
        self.post_attention_layernorm = nn.RMSNorm(hidden, -1, eps, bias=False, dtype=dtype)

    def forward(self, x: nn.Tensor, kv_cache: PagedKVCache, layer_id: int) -> nn.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), kv_cache, layer_id)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, quant: Quantization):
        self.embed_tokens = Embedding(
            config.vocab_size,
            config.hidden_size,
            quant,
            storage_of(config, "model.embed_tokens"),
        )
        self.layers = nn.ModuleList(
            [
                DecoderLayer(config, quant, f"model.layers.{i}")
                for i in range(config.num_hidden_layers)
            ]
        )
        self.norm = nn.RMSNorm(
            config.hidden_size, -1, config.rms_norm_eps, bias=False, dtype=quant.dtype
        )

    def forward(self, x: nn.Tensor, kv_cache: PagedKVCache) -> nn.Tensor:
        for layer_id, layer in enumerate(self.layers):
            x = layer(x, kv_cache, layer_id)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """The exported functions: `prefill` (ragged, several sequences), `decode` (a batch)
    and `create_kv_cache`. Logits come back in float32 whatever the compute dtype."""

    def __init__(self, config: ModelConfig, target: Target | None, kv_dtype: str = ""):
        """`target` None: the model as any target sees it (its parameter names, not their
        layout). `kv_dtype`: the KV cache's dtype, if not the quantization's default."""
        quant = dataclasses.replace(get_quantization(config.quantization), kv_cache_dtype=kv_dtype)
        if target is not None:
            quant = dataclasses.replace(quant, column_block=int8_gemm.column_block(quant, target))
        self.quant = quant
        self.rope_scaling = _rope_scaling(config)
        self.config = config
        self.target = target
        self.dtype = quant.dtype
        self.model = LlamaModel(config, quant)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Linear(
                config.hidden_size,
                config.vocab_size,
                False,
                quant,
                storage_of(config, "lm_head"),
            )
        )

    def _logits(self, hidden: nn.Tensor) -> nn.Tensor:
        if self.lm_head is None:
            return self.model.embed_tokens.lm_head(hidden)
        return self.lm_head(hidden).astype("float32")

    def prefill(
        self, input_ids: nn.Tensor, logit_positions: nn.Tensor, kv_cache: PagedKVCache
    ) -> tuple[nn.Tensor, PagedKVCache]:
        """Ragged prefill: `input_ids` holds every sequence's new tokens end to end."""
        embeds = op.reshape(self.model.embed_tokens(input_ids), (1, input_ids.shape[0], -1))
        hidden = op.take(self.model(embeds, kv_cache), logit_positions, axis=1)
        return self._logits(hidden), kv_cache

    def decode(
        self, input_ids: nn.Tensor, kv_cache: PagedKVCache
    ) -> tuple[nn.Tensor, PagedKVCache]:
        """One new token for each sequence of the batch."""
        embeds = op.reshape(self.model.embed_tokens(input_ids), (input_ids.shape[0], 1, -1))
        return self._logits(self.model(embeds, kv_cache)), kv_cache

    def decode_one(
        self, input_ids: nn.Tensor, kv_cache: PagedKVCache
    ) -> tuple[nn.Tensor, PagedKVCache]:
        """`decode` for a batch of exactly one. Every shape in it is static, so its matmuls get
        single-row kernels and the VM computes no shapes at run time."""
        return self.decode(input_ids, kv_cache)

    def create_kv_cache(
        self,
        max_batch_size: tirx.Var,
        max_total_seq_len: tirx.Var,
        prefill_chunk_size: tirx.Var,
        page_size: tirx.Var,
        support_sliding_window: tirx.Var,
    ) -> PagedKVCache:
        return create_paged_kv_cache(
            self.config,
            self.quant.kv_dtype,
            self.target,
            max_batch_size,
            max_total_seq_len,
            prefill_chunk_size,
            page_size,
            support_sliding_window,
            self.rope_scaling,
        )

    def get_default_spec(self) -> nn.spec.ModuleSpec:
        packed = {"param_mode": "packed", "effect_mode": "none"}
        spec: dict[str, Any] = {
            "prefill": {
                "input_ids": nn.spec.Tensor(["seq_len"], "int32"),
                "logit_positions": nn.spec.Tensor(["num_logits"], "int32"),
                "kv_cache": nn.spec.Object(object_type=PagedKVCache),
                "$": packed,
            },
            "decode": {
                "input_ids": nn.spec.Tensor(["batch_size"], "int32"),
                "kv_cache": nn.spec.Object(object_type=PagedKVCache),
                "$": packed,
            },
            "decode_one": {
                "input_ids": nn.spec.Tensor([1], "int32"),
                "kv_cache": nn.spec.Object(object_type=PagedKVCache),
                "$": packed,
            },
            "create_kv_cache": {
                "max_batch_size": int,
                "max_total_seq_len": int,
                "prefill_chunk_size": int,
                "page_size": int,
                "support_sliding_window": int,
                "$": {"param_mode": "none", "effect_mode": "none"},
            },
        }
        return nn.spec.ModuleSpec.from_raw(spec, self)


SUPPORTED_ROPE_SCALING = ("llama3", "yarn")


def _rope_scaling(config: ModelConfig) -> dict[str, Any]:
    """The RoPE scaling dict TVM's kernels take ({} for none); older configs say "type"."""
    scaling = dict(config.rope_scaling or {})
    kind = scaling.pop("type", None) or scaling.get("rope_type", "default")
    if kind == "default":
        return {}
    if kind not in SUPPORTED_ROPE_SCALING:
        supported = ", ".join(SUPPORTED_ROPE_SCALING)
        raise ValueError(f"RoPE scaling {kind!r} is not supported (supported: {supported})")
    return {**scaling, "rope_type": kind}
