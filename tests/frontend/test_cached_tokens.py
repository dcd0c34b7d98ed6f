"""usage.prompt_tokens_details.cached_tokens over real HTTP: the prompt tokens a request took
from the prefix cache (on by default), 0 with --no-prefix-cache."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import running_server, serve_command

CHAT = "/v1/chat/completions"
LONG = [{"role": "user", "content": "Tell me about the sea. " * 12}]


@pytest.fixture(scope="module")
def untiny_server_url(tiny_chat_model: Path) -> Iterator[str]:
    with running_server(serve_command(tiny_chat_model, "--no-prefix-cache")) as url:
        yield url


def _cached(url: str, **fields: object) -> int:
    body = {"messages": LONG, "max_tokens": 3, **fields}
    usage = httpx.post(url + CHAT, json=body, timeout=60).json()["usage"]
    return int(usage["prompt_tokens_details"]["cached_tokens"])


def test_a_repeated_prompt_reports_its_cached_tokens(tiny_server_url: str) -> None:
    first = _cached(tiny_server_url)
    again = _cached(tiny_server_url)
    assert first == 0 and again >= 48  # the prompt's whole pages, all but its last token
    assert _cached(tiny_server_url, n=2) == again  # counted once per prompt, not per choice
    chunks = []
    body = {"messages": LONG, "max_tokens": 3, "stream": True}
    body["stream_options"] = {"include_usage": True}
    with httpx.stream("POST", tiny_server_url + CHAT, json=body, timeout=60) as response:
        chunks = [line for line in response.iter_lines() if '"usage":{' in line]
    assert f'"cached_tokens":{again}' in chunks[-1]


def test_without_the_cache_nothing_is_cached(untiny_server_url: str) -> None:
    assert _cached(untiny_server_url) == 0 and _cached(untiny_server_url) == 0
