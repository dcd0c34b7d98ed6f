"""Throughput of a real engine process driven directly over ZeroMQ (no HTTP), by concurrency.

Starts `mlc-engine engine` on the default model (SmolLM2-135M-Instruct) and, for each
concurrency level, keeps that many requests in flight (each `--output-tokens` tokens with
ignore_eos, prompts of `--prompt-tokens` tokens cut from benchmarks/data/pd_english.txt) until
`--requests-per-level` x concurrency requests have finished or `--max-seconds` have passed.
Prints aggregate output tok/s, time to first token and inter-token latency (client side).

    python benchmarks/engine_throughput.py [--concurrency 1 4 16 64] [--output-tokens 128]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from mlc_engine.common.client import EngineClient
from mlc_engine.common.config import ModelConfig
from mlc_engine.common.device import parse_device
from mlc_engine.common.protocol import SamplingParams
from mlc_engine.engine.models import prepare_model
from mlc_engine.frontend.text import Tokenizer

TEXT = Path(__file__).parent / "data" / "pd_english.txt"
console = Console()


@dataclass
class Level:
    concurrency: int
    requests: int
    output_tokens: int
    seconds: float
    output_tok_s: float
    ttft_median_ms: float
    ttft_p90_ms: float
    itl_median_ms: float
    itl_p90_ms: float


@dataclass
class Timing:
    ttft: float
    gaps: list[float]
    tokens: int


@contextlib.contextmanager
def engine(model: str | None, options: list[str]) -> Iterator[EngineClient]:
    run_dir = Path(tempfile.mkdtemp(prefix="mlc-engine-bench-"))
    endpoints = f"ipc://{run_dir}/input", f"ipc://{run_dir}/output"
    command = [sys.executable, "-m", "mlc_engine", "engine", "--device", "cpu", *options]
    command += ["--input", endpoints[0], "--output", endpoints[1]]
    if model:
        command += ["--model", model]
    process = subprocess.Popen(command)
    try:
        yield EngineClient(*endpoints)
    finally:
        process.terminate()
        process.wait(timeout=30)


async def one_request(
    client: EngineClient, request_id: str, prompt: list[int], tokens: int
) -> Timing:
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    arrivals = []
    count = 0
    async for output in client.generate(request_id, prompt, params):
        if output.error:
            raise RuntimeError(output.error)
        if output.token_ids:
            arrivals.append(time.perf_counter())
            count += len(output.token_ids)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    return Timing(arrivals[0] - start, gaps, count)


async def run_level(
    client: EngineClient, prompts: list[list[int]], concurrency: int, args: argparse.Namespace
) -> Level:
    total = args.requests_per_level * concurrency
    deadline = time.perf_counter() + args.max_seconds
    timings: list[Timing] = []
    issued = 0

    async def worker(worker_id: int) -> None:
        nonlocal issued
        while issued < total and time.perf_counter() < deadline:
            issued += 1
            prompt = prompts[issued % len(prompts)]
            timings.append(
                await one_request(client, f"{concurrency}-{issued}", prompt, args.output_tokens)
            )

    start = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    seconds = time.perf_counter() - start
    ttfts = [t.ttft * 1000 for t in timings]
    gaps = [g * 1000 for t in timings for g in t.gaps] or [0.0]
    return Level(
        concurrency=concurrency,
        requests=len(timings),
        output_tokens=sum(t.tokens for t in timings),
        seconds=seconds,
        output_tok_s=sum(t.tokens for t in timings) / seconds,
        ttft_median_ms=statistics.median(ttfts),
        ttft_p90_ms=_p90(ttfts),
        itl_median_ms=statistics.median(gaps),
        itl_p90_ms=_p90(gaps),
    )


def _p90(values: list[float]) -> float:
    return float(np.percentile(values, 90))


def prompts_from_text(tokenizer: Tokenizer, length: int, count: int) -> list[list[int]]:
    ids = tokenizer.encode(TEXT.read_text(encoding="utf-8"))
    step = max(1, (len(ids) - length) // count)
    return [ids[i * step : i * step + length] for i in range(count)]


async def main(args: argparse.Namespace) -> list[Level]:
    folder = prepare_model(args.model, parse_device("cpu"))
    tokenizer = Tokenizer.from_folder(folder, ModelConfig.load(folder))
    prompts = prompts_from_text(tokenizer, args.prompt_tokens, 64)
    options = ["--max-num-seqs", str(max(args.concurrency))]
    with engine(str(folder), options) as client:
        info = await client.connect(timeout=600)
        console.print(f"engine ready: {info.model}, {info.kv_pages} KV pages")
        await one_request(client, "warm-up", prompts[0], 8)
        levels = []
        for concurrency in args.concurrency:
            levels.append(await run_level(client, prompts, concurrency, args))
            console.print(f"concurrency {concurrency}: {levels[-1].output_tok_s:.1f} tok/s")
        await client.close()
    return levels


def show(levels: list[Level]) -> None:
    table = Table(title="engine over ZeroMQ, SmolLM2-135M-Instruct")
    for column in ("concurrency", "requests", "output tok/s", "TTFT p50/p90 ms", "ITL p50/p90 ms"):
        table.add_column(column, justify="right")
    for level in levels:
        table.add_row(
            str(level.concurrency),
            str(level.requests),
            f"{level.output_tok_s:.1f}",
            f"{level.ttft_median_ms:.0f} / {level.ttft_p90_ms:.0f}",
            f"{level.itl_median_ms:.1f} / {level.itl_p90_ms:.1f}",
        )
    console.print(table)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="default: the default model for the CPU")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--requests-per-level", type=int, default=2)
    parser.add_argument("--max-seconds", type=float, default=120.0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    arguments = parser.parse_args()
    results = asyncio.run(main(arguments))
    show(results)
    if arguments.json:
        arguments.json.write_text(json.dumps([asdict(level) for level in results], indent=2))
