"""An independent NumPy forward pass of a Llama/Qwen2 model, from Hugging Face-named float weights.

It follows the Hugging Face modelling code (rotate_half RoPE, GQA, SwiGLU), not ours, so the
compiled model can be checked against it. GGUF files' weights are dequantized by gguf-py
(`gguf_weights`), not by the engine's converter.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np

from mlc_engine.common.config import ModelConfig


def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    variance = np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True)
    return (x / np.sqrt(variance + eps)).astype(np.float32) * weight


def _llama3_scaling(inv_freq: np.ndarray, scaling: dict) -> np.ndarray:
    """Hugging Face's `_compute_llama3_parameters`."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return np.where(medium, smoothed, scaled)


def _rope(
    x: np.ndarray, positions: np.ndarray, theta: float, scaling: dict | None = None
) -> np.ndarray:
    """x: [tokens, heads, head_dim]; Hugging Face's rotate_half convention."""
    dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if scaling and scaling.get("rope_type") == "llama3":
        inv_freq = _llama3_scaling(inv_freq, scaling)
    angles = positions[:, None].astype(np.float64) * inv_freq[None, :]
    cos = np.cos(np.concatenate([angles, angles], axis=-1))[:, None, :]
    sin = np.sin(np.concatenate([angles, angles], axis=-1))[:, None, :]
    half = dim // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos + rotated * sin).astype(np.float32)


def forward(
    weights: dict[str, np.ndarray],
    config: ModelConfig,
    tokens: list[int],
    rounded: Callable[[np.ndarray], np.ndarray] = lambda x: x,
    kv_dtype: str = "float32",
    rounds: Callable[[str], bool] = lambda weight: True,
) -> np.ndarray:
    """Logits [len(tokens), vocab] after each token of one sequence. `rounded` is applied to the
    activations that go into each weight matmul (as a kernel that rounds them would), of the
    weights (by name) that `rounds` picks. With a
    float16 `kv_dtype`, q, k and v are rounded to it before RoPE and after (the cache's kernels
    take and give that dtype), and so is the attention's output."""

    def in_cache(x: np.ndarray) -> np.ndarray:
        return x.astype(kv_dtype).astype(np.float32)

    c = config
    w = weights

    def into(x: np.ndarray, weight: str) -> np.ndarray:
        return rounded(x) if rounds(weight) else x

    positions = np.arange(len(tokens))
    x = w["model.embed_tokens.weight"][tokens].astype(np.float32)
    n, hq, hkv, d = len(tokens), c.num_attention_heads, c.num_key_value_heads, c.head_dim
    causal = np.triu(np.full((n, n), -np.inf, dtype=np.float32), k=1)
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}"
        h = _rms_norm(x, w[f"{p}.input_layernorm.weight"], c.rms_norm_eps)
        proj = {}
        for name in "qkv":
            weight = f"{p}.self_attn.{name}_proj.weight"
            out = into(h, weight) @ w[weight].T
            bias = w.get(f"{p}.self_attn.{name}_proj.bias")
            proj[name] = out + bias if bias is not None else out
        q, k = proj["q"].reshape(n, hq, d), proj["k"].reshape(n, hkv, d)
        if c.qk_norm:  # Qwen3: each head of q and k RMS-normalized before RoPE
            q = _rms_norm(q, w[f"{p}.self_attn.q_norm.weight"], c.rms_norm_eps)
            k = _rms_norm(k, w[f"{p}.self_attn.k_norm.weight"], c.rms_norm_eps)
        q, k, v = in_cache(q), in_cache(k), in_cache(proj["v"])
        q = in_cache(_rope(q, positions, c.rope_theta, c.rope_scaling))
        k = in_cache(_rope(k, positions, c.rope_theta, c.rope_scaling))
        v = v.reshape(n, hkv, d)
        group = hq // hkv
        k = np.repeat(k, group, axis=1)
        v = np.repeat(v, group, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d) + causal
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs = scores / scores.sum(axis=-1, keepdims=True)
        attn = in_cache(np.einsum("hqk,khd->qhd", probs, v).reshape(n, hq * d))
        o_proj, down = f"{p}.self_attn.o_proj.weight", f"{p}.mlp.down_proj.weight"
        x = x + into(attn, o_proj) @ w[o_proj].T
        h = _rms_norm(x, w[f"{p}.post_attention_layernorm.weight"], c.rms_norm_eps)
        gate, up = (f"{p}.mlp.{name}_proj.weight" for name in ("gate", "up"))
        gate, up = into(h, gate) @ w[gate].T, into(h, up) @ w[up].T
        x = x + into(gate / (1.0 + np.exp(-gate)) * up, down) @ w[down].T
    x = _rms_norm(x, w["model.norm.weight"], c.rms_norm_eps)
    head = "model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"
    return into(x, head) @ w[head].T


# llama.cpp's tensor names (GGUF) -> Hugging Face's, for the parts of a layer.
_GGUF_LAYER_PARTS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_TOP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def gguf_weights(path: Path) -> dict[str, np.ndarray]:
    """A llama GGUF file's weights as float32 in Hugging Face names, dequantized by gguf-py's
    own `gguf.quants` (not by the engine), q and k rows put back out of llama.cpp's RoPE order."""
    reader = gguf.GGUFReader(path)
    heads = {
        "attn_q": int(reader.get_field("llama.attention.head_count").contents()),
        "attn_k": int(reader.get_field("llama.attention.head_count_kv").contents()),
    }
    weights = {}
    for tensor in reader.tensors:
        shape = tuple(reversed([int(n) for n in tensor.shape]))
        values = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
        values = values.reshape(shape).astype(np.float32)
        if tensor.name in _GGUF_TOP:
            weights[_GGUF_TOP[tensor.name]] = values
            continue
        _, layer, part, suffix = tensor.name.split(".")
        if part in heads:  # llama.cpp's permute: each head's two halves interleaved by rows
            n_head = heads[part]
            half = values.shape[0] // n_head // 2
            values = values.reshape(n_head, half, 2, -1).swapaxes(1, 2).reshape(values.shape)
        weights[f"model.layers.{layer}.{_GGUF_LAYER_PARTS[part]}.{suffix}"] = values
    return weights
