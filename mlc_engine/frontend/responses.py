"""Response bodies and SSE events in OpenAI's shapes, and in MLC-Chat 2023's compact stream."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from mlc_engine.common.protocol import TokenLogprob
from mlc_engine.frontend.generation import Delta, TokenChoice

# MLC-Chat's own clients read each event as one 128-byte read: an event must fit.
MLC_CHAT_EVENT_BYTES = 128
TokenText = Callable[[int], str]


def sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


class ResponseIds:
    """The id, creation time and model name every chunk of one response repeats."""

    def __init__(self, prefix: str, request_id: str, model: str):
        self.id = f"{prefix}-{request_id}"
        self.created = int(time.time())
        self.model = model

    def head(self, object_type: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_type, "created": self.created, "model": self.model}


def chat_logprobs(tokens: list[TokenChoice], token_text: TokenText) -> dict[str, Any]:
    def entry(text: str, logprob: float | None) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {
        "content": [
            {
                **entry(_text(token, token_text), token.logprob),
                "top_logprobs": [entry(token_text(t), lp) for t, lp in token.top],
            }
            for token in tokens
        ]
    }


def _text(token: TokenChoice, token_text: TokenText) -> str:
    return token_text(token.token_id) if token.text is None else token.text


def completion_logprobs(
    tokens: list[TokenChoice], token_text: TokenText, offset: int = 0
) -> dict[str, Any]:
    """OpenAI's legacy shape; `offset` is where the first token's text starts."""
    texts = [_text(token, token_text) for token in tokens]
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": texts,
        "token_logprobs": [token.logprob for token in tokens],
        "top_logprobs": [
            None if token.logprob is None else {token_text(t): lp for t, lp in token.top}
            for token in tokens
        ],
        "text_offset": offsets,
    }


def prompt_token_choices(
    prompt: list[int], logprobs: list[TokenLogprob | None] | None
) -> list[TokenChoice]:
    """The prompt's tokens with their logprobs (none for the first), for `echo`."""
    found = logprobs or [None] * len(prompt)
    return [
        TokenChoice(token, entry.logprob if entry else None, entry.top if entry else [])
        for token, entry in zip(prompt, found, strict=True)
    ]


def mlc_chat_events(delta: Delta) -> list[bytes]:
    """Compact chunks, the content split so that every event fits in 128 bytes."""
    events, piece = [], ""
    for char in delta.text:
        if piece and len(_mlc_event(delta.index, piece + char, None)) > MLC_CHAT_EVENT_BYTES:
            events.append(_mlc_event(delta.index, piece, None))
            piece = ""
        piece += char
    if piece:
        events.append(_mlc_event(delta.index, piece, None))
    if delta.finish_reason is not None:
        events.append(_mlc_event(delta.index, None, delta.finish_reason))
    return events


def _mlc_event(index: int, text: str | None, finish_reason: str | None) -> bytes:
    choice: dict[str, Any] = {"index": index, "delta": {} if text is None else {"content": text}}
    if finish_reason is not None:
        choice["finish_reason"] = finish_reason
    return sse({"choices": [choice]})
