"""Prefill and decode throughput of one engine step for SmolLM2-135M-Instruct, per quantization.

Prefill runs one fresh sequence of 128 or 512 tokens. Decode runs N steps of a whole batch of
sequences (each first prefilled with a short prompt, untimed) and counts batch * N tokens. Each
figure is the median of the repetitions after one warm-up, repeated until the time budget
(default 3 s) or 20 repetitions, whichever comes first.

With `--llama-cpp-bin DIR` each group of figures is followed by llama.cpp's own benchmark tools
(`llama-bench`, `llama-batched-bench` from DIR) on the GGUF the default model is converted from,
with as many threads, and the table gives ours / llama.cpp beside each figure.

    python benchmarks/engine_step.py [--quantizations q4f32_1 q0f32] [--decode-steps 16]
    python benchmarks/engine_step.py --llama-cpp-bin /work/llama-build/bin
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from llama_cpp import LlamaCppError, LlamaCppTools
from loading import load
from rich.console import Console
from rich.table import Table

from mlc_engine.common.device import Device, parse_device, resolve_device
from mlc_engine.engine.models import DEFAULT_MODEL, default_model_gguf, default_quantization
from mlc_engine.engine.runtime import KVCache, ModelRuntime, use_threads

TEXT = Path(__file__).parent / "data" / "pd_english.txt"
QUANTIZATIONS = ["q4f32_1", "q0f32"]
COMPARED_QUANTIZATIONS = ["q4f32_m"]  # the GGUF's Q4_1 blocks, carried over exactly
PREFILL_LENGTHS = (128, 512)
DECODE_BATCHES = (1, 4, 16)
DECODE_PROMPT = 16  # tokens each decode sequence starts with
MAX_REPS = 20

LLAMA_CPP_TOOLS = ("llama-bench", "llama-batched-bench")
LLAMA_GEN_TOKENS = 128  # llama-bench tg128
LLAMA_BATCHED_GEN = 32  # llama-batched-bench -ntg
LLAMA_BATCHED_RUNS = 3  # it times each batch size once; the median of three steadies that

console = Console(stderr=True)


@dataclasses.dataclass
class Figures:
    prefill_tok_s: dict[int, float]  # by prompt length
    decode_tok_s: dict[int, float]  # by batch size, all sequences together


@dataclasses.dataclass
class Result:
    quantization: str
    compile_seconds: float | None  # None: the library was already cached
    prefill_tok_s: dict[int, float]
    decode_tok_s: dict[int, float]
    llama_cpp: Figures | None = None  # the same figures from llama.cpp, run beside ours

    def ratios(self) -> Figures | None:
        """Ours / llama.cpp, figure by figure."""
        if self.llama_cpp is None:
            return None
        theirs = self.llama_cpp
        return Figures(
            {n: v / theirs.prefill_tok_s[n] for n, v in self.prefill_tok_s.items()},
            {n: v / theirs.decode_tok_s[n] for n, v in self.decode_tok_s.items()},
        )


class LlamaCpp:
    """llama.cpp's benchmark tools in `folder`, run on `gguf` with `threads` threads."""

    def __init__(self, folder: Path, gguf: Path, threads: int):
        self.tools = LlamaCppTools(folder, LLAMA_CPP_TOOLS, gguf, threads)
        self.build = "?"  # llama-bench's "b<number> (<commit>)", once it has run

    def prefill_tok_s(self, lengths: Sequence[int]) -> dict[int, float]:
        rows = self._bench("-p", ",".join(map(str, lengths)), "-n", "0")
        return {row["n_prompt"]: statistics.median(row["samples_ts"]) for row in rows}

    def decode_tok_s(self, batches: Sequence[int]) -> dict[int, float]:
        """Batch 1 from llama-bench's tg128, larger batches from llama-batched-bench's S_TG."""
        out: dict[int, float] = {}
        if 1 in batches:
            (row,) = self._bench("-p", "0", "-n", str(LLAMA_GEN_TOKENS))
            out[1] = statistics.median(row["samples_ts"])
        larger = [batch for batch in batches if batch > 1]
        if larger:
            runs = [self._batched(larger) for _ in range(LLAMA_BATCHED_RUNS)]
            out.update({batch: statistics.median(run[batch] for run in runs) for batch in larger})
        return out

    def _bench(self, *args: str) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = json.loads(self._run("llama-bench", *args, "-o", "json"))
        self.build = f"b{rows[0]['build_number']} ({rows[0]['build_commit']})"
        return rows

    def _batched(self, batches: Sequence[int]) -> dict[int, float]:
        # npl 1 goes first although its figure is unused (llama-bench gives batch 1): it warms
        # the batched path up, which otherwise has only a 16-token warm-up.
        npl = ",".join(map(str, (1, *batches)))
        args = ["-c", "4096", "-b", "2048", "-ub", "512", "-npp", str(DECODE_PROMPT)]
        args += ["-ntg", str(LLAMA_BATCHED_GEN), "-npl", npl, "--output-format", "jsonl"]
        lines = self._run("llama-batched-bench", *args).splitlines()
        rows = [json.loads(line) for line in lines if line.startswith("{")]
        return {row["pl"]: row["speed_tg"] for row in rows if row["pl"] in batches}

    def _run(self, tool: str, *args: str) -> str:
        return self.tools.run(tool, *args).stdout


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


