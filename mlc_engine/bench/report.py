"""The figures of a run as terminal tables (rich) and as a JSON file."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from mlc_engine.bench.client import RequestResult
from mlc_engine.bench.metrics import COMPARED_LATENCIES, ratios
from mlc_engine.bench.run import BenchmarkResult


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _share(part: int | None, whole: int) -> str:
    return "-" if part is None or not whole else f"{part / whole:.0%}"


def _name(url: str) -> str:
    return url.split("://", 1)[-1]


def print_tables(result: BenchmarkResult, console: Console) -> None:
    """Throughput and latency per level and server; ratios to the first server when several."""
    width = max(len(_name(t.url)) for t in result.targets)
    workload = result.workload
    throughput = Table(
        title=f"Throughput, {workload.scenario} (ok, errors, cut off at the time limit, short "
        "outputs; prompt tokens and the share the server's prompt cache held)"
    )
    latency = Table(title="Latency (ms)")
    for table in (throughput, latency):
        table.add_column("level")
        table.add_column("server", no_wrap=True, min_width=width)
    for column in ("ok", "err", "cut", "short", "s", "prompt", "cached"):
        throughput.add_column(column, justify="right")
    for column in ("req/s", "out tok/s", "all tok/s"):
        throughput.add_column(column, justify="right")
    latency.add_column("figure")
    for column in ("mean", "median", "p90", "p99"):
        latency.add_column(column, justify="right")
    for level in result.levels:
        for s in level.summaries:
            throughput.add_row(
                s.level,
                _name(s.server),
                *(str(n) for n in (s.completed, s.errors, s.unfinished, s.short)),
                f"{s.duration:.1f}",
                str(s.prompt_tokens),
                _share(s.cached_tokens, s.prompt_tokens),
                f"{s.request_throughput:.2f}",
                f"{s.output_throughput:.1f}",
                f"{s.total_throughput:.1f}",
            )
            figures = {"TTFT": s.ttft, "TPOT": s.tpot, "ITL": s.itl, "E2E": s.e2e}
            if s.long_ttft.count:
                figures["TTFT long"] = s.long_ttft
            for figure, d in figures.items():
                latency.add_row(
                    s.level,
                    _name(s.server),
                    figure,
                    *(_ms(v) for v in (d.mean, d.median, d.p90, d.p99)),
                )
            latency.add_section()
    console.print(throughput)
    console.print(latency)
    if len(result.targets) > 1:
        console.print(_ratio_table(result))


def _ratio_table(result: BenchmarkResult) -> Table:
    first = _name(result.targets[0].url)
    table = Table(
        title=f"Ratio to {first}: throughputs (above 1: faster), median latencies (above 1: slower)"
    )
    latencies = [n.upper().replace("LONG_TTFT", "TTFT long") for n in COMPARED_LATENCIES]
    names = ["req/s", "out tok/s", "all tok/s", *latencies, "ITL p99"]
    table.add_column("level")
    table.add_column("server", no_wrap=True)
    for column in names:
        table.add_column(column, justify="right")
    for level in result.levels:
        baseline = level.summaries[0]
        for s in level.summaries[1:]:
            table.add_row(
                s.level, _name(s.server), *(_ratio(v) for v in ratios(s, baseline).values())
            )
    return table


def _request(r: RequestResult) -> dict[str, Any]:
    record = dataclasses.asdict(r)
    record.update(ttft=r.ttft, tpot=r.tpot, e2e=r.e2e, chunks=len(r.chunk_times))
    return record


def as_json(result: BenchmarkResult) -> dict[str, Any]:
    """Workload, servers, each level's summaries and ratios, and every request (seconds)."""
    levels = []
    for level in result.levels:
        baseline = level.summaries[0]
        levels.append(
            {
                "level": level.level.label,
                "concurrency": level.level.concurrency,
                "rate": level.level.rate,
                "summaries": [dataclasses.asdict(s) for s in level.summaries],
                "ratios": {s.server: ratios(s, baseline) for s in level.summaries[1:]},
            }
        )
    requests = [
        _request(r)
        for level in result.levels
        for batches in level.batches.values()
        for batch in batches
        for r in batch.results
    ]
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run_id": result.run_id,
        "workload": dataclasses.asdict(result.workload),
        "servers": [dataclasses.asdict(t) for t in result.targets],
        "levels": levels,
        "requests": requests,
    }


def write_json(result: BenchmarkResult, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(as_json(result), indent=1) + "\n")
