"""`mlc-engine bench` against a real `mlc-engine serve` of a tiny model, run as a user runs it.

`tiny_server_url` (tests/conftest.py) is the base URL of that server on the loopback.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import matplotlib.image
import pytest

from mlc_engine.bench.client import request_body
from mlc_engine.bench.workload import PromptSource

INPUT_WORDS, OUTPUT_TOKENS, REQUESTS = 16, 8, 4


def bench(url: str, folder: Path, *options: str) -> dict[str, Any]:
    """`mlc-engine bench URL OPTIONS`: its stdout, JSON and output folder."""
    args = ["--max-seconds", "120", "--output-dir", str(folder), *options]
    result = subprocess.run(
        [sys.executable, "-m", "mlc_engine", "bench", url, *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads((folder / "results.json").read_text())
    return {"stdout": result.stdout, "data": data, "folder": folder}


@pytest.fixture(scope="module")
def run(tiny_server_url: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One benchmark run at concurrency 1 and 4."""
    args = ["--concurrency", "1,4", "--num-requests", str(REQUESTS)]
    args += ["--input-len", str(INPUT_WORDS), "--output-len", str(OUTPUT_TOKENS)]
    return bench(tiny_server_url, tmp_path_factory.mktemp("bench"), *args)


@pytest.mark.slow
def test_every_request_ended_with_consistent_timings(run: dict[str, Any]) -> None:
    data = run["data"]
    assert [level["level"] for level in data["levels"]] == ["c=1", "c=4"]
    assert len(data["requests"]) == 2 * REQUESTS
    for r in data["requests"]:
        assert r["error"] is None and r["usage_reported"], r
        assert 0 < r["ttft"] <= r["e2e"]
        assert 1 <= r["chunks"] <= r["output_tokens"] <= OUTPUT_TOKENS
        assert r["chunk_times"] == sorted(r["chunk_times"])
        assert r["chunk_times"][-1] <= r["e2e"]


@pytest.mark.slow
def test_throughput_is_tokens_over_wall_time(run: dict[str, Any]) -> None:
    data = run["data"]
    for level in data["levels"]:
        (s,) = level["summaries"]
        mine = [r for r in data["requests"] if r["level"] == level["level"]]
        assert (s["completed"], s["errors"], s["unfinished"]) == (REQUESTS, 0, 0)
        assert s["output_tokens"] == sum(r["output_tokens"] for r in mine)
        assert s["prompt_tokens"] == sum(r["prompt_tokens"] for r in mine)
        assert s["output_throughput"] == pytest.approx(s["output_tokens"] / s["duration"])
        assert s["request_throughput"] == pytest.approx(REQUESTS / s["duration"])
        total = s["prompt_tokens"] + s["output_tokens"]
        assert s["total_throughput"] == pytest.approx(total / s["duration"])
        # The requests ran within the measured wall time.
        assert max(r["e2e"] for r in mine) <= s["duration"]
        assert s["ttft"]["median"] <= s["e2e"]["median"]
    assert "Throughput" in run["stdout"] and "c=4" in run["stdout"]


@pytest.mark.slow
def test_token_counts_match_the_servers_usage(run: dict[str, Any], tiny_server_url: str) -> None:
    """The same request again, not streamed: the server's usage gives the same counts."""
    data = run["data"]
    recorded = next(r for r in data["requests"] if r["level"] == "c=1")
    prompt = PromptSource.from_file().prompt(recorded["index"], INPUT_WORDS, data["run_id"])
    messages = [{"role": "user", "content": prompt}]
    body = request_body("chat", data["servers"][0]["model"], messages, OUTPUT_TOKENS)
    body["stream"] = False
    del body["stream_options"]
    response = httpx.post(f"{tiny_server_url}/v1/chat/completions", json=body, timeout=120)
    response.raise_for_status()
    usage = response.json()["usage"]
    assert usage["prompt_tokens"] == recorded["prompt_tokens"]
    assert usage["completion_tokens"] == recorded["output_tokens"]


@pytest.mark.slow
def test_plots_open_as_images(run: dict[str, Any]) -> None:
    for name in ("throughput.png", "ttft.png", "itl.png"):
        path: Path = run["folder"] / name
        assert path.stat().st_size > 0
        height, width, channels = matplotlib.image.imread(path).shape
        assert height > 200 and width > 400 and channels in (3, 4)


@pytest.mark.slow
def test_a_multi_turn_run_resends_each_conversation_and_hits_the_prefix_cache(
    tiny_server_url: str, tmp_path: Path
) -> None:
    args = ["--scenario", "multi-turn", "--turns", "3", "--concurrency", "2"]
    args += ["--num-requests", "2", "--input-len", "40", "--output-len", str(OUTPUT_TOKENS)]
    data = bench(tiny_server_url, tmp_path, *args)["data"]
    requests = data["requests"]
    expected = [(index, turn) for index in (0, 1) for turn in range(3)]
    assert sorted((r["index"], r["turn"]) for r in requests) == expected
    for index in (0, 1):
        turns = sorted((r for r in requests if r["index"] == index), key=lambda r: r["turn"])
        assert all(r["error"] is None for r in turns)
        for before, after in itertools.pairwise(turns):
            # The history (the reply included) comes again, and the server found most of it.
            assert after["prompt_tokens"] > before["prompt_tokens"] + before["output_tokens"]
            assert after["cached_tokens"] >= before["prompt_tokens"] - 16
    (summary,) = data["levels"][0]["summaries"]
    assert summary["cached_tokens"] == sum(r["cached_tokens"] for r in requests)
