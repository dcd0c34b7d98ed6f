"""The report of a made-up run of two servers: tables, JSON and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import pytest
from rich.console import Console

from mlc_engine.bench.client import RequestResult
from mlc_engine.bench.metrics import Batch, summarize
from mlc_engine.bench.plots import write_plots
from mlc_engine.bench.report import as_json, print_tables, write_json
from mlc_engine.bench.run import BenchmarkResult, LevelResult, Target
from mlc_engine.bench.workload import LoadLevel, Workload

SERVERS = ["http://127.0.0.1:8000", "http://127.0.0.1:8090"]


def _run() -> BenchmarkResult:
    """Server B takes twice as long per token as A, at concurrency 1 and 4."""
    workload = Workload("chat", 16, 4, 3, 10.0)
    levels = []
    for concurrency in (1, 4):
        level = LoadLevel(concurrency=concurrency)
        batches = {}
        for scale, url in zip((1.0, 2.0), SERVERS, strict=True):
            results = [
                RequestResult(
                    url,
                    level.label,
                    i,
                    chunk_times=[scale * t for t in (0.1, 0.15, 0.2, 0.25)],
                    end=scale * 0.26,
                    output_tokens=4,
                    prompt_tokens=20,
                    usage_reported=True,
                )
                for i in range(3)
            ]
            batches[url] = [Batch(results, scale * 0.26 * 3 / concurrency, 0)]
        summaries = [summarize(url, level.label, batches[url], 4) for url in SERVERS]
        levels.append(LevelResult(level, summaries, batches))
    return BenchmarkResult(workload, [Target(url, "m") for url in SERVERS], levels, "abc123")


def test_json_holds_summaries_ratios_and_every_request(tmp_path: Path) -> None:
    result = _run()
    write_json(result, tmp_path / "out" / "results.json")
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data == json.loads(json.dumps(as_json(result)))
    assert data["workload"]["output_tokens"] == 4
    assert [s["url"] for s in data["servers"]] == SERVERS
    assert [level["level"] for level in data["levels"]] == ["c=1", "c=4"]
    first = data["levels"][0]
    a, b = first["summaries"]
    assert a["output_throughput"] == pytest.approx(a["output_tokens"] / a["duration"])
    assert first["ratios"][SERVERS[1]]["output_throughput"] == pytest.approx(0.5)
    assert first["ratios"][SERVERS[1]]["ttft_median"] == pytest.approx(2.0)
    assert len(data["requests"]) == 2 * 2 * 3
    request = data["requests"][0]
    assert request["ttft"] == pytest.approx(0.1) and request["chunks"] == 4
    assert request["ttft"] <= request["e2e"]


def test_tables_show_each_level_server_and_ratio() -> None:
    console = Console(record=True, width=120)
    print_tables(_run(), console)
    text = console.export_text()
    for expected in ("Throughput", "Latency (ms)", "Ratio to 127.0.0.1:8000", "0.50x", "2.00x"):
        assert expected in text
    # Server A: 3 requests x 4 tokens in 0.78 s at concurrency 1.
    assert f"{12 / 0.78:.1f}" in text


def test_plots_are_images(tmp_path: Path) -> None:
    paths = write_plots(_run(), tmp_path)
    assert [p.name for p in paths] == ["throughput.png", "ttft.png", "itl.png"]
    for path in paths:
        image = matplotlib.image.imread(path)
        height, width, channels = image.shape
        assert height > 200 and width > 400 and channels in (3, 4)
        assert image.std() > 0  # something was drawn
