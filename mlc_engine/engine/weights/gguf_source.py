"""Read a llama.cpp GGUF file (architectures `llama` and `qwen2`) as a `ModelSource`.

Tensors are renamed to Hugging Face names and kept in their stored encoding, memory-mapped. The one
layout change is for `llama` files: llama.cpp's converter interleaves the rows of every attention
head of q_proj and k_proj (so GGML's RoPE can rotate adjacent pairs), and our kernels rotate the
two halves of a head as Hugging Face does, so those rows are put back in Hugging Face order.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, ReaderTensor

from mlc_engine.common.config import ModelConfig
from mlc_engine.engine.weights.gguf_blocks import QUANTIZED_KINDS
from mlc_engine.engine.weights.gguf_tokenizer import tokenizer_json_from_reader
from mlc_engine.engine.weights.sampling_defaults import recommended_sampling
from mlc_engine.engine.weights.source import (
    CHAT_STOP_TOKENS,
    ModelSource,
    SourceTensor,
    stop_token_ids,
)

KINDS = ("F32", "F16", "BF16", *QUANTIZED_KINDS)
ARCHITECTURES = ("llama", "qwen2", "qwen3")
TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_PARTS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


class _Reader(GGUFReader):
    """GGUFReader over a plain ndarray view of its memory map.

    numpy.memmap's bookkeeping on every slice dominates parsing a large vocabulary (one slice per
    token); a plain view of the same mapping reads the header about twice as fast.
    """

    @property  # type: ignore[override]
    def data(self) -> np.ndarray:
        return self._plain

    @data.setter
    def data(self, mapped: np.ndarray) -> None:
        self._plain = mapped.view(np.ndarray)


def load_gguf(path: Path) -> ModelSource:
    """Read the tensors, metadata and vocabulary (as a tokenizer.json) of a GGUF file."""
    reader = _Reader(path)
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported ({ARCHITECTURES})")
    heads = {
        "attn_q": int(_field(reader, f"{arch}.attention.head_count")),
        "attn_k": int(_field(reader, f"{arch}.attention.head_count_kv")),
    }
    tensors = {}
    for stored in reader.tensors:
        tensor = _tensor(stored, arch, heads)
        tensors[tensor.name] = tensor
    config = _config(reader, arch, tensors, path)
    has_vocab = "tokenizer.ggml.tokens" in reader.fields
    tokenizer_json = tokenizer_json_from_reader(reader) if has_vocab else None
    return ModelSource(
        config=config, tensors=tensors, tokenizer_json=tokenizer_json, path=path, keeps_storage=True
    )


def undo_rope_interleave(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `LlamaModel.permute` on the first axis of `rows`.

    Works on anything laid out row by row: floats, or whole rows of GGUF block bytes, which keeps
    quantized codes, scales and minimums exactly as stored.
    """
    half = rows.shape[0] // n_head // 2
    return rows.reshape(n_head, half, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _hf_name(name: str, arch: str) -> str:
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    match = LAYER_NAME.fullmatch(name)
    if match is None or match.group(2) not in LAYER_PARTS:
        # Includes rope_freqs.weight: Llama 3.1's per-dimension RoPE factors are not supported.
        raise ValueError(f"GGUF tensor {name} has no Hugging Face counterpart in {arch}")
    layer, part, suffix = match.groups()
    return f"model.layers.{layer}.{LAYER_PARTS[part]}.{suffix}"


def _tensor(stored: ReaderTensor, arch: str, heads: dict[str, int]) -> SourceTensor:
    kind = stored.tensor_type.name
    if kind not in KINDS:
        raise ValueError(f"GGUF tensor {stored.name} has type {kind}; supported: {KINDS}")
    name = _hf_name(stored.name, arch)
    shape = tuple(reversed([int(n) for n in stored.shape]))  # GGUF lists dimensions innermost first
    data = stored.data
    if kind == "BF16":
        data = data.view(np.uint16)  # the reader hands BF16 over as raw bytes
    elif kind not in ("F32", "F16"):
        rows = int(np.prod(shape[:-1], dtype=np.int64))
        data = data.reshape(rows, -1)
    part = stored.name.split(".")[-2]
    if arch == "llama" and part in heads:
        data = undo_rope_interleave(data, heads[part])
    return SourceTensor(name=name, shape=shape, kind=kind, data=data)


def _config(
    reader: GGUFReader, arch: str, tensors: dict[str, SourceTensor], path: Path
) -> ModelConfig:
    def meta(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    hidden = int(meta("embedding_length"))
    heads = int(meta("attention.head_count"))
    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens", [])
    chat_template = _field(reader, "tokenizer.chat_template")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    stop_ids = {t: i for i, t in enumerate(tokens) if t in CHAT_STOP_TOKENS}
    # llama.cpp prepends BOS by default only for SentencePiece ("llama") vocabularies.
    spm = _field(reader, "tokenizer.ggml.model") == "llama"
    names = [_field(reader, f"general.{key}", "") for key in ("basename", "name")] + [path.stem]
    return ModelConfig(
        model_type=arch,
        hidden_size=hidden,
        intermediate_size=int(meta("feed_forward_length")),
        num_hidden_layers=int(meta("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(meta("attention.head_count_kv", heads)),
        vocab_size=int(meta("vocab_size", len(tokens))),
        rms_norm_eps=_short(meta("attention.layer_norm_rms_epsilon")),
        rope_theta=_short(meta("rope.freq_base", 10000.0)),
        context_window_size=int(meta("context_length")),
        head_dim=int(meta("attention.key_length", meta("rope.dimension_count", hidden // heads))),
        rope_scaling=_rope_scaling(reader, arch),
        tie_word_embeddings="lm_head.weight" not in tensors,
        attention_bias="model.layers.0.self_attn.q_proj.bias" in tensors,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=stop_token_ids([] if eos is None else [eos], chat_template, stop_ids.get),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
        add_bos_token=bool(_field(reader, "tokenizer.ggml.add_bos_token", spm)),
        chat_template=chat_template,
        model_name=_field(reader, "general.name", _field(reader, "general.basename", path.stem)),
        # GGUF files carry no generation config: the family's recommendation, if any.
        sampling=recommended_sampling({}, names),
    )


def _rope_scaling(reader: GGUFReader, arch: str) -> dict[str, Any] | None:
    """The Hugging Face `rope_scaling` dict for GGUF's `rope.scaling.*` keys (None when absent)."""
    kind = _field(reader, f"{arch}.rope.scaling.type")
    factor = _field(reader, f"{arch}.rope.scaling.factor")
    if kind is None and _field(reader, f"{arch}.rope.scale_linear") is not None:
        kind, factor = "linear", _field(reader, f"{arch}.rope.scale_linear")
    if kind in (None, "none"):
        return None
    scaling: dict[str, Any] = {"rope_type": kind, "factor": _short(factor)}
    original = _field(reader, f"{arch}.rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _short(value: float) -> float:
    """GGUF stores float32; take its shortest decimal (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))
