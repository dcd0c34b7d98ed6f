"""GGUF files written by llama.cpp's llama-quantize (tests/engine/data/gguf, made by
scripts/make_gguf_fixtures.py), one per block type and one Q4_K_M mixture: each tensor is carried
over in its own type, bit for bit, and the compiled model matches the NumPy reference on the
weights gguf-py dequantizes, on the host's SIMD path and on AVX2 alone."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import reference
import tvm
from conftest import CPU, LoadedModel, requires_cuda_codegen, requires_vulkan_codegen
from test_int8_gemm import AVX2, int8_rounded
from test_model import _relative_error, _rounded_weights

from mlc_engine.common.config import ModelConfig
from mlc_engine.common.device import Device, tvm_device, tvm_target
from mlc_engine.engine.compiler import compile_model
from mlc_engine.engine.convert import convert
from mlc_engine.engine.models import library_path
from mlc_engine.engine.runtime import ModelRuntime
from mlc_engine.engine.weights.source import load_source

FIXTURES = Path(__file__).parent / "data" / "gguf"
TARGETS = {"host": tvm_target(CPU), "avx2": AVX2}
# What each file's weights become. Rows of 256 take the file's type; the attention output and
# down projection (rows of 64 and 32) fell back to another type in llama-quantize.
EXPECTED_STORAGE = {
    # Q4_K: a float32 scale and minimum per sub-block; the fallback Q5_0 as signed 8-bit codes.
    "tiny-Q4_K": {"embed": "q4_1", "qkv": "q4_1", "o": "q8_0", "gate_up": "q4_1", "down": "q8_0"},
    # Q5_K and its fallback Q5_1: 5-bit codes in bytes, with their minimums.
    "tiny-Q5_K": {"embed": "q8_1", "qkv": "q8_1", "o": "q8_1", "gate_up": "q8_1", "down": "q8_1"},
    # Q6_K: signed codes with a scale per 16; its fallback Q8_0.
    "tiny-Q6_K": {
        "embed": "q8_0_g16",
        "qkv": "q8_0_g16",
        "o": "q8_0",
        "gate_up": "q8_0_g16",
        "down": "q8_0",
    },
    "tiny-Q5_0": {"embed": "q8_0", "qkv": "q8_0", "o": "q8_0", "gate_up": "q8_0", "down": "q8_0"},
    "tiny-Q5_1": {"embed": "q8_1", "qkv": "q8_1", "o": "q8_1", "gate_up": "q8_1", "down": "q8_1"},
    # Q4_K_M with attn_v in Q6_K: q and k are Q4_K, so the fused q/k/v needs both a minimum and
    # groups of 16; the embedding is Q6_K, the down projection Q8_0.
    "tiny-Q4_K_M": {
        "embed": "q8_0_g16",
        "qkv": "q8_1_g16",
        "o": "q8_0",
        "gate_up": "q4_1",
        "down": "q8_0",
    },
}
OUR_NAMES = {
    "embed": "model.embed_tokens",
    "qkv": "model.layers.0.self_attn.qkv_proj",
    "o": "model.layers.0.self_attn.o_proj",
    "gate_up": "model.layers.0.mlp.gate_up_proj",
    "down": "model.layers.0.mlp.down_proj",
}


@pytest.fixture(scope="module")
def kquant_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], LoadedModel]:
    """`kquant_model(stem, target)`: the fixture converted to q4f32_m, compiled for the target
    with a float32 KV cache (so that the reference reproduces it exactly) and loaded. Libraries
    are cached beside the others, so files of the same storage share one."""
    loaded: dict[tuple[str, str], LoadedModel] = {}

    def load(stem: str, target: str) -> LoadedModel:
        if (stem, target) not in loaded:
            folder = tmp_path_factory.mktemp(stem) / "model"
            convert(FIXTURES / f"{stem}.gguf", "q4f32_m", folder)
            config = ModelConfig.load(folder)
            cached = library_path(config, TARGETS[target], CPU)
            library = cached.with_name(f"{cached.stem}-kv-float32.so")
            if not library.is_file():
                compile_model(config, TARGETS[target], library, kv_dtype="float32")
            runtime = ModelRuntime(library, folder, tvm_device(CPU))
            loaded[stem, target] = LoadedModel(folder, runtime, {})
        return loaded[stem, target]

    return load


@pytest.mark.parametrize("stem", list(EXPECTED_STORAGE))
def test_every_block_decodes_as_gguf_py_dequantizes_it(stem: str) -> None:
    reader = gguf.GGUFReader(FIXTURES / f"{stem}.gguf")
    source = load_source(FIXTURES / f"{stem}.gguf")
    expected = reference.gguf_weights(FIXTURES / f"{stem}.gguf")
    kinds = {t.tensor_type.name for t in reader.tensors}
    assert kinds - {"F32"}  # the file is quantized
    for name, tensor in source.tensors.items():
        np.testing.assert_array_equal(tensor.to_float32(), expected[name], err_msg=name)


def test_types_still_unsupported_are_refused_by_name(tmp_path: Path) -> None:
    """A Q3_K tensor (bytes as llama-quantize writes them) stops the conversion, naming it."""
    source = gguf.GGUFReader(FIXTURES / "tiny-Q4_K.gguf")
    writer = gguf.GGUFWriter(tmp_path / "q3.gguf", "llama")
    for field in source.fields.values():
        if field.name.startswith(("llama.", "tokenizer.")) and field.types:
            value = field.contents()
            writer.add_key_value(field.name, value, field.types[0], field.types[-1])
    for tensor in source.tensors:
        if tensor.name == "blk.0.ffn_gate.weight":  # 32 rows of 256: 110 bytes per row in Q3_K
            data = np.zeros((tensor.shape[1], 110), np.uint8)
            writer.add_tensor(tensor.name, data, raw_dtype=gguf.GGMLQuantizationType.Q3_K)
        else:
            writer.add_tensor(tensor.name, np.asarray(tensor.data), raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_gate\.weight has type Q3_K"):
        convert(tmp_path / "q3.gguf", "q4f32_m", tmp_path / "model")


def _cases() -> list[object]:
    """Every file on the host's path; on AVX2 alone, the mixture (which holds every storage but
    q8_1) by default and the rest as slow tests: each compiles a library of its own (the
    kernel's AVX2 path is checked per storage in test_int8_gemm.py)."""
    cases: list[object] = []
    for stem in EXPECTED_STORAGE:
        cases.append(pytest.param(stem, "host", id=f"{stem}-host"))
        marks = [] if stem == "tiny-Q4_K_M" else [pytest.mark.slow]
        cases.append(pytest.param(stem, "avx2", marks=marks, id=f"{stem}-avx2"))
    return cases


@pytest.mark.parametrize(("stem", "target"), _cases())
def test_each_block_type_matches_the_reference(
    kquant_model: Callable[[str, str], LoadedModel], stem: str, target: str
) -> None:
    if not tvm.target.codegen.llvm_cpu_has_features(["avx2"], TARGETS[target]):
        pytest.skip("needs AVX2")
    model = kquant_model(stem, target)
    config = model.config
    storage = {short: config.tensor_storage[ours] for short, ours in OUR_NAMES.items()}
    assert storage == EXPECTED_STORAGE[stem]
    weights = reference.gguf_weights(FIXTURES / f"{stem}.gguf")
    rounds = _rounded_weights(config)
    # Every token at position 0, each a sequence of its own, prefilled together: nothing differs
    # from the reference but float summation order, so every int8 rounding is the same.
    tokens = list(range(0, config.vocab_size, 3))
    kv = model.runtime.create_kv_cache(len(tokens), 512, 128)
    for seq_id in range(len(tokens)):
        kv.add_sequence(seq_id)
    logits = model.runtime.prefill(kv, list(range(len(tokens))), [[t] for t in tokens])
    for row, token in zip(logits, tokens, strict=True):
        expected = reference.forward(weights, config, [token], int8_rounded, "float32", rounds)
        assert _relative_error(row, expected[0]) < 1e-5
    _check_prompts_and_decodes(model, weights, rounds)


def _check_prompts_and_decodes(
    model: LoadedModel, weights: dict[str, np.ndarray], rounds: Callable[[str], bool]
) -> None:
    """Prompts prefilled one at a time, then a decode of all of them. Attention sums in another
    order than NumPy, which can move an activation across an int8 rounding boundary now and
    then (see test_storage.py): hence the looser tolerance."""
    runtime, config = model.runtime, model.config
    prompts = [[5, 6, 7, 8, 9, 10, 11], [1, 2, 3], list(range(20, 60))]
    kv = runtime.create_kv_cache(len(prompts), 512, 128)
    for seq_id, prompt in enumerate(prompts):
        kv.add_sequence(seq_id)
        logits = runtime.prefill(kv, [seq_id], [prompt], all_logits=True)
        expected = reference.forward(weights, config, prompt, int8_rounded, "float32", rounds)
        assert _relative_error(logits, expected) < 5e-2
    next_tokens = [12, 4, 63]
    logits = runtime.decode(kv, list(range(len(prompts))), next_tokens)
    for seq_id, prompt in enumerate(prompts):
        tokens = [*prompt, next_tokens[seq_id]]
        expected = reference.forward(weights, config, tokens, int8_rounded, "float32", rounds)
        assert _relative_error(logits[seq_id], expected[-1]) < 5e-2


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param("cuda", marks=requires_cuda_codegen),
        pytest.param("vulkan", marks=requires_vulkan_codegen),
    ],
)
def test_every_storage_cross_compiles_for_gpus(tmp_path: Path, kind: str) -> None:
    """The GPU schedules take each storage (float16 compute, weights row by row); no GPU is
    needed to compile."""
    storage = {
        "model.embed_tokens": "q8_0_g16",
        "model.layers.0.self_attn.qkv_proj": "q8_1_g16",
        "model.layers.0.self_attn.o_proj": "q8_1",
        "model.layers.0.mlp.gate_up_proj": "q4_1",
        "model.layers.0.mlp.down_proj": "q8_0",
    }
    # The tiny Hugging Face model's shape (conftest.py): the fixtures' (hidden 256, 64 tokens)
    # crashes TVM's CUDA tensorization (a segfault, with the storages of main as well).
    config = ModelConfig(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        context_window_size=512,
        head_dim=16,
        tie_word_embeddings=True,
        quantization="q4f16_m",
        tensor_storage=storage,
    )
    library = tmp_path / f"{kind}.so"
    compile_model(config, tvm_target(Device(kind, 0)), library)
    assert library.stat().st_size > 0
