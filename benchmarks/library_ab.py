"""Decode speed of several compiled libraries of one model, timed in turn in one process.

For kernel work: compile the library before and after a change (`mlc-engine compile MODEL
--device cpu --output before.so`, then again after the change), and compare them here. Each
round decodes with every library in turn, so that whatever else the machine does weighs on all
of them alike; the table gives each library's median tokens/s and its ratio to the first.

    python benchmarks/library_ab.py before.so after.so
    python benchmarks/library_ab.py before.so after.so --context 1000 --batch 4
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import tvm
from rich.console import Console
from rich.table import Table

from mlc_engine.common.device import Device
from mlc_engine.engine.models import prepare_model
from mlc_engine.engine.runtime import KVCache, ModelRuntime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("libraries", nargs="+", type=Path, help="compiled .so files")
    parser.add_argument("--model", default="SmolLM2-135M-Instruct-q4f32_m")
    parser.add_argument("--context", type=int, default=16, help="prompt tokens before decoding")
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    parser.add_argument("--steps", type=int, default=32, help="decode steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    folder = prepare_model(args.model, Device("cpu"))
    seqs = list(range(args.batch))
    prompts = [list(range(1 + s, args.context + 1 + s)) for s in seqs]
    runtimes = [ModelRuntime(lib, folder, tvm.cpu()) for lib in args.libraries]
    # Each sequence holds whole pages: room for its tokens rounded up to a page, and one more.
    pages = -(-(args.context + args.steps) // KVCache.page_size) + 1
    caches = [
        rt.create_kv_cache(args.batch, args.batch * pages * KVCache.page_size) for rt in runtimes
    ]
    speeds: list[list[float]] = [[] for _ in runtimes]
    for _ in range(args.rounds):
        for runtime, cache, speed in zip(runtimes, caches, speeds, strict=True):
            for s in seqs:
                cache.add_sequence(s)
            runtime.prefill(cache, seqs, prompts)
            start = time.perf_counter()
            for step in range(args.steps):
                runtime.decode(cache, seqs, [100 + step] * args.batch)
            speed.append(args.steps * args.batch / (time.perf_counter() - start))
            for s in seqs:
                cache.remove_sequence(s)

    table = Table(title=f"decode x{args.batch} after {args.context} tokens, {args.rounds} rounds")
    for column in ("library", "median tok/s", "rounds", "ratio"):
        table.add_column(column)
    first = statistics.median(speeds[0])
    for lib, speed in zip(args.libraries, speeds, strict=True):
        median = statistics.median(speed)
        rounds = " ".join(f"{s:.0f}" for s in speed)
        table.add_row(lib.name, f"{median:.1f}", rounds, f"{median / first:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
