"""Tool calling: tools into the prompt, a grammar when a call is required, and the model's
output parsed back into OpenAI's `tool_calls`.

Two output formats are known, picked by the chat template (overridable with
`--tool-call-parser`):

- `hermes` (Hermes, Qwen2.5, and the default): each call is
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, text may come before.
- `llama3_json` (Llama 3.1 and later): the whole answer is `{"name": ..., "parameters": {...}}`,
  after an optional `<|python_tag|>`, several calls joined by `; `.

A template that takes a `tools` variable (as Hugging Face templates do) renders the tools and the
calls itself. Any other template gets `DEFAULT_TOOL_BLOCK` in its system message, assistant
calls written out in the parser's format, and tool results as user messages in
`<tool_response>` tags, so every template sees only roles and text it knows.

`tool_choice` "required" or a named function adds a grammar that admits only well-formed calls
of the allowed functions, with arguments that match their schemas; "auto" leaves the model free
and parses what it writes; "none" leaves the tools out of the prompt.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

import llguidance

from mlc_engine.frontend.errors import BadRequestError
from mlc_engine.frontend.schemas import ChatCompletionRequest, ChatMessage, NamedToolChoice, Tool
from mlc_engine.frontend.structured import JSON_OPTIONS

PARSERS = ("hermes", "llama3_json")
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"

DEFAULT_TOOL_BLOCK = """You can call functions to help answer. The functions, as JSON schemas:
{functions}
To call a function, reply with one block like this for each call, and nothing after them:
<tool_call>
{{"name": "function name", "arguments": {{"argument": "value"}}}}
</tool_call>
A function's result comes back in <tool_response></tool_response> tags."""


def parser_for(template_source: str) -> str:
    """The output format a chat template's model was trained to write."""
    return "llama3_json" if PYTHON_TAG in template_source else "hermes"


def template_takes_tools(template_source: str) -> bool:
    return re.search(r"\btools\b", template_source) is not None


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# ---- into the prompt ------------------------------------------------------------------------


def prompt_messages(
    messages: list[ChatMessage], tools: list[Tool], takes_tools: bool, parser: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages for the chat template, and its `tools` variable (None: no tools)."""
    if takes_tools:
        rendered = [_native_message(message) for message in messages]
        return rendered, [tool.model_dump(exclude_none=True) for tool in tools] or None
    rendered = [_plain_message(message, parser) for message in messages]
    if tools:
        rendered = _with_tool_block(rendered, tools)
    return rendered, None


def _native_message(message: ChatMessage) -> dict[str, Any]:
    rendered: dict[str, Any] = {"role": message.role, "content": message.text()}
    if message.tool_calls:
        rendered["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.function.name, "arguments": _arguments(call)},
            }
            for call in message.tool_calls
        ]
    if message.tool_call_id is not None:
        rendered["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        rendered["name"] = message.name
    return rendered


def _arguments(call: Any) -> Any:
    """A call's arguments as templates expect them: the JSON object, when it is one."""
    try:
        return json.loads(call.function.arguments)
    except json.JSONDecodeError:
        return call.function.arguments


def _plain_message(message: ChatMessage, parser: str) -> dict[str, Any]:
    if message.role == "tool":
        return {"role": "user", "content": f"<tool_response>\n{message.text()}\n</tool_response>"}
    text = message.text()
    if message.tool_calls:
        calls = [(call.function.name, _arguments(call)) for call in message.tool_calls]
        text += format_calls(calls, parser)
    return {"role": message.role, "content": text}


def format_calls(calls: list[tuple[str, Any]], parser: str) -> str:
    """Calls written as the model writes them in `parser`'s format."""
    if parser == "llama3_json":
        return "; ".join(json.dumps({"name": name, "parameters": args}) for name, args in calls)
    return "\n".join(
        f"{CALL_OPEN}\n{json.dumps({'name': name, 'arguments': args})}\n{CALL_CLOSE}"
        for name, args in calls
    )


def _with_tool_block(messages: list[dict[str, Any]], tools: list[Tool]) -> list[dict[str, Any]]:
    functions = "\n".join(json.dumps(tool.function.model_dump(exclude_none=True)) for tool in tools)
    block = DEFAULT_TOOL_BLOCK.format(functions=functions)
    if messages and messages[0]["role"] in ("system", "developer"):
        first = messages[0]
        return [{**first, "content": f"{first['content']}\n\n{block}"}, *messages[1:]]
    return [{"role": "system", "content": block}, *messages]


# ---- the grammar of a required call ---------------------------------------------------------


def tool_grammar(request: ChatCompletionRequest, parser: str) -> str | None:
    """A grammar admitting only calls of the allowed functions, when the request requires a
    call; None when the model is free to answer in text."""
    choice = request.tool_choice
    tools = request.called_tools()
    if isinstance(choice, NamedToolChoice):
        tools = [tool for tool in tools if tool.function.name == choice.function.name]
    elif choice != "required":
        return None
    key = "parameters" if parser == "llama3_json" else "arguments"
    rules = [f"fn{i}: %json {json.dumps(_call_schema(tool, key))}" for i, tool in enumerate(tools)]
    body = " | ".join(f"fn{i}" for i in range(len(tools)))
    if parser == "llama3_json":
        call, separator = "call: body", '"; "'
    else:
        call, separator = f'call: "{CALL_OPEN}\\n" body "\\n{CALL_CLOSE}"', '"\\n"'
    many = request.parallel_tool_calls and not isinstance(choice, NamedToolChoice)
    start = f"start: call ({separator} call)*" if many else "start: call"
    lark = "\n".join([start, call, f"body: {body}", *rules])
    grammar = llguidance.LLMatcher.grammar_from_lark(lark)
    problem = llguidance.LLMatcher.validate_grammar(grammar)
    if problem:
        raise BadRequestError(f"tools: a function's parameters: {problem.strip()}", "tools")
    return grammar


def _call_schema(tool: Tool, key: str) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": tool.function.name}, key: tool.function.parameters},
        "required": ["name", key],
        "additionalProperties": False,
        "x-guidance": JSON_OPTIONS,
    }


# ---- out of the model's text ----------------------------------------------------------------


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