def measure(
    quantization: str,
    device: Device,
    steps: int,
    budget: float,
    threads: int,
    llama: LlamaCpp | None,
    gguf: Path | None = None,
) -> Result:
    """Our figures for `quantization` (or for the GGUF file `gguf`, converted as `--model`
    converts it under that scheme); with `llama`, llama.cpp's right after each group of them
    (prefill, decode x1, batched decode), so that both see much the same machine."""
    model = str(gguf) if gguf else f"{DEFAULT_MODEL}-{quantization}"
    runtime, tokenizer, compile_seconds = load(model, device, threads)
    text = tokenizer.encode(TEXT.read_text(encoding="utf-8"))
    capacity = max(max(PREFILL_LENGTHS), max(DECODE_BATCHES) * (DECODE_PROMPT + steps))
    kv_cache = runtime.create_kv_cache(max(DECODE_BATCHES), capacity, max(PREFILL_LENGTHS))
    result = Result(quantization, compile_seconds, {}, {})
    theirs = Figures({}, {})
    for length in PREFILL_LENGTHS:
        console.print(f"[dim]{quantization}: prefill {length} tokens...[/dim]")
        run = partial(prefill_seconds, runtime, kv_cache, text[:length])
        result.prefill_tok_s[length] = length / median_seconds(run, budget)
    if llama:
        theirs.prefill_tok_s.update(llama.prefill_tok_s(PREFILL_LENGTHS))
    for group in (DECODE_BATCHES[:1], DECODE_BATCHES[1:]):
        for batch in group:
            console.print(f"[dim]{quantization}: decode batch {batch}...[/dim]")
            prompts = [text[i * DECODE_PROMPT : (i + 1) * DECODE_PROMPT] for i in range(batch)]
            run = partial(decode_seconds, runtime, kv_cache, prompts, steps)
            result.decode_tok_s[batch] = batch * steps / median_seconds(run, budget)
        if llama:
            theirs.decode_tok_s.update(llama.decode_tok_s(group))
    result.llama_cpp = theirs if llama else None
    return result


def table(results: list[Result], steps: int, threads: int, llama: LlamaCpp | None) -> Table:
    """One column per quantization, so that they read side by side; with llama.cpp figures,
    each is followed by llama.cpp's column and the ratio ours / llama.cpp."""
    out = Table(title=f"{DEFAULT_MODEL} engine step (threads: {threads}, decode steps: {steps})")
    if llama:
        out.caption = (
            f"llama.cpp {llama.build}: llama-bench pp128, pp512, tg{LLAMA_GEN_TOKENS}; "
            f"llama-batched-bench S_TG (npp {DECODE_PROMPT}, ntg {LLAMA_BATCHED_GEN})"
        )
    out.add_column("")
    for r in results:
        out.add_column(r.quantization, justify="right")
        if r.llama_cpp:
            out.add_column("llama.cpp", justify="right")
            out.add_column("ratio", justify="right")
    out.add_row("compile, s", *(cell for r in results for cell in _compile_cells(r)))
    rows = [(f"prefill {n}, tok/s", "prefill_tok_s", n) for n in PREFILL_LENGTHS]
    rows += [(f"decode x{n}, tok/s", "decode_tok_s", n) for n in DECODE_BATCHES]
    for label, figure, n in rows:
        cells: list[str] = []
        for r in results:
            theirs = getattr(r.llama_cpp, figure)[n] if r.llama_cpp else None
            cells += _cells(getattr(r, figure)[n], theirs)
        out.add_row(label, *cells)
    return out


