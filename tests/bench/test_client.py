"""Streamed requests and batches against httpx's mock transport: SSE parsing, errors, limits."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from mlc_engine.bench.client import RequestResult, request_body, stream_request
from mlc_engine.bench.run import Target, run_batch
from mlc_engine.bench.workload import Conversation, LoadLevel, Workload

URL = "http://127.0.0.1:1"
HI = [{"role": "user", "content": "hi"}]


def _sse(events: list[Any], delay: float = 0.0) -> Callable[[httpx.Request], httpx.Response]:
    """A handler streaming `events` (dicts as JSON, strings as they are), `delay` s apart."""

    async def body() -> AsyncIterator[bytes]:
        for event in events:
            await asyncio.sleep(delay)
            data = event if isinstance(event, str) else json.dumps(event)
            yield f"data: {data}\n\n".encode()

    return lambda request: httpx.Response(200, content=body())


def _send(handler: Callable[[httpx.Request], httpx.Response], endpoint: str) -> RequestResult:
    async def go() -> RequestResult:
        result = RequestResult(URL, "c=1", 0)
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            await stream_request(client, URL, endpoint, request_body(endpoint, "m", HI, 3), result)
        return result

    return asyncio.run(go())


def _chat(text: str) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": {"content": text}}]}


def test_chat_stream_is_timed_per_event_and_counted_by_usage() -> None:
    usage = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 4}}
    role = {"choices": [{"index": 0, "delta": {"role": "assistant"}}]}
    events = [role, _chat("a"), _chat("b"), _chat("cd"), usage, "[DONE]"]
    r = _send(_sse(events, delay=0.01), "chat")
    assert r.ok, r.error
    assert len(r.chunk_times) == 3  # the role-only event carries no text
    assert (r.output_tokens, r.prompt_tokens, r.usage_reported) == (4, 7, True)
    assert r.ttft is not None and r.e2e is not None and 0 < r.ttft <= r.e2e
    assert all(gap > 0.005 for gap in r.itls)


def test_completions_without_usage_count_one_token_per_event() -> None:
    events = [{"choices": [{"index": 0, "text": t}]} for t in ("x", "y")] + ["[DONE]"]
    r = _send(_sse(events), "completions")
    assert r.ok and (r.output_tokens, r.usage_reported, r.prompt_tokens) == (2, False, None)


@pytest.mark.parametrize(
    ("handler", "error"),
    [
        (lambda request: httpx.Response(503, text="busy"), "HTTP 503: busy"),
        (_sse([{"error": {"message": "bad model"}}]), "server error"),
        (_sse([{"choices": [{"delta": {"role": "assistant"}}]}, "[DONE]"]), "no text"),
        (_sse(["{not json"]), "JSONDecodeError"),
    ],
)
def test_failures_are_recorded_not_raised(handler: Any, error: str) -> None:
    r = _send(handler, "chat")
    assert not r.ok and r.error is not None and r.error.startswith(error), r.error


def test_a_refused_connection_is_an_error() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    assert "ConnectError" in (_send(refuse, "chat").error or "")


def test_request_bodies_ask_for_usage_and_a_fixed_length() -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    chat = request_body("chat", "m", messages, 16)
    assert chat["messages"] == messages and "prompt" not in chat
    assert chat["stream_options"] == {"include_usage": True}
    assert (chat["max_tokens"], chat["ignore_eos"], chat["stream"]) == (16, True, True)
    assert request_body("completions", "m", messages, 16)["prompt"] == "be brief\n\nhello"


def test_a_batch_cancels_what_runs_past_its_time_limit() -> None:
    """One at a time, about 0.09 s each (three events 0.03 s apart), 0.5 s allowed: the first
    few end, the one running at 0.5 s is cut off and the rest are never sent."""
    events = [_chat("a"), _chat("b"), "[DONE]"]
    workload = Workload("chat", 4, 2, 20, 10.0)
    conversations = [Conversation(i, "", (f"prompt {i}",)) for i in range(20)]

    async def go() -> Any:
        transport = httpx.MockTransport(_sse(events, delay=0.03))
        async with httpx.AsyncClient(transport=transport) as client:
            target = Target(URL, "m")
            level = LoadLevel(concurrency=1)
            return await run_batch(client, target, workload, level, conversations, [0.0] * 20, 0.5)

    batch = asyncio.run(go())
    ended = len(batch.results)
    assert 1 <= ended <= 5 and batch.unfinished == 20 - ended
    assert [r.index for r in batch.results] == list(range(ended))
    assert all(r.ok for r in batch.results)
    assert batch.duration == pytest.approx(0.5, abs=0.1)
    for before, after in itertools.pairwise(batch.results):  # concurrency 1: one after another
        assert before.e2e is not None and after.sent_at >= before.sent_at + before.e2e


def test_a_conversation_resends_its_history_with_each_reply() -> None:
    """Two conversations of three turns at concurrency 1: each turn carries the system prompt,
    the earlier messages and the replies as the server streamed them."""
    sent: list[list[dict[str, str]]] = []

    def reply(request: httpx.Request) -> httpx.Response:
        messages = json.loads(request.content)["messages"]
        sent.append(messages)
        return _sse([_chat(f"re {len(sent)}"), _chat("!"), "[DONE]"])(request)

    workload = Workload("chat", 4, 2, 2, 10.0, scenario="multi-turn", turns=3)
    conversations = [Conversation(i, "sys", tuple(f"u{i}.{t}" for t in range(3))) for i in (0, 1)]

    async def go() -> Any:
        async with httpx.AsyncClient(transport=httpx.MockTransport(reply)) as client:
            level = LoadLevel(concurrency=1)
            target = Target(URL, "m")
            return await run_batch(client, target, workload, level, conversations, [0.0] * 2, 10)

    batch = asyncio.run(go())
    assert [(r.index, r.turn) for r in batch.results] == [
        (0, 0),
        (0, 1),
        (0, 2),
        (1, 0),
        (1, 1),
        (1, 2),
    ]
    assert batch.unfinished == 0 and all(r.ok for r in batch.results)
    assert sent[2] == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "u0.0"},
        {"role": "assistant", "content": "re 1!"},
        {"role": "user", "content": "u0.1"},
        {"role": "assistant", "content": "re 2!"},
        {"role": "user", "content": "u0.2"},
    ]
    assert sent[3][1:] == [{"role": "user", "content": "u1.0"}]
