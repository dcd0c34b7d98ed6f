"""The compiled model against an independent NumPy forward pass, and the paged KV cache API."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import reference
import tvm
from conftest import CPU
from safetensors.numpy import load_file
from test_int8_gemm import int8_rounded

from mlc_engine.common.config import ModelConfig
from mlc_engine.common.device import Device, tvm_target
from mlc_engine.common.errors import ModelLibraryError
from mlc_engine.engine import int8_gemm
from mlc_engine.engine.compiler import METADATA_FUNCTION, compile_model
from mlc_engine.engine.model.llama import LlamaForCausalLM
from mlc_engine.engine.models import prepare_library
from mlc_engine.engine.quantization import (
    FLOAT,
    PackedWeight,
    dequantize,
    get_quantization,
    packed_name,
    storage_of,
)
from mlc_engine.engine.runtime import PARAMS_FILE, ModelRuntime, logit_rows_bucket

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [1, 2, 3], [100, 200, 3, 4, 5, 300, 17, 42, 8]]


def _kernel_rounding(quantization: str, device: Device) -> Callable[[np.ndarray], np.ndarray]:
    """What the compiled model does to activations before its weight matmuls: on AVX2, 4-bit
    float32 ones round them to int8 (`int8_gemm.py`); other matmuls keep them as they are."""
    if int8_gemm.column_block(get_quantization(quantization), tvm_target(device)):
        return int8_rounded
    return lambda x: x


def _rounded_weights(config: ModelConfig) -> Callable[[str], bool]:
    """Which weights (by Hugging Face name) the int8 kernel serves: the quantized ones, by the
    storage the model folder records for their (fused) parameter."""
    fused = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj"}
    fused |= {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}

    def rounds(weight: str) -> bool:
        *prefix, part, _ = weight.split(".")
        ours = ".".join([*prefix, fused.get(part, part)])
        return storage_of(config, ours) != FLOAT

    return rounds


def _relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def dequantized_hf_weights(folder, config: ModelConfig) -> dict[str, np.ndarray]:  # noqa: ANN001
    """The float weights a converted (possibly 4-bit, fused) model folder stands for, in Hugging
    Face names: the reference for the numerics of quantized models."""
    params = load_file(str(folder / PARAMS_FILE))

    def matrix(name: str) -> np.ndarray:
        storage = storage_of(config, name)
        if storage == FLOAT:
            return params[f"{name}.weight"].astype(np.float32)
        prefix = f"{name}.{packed_name(storage)}"
        packed = PackedWeight(
            storage,
            params[f"{prefix}.q_weight"],
            params[f"{prefix}.q_scale"],
            params.get(f"{prefix}.q_min"),
        )
        return dequantize(packed)

    head_dim = config.head_dim
    q_rows = config.num_attention_heads * head_dim
    kv_rows = config.num_key_value_heads * head_dim
    w = {
        "model.embed_tokens.weight": matrix("model.embed_tokens"),
        "model.norm.weight": params["model.norm.weight"].astype(np.float32),
    }
    if not config.tie_word_embeddings:
        w["lm_head.weight"] = matrix("lm_head")
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        qkv = matrix(f"{p}.self_attn.qkv_proj")
        splits = np.split(qkv, [q_rows, q_rows + kv_rows])
        for name, rows in zip("qkv", splits, strict=True):
            w[f"{p}.self_attn.{name}_proj.weight"] = rows
        if config.attention_bias:
            bias = params[f"{p}.self_attn.qkv_proj.bias"].astype(np.float32)
            for name, rows in zip("qkv", np.split(bias, [q_rows, q_rows + kv_rows]), strict=True):
                w[f"{p}.self_attn.{name}_proj.bias"] = rows
        w[f"{p}.self_attn.o_proj.weight"] = matrix(f"{p}.self_attn.o_proj")
        gate, up = np.split(matrix(f"{p}.mlp.gate_up_proj"), 2)
        w[f"{p}.mlp.gate_proj.weight"], w[f"{p}.mlp.up_proj.weight"] = gate, up
        w[f"{p}.mlp.down_proj.weight"] = matrix(f"{p}.mlp.down_proj")
        for norm in ("input_layernorm", "post_attention_layernorm"):
            w[f"{p}.{norm}.weight"] = params[f"{p}.{norm}.weight"].astype(np.float32)
    return w


def _check_against_reference(  # noqa: ANN001
    model, weights, tolerance: float, quantization: str, kv_dtype: str = "", device: Device = CPU
) -> None:
    """Prefill four prompts one at a time, decode them together, then one alone: logits within
    `tolerance` of the reference's (which rounds activations as the kernels do)."""
    runtime, config = model.runtime, model.config
    rounded = _kernel_rounding(quantization, device)
    rounds = _rounded_weights(config)
    kv_dtype = kv_dtype or get_quantization(quantization).kv_dtype
    kv = runtime.create_kv_cache(4, 512, 128)
    # Long enough for RoPE scaling (original context 16 in the llama3 variant) to matter.
    prompts = [*PROMPTS, list(range(40, 80))]
    for seq_id, prompt in enumerate(prompts):
        kv.add_sequence(seq_id)
        logits = runtime.prefill(kv, [seq_id], [prompt], all_logits=True)
        expected = reference.forward(weights, config, prompt, rounded, kv_dtype, rounds)
        assert logits.shape == expected.shape
        assert _relative_error(logits, expected) < tolerance
    next_tokens = [12, 4, 6, 81]
    logits = runtime.decode(kv, [0, 1, 2, 3], next_tokens)
    for seq_id, prompt in enumerate(prompts):
        expected = reference.forward(
            weights, config, prompt + [next_tokens[seq_id]], rounded, kv_dtype, rounds
        )[-1]
        assert _relative_error(logits[seq_id], expected) < tolerance
    alone = runtime.decode(kv, [0], [33])[0]
    expected = reference.forward(
        weights, config, prompts[0] + [next_tokens[0], 33], rounded, kv_dtype, rounds
    )[-1]
    assert _relative_error(alone, expected) < tolerance


