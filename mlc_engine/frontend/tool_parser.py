"""The model's text, as it streams, split into content and OpenAI's `tool_calls`.

Two formats (see `tools.py` for which model writes which): `hermes`, calls in
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks after optional text, and
`llama3_json`, a whole answer of `{"name": ..., "parameters": {...}}` objects joined by `; `.
Text that looks like a call but is not one (bad JSON, an unknown function) stays content, as
written.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

PARSERS = ("hermes", "llama3_json")
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ParsedCall:
    index: int
    id: str
    name: str
    arguments: str  # the JSON object, as a string


class ToolCallParser:
    """Splits one choice's text, as it streams, into content and calls. Feeding the whole text
    at once gives exactly what the pieces of a stream join to."""

    def __init__(self, parser: str, names: set[str]):
        self.parser = parser
        self.names = names
        self.calls: list[ParsedCall] = []
        self._pending = ""
        self._in_call = False
        self._after_call = False
        self._gap = ""  # whitespace held back before an opening tag
        self._started = False  # llama3_json: whether the answer opened as a call

    def push(self, text: str) -> tuple[str, list[ParsedCall]]:
        """Content that is surely not part of a call, and the calls completed so far."""
        self._pending += text
        if self.parser == "llama3_json":
            return self._push_llama3()
        return self._push_hermes()

    def finish(self) -> tuple[str, list[ParsedCall]]:
        """What is left once the text has ended."""
        pending, self._pending = self._pending, ""
        if self.parser == "llama3_json":
            if not self._started:
                return pending, []
            calls = self._llama3_calls(pending)
            return ("", calls) if calls is not None else (pending, [])
        if self._in_call:
            call = self._call(pending.strip())  # ended (EOS) before its closing tag
            return ("", [call]) if call else (self._gap + CALL_OPEN + pending, [])
        return ("" if self.calls and not pending.strip() else pending), []

    def _push_hermes(self) -> tuple[str, list[ParsedCall]]:
        content = ""
        done: list[ParsedCall] = []
        while True:
            if self._in_call:
                end = self._pending.find(CALL_CLOSE)
                if end < 0:
                    return content, done
                body = self._pending[:end]
                self._pending = self._pending[end + len(CALL_CLOSE) :]
                self._in_call = False
                call = self._call(body.strip())
                if call is not None:
                    done.append(call)
                    self._after_call = True
                else:  # not a call after all: the text stands as it was written
                    content += self._gap + CALL_OPEN + body + CALL_CLOSE
                continue
            if self._after_call:  # whitespace between and after calls is not content
                self._pending = self._pending.lstrip()
                self._after_call = not self._pending
            start = self._pending.find(CALL_OPEN)
            if start >= 0:
                before = self._pending[:start]
                content += before.rstrip()
                self._gap = before[len(before.rstrip()) :]
                self._pending = self._pending[start + len(CALL_OPEN) :]
                self._in_call = True
                continue
            # Keep back what may begin a call tag, and trailing whitespace before one.
            keep = _partial_suffix(self._pending, CALL_OPEN)
            safe = self._pending[: len(self._pending) - keep]
            stripped = safe.rstrip()
            content += stripped
            self._pending = self._pending[len(stripped) :]
            return content, done

    def _push_llama3(self) -> tuple[str, list[ParsedCall]]:
        if self._started:
            return "", []
        head = self._pending.lstrip()
        if head.startswith(("{", PYTHON_TAG)):
            self._started = True
            return "", []
        if not head or PYTHON_TAG.startswith(head):
            return "", []
        content, self._pending = self._pending, ""
        return content, []

    def _llama3_calls(self, text: str) -> list[ParsedCall] | None:
        body = text.strip().removeprefix(PYTHON_TAG).strip()
        calls = []
        for piece in _split_objects(body):
            call = self._call(piece, key="parameters")
            if call is None:
                return None
            calls.append(call)
        return calls or None

    def _call(self, body: str, key: str = "arguments") -> ParsedCall | None:
        try:
            value = json.loads(body)
        except json.JSONDecodeError:
            return None
        if not isinstance(value, dict) or value.get("name") not in self.names:
            return None
        arguments = value.get(key, value.get("arguments", value.get("parameters", {})))
        if not isinstance(arguments, dict):
            return None
        call = ParsedCall(len(self.calls), call_id(), value["name"], json.dumps(arguments))
        self.calls.append(call)
        return call


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that is a beginning of `tag`."""
    for length in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-length:]):
            return length
    return 0


def _split_objects(text: str) -> list[str]:
    """JSON objects written one after another, separated by `;` or whitespace."""
    decoder = json.JSONDecoder()
    pieces, position = [], 0
    while position < len(text):
        while position < len(text) and text[position] in "; \n\t":
            position += 1
        if position >= len(text):
            break
        try:
            _, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            return [text]
        pieces.append(text[position:end])
        position = end
    return pieces
