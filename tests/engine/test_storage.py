"""Per-tensor storage: a GGUF's tensors keep what their file gave them (Q8_0 stays 8-bit, floats
stay float, 4-bit blocks carried over), and the model compiled from them matches the reference."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import reference
from conftest import CPU, TINY_HF_CONFIG, LoadedModel, tiny_hf_weights
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import load_file
from test_int8_gemm import int8_rounded
from test_model import (
    _check_against_reference,
    _relative_error,
    _rounded_weights,
    dequantized_hf_weights,
)
from test_weights import finish_gguf, llama_cpp_permute

from mlc_engine.common.config import ModelConfig
from mlc_engine.common.device import tvm_device, tvm_target
from mlc_engine.engine.compiler import compile_model
from mlc_engine.engine.convert import convert
from mlc_engine.engine.runtime import PARAMS_FILE, ModelRuntime
from mlc_engine.engine.weights.source import load_source

GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
# Every storage a GGUF can hand over, and fused groups of mixed ones (layer 1's q, k, v).
KINDS = {
    "token_embd": Q.Q8_0,
    "blk.0.attn_output": Q.Q4_0,
    "blk.1.attn_v": Q.Q8_0,
    "blk.1.attn_output": Q.F16,
    "blk.1.ffn_gate": Q.Q8_0,
    "blk.1.ffn_up": Q.Q8_0,
    "blk.1.ffn_down": Q.BF16,
}
EXPECTED_STORAGE = {
    "model.embed_tokens": "q8_0",
    "model.layers.0.self_attn.qkv_proj": "q4_1",
    "model.layers.0.self_attn.o_proj": "q4_1",  # Q4_0 blocks as q4_1, exactly
    "model.layers.0.mlp.gate_up_proj": "q4_1",
    "model.layers.0.mlp.down_proj": "q4_1",
    # Q4_1, Q4_1 and Q8_0 blocks: 8-bit codes with a minimum hold all three exactly.
    "model.layers.1.self_attn.qkv_proj": "q8_1",
    "model.layers.1.self_attn.o_proj": "float",
    "model.layers.1.mlp.gate_up_proj": "q8_0",
    "model.layers.1.mlp.down_proj": "float",
}


def _gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    _, _, layer, *part, suffix = hf_name.split(".")
    return f"blk.{layer}.{GGUF_NAMES['.'.join(part)]}.{suffix}"


def write_tiny_gguf(path: Path) -> Path:
    """The tiny Llama's random weights as a llama.cpp GGUF: norms F32, the rest KINDS or Q4_1
    (q and k rows interleaved as llama.cpp's converter does)."""
    c = TINY_HF_CONFIG
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny-gguf")
    writer.add_block_count(c["num_hidden_layers"])
    writer.add_context_length(c["max_position_embeddings"])
    writer.add_embedding_length(c["hidden_size"])
    writer.add_feed_forward_length(c["intermediate_size"])
    writer.add_head_count(c["num_attention_heads"])
    writer.add_head_count_kv(c["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(c["rms_norm_eps"])
    writer.add_rope_freq_base(c["rope_theta"])
    writer.add_token_list([f"t{i}" for i in range(c["vocab_size"])])
    writer.add_bos_token_id(c["bos_token_id"])
    writer.add_eos_token_id(c["eos_token_id"])
    heads = {"attn_q": c["num_attention_heads"], "attn_k": c["num_key_value_heads"]}
    tensors = {}
    for hf_name, array in tiny_hf_weights("llama").items():
        name = _gguf_name(hf_name)
        stem, part = name.rsplit(".", 1)[0], name.split(".")[-2]
        if part in heads:
            array = llama_cpp_permute(array, heads[part])
        tensors[name] = (array, Q.F32 if array.ndim == 1 else KINDS.get(stem, Q.Q4_1))
    return finish_gguf(writer, tensors, path)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def gguf_model(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """The tiny GGUF converted to q4f32_m, compiled with a float32 cache (so that the
    reference reproduces it exactly) and loaded."""
    root = tmp_path_factory.mktemp("gguf-model")
    folder = root / "model"
    convert(tiny_gguf, "q4f32_m", folder)
    library = root / "model.so"
    compile_model(ModelConfig.load(folder), tvm_target(CPU), library, kv_dtype="float32")
    return LoadedModel(folder, ModelRuntime(library, folder, tvm_device(CPU)), {})


def test_each_tensor_keeps_the_storage_its_file_gave_it(gguf_model: LoadedModel) -> None:
    assert gguf_model.config.tensor_storage == EXPECTED_STORAGE


def test_8bit_and_float_tensors_are_carried_over_exactly(
    gguf_model: LoadedModel, tiny_gguf: Path
) -> None:
    source = load_source(tiny_gguf)
    params = load_file(str(gguf_model.folder / PARAMS_FILE))
    blocks = source.tensors["model.embed_tokens.weight"].blocks()
    codes = params["model.embed_tokens.q8.q_weight"].view(np.int8)
    np.testing.assert_array_equal(codes, blocks.codes)
    np.testing.assert_array_equal(params["model.embed_tokens.q8.q_scale"], blocks.scale)
    o_proj = source.tensors["model.layers.1.self_attn.o_proj.weight"].to_float32()
    np.testing.assert_array_equal(params["model.layers.1.self_attn.o_proj.weight"], o_proj)
    weights = dequantized_hf_weights(gguf_model.folder, gguf_model.config)
    for name in ("model.layers.1.mlp.gate_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        np.testing.assert_array_equal(weights[name], source.tensors[name].to_float32())


def test_a_model_of_mixed_storage_matches_the_reference(gguf_model: LoadedModel) -> None:
    """8-bit matmuls (the tied lm_head, a fused qkv, gate_up) and float ones in a 4-bit model,
    the 8-bit embedding looked up row by row, against the reference on the same weights, which
    rounds activations as the int8 kernel does."""
    runtime, config = gguf_model.runtime, gguf_model.config
    weights = dequantized_hf_weights(gguf_model.folder, config)
    rounds = _rounded_weights(config)
    # Tokens at position 0, each a sequence of its own, prefilled together: nothing differs
    # from the reference but float summation order, so every int8 rounding is the same.
    tokens = list(range(0, 512, 21))
    kv = runtime.create_kv_cache(len(tokens), 512, 128)
    for seq_id in range(len(tokens)):
        kv.add_sequence(seq_id)
    logits = runtime.prefill(kv, list(range(len(tokens))), [[t] for t in tokens])
    for row, token in zip(logits, tokens, strict=True):
        expected = reference.forward(weights, config, [token], int8_rounded, "float32", rounds)
        assert _relative_error(row, expected[0]) < 1e-5
    # Later positions sum attention in another order than NumPy: now and then an activation
    # that lies within that difference of a rounding boundary of the int8 kernel rounds the
    # other way, which moves a 2-layer random model's logits by up to about 1e-2.
    _check_against_reference(gguf_model, weights, 5e-2, "q4f32_m", "float32")


@pytest.mark.parametrize(
    ("quantization", "storage"),
    [
        ("q0f32", {"float"}),
        # Symmetric 4-bit: Q4_1 blocks are rounded again; Q8_0 and floats keep their bits.
        ("q4f32_1", {"q4_0", "q8_0", "float"}),
    ],
)
def test_the_scheme_decides_only_what_the_file_leaves_open(
    tiny_gguf: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    quantization: str,
    storage: set[str],
) -> None:
    with caplog.at_level(logging.WARNING):
        config = convert(tiny_gguf, quantization, tmp_path / "model")
    assert set(config.tensor_storage.values()) == storage
    assert config.tensor_storage["model.embed_tokens"] == (
        "float" if quantization == "q0f32" else "q8_0"
    )
    rounded_again = "rounded again" in caplog.text
    assert rounded_again == (quantization == "q4f32_1")
    if rounded_again:
        assert "model.layers.0.self_attn.q_proj.weight" in caplog.text


def test_float_checkpoints_take_the_schemes_storage(tiny_model: Callable) -> None:
    config = tiny_model("q4f32_1").config
    assert set(config.tensor_storage.values()) == {"q4_0"}
