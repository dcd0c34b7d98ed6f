"""Read a Hugging Face model folder (config.json, safetensors, tokenizer files) as a `ModelSource`.

The safetensors header is parsed here rather than by the `safetensors` package, whose numpy loader
cannot return bfloat16; every tensor is a view into one read-only memory map per file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mlc_engine.common.config import ModelConfig
from mlc_engine.engine.weights.sampling_defaults import recommended_sampling
from mlc_engine.engine.weights.source import ModelSource, SourceTensor, stop_token_ids

# bfloat16 is kept as its uint16 bit patterns; SourceTensor.to_float32 widens it.
DTYPES: dict[str, type[np.generic]] = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def load_hf_folder(folder: Path) -> ModelSource:
    """Read config.json, the safetensors shards and the tokenizer files of `folder`."""
    hf = _json(folder / "config.json")
    if hf.get("model_type") not in MODEL_TYPES:
        raise ValueError(f"{folder}: model_type {hf.get('model_type')!r} is not supported")
    tensors: dict[str, SourceTensor] = {}
    for file in _shards(folder):
        tensors.update(read_safetensors(file))
    tokenizer_file = folder / "tokenizer.json"
    tokenizer_json = (
        tokenizer_file.read_text(encoding="utf-8") if tokenizer_file.is_file() else None
    )
    config = _config(folder, hf, tensors, json.loads(tokenizer_json or "{}"))
    return ModelSource(config=config, tensors=tensors, tokenizer_json=tokenizer_json, path=folder)


def read_safetensors(file: Path) -> dict[str, SourceTensor]:
    """The tensors of one safetensors file, memory-mapped."""
    with file.open("rb") as stream:
        header_size = int.from_bytes(stream.read(8), "little")
        header = json.loads(stream.read(header_size))
    raw = np.memmap(file, dtype=np.uint8, mode="r")
    start = 8 + header_size
    tensors = {}
    for name, entry in header.items():
        # Rotary tables are recomputed by the model; they are buffers, not weights.
        if name == "__metadata__" or name.endswith("rotary_emb.inv_freq"):
            continue
        kind = entry["dtype"]
        if kind not in DTYPES:
            raise ValueError(f"{file}: tensor {name} has dtype {kind}; supported: {list(DTYPES)}")
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        data = raw[start + begin : start + end].view(DTYPES[kind]).reshape(shape)
        tensors[name] = SourceTensor(name=name, shape=shape, kind=kind, data=data)
    return tensors


def _shards(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / name for name in sorted(set(_json(index)["weight_map"].values()))]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder} has no *.safetensors files (PyTorch .bin is not supported)")
    return files


def _config(
    folder: Path, hf: dict[str, Any], tensors: dict[str, SourceTensor], tokenizer: dict[str, Any]
) -> ModelConfig:
    model_type = MODEL_TYPES[hf["model_type"]]
    special = _json(folder / "tokenizer_config.json")
    generation = _json(folder / "generation_config.json")
    token_id = _token_lookup(tokenizer)
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    context = hf["max_position_embeddings"]
    # Mistral v0.1 attends through a sliding window; past it the model was never trained.
    # Qwen configs name a window they do not use unless use_sliding_window says so.
    if hf.get("use_sliding_window", model_type == "llama") and hf.get("sliding_window"):
        context = min(context, hf["sliding_window"])
    chat_template = _chat_template(special.get("chat_template"))
    bos_text = _token_text(special.get("bos_token"))
    eos = [
        *_ids(generation.get("eos_token_id")),
        *_ids(hf.get("eos_token_id")),
        *_ids(token_id(_token_text(special.get("eos_token")) or "")),
    ]
    bos = hf.get("bos_token_id", generation.get("bos_token_id"))
    # A hub snapshot's folder is named by its commit; config.json may still name the model.
    names = [folder.resolve().name, Path(hf.get("_name_or_path") or "").name]
    return ModelConfig(
        model_type=model_type,
        hidden_size=hidden,
        intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads,
        vocab_size=hf["vocab_size"],
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=hf.get("rope_theta", 10000.0),
        context_window_size=context,
        head_dim=hf.get("head_dim") or hidden // heads,
        rope_scaling=hf.get("rope_scaling"),
        tie_word_embeddings=hf.get("tie_word_embeddings", False) or "lm_head.weight" not in tensors,
        attention_bias="model.layers.0.self_attn.q_proj.bias" in tensors,
        bos_token_id=bos if bos is not None else token_id(bos_text or ""),
        eos_token_ids=stop_token_ids(eos, chat_template, token_id),
        pad_token_id=hf.get("pad_token_id", generation.get("pad_token_id")),
        add_bos_token=special.get(
            "add_bos_token", _prepends(tokenizer.get("post_processor"), bos_text)
        ),
        chat_template=chat_template,
        model_name=folder.resolve().name,
        sampling=recommended_sampling(generation, names),
    )


def _token_lookup(tokenizer: dict[str, Any]) -> Callable[[str], int | None]:
    """Token text -> id from tokenizer.json: its added tokens, then the model vocabulary."""
    ids = {added["content"]: added["id"] for added in tokenizer.get("added_tokens", [])}
    vocab = tokenizer.get("model", {}).get("vocab", {})
    if isinstance(vocab, list):  # Unigram vocabularies are [piece, score] pairs in id order
        vocab = {piece: i for i, (piece, _score) in enumerate(vocab)}
    return lambda text: ids.get(text, vocab.get(text))


def _prepends(post_processor: dict[str, Any] | None, bos: str | None) -> bool:
    """Whether tokenizer.json's post-processor puts `bos` in front of a single sequence."""
    if not post_processor or bos is None:
        return False
    if post_processor.get("type") == "Sequence":
        return any(_prepends(step, bos) for step in post_processor["processors"])
    single = post_processor.get("single") or [{}]
    return bool(single[0].get("SpecialToken", {}).get("id") == bos)


def _chat_template(value: str | list[dict[str, str]] | None) -> str | None:
    """The one template in tokenizer_config.json, or 'default' from its list of named ones."""
    if isinstance(value, list):
        named = {entry["name"]: entry["template"] for entry in value}
        return named.get("default")
    return value


def _token_text(value: str | dict[str, Any] | None) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _ids(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data
