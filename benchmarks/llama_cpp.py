"""Running llama.cpp's tools beside ours: finding them, and one run with a time limit.

Shared by `engine_step.py` (llama-bench, llama-batched-bench) and `perplexity.py`
(llama-perplexity); `README.md` says how to build them.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

TIMEOUT = 600  # seconds per tool run; each takes well under a minute on 2 cores

console = Console(stderr=True)


class LlamaCppError(Exception):
    """A llama.cpp tool is missing, failed, ran past TIMEOUT or printed nothing usable."""


class LlamaCppTools:
    """The llama.cpp tools `names` in `folder`, each run on `gguf` with `threads` threads."""

    def __init__(self, folder: Path, names: Sequence[str], gguf: Path, threads: int):
        missing = [name for name in names if not os.access(folder / name, os.X_OK)]
        if missing:
            raise LlamaCppError(
                f"--llama-cpp-bin {folder} has no {' or '.join(missing)} "
                "(benchmarks/README.md says how to build it)"
            )
        self.folder = folder
        self.gguf = gguf
        self.threads = threads

    def run(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        """`tool` on the GGUF with `args`; raises LlamaCppError when it fails or hangs."""
        command = [str(self.folder / tool), "-m", str(self.gguf), "-t", str(self.threads), *args]
        console.print(f"[dim]llama.cpp: {tool} {shlex.join(args)}...[/dim]")
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=TIMEOUT, check=False
            )
        except subprocess.TimeoutExpired:
            raise LlamaCppError(f"{tool} ran past {TIMEOUT} s: {shlex.join(command)}") from None
        if done.returncode != 0:
            raise LlamaCppError(f"{tool} failed (exit {done.returncode}): {last_line(done)}")
        return done


def last_line(done: subprocess.CompletedProcess[str]) -> str:
    """What a tool said last on stderr (where llama.cpp logs)."""
    return (done.stderr.strip().splitlines() or ["no output"])[-1]
