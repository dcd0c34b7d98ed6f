"""`python -m mlc_chat.rest` on the real SmolLM2, as the MLC-Chat REST API documentation uses it."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import requests
from conftest import running_server

EXAMPLE = Path(__file__).parent / "data" / "rest_example.py"


@pytest.fixture(scope="module")
def rest_url(smollm2_folder: Path) -> Iterator[str]:
    command = [sys.executable, "-m", "mlc_chat.rest", "--model", str(smollm2_folder)]
    with running_server([*command, "--device", "cpu"]) as url:
        yield url


def test_help_lists_the_documented_flags() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mlc_chat.rest", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    for flag in ("--model", "--lib-path", "--device", "--host", "--port"):
        assert flag in result.stdout


def test_the_documented_example_runs_as_written(rest_url: str, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(EXAMPLE.read_text().replace("http://127.0.0.1:8000", rest_url))
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    reply = out.split("Without streaming:\n")[1].split("\n\nReset chat:")[0]
    assert reply.strip()
    assert "Reset chat: <Response [200]>" in out
    streamed = out.split("With streaming:\n")[1].split("\n\nRuntime stats:")[0]
    assert streamed.strip()
    assert "Runtime stats: prefill: " in out and " tok/s, decode: " in out


def test_stream_events_each_fit_one_128_byte_read(rest_url: str) -> None:
    payload = {"messages": [{"role": "user", "content": "Count from 1 to 30"}], "stream": True}
    with requests.post(f"{rest_url}/v1/chat/completions", json=payload, stream=True) as r:
        chunks = list(r)
    assert len(chunks) > 3
    for chunk in chunks:
        assert chunk.startswith(b"data: ") and chunk.endswith(b"\n\n")
        event = json.loads(chunk[6:-2])
        assert set(event) == {"choices"}
    assert json.loads(chunks[-1][6:-2])["choices"][0]["finish_reason"] in ("stop", "length")


def test_stats_are_lines_of_text_and_reset_zeroes_them(rest_url: str) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_gen_len": 8}
    assert httpx.post(f"{rest_url}/v1/chat/completions", json=body, timeout=120).status_code == 200
    stats = httpx.get(f"{rest_url}/stats").json()
    assert stats.startswith("prefill: ") and not stats.startswith("prefill: 0.0 tok/s")
    verbose = httpx.get(f"{rest_url}/verbose_stats").json()
    assert "total tokens" in verbose and "decode" in verbose
    reset = httpx.get(f"{rest_url}/chat/reset")
    assert reset.status_code == 200 and reset.json() is None
    assert httpx.get(f"{rest_url}/stats").json() == "prefill: 0.0 tok/s, decode: 0.0 tok/s"
