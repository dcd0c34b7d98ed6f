"""The `mlc-engine` command line, run as a user runs it (a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from conftest import LoadedModel


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
    result = _cli("generate", "What is the capital of France?", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_chat_keeps_the_conversation_across_turns(smollm2: LoadedModel) -> None:
    turns = "What is the capital of France?\nAnd of Germany?\n/exit\n"
    result = _cli("chat", "--device", "cpu", stdin=turns)
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.strip().split("\n")
    assert "Paris" in first
    # "And of Germany?" only makes sense with the first turn in context.
    assert "Berlin" in second


def test_a_missing_device_is_named_in_one_line() -> None:
    result = _cli("generate", "hi", "--device", "vulkan")
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


def test_compile_cross_compiles_for_cuda_without_a_gpu(
    tiny_model: Callable, tmp_path: Path
) -> None:
    library = tmp_path / "tiny-cuda.so"
    result = _cli(
        "compile", str(tiny_model("q4f16_1").folder), "--device", "cuda", "--output", str(library)
    )
    assert result.returncode == 0, result.stderr
    assert library.stat().st_size > 0