def _compile_cells(result: Result) -> list[str]:
    ours = "cached" if result.compile_seconds is None else f"{result.compile_seconds:.1f}"
    return [ours, "", ""] if result.llama_cpp else [ours]


def _cells(ours: float, theirs: float | None) -> list[str]:
    if theirs is None:
        return [f"{ours:.1f}"]
    return [f"{ours:.1f}", f"{theirs:.1f}", f"{ours / theirs:.2f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quantizations",
        nargs="+",
        default=None,
        metavar="Q",
        help=f"default {' '.join(QUANTIZATIONS)}; with --llama-cpp-bin, "
        f"{' '.join(COMPARED_QUANTIZATIONS)}",
    )
    parser.add_argument("--decode-steps", type=int, default=16, metavar="N")
    parser.add_argument("--budget", type=float, default=3.0, help="seconds per figure (default 3)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda[:N], ... or auto")
    parser.add_argument(
        "--num-threads", type=int, default=None, metavar="N", help="default: every usable core"
    )
    parser.add_argument(
        "--llama-cpp-bin",
        type=Path,
        default=None,
        metavar="DIR",
        help="also run llama-bench and llama-batched-bench from DIR and compare",
    )
    parser.add_argument(
        "--gguf",
        type=Path,
        default=None,
        metavar="FILE",
        help="measure this GGUF file instead (converted as --model converts it, each tensor in "
        "its own type, under the device's default scheme); llama.cpp runs on it too",
    )
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write here")
    args = parser.parse_args()
    if args.gguf and args.quantizations:
        parser.error("--gguf takes the device's default scheme: leave out --quantizations")
    if args.decode_steps < 1:
        parser.error("--decode-steps must be at least 1")
    if args.num_threads is not None and args.num_threads < 1:
        parser.error("--num-threads must be at least 1")
    device = resolve_device(parse_device(args.device))
    if args.llama_cpp_bin and device.kind != "cpu":
        parser.error("--llama-cpp-bin compares CPU builds: use --device cpu")
    quantizations = args.quantizations or (
        COMPARED_QUANTIZATIONS if args.llama_cpp_bin else QUANTIZATIONS
    )
    if args.gguf:
        quantizations = [default_quantization(device)]
    gguf = args.gguf or default_model_gguf()
    # Decided once here, so that llama.cpp gets exactly the thread count our runtime gets.
    threads = use_threads(args.num_threads)
    try:
        llama = None
        if args.llama_cpp_bin:
            llama = LlamaCpp(args.llama_cpp_bin, gguf, threads)
        results = [
            measure(q, device, args.decode_steps, args.budget, threads, llama, args.gguf)
            for q in quantizations
        ]
    except LlamaCppError as error:
        raise SystemExit(f"engine_step.py: error: {error}") from None
    Console().print(table(results, args.decode_steps, threads, llama))
    if args.json:
        report = {
            "model": DEFAULT_MODEL,
            "gguf": str(gguf),
            "device": device.name,
            "decode_steps": args.decode_steps,
            "num_threads": threads,
        }
        if llama:
            report["llama_cpp"] = {"bin": str(llama.tools.folder), "gguf": str(llama.tools.gguf)}
            report["llama_cpp"]["build"] = llama.build
        figures = [{**dataclasses.asdict(r), "ratio": _asdict(r.ratios())} for r in results]
        args.json.write_text(json.dumps({**report, "results": figures}, indent=2) + "\n")


def _asdict(figures: Figures | None) -> dict[str, Any] | None:
    return None if figures is None else dataclasses.asdict(figures)


if __name__ == "__main__":
    main()
