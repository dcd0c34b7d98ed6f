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
from mlc_engine.engine.weights.source import ModelSource, SourceTensor, load_source

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"


# Raised whenever converting the same source would give another folder: the default model's
# folder in the cache is converted again when it was written by an older converter.
CONVERTER_VERSION = 2
FLOAT_KINDS = {"F32", "F16", "BF16"}
# How much a storage holds, for fused groups of sources stored differently: the group takes the
# widest of its members' storages, so no member loses bits.
WIDTH = {q.Q4_0: 0, q.Q4_1: 1, q.Q8_0: 2, q.FLOAT: 3}


def _float_rows(sources: list[SourceTensor]) -> np.ndarray:
    return np.concatenate([s.to_float32() for s in sources], axis=0)


def _kind_storage(kind: str, quant: Quantization) -> str:
    """What a GGUF tensor of `kind` becomes under a 4-bit scheme: never fewer bits than it has.
    4-bit blocks take the scheme's 4-bit format (Q4_1 into a symmetric scheme is rounded again,
    with a warning, as MLC's names promise symmetric codes)."""
    if kind in FLOAT_KINDS:
        return q.FLOAT
    if kind == "Q8_0":
        return q.Q8_0
    return quant.weight_storage


def weight_storage(sources: list[SourceTensor], quant: Quantization, keeps_storage: bool) -> str:
    """The storage of one (possibly fused) weight: the scheme's for float checkpoints and for
    unquantized schemes, else the widest of what the GGUF file's tensors need."""
    if not quant.quantized or not keeps_storage:
        return quant.weight_storage
    return max((_kind_storage(s.kind, quant) for s in sources), key=WIDTH.__getitem__)


def _pack_q4(sources: list[SourceTensor], storage: str, rerounded: list[str]) -> q.PackedWeight:
    """4-bit groups for the row-concatenation of `sources`, reusing GGUF blocks when they fit;
    names of 4-bit sources that had to be rounded again go to `rerounded`."""
    kinds = {s.kind for s in sources}
    has_minimum = storage == q.Q4_1
    if kinds == {"Q4_0"} or (has_minimum and kinds <= {"Q4_0", "Q4_1"}):
        codes, scales, minimums = [], [], []
        for s in sources:
            blocks = s.q4_blocks()
            codes.append(blocks.codes)
            scales.append(blocks.scale)
            # Q4_0's `scale * (code - 8)` is `scale * code + minimum` with minimum = -8 * scale.
            minimums.append(blocks.minimum if blocks.minimum is not None else -8.0 * blocks.scale)
        minimum = np.concatenate(minimums) if has_minimum else None
        return q.PackedWeight(
            storage, q.pack_codes(np.concatenate(codes)), np.concatenate(scales), minimum
        )
    rerounded.extend(s.name for s in sources if s.kind not in FLOAT_KINDS)
    weight = _float_rows(sources)
    if has_minimum:
        code, scale, minimum = q.quantize_asymmetric(weight)
        return q.PackedWeight(storage, q.pack_codes(code), scale, minimum)
    code, scale = q.quantize_symmetric(weight)
    return q.PackedWeight(storage, q.pack_codes(code), scale)


def _pack_q8(sources: list[SourceTensor], rerounded: list[str]) -> q.PackedWeight:
    """8-bit groups for the row-concatenation of `sources`: GGUF Q8_0 blocks as they are, others
    rounded from their values (a 4-bit member of a fused group goes to `rerounded`)."""
    codes, scales = [], []
    for s in sources:
        if s.kind == "Q8_0":
            blocks = s.q8_blocks()
        else:
            if s.kind not in FLOAT_KINDS:
                rerounded.append(s.name)
            blocks = q.quantize_q8(s.to_float32())
        codes.append(blocks[0])
        scales.append(blocks[1])
    return q.PackedWeight(q.Q8_0, q.pack_q8(np.concatenate(codes)), np.concatenate(scales))


def _weight_params(
    name: str, sources: list[SourceTensor], storage: str, dtype: str, rerounded: list[str]
) -> dict[str, np.ndarray]:
    """Parameters of one (possibly fused) linear or embedding weight, under our names."""
    if storage == q.FLOAT:
        return {f"{name}.weight": _float_rows(sources).astype(dtype)}
    cols = sources[0].shape[-1]
    if cols % q.GROUP_SIZE:
        raise ValueError(f"{sources[0].name}: {cols} columns is not a multiple of {q.GROUP_SIZE}")
    if storage == q.Q8_0:
        packed = _pack_q8(sources, rerounded)
    else:
        packed = _pack_q4(sources, storage, rerounded)
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
            "rounded again (%s%s); q4f32_m / q4f16_m keep GGUF Q4_0 and Q4_1 blocks exactly",
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