@pytest.mark.parametrize("variant", ["llama", "qwen2", "llama3-rope", "qwen3", "mistral"])
def test_q0f32_matches_numpy_reference(tiny_model: Callable, variant: str) -> None:
    model = tiny_model("q0f32", variant)
    _check_against_reference(model, model.hf_weights, 1e-4, "q0f32")


@pytest.mark.parametrize(
    ("quantization", "tolerance"),
    [("q4f32_1", 1e-4), ("q4f32_m", 1e-4), ("q0f16", 2e-2), ("q4f16_1", 2e-2)],
)
def test_quantized_model_matches_reference_on_its_dequantized_weights(
    tiny_model: Callable, quantization: str, tolerance: float
) -> None:
    # A float32 cache for the float32 models: a float16 one rounds q, k, v and the attention's
    # output at points the reference cannot reproduce to the last bit, and the int8 rounding of
    # the next matmul turns a last-bit difference into up to 1/254 of a group (the library
    # below without int8 rounding checks the float16 cache).
    kv_dtype = "float32" if get_quantization(quantization).dtype == "float32" else ""
    model = tiny_model(quantization, kv_dtype=kv_dtype)
    weights = dequantized_hf_weights(model.folder, model.config)
    _check_against_reference(model, weights, tolerance, quantization, kv_dtype)


def test_4bit_libraries_keep_a_float16_cache_by_default(tiny_model: Callable) -> None:
    def cache_dtype(runtime: ModelRuntime) -> str:
        return json.loads(str(runtime.vm[METADATA_FUNCTION]()))["kv_dtype"]

    assert cache_dtype(tiny_model("q4f32_m").runtime) == "float16"
    assert cache_dtype(tiny_model("q0f32").runtime) == "float32"
    assert cache_dtype(tiny_model("q4f32_m", kv_dtype="float32").runtime) == "float32"


def test_4bit_weights_stay_close_to_the_float_weights(tiny_model: Callable) -> None:
    model = tiny_model("q4f32_1")
    weights = dequantized_hf_weights(model.folder, model.config)
    name = "model.layers.0.mlp.down_proj.weight"
    original = model.hf_weights[name]
    # Symmetric 4-bit: at most half a step (absmax / 7 / 2) off per element.
    step = np.abs(original.reshape(-1, 32)).max(axis=1) / 7
    error = np.abs(weights[name] - original).reshape(-1, 32).max(axis=1)
    assert np.all(error <= step / 2 + 1e-6)


