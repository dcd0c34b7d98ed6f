"""Model loading shared by the benchmarks: convert and compile when not cached, then load."""

from __future__ import annotations

import time

from rich.console import Console

from mlc_engine.common.config import ModelConfig
from mlc_engine.common.device import Device, tvm_device, tvm_target
from mlc_engine.engine.models import library_path, prepare_library, prepare_model
from mlc_engine.engine.runtime import ModelRuntime
from mlc_engine.frontend.text import Tokenizer

console = Console(stderr=True)


def load(
    model: str, device: Device, num_threads: int | None = None
) -> tuple[ModelRuntime, Tokenizer, float | None]:
    """The runtime and tokenizer for `model`, and the compile time when it was not cached.
    `num_threads` sizes the CPU thread pool (None: every core this process may use)."""
    announced: set[str] = set()

    def show(what: str, done: int, total: int) -> None:
        if what not in announced:
            announced.add(what)
            console.print(f"[dim]{what}...[/dim]")

    folder = prepare_model(model, device, show)
    cached = library_path(ModelConfig.load(folder), tvm_target(device), device).is_file()
    start = time.perf_counter()
    lib = prepare_library(folder, device, progress=show)
    compile_seconds = None if cached else time.perf_counter() - start
    runtime = ModelRuntime(lib, folder, tvm_device(device), num_threads)
    return runtime, Tokenizer.from_folder(folder, runtime.config), compile_seconds
