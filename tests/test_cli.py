"""The `mlc-engine` command line, run as a user runs it (a subprocess)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from conftest import CPU, SMOLLM2_GGUF, LoadedModel, greedy_reply, requires_cuda_codegen

from mlc_engine.common.model_paths import cache_dir
from mlc_engine.engine.models import content_digest, prepare_model
from mlc_engine.engine.runtime import PARAMS_FILE


def _cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mlc_engine", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ.copy(),
    )


def test_generate_answers_with_the_default_model(smollm2: LoadedModel) -> None:
    question = "What is the capital of France?"
    result = _cli("generate", question, "--device", "cpu", "--max-tokens", "24")
    assert result.returncode == 0, result.stderr
    expected = greedy_reply(smollm2, [{"role": "user", "content": question}], 24)
    assert result.stdout == expected + "\n"
    # A continuation whose next token wins by a margin test_smollm2 measures and asserts.
    result = _cli("generate", "--raw", "The capital of France is", "--max-tokens", "1")
    assert result.stdout.strip() == "Paris", result.stderr


def test_chat_keeps_the_conversation_across_turns(smollm2: LoadedModel) -> None:
    turns = ["What is the capital of France?", "And of Germany?"]
    result = _cli(
        "chat", "--device", "cpu", "--max-tokens", "24", stdin="\n".join(turns) + "\n/exit\n"
    )
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.strip().split("\n")
    messages = [{"role": "user", "content": turns[0]}]
    assert first == greedy_reply(smollm2, messages, 24)
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": turns[1]}]
    assert second == greedy_reply(smollm2, messages, 24)
    # The second answer depends on the first turn: alone, the question gets another one.
    assert second != greedy_reply(smollm2, messages[-1:], 24)


def test_a_missing_device_is_named_in_one_line() -> None:
    # An index no machine has: missing with a Vulkan TVM, and without one (the pinned wheel).
    result = _cli("generate", "hi", "--device", "vulkan:9")
    assert result.returncode == 2
    assert "Vulkan" in result.stderr and "Traceback" not in result.stderr


def test_an_unknown_model_is_reported_with_the_paths_searched() -> None:
    result = _cli("generate", "hi", "--model", "NoSuchModel-q4f32_1", "--device", "cpu")
    assert result.returncode == 2
    assert "not found" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_convert_writes_a_model_folder(tiny_model: Callable, tmp_path: Path) -> None:
    hf_folder = tiny_model("q0f32").folder.parent / "hf"
    result = _cli("convert", str(hf_folder), "--quantization", "q4f32_m", "--output", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "mlc-chat-config.json",
        "params.safetensors",
    ]


def test_convert_rejects_an_unknown_quantization(tiny_model: Callable, tmp_path: Path) -> None:
    hf_folder = tiny_model("q0f32").folder.parent / "hf"
    result = _cli("convert", str(hf_folder), "--quantization", "q3f7", "--output", str(tmp_path))
    assert result.returncode == 2
    assert "unknown quantization 'q3f7'" in result.stderr


@requires_cuda_codegen
def test_compile_cross_compiles_for_cuda_without_a_gpu(
    tiny_model: Callable, tmp_path: Path
) -> None:
    library = tmp_path / "tiny-cuda.so"
    result = _cli(
        "compile", str(tiny_model("q4f16_1").folder), "--device", "cuda", "--output", str(library)
    )
    assert result.returncode == 0, result.stderr
    assert library.stat().st_size > 0


def test_a_gguf_file_is_served_as_the_model_converted_once_by_content(
    smollm2: LoadedModel, tmp_path: Path
) -> None:
    """`--model file.gguf`: converted on first use into the cache, keyed by the file's content,
    so a copy under another name reuses it; the answer is the default model's own."""
    gguf = tmp_path / "My-SmolLM2.gguf"
    shutil.copyfile(SMOLLM2_GGUF, gguf)
    question = "What is the capital of France?"
    result = _cli("generate", question, "--model", str(gguf), "--max-tokens", "16")
    assert result.returncode == 0, result.stderr
    expected = greedy_reply(smollm2, [{"role": "user", "content": question}], 16)
    assert result.stdout == expected + "\n"
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()[:16]
    assert content_digest(gguf) == digest
    folder = prepare_model(str(gguf), CPU)
    assert folder == cache_dir() / "models" / "gguf" / digest / "My-SmolLM2-q4f32_m"
    converted = (folder / PARAMS_FILE).stat().st_mtime_ns
    renamed = tmp_path / "renamed.gguf"
    gguf.rename(renamed)
    assert prepare_model(str(renamed), CPU) == folder  # same content: no second conversion
    assert (folder / PARAMS_FILE).stat().st_mtime_ns == converted


def test_a_missing_gguf_file_is_reported_in_one_line(tmp_path: Path) -> None:
    result = _cli("generate", "Hi", "--model", str(tmp_path / "nope.gguf"), "--device", "cpu")
    assert result.returncode == 2 and "no such GGUF file" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_a_file_digest_follows_its_content(tmp_path: Path) -> None:
    first = tmp_path / "a.gguf"
    first.write_bytes(b"one")
    digest = content_digest(first)
    first.write_bytes(b"two")
    os.utime(first, ns=(1, 1))  # a new modification time: the remembered digest is stale
    assert content_digest(first) != digest
    assert content_digest(first) == hashlib.sha256(b"two").hexdigest()[:16]