def batch_and_alone(runtime: ModelRuntime) -> list[tuple[np.ndarray, np.ndarray]]:
    """(in a batch, alone) logits of each of PROMPTS at each step: the prefill, then two decodes,
    run once for the three together and once for each on its own."""
    alone = []
    for prompt in PROMPTS:
        kv = runtime.create_kv_cache(1, 512, 128)
        kv.add_sequence(0)
        logits = [runtime.prefill(kv, [0], [prompt])[0]]
        for token in (3, 9):
            logits.append(runtime.decode(kv, [0], [token])[0])
        alone.append(logits)
    kv = runtime.create_kv_cache(4, 512, 128)
    ids = [7, 3, 11]  # any ids: the cache maps them
    for seq_id in ids:
        kv.add_sequence(seq_id)
    together = [runtime.prefill(kv, ids, PROMPTS)]
    for token in (3, 9):
        together.append(runtime.decode(kv, ids, [token] * 3))
    return [(batch[i], alone[i][step]) for step, batch in enumerate(together) for i in range(3)]


def test_batched_prefill_and_decode_equal_each_sequence_alone(tiny_model: Callable) -> None:
    for in_batch, by_itself in batch_and_alone(tiny_model("q4f32_1").runtime):
        # Every matmul rounds each row on its own: the batch does not change a sequence's
        # result.
        assert _relative_error(in_batch, by_itself) < 1e-5


def test_a_large_decode_batch_equals_each_sequence_alone(tiny_model: Callable) -> None:
    # More rows than a register tile of the int8 kernel takes: whole tiles and remainders.
    runtime = tiny_model("q4f32_m").runtime
    count = 12
    prompts = [[seq_id + 1, 2 * seq_id + 5, 7] for seq_id in range(count)]
    kv = runtime.create_kv_cache(count, 512, 128)
    for seq_id in range(count):
        kv.add_sequence(seq_id)
    runtime.prefill(kv, list(range(count)), prompts)
    together = runtime.decode(kv, list(range(count)), list(range(30, 30 + count)))
    for seq_id, prompt in enumerate(prompts):
        alone = runtime.create_kv_cache(1, 512, 128)
        alone.add_sequence(0)
        runtime.prefill(alone, [0], [prompt])
        expected = runtime.decode(alone, [0], [30 + seq_id])[0]
        assert _relative_error(together[seq_id], expected) < 1e-5


def test_logits_a_caller_holds_outlive_later_steps(tiny_model: Callable) -> None:
    # On CPU the logits come back without a copy: later steps must not write over them.
    runtime = tiny_model("q0f32").runtime
    kv = runtime.create_kv_cache(2, 512, 128)
    for seq_id in (0, 1):
        kv.add_sequence(seq_id)
    held = [runtime.prefill(kv, [0, 1], PROMPTS[:2]), runtime.decode(kv, [0, 1], [5, 6])]
    copies = [logits.copy() for logits in held]
    later = runtime.decode(kv, [0, 1], [7, 8]), runtime.decode(kv, [0], [9])
    for logits, copy in zip(held, copies, strict=True):
        np.testing.assert_array_equal(logits, copy)
    assert not np.array_equal(later[0], held[1])


def test_releasing_the_pooled_memory_keeps_logits_held_and_to_come(tiny_model: Callable) -> None:
    runtime = tiny_model("q0f32").runtime
    kvs = [runtime.create_kv_cache(2, 512, 128) for _ in range(2)]
    steps = []
    for kv, release in zip(kvs, (False, True), strict=True):
        kv.add_sequence(0)
        held = runtime.prefill(kv, [0], PROMPTS[:1])
        copy = held.copy()
        if release:
            runtime.release_memory()
        np.testing.assert_array_equal(held, copy)
        steps.append([copy, runtime.decode(kv, [0], [5]).copy()])
    np.testing.assert_array_equal(steps[0], steps[1])


def test_forked_sequence_continues_like_its_parent(tiny_model: Callable) -> None:
    runtime = tiny_model("q0f32").runtime
    kv = runtime.create_kv_cache(4, 512, 128)
    kv.add_sequence(0)
    prompt = list(range(40))  # two full pages of 16 and a partial one
    runtime.prefill(kv, [0], [prompt])
    pages_before_fork = kv.free_pages()
    kv.fork_sequence(0, 1)
    # The child shares the full pages; only the partial last page is copied.
    assert kv.free_pages() == pages_before_fork - 1
    parent, child = runtime.decode(kv, [0, 1], [21, 21])
    np.testing.assert_allclose(parent, child, atol=1e-5)
    # And both continue like a sequence that was never forked.
    fresh = runtime.create_kv_cache(1, 512, 128)
    fresh.add_sequence(0)
    runtime.prefill(fresh, [0], [prompt])
    np.testing.assert_allclose(runtime.decode(fresh, [0], [21])[0], parent, atol=1e-4)


