"""Turn a weight source (GGUF file or Hugging Face folder) into an MLC model folder.

The folder holds `mlc-chat-config.json`, `params.safetensors` (named as the model definition
names its parameters) and `tokenizer.json`. 4-bit GGUF blocks that match one of our schemes are
carried over as they are, never rounded twice.
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
from mlc_engine.engine.weights.source import SourceTensor, load_source

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"


def _float_rows(sources: list[SourceTensor]) -> np.ndarray:
    return np.concatenate([s.to_float32() for s in sources], axis=0)


def _quantize_q4(
    sources: list[SourceTensor], quant: Quantization, rerounded: list[str]
) -> q.PackedQ4:
    """4-bit groups for the row-concatenation of `sources`, reusing GGUF blocks when they fit;
    names of 4-bit sources that had to be rounded again go to `rerounded`."""
    kinds = {s.kind for s in sources}
    cols = sources[0].shape[-1]
    if cols % q.GROUP_SIZE:
        raise ValueError(f"{sources[0].name}: {cols} columns is not a multiple of {q.GROUP_SIZE}")
    carry = kinds == {"Q4_0"} or (quant.has_minimum and kinds <= {"Q4_0", "Q4_1"})
    if carry:
        codes, scales, minimums = [], [], []
        for s in sources:
            blocks = s.q4_blocks()
            codes.append(blocks.codes)
            scales.append(blocks.scale)
            # Q4_0's `scale * (code - 8)` is `scale * code + minimum` with minimum = -8 * scale.
            minimums.append(blocks.minimum if blocks.minimum is not None else -8.0 * blocks.scale)
        code = np.concatenate(codes)
        scale = np.concatenate(scales)
        minimum = np.concatenate(minimums) if quant.has_minimum else None
    else:
        if kinds & {"Q4_0", "Q4_1"}:
            rerounded.append(sources[0].name)
        weight = _float_rows(sources)
        if quant.has_minimum:
            code, scale, minimum = q.quantize_asymmetric(weight)
        else:
            (code, scale), minimum = q.quantize_symmetric(weight), None
    dtype = quant.dtype
    return q.PackedQ4(
        weight=q.pack_codes(code),
        scale=scale.astype(dtype),
        minimum=None if minimum is None else minimum.astype(dtype),
    )


def _weight_params(
    name: str, sources: list[SourceTensor], quant: Quantization, rerounded: list[str]
) -> dict[str, np.ndarray]:
    """Parameters of one (possibly fused) linear or embedding weight, under our names."""
    if not quant.quantized:
        return {f"{name}.weight": _float_rows(sources).astype(quant.dtype)}
    packed = _quantize_q4(sources, quant, rerounded)
    params = {f"{name}.q4.q_weight": packed.weight, f"{name}.q4.q_scale": packed.scale}
    if packed.minimum is not None:
        params[f"{name}.q4.q_min"] = packed.minimum
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
        for norm in ("input_layernorm", "post_attention_layernorm"):
            yield f"{ours}.{norm}.weight", [f"{hf}.{norm}.weight"], False
    yield "model.norm.weight", ["model.norm.weight"], False
    if not config.tie_word_embeddings:
        yield "lm_head", ["lm_head.weight"], True


def convert_params(
    tensors: dict[str, SourceTensor],
    config: ModelConfig,
    on_tensor: Callable[[str], None] = lambda _: None,
) -> dict[str, np.ndarray]:
    """Map, fuse and quantize source tensors into the model definition's parameters."""
    quant = get_quantization(config.quantization)
    params: dict[str, np.ndarray] = {}
    rerounded: list[str] = []
    for ours, names, is_weight in _groups(config):
        missing = [n for n in names if n not in tensors]
        if missing:
            raise ValueError(f"the weights lack {missing[0]}")
        sources = [tensors[n] for n in names]
        if is_weight:
            params.update(_weight_params(ours, sources, quant, rerounded))
        else:
            params[ours] = np.concatenate([s.to_float32().ravel() for s in sources]).astype(
                quant.dtype
            )
        on_tensor(ours)
    if rerounded:
        log.warning(
            "%d weights were already 4-bit in a layout %s cannot hold and were rounded again; "
            "q4f32_m / q4f16_m keep GGUF Q4_0 and Q4_1 blocks exactly",
            len(rerounded),
            quant.name,
        )
    return params


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
    params = convert_params(source.tensors, config, lambda name: on_tensor(name, total))
    # Write to a sibling and rename, so an interrupted conversion leaves no half-made folder.
    partial = output.with_name(f".{output.name}.partial")
    write_model_folder(config, params, source.tokenizer_json, partial)
    if output.exists():
        shutil.rmtree(output)
    partial.replace(output)
    return config
