"""Turn a weight source (GGUF file or Hugging Face folder) into an MLC model folder.

The folder holds `mlc-chat-config.json`, `params.safetensors` (named as the model definition
names its parameters) and `tokenizer.json`. GGUF blocks that match one of our storages are carried
over as they are, never rounded twice, and no tensor gets fewer bits than the file gave it (a Q8_0
tensor stays 8-bit, a float one float; see `weight_storage`).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from mlc_engine.common.config import ModelConfig
from mlc_engine.engine import quantization as q
from mlc_engine.engine.quantization import Quantization, get_quantization
from mlc_engine.engine.runtime import PARAMS_FILE
from mlc_engine.engine.weights.gguf_blocks import Blocks
from mlc_engine.engine.weights.source import ModelSource, SourceTensor, load_source

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"


# Raised whenever converting the same source would give another folder: the default model's
# folder in the cache is converted again when it was written by an older converter.
CONVERTER_VERSION = 3
FLOAT_KINDS = {"F32", "F16", "BF16"}
# The storage that holds each GGUF block type exactly (`gguf_blocks.py` decodes them): K-quants'
# sub-block scales become per-group float scales, and 5- and 6-bit codes take a byte each.
EXACT_STORAGE = {
    "Q4_0": q.Q4_0,
    "Q4_1": q.Q4_1,
    "Q4_K": q.Q4_1,
    "Q5_0": q.Q8_0,
    "Q8_0": q.Q8_0,
    "Q5_1": q.Q8_1,
    "Q5_K": q.Q8_1,
    "Q6_K": q.Q8_0_G16,
}


def _float_rows(sources: list[SourceTensor]) -> np.ndarray:
    return np.concatenate([s.to_float32() for s in sources], axis=0)


def _kind_storage(kind: str, quant: Quantization) -> str:
    """What a GGUF tensor of `kind` becomes under a 4-bit scheme: never fewer bits than it has.
    4-bit blocks take the scheme's 4-bit format (Q4_1 and Q4_K into a symmetric scheme are
    rounded again, with a warning, as MLC's names promise symmetric codes)."""
    if kind in FLOAT_KINDS:
        return q.FLOAT
    storage = EXACT_STORAGE[kind]
    return quant.weight_storage if q.FORMATS[storage].bits == 4 else storage


def weight_storage(sources: list[SourceTensor], quant: Quantization, keeps_storage: bool) -> str:
    """The storage of one (possibly fused) weight: the scheme's for float checkpoints and for
    unquantized schemes, else the narrowest that holds what each of the GGUF file's tensors
    needs (`quantization.widest`)."""
    if not quant.quantized or not keeps_storage:
        return quant.weight_storage
    return q.widest([_kind_storage(s.kind, quant) for s in sources])


def _exact(blocks: Blocks, storage: str) -> q.PackedWeight | None:
    """`blocks` in `storage` with every value kept, or None where the storage cannot hold them."""
    form = q.FORMATS[storage]
    if blocks.group % form.group:
        return None
    scale, minimum = blocks.scale, blocks.minimum
    if minimum is not None and not form.has_minimum:
        return None
    if form.bits == 8:
        words = q.pack_q8(blocks.codes)
        if form.has_minimum and minimum is None:
            minimum = np.zeros_like(scale)
    else:
        codes = blocks.codes.astype(np.int16)
        if minimum is None:  # symmetric codes (Q4_0's), which 4-bit storages hold as code + 8
            if codes.min(initial=0) < -8 or codes.max(initial=0) > 7:
                return None
            codes = codes + 8
            # scale * (code + 8) - 8 * scale: both products and the difference are exact.
            minimum = -8 * scale if form.has_minimum else None
        elif codes.min(initial=0) < 0 or codes.max(initial=0) > 15:
            return None
        words = q.pack_codes(codes.astype(np.uint8))
    repeat = blocks.group // form.group
    if repeat > 1:
        scale = np.repeat(scale, repeat, axis=1)
        minimum = None if minimum is None else np.repeat(minimum, repeat, axis=1)
    return q.PackedWeight(storage, words, scale, minimum)


def _rounded(weight: np.ndarray, storage: str) -> q.PackedWeight:
    """A float matrix rounded into `storage`."""
    form = q.FORMATS[storage]
    if form.bits == 4 and form.has_minimum:
        code, scale, minimum = q.quantize_asymmetric(weight)
        return q.PackedWeight(storage, q.pack_codes(code), scale, minimum)
    if form.bits == 4:
        code, scale = q.quantize_symmetric(weight)
        return q.PackedWeight(storage, q.pack_codes(code), scale)
    code, scale = q.quantize_q8(weight, form.group)
    zero = np.zeros_like(scale) if form.has_minimum else None
    return q.PackedWeight(storage, q.pack_q8(code), scale, zero)


def _pack(sources: list[SourceTensor], storage: str, rerounded: list[str]) -> q.PackedWeight:
    """The row-concatenation of `sources` in `storage`: GGUF blocks carried over exactly where
    the storage holds them, others rounded from their values (names of quantized sources that
    had to be rounded again go to `rerounded`)."""
    parts = []
    for s in sources:
        packed = None if s.kind in FLOAT_KINDS else _exact(s.blocks(), storage)
        if packed is None:
            if s.kind not in FLOAT_KINDS:
                rerounded.append(s.name)
            packed = _rounded(s.to_float32(), storage)
        parts.append(packed)
    minimums = [p.minimum for p in parts if p.minimum is not None]
    return q.PackedWeight(
        storage,
        np.concatenate([p.weight for p in parts]),
        np.concatenate([p.scale for p in parts]),
        np.concatenate(minimums) if minimums else None,
    )