def test_removing_sequences_returns_their_pages(tiny_model: Callable) -> None:
    runtime = tiny_model("q0f32").runtime
    kv = runtime.create_kv_cache(4, 512, 128)
    idle = kv.free_pages()
    assert idle == kv.num_pages > 0
    kv.add_sequence(0)
    runtime.prefill(kv, [0], [list(range(40))])
    assert kv.page_size == 16
    assert kv.free_pages() == idle - 3  # 40 tokens in pages of 16
    assert kv.total_sequence_length() == 40
    kv.remove_sequence(0)
    assert kv.free_pages() == idle


def test_a_kv_cache_beyond_the_library_size_bounds_is_refused(tiny_model: Callable) -> None:
    runtime = tiny_model("q0f32").runtime
    with pytest.raises(ValueError, match="at most 4096 prefill tokens and 256 sequences"):
        runtime.create_kv_cache(257, 4096, 128)
    with pytest.raises(ValueError, match="asked for 8192 and 4"):
        runtime.create_kv_cache(4, 16384, 8192)


def test_prefill_logit_rows_come_in_a_few_sizes() -> None:
    sizes = {logit_rows_bucket(rows) for rows in range(1, 4097)}
    assert sizes == {8, 16, 24, 32, 64, 128, 256, 512, 1024, 2048, 4096}
    assert all(logit_rows_bucket(rows) >= rows for rows in range(1, 4097))


def test_prefill_rejects_an_empty_prompt(tiny_model: Callable) -> None:
    runtime = tiny_model("q0f32").runtime
    kv = runtime.create_kv_cache(1, 512, 128)
    kv.add_sequence(0)
    with pytest.raises(ValueError, match="at least one token"):
        runtime.prefill(kv, [0], [[]])


def test_unsupported_rope_scaling_is_refused_by_name(tiny_model: Callable) -> None:
    config = dataclasses.replace(
        tiny_model("q0f32").config, rope_scaling={"type": "linear", "factor": 2.0}
    )
    with pytest.raises(ValueError, match="RoPE scaling 'linear' is not supported"):
        LlamaForCausalLM(config, None)


def test_a_library_built_for_another_model_is_refused(tiny_model: Callable) -> None:
    llama, qwen2 = tiny_model("q0f32"), tiny_model("q0f32", "qwen2")
    qwen2_library = prepare_library(qwen2.folder, CPU)
    with pytest.raises(ModelLibraryError, match="differ in attention_bias, model_type"):
        ModelRuntime(qwen2_library, llama.folder, tvm.cpu())


def test_a_library_without_avx2_reads_the_same_folder_row_by_row(
    tiny_model: Callable, tmp_path: Path
) -> None:
    """A CPU without AVX2 gets a library that keeps 4-bit weights row by row and the float
    schedules: from the same model folder, its logits match the unrounded reference."""
    model = tiny_model("q4f32_m")
    target = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64", "num-cores": 2})
    library = tmp_path / "no-avx2.so"
    compile_model(model.config, target, library)
    runtime = ModelRuntime(library, model.folder, tvm.cpu())
    assert all(len(param.shape) <= 2 for param in runtime.params)  # no blocks of columns
    assert any(len(param.shape) == 3 for param in model.runtime.params)  # as on AVX2
    weights = dequantized_hf_weights(model.folder, model.config)
    prompt = PROMPTS[2]
    kv = runtime.create_kv_cache(1, 512, 128)
    kv.add_sequence(0)
    logits = runtime.prefill(kv, [0], [prompt], all_logits=True)
    # Its float16 cache, as the reference rounds it: within last-bit differences of float16.
    unrounded = partial(reference.forward, weights, model.config, kv_dtype="float16")
    error = _relative_error(logits, unrounded(prompt))
    assert error < 1e-3
    decoded = runtime.decode(kv, [0], [12])[0]
    expected = unrounded([*prompt, 12])[-1]
    assert _relative_error(decoded, expected) < 1e-3
    # Without the cache's rounding the reference is several times further off (measured 6x):
    # the cache is float16.
    assert _relative_error(logits, reference.forward(weights, model.config, prompt)) > 3 * error
