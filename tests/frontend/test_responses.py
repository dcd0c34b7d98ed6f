"""MLC-Chat's compact stream events: each fits one 128-byte read and they add up to the text."""

from __future__ import annotations

import json

import pytest

from mlc_engine.frontend.generation import Delta
from mlc_engine.frontend.responses import MLC_CHAT_EVENT_BYTES, mlc_chat_events


@pytest.mark.parametrize(
    "text",
    ["hi", "x" * 500, "日本語のテキスト" * 20, 'quotes " and \\ backslashes\n' * 8, "😀" * 60],
)
def test_events_fit_128_bytes_and_join_to_the_text(text: str) -> None:
    events = mlc_chat_events(Delta(0, text, [], "stop"))
    assert all(len(event) <= MLC_CHAT_EVENT_BYTES for event in events)
    assert all(event.startswith(b"data: ") and event.endswith(b"\n\n") for event in events)
    chunks = [json.loads(event[6:-2])["choices"][0] for event in events]
    assert "".join(chunk["delta"].get("content", "") for chunk in chunks) == text
    assert chunks[-1]["finish_reason"] == "stop"
