"""Tool calling, on the way in: the tools into the prompt, and a grammar when a call is
required. `tool_parser.py` reads the calls back out of the model's text.

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
from typing import Any

import llguidance

from mlc_engine.frontend.errors import BadRequestError
from mlc_engine.frontend.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    NamedToolChoice,
    Tool,
    ToolCall,
)
from mlc_engine.frontend.structured import JSON_OPTIONS
from mlc_engine.frontend.tool_parser import CALL_CLOSE, CALL_OPEN, PYTHON_TAG

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


def _arguments(call: ToolCall) -> Any:
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
        text += _format_calls(calls, parser)
    return {"role": message.role, "content": text}


def _format_calls(calls: list[tuple[str, Any]], parser: str) -> str:
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
