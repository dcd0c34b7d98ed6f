"""Prefill and decode throughput of one engine step for SmolLM2-135M-Instruct, per quantization.

Prefill runs one fresh sequence of 128 or 512 tokens. Decode runs N steps of a whole batch of
sequences (each first prefilled with a short prompt, untimed) and counts batch * N tokens. Each
figure is the median of the repetitions after one warm-up, repeated until the time budget
(default 3 s) or 20 repetitions, whichever comes first.

    python benchmarks/engine_step.py [--quantizations q4f32_1 q0f32] [--decode-steps 16]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
from loading import load
from rich.console import Console
from rich.table import Table

from mlc_engine.common.device import Device, parse_device, resolve_device
from mlc_engine.engine.models import DEFAULT_MODEL
from mlc_engine.engine.runtime import KVCache, ModelRuntime

TEXT = Path(__file__).parent / "data" / "pd_english.txt"
QUANTIZATIONS = ["q4f32_1", "q0f32"]
PREFILL_LENGTHS = (128, 512)
DECODE_BATCHES = (1, 4, 16)
DECODE_PROMPT = 16  # tokens each decode sequence starts with
MAX_REPS = 20

console = Console(stderr=True)


@dataclasses.dataclass
class Result:
    quantization: str
    compile_seconds: float | None  # None: the library was already cached
    prefill_tok_s: dict[int, float]  # by prompt length
    decode_tok_s: dict[int, float]  # by batch size, all sequences together


def median_seconds(run: Callable[[], float], budget: float) -> float:
    """Median of what `run` reports (the seconds it timed) after one warm-up call, over
    repetitions until `budget` seconds have passed or MAX_REPS were made."""
    run()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < MAX_REPS and (not times or time.perf_counter() - start < budget):
        times.append(run())
    return statistics.median(times)


def prefill_seconds(runtime: ModelRuntime, kv_cache: KVCache, prompt: list[int]) -> float:
    kv_cache.add_sequence(0)
    start = time.perf_counter()
    runtime.prefill(kv_cache, [0], [prompt])
    seconds = time.perf_counter() - start
    kv_cache.remove_sequence(0)
    return seconds


def decode_seconds(
    runtime: ModelRuntime, kv_cache: KVCache, prompts: list[list[int]], steps: int
) -> float:
    seq_ids = list(range(len(prompts)))
    for seq_id in seq_ids:
        kv_cache.add_sequence(seq_id)
    logits = runtime.prefill(kv_cache, seq_ids, prompts)
    start = time.perf_counter()
    for _ in range(steps):
        # Greedy tokens, as a real decode step feeds back (the argmax is part of the step).
        logits = runtime.decode(kv_cache, seq_ids, np.argmax(logits, axis=1).tolist())
    seconds = time.perf_counter() - start
    for seq_id in seq_ids:
        kv_cache.remove_sequence(seq_id)
    return seconds


def measure(quantization: str, device: Device, steps: int, budget: float) -> Result:
    runtime, tokenizer, compile_seconds = load(f"{DEFAULT_MODEL}-{quantization}", device)
    text = tokenizer.encode(TEXT.read_text(encoding="utf-8"))
    capacity = max(max(PREFILL_LENGTHS), max(DECODE_BATCHES) * (DECODE_PROMPT + steps))
    kv_cache = runtime.create_kv_cache(max(DECODE_BATCHES), capacity, max(PREFILL_LENGTHS))
    prefill: dict[int, float] = {}
    for length in PREFILL_LENGTHS:
        console.print(f"[dim]{quantization}: prefill {length} tokens...[/dim]")
        run = partial(prefill_seconds, runtime, kv_cache, text[:length])
        prefill[length] = length / median_seconds(run, budget)
    decode: dict[int, float] = {}
    for batch in DECODE_BATCHES:
        console.print(f"[dim]{quantization}: decode batch {batch}...[/dim]")
        prompts = [text[i * DECODE_PROMPT : (i + 1) * DECODE_PROMPT] for i in range(batch)]
        run = partial(decode_seconds, runtime, kv_cache, prompts, steps)
        decode[batch] = batch * steps / median_seconds(run, budget)
    return Result(quantization, compile_seconds, prefill, decode)


def table(results: list[Result], steps: int) -> Table:
    """One column per quantization, so that they read side by side."""
    out = Table(title=f"{DEFAULT_MODEL} engine step (decode: {steps} steps per repetition)")
    out.add_column("")
    for r in results:
        out.add_column(r.quantization, justify="right")
    out.add_row("compile, s", *(_seconds(r.compile_seconds) for r in results))
    for n in PREFILL_LENGTHS:
        out.add_row(f"prefill {n}, tok/s", *(f"{r.prefill_tok_s[n]:.1f}" for r in results))
    for n in DECODE_BATCHES:
        out.add_row(f"decode x{n}, tok/s", *(f"{r.decode_tok_s[n]:.1f}" for r in results))
    return out


def _seconds(seconds: float | None) -> str:
    return "cached" if seconds is None else f"{seconds:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quantizations", nargs="+", default=QUANTIZATIONS, metavar="Q")
    parser.add_argument("--decode-steps", type=int, default=16, metavar="N")
    parser.add_argument("--budget", type=float, default=3.0, help="seconds per figure (default 3)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda[:N], ... or auto")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write here")
    args = parser.parse_args()
    if args.decode_steps < 1:
        parser.error("--decode-steps must be at least 1")
    device = resolve_device(parse_device(args.device))

    results = [measure(q, device, args.decode_steps, args.budget) for q in args.quantizations]
    Console().print(table(results, args.decode_steps))
    if args.json:
        report = {"model": DEFAULT_MODEL, "device": device.name, "decode_steps": args.decode_steps}
        figures = [dataclasses.asdict(r) for r in results]
        args.json.write_text(json.dumps({**report, "results": figures}, indent=2) + "\n")


if __name__ == "__main__":
    main()