def _weight_params(
    name: str, sources: list[SourceTensor], storage: str, dtype: str, rerounded: list[str]
) -> dict[str, np.ndarray]:
    """Parameters of one (possibly fused) linear or embedding weight, under our names."""
    if storage == q.FLOAT:
        return {f"{name}.weight": _float_rows(sources).astype(dtype)}
    cols = sources[0].shape[-1]
    if cols % q.GROUP_SIZE:
        raise ValueError(f"{sources[0].name}: {cols} columns is not a multiple of {q.GROUP_SIZE}")
    packed = _pack(sources, storage, rerounded)
    prefix = f"{name}.{q.packed_name(storage)}"
    params = {f"{prefix}.q_weight": packed.weight, f"{prefix}.q_scale": packed.scale.astype(dtype)}
    if packed.minimum is not None:
        params[f"{prefix}.q_min"] = packed.minimum.astype(dtype)
    return params


def _groups(config: ModelConfig) -> Iterator[tuple[str, list[str], bool]]:
    """(our name, source names fused by rows, whether it is a quantizable weight)."""
    yield "model.embed_tokens", ["model.embed_tokens.weight"], True
    for i in range(config.num_hidden_layers):
        hf, ours = f"model.layers.{i}", f"model.layers.{i}"
        attn = [f"{hf}.self_attn.{p}_proj" for p in "qkv"]
        yield f"{ours}.self_attn.qkv_proj", [f"{a}.weight" for a in attn], True
        if config.attention_bias:
            yield f"{ours}.self_attn.qkv_proj.bias", [f"{a}.bias" for a in attn], False
        yield f"{ours}.self_attn.o_proj", [f"{hf}.self_attn.o_proj.weight"], True
        mlp = [f"{hf}.mlp.gate_proj.weight", f"{hf}.mlp.up_proj.weight"]
        yield f"{ours}.mlp.gate_up_proj", mlp, True
        yield f"{ours}.mlp.down_proj", [f"{hf}.mlp.down_proj.weight"], True
        norms = ["input_layernorm", "post_attention_layernorm"]
        norms += ["self_attn.q_norm", "self_attn.k_norm"] if config.qk_norm else []
        for norm in norms:
            yield f"{ours}.{norm}.weight", [f"{hf}.{norm}.weight"], False
    yield "model.norm.weight", ["model.norm.weight"], False
    if not config.tie_word_embeddings:
        yield "lm_head", ["lm_head.weight"], True


def convert_params(
    source: ModelSource,
    config: ModelConfig,
    on_tensor: Callable[[str], None] = lambda _: None,
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Map, fuse and quantize source tensors into the model definition's parameters; returns
    them with each weight's storage (`ModelConfig.tensor_storage`)."""
    quant = get_quantization(config.quantization)
    params: dict[str, np.ndarray] = {}
    storages: dict[str, str] = {}
    rerounded: list[str] = []
    for ours, names, is_weight in _groups(config):
        missing = [n for n in names if n not in source.tensors]
        if missing:
            raise ValueError(f"the weights lack {missing[0]}")
        sources = [source.tensors[n] for n in names]
        if is_weight:
            storages[ours] = weight_storage(sources, quant, source.keeps_storage)
            params.update(_weight_params(ours, sources, storages[ours], quant.dtype, rerounded))
        else:
            params[ours] = np.concatenate([s.to_float32().ravel() for s in sources]).astype(
                quant.dtype
            )
        on_tensor(ours)
    if rerounded:
        log.warning(
            "%d quantized tensors could not be carried over as they are into %s and were "
            "rounded again (%s%s); q4f32_m / q4f16_m keep GGUF Q4_0, Q4_1 and Q4_K blocks exactly",
            len(rerounded),
            quant.name,
            ", ".join(rerounded[:3]),
            ", ..." if len(rerounded) > 3 else "",
        )
    return params, storages


def write_model_folder(
    config: ModelConfig, params: dict[str, np.ndarray], tokenizer_json: str | None, output: Path
) -> None:
    output.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in params.items()}, str(output / PARAMS_FILE))
    if tokenizer_json is not None:
        (output / TOKENIZER_FILE).write_text(tokenizer_json, encoding="utf-8")
    config.save(output)


def convert(
    source_path: Path,
    quantization: str,
    output: Path,
    model_name: str | None = None,
    on_tensor: Callable[[str, int], None] = lambda name, total: None,
) -> ModelConfig:
    """Convert a GGUF file or Hugging Face folder into a model folder at `output`.

    `on_tensor(name, total)` is called after each parameter group, for progress bars."""
    get_quantization(quantization)
    source = load_source(source_path)
    config = dataclasses.replace(
        source.config, quantization=quantization, model_name=model_name or source.config.model_name
    )
    total = sum(1 for _ in _groups(config))
    params, storages = convert_params(source, config, lambda name: on_tensor(name, total))
    config = dataclasses.replace(
        config, tensor_storage=storages, converter_version=CONVERTER_VERSION
    )
    # Write to a sibling and rename, so an interrupted conversion leaves no half-made folder.
    partial = output.with_name(f".{output.name}.partial")
    write_model_folder(config, params, source.tokenizer_json, partial)
    if output.exists():
        shutil.rmtree(output)
    partial.replace(output)
    return config
