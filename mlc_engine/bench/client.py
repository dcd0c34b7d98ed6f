"""One streamed request to an OpenAI-compatible server, timed chunk by chunk.

The response is read as server-sent events, line by line. Every event that carries text is a
moment a token (or a few) reached the client: the first gives the time to first token, the gaps
between them the inter-token latencies. Token counts come from the server's `usage`, asked for
with `stream_options.include_usage`; a server that sends none is counted one token per chunk.
The reply's text is kept, for the next turn of a conversation.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


@dataclass
class RequestResult:
    """What one request measured; times in seconds from the moment it was sent."""

    server: str
    level: str
    index: int  # which conversation of the workload
    turn: int = 0  # which of its user messages
    sent_at: float = 0.0  # seconds after the start of its batch
    chunk_times: list[float] = field(default_factory=list)  # each event that carried text
    end: float | None = None  # the stream closed
    output_tokens: int = 0  # usage.completion_tokens, or the chunk count without usage
    prompt_tokens: int | None = None  # usage.prompt_tokens
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens
    reply: str = ""
    long: bool = False  # one of a mixed workload's long prompts
    usage_reported: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.end is not None

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] if self.chunk_times else None

    @property
    def e2e(self) -> float | None:
        return self.end

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.chunk_times)]

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (E2E - TTFT) / (tokens - 1)."""
        if self.end is None or self.ttft is None or self.output_tokens < 2:
            return None
        return (self.end - self.ttft) / (self.output_tokens - 1)


def request_body(
    endpoint: str, model: str, messages: list[dict[str, str]], max_tokens: int
) -> dict[str, Any]:
    """A greedy streamed request for exactly `max_tokens` where the server honours ignore_eos;
    /v1/completions gets the messages' texts as one prompt, a blank line between them."""
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        # Not OpenAI's: llama.cpp, vLLM and others read it, servers that do not ignore it.
        "ignore_eos": True,
    }
    if endpoint == "chat":
        body["messages"] = messages
    else:
        body["prompt"] = "\n\n".join(message["content"] for message in messages)
    return body


def _read_usage(usage: dict[str, Any], result: RequestResult) -> None:
    result.output_tokens = int(usage.get("completion_tokens", 0))
    result.prompt_tokens = usage.get("prompt_tokens")
    details = usage.get("prompt_tokens_details") or {}
    result.cached_tokens = details.get("cached_tokens")
    result.usage_reported = True


def _chunk_text(choice: dict[str, Any]) -> str:
    if "delta" in choice:
        return (choice["delta"] or {}).get("content") or ""
    return choice.get("text") or ""


async def stream_request(
    client: httpx.AsyncClient,
    base_url: str,
    endpoint: str,
    body: dict[str, Any],
    result: RequestResult,
) -> None:
    """Send `body`, filling `result` as the events arrive.

    Failures are recorded in `result.error`, never raised, except cancellation: the caller
    cancels requests still running at its time limit.
    """
    start = time.perf_counter()
    chunks = 0
    try:
        async with client.stream("POST", base_url + PATHS[endpoint], json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text[:200]}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments, event names
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = f"server error: {json.dumps(event['error'])[:200]}"
                    return
                text = "".join(_chunk_text(choice) for choice in event.get("choices") or [])
                if text:
                    result.chunk_times.append(time.perf_counter() - start)
                    result.reply += text
                    chunks += 1
                if event.get("usage"):
                    _read_usage(event["usage"], result)
        result.end = time.perf_counter() - start
    except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError) as error:
        result.error = f"{type(error).__name__}: {error}"[:200]
        return
    if not result.usage_reported:
        result.output_tokens = chunks
    if chunks == 0:
        result.error = "no text in the response"
