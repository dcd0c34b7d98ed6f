"""Tool calling: the parser on its own (any split of a stream joins to the whole), tools in the
prompt, and over real HTTP calls enforced by the grammar on the tiny model (random weights:
only the grammar makes the calls valid) and through the official client on the default model.
Arguments are checked with jsonschema, independently of the grammar that produced them."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from conftest import REPEATABLE, running_server, serve_command

from mlc_engine.frontend.schemas import ChatMessage, Tool
from mlc_engine.frontend.text import ChatTemplate
from mlc_engine.frontend.tool_parser import ToolCallParser
from mlc_engine.frontend.tools import prompt_messages

CHAT = "/v1/chat/completions"
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]

HERMES_TEXTS = [
    'Sure.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n'
    '<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>\n',
    "Hello <tool_call> and more",
    "no calls here  \n",
    '<tool_call>\n{"name": "f", "arguments": {"a": [1, 2]}}',  # EOS before the closing tag
    'x <tool_call>{"name": "unknown", "arguments": {}}</tool_call> after',
    "</tool_call>\nBye <tool_",
]


def _parse(parser: str, pieces: list[str]) -> tuple[str, list[tuple[str, str]]]:
    tool_parser = ToolCallParser(parser, {"f", "g"})
    content, calls = "", []
    for piece in pieces:
        text, done = tool_parser.push(piece)
        content, calls = content + text, calls + done
    text, done = tool_parser.finish()
    return content + text, [(call.name, call.arguments) for call in calls + done]


@pytest.mark.parametrize("text", HERMES_TEXTS)
def test_any_split_of_a_stream_parses_as_the_whole_text(text: str) -> None:
    whole = _parse("hermes", [text])
    rng = random.Random(0)
    for _ in range(100):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 8))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert _parse("hermes", pieces) == whole


def test_the_parsers_read_their_formats() -> None:
    assert _parse("hermes", [HERMES_TEXTS[0]]) == ("Sure.", [("f", '{"a": 1}'), ("g", "{}")])
    assert _parse("hermes", [HERMES_TEXTS[1]]) == (HERMES_TEXTS[1], [])  # not a call: as written
    assert _parse("hermes", [HERMES_TEXTS[4]]) == (HERMES_TEXTS[4], [])  # unknown function
    llama = '<|python_tag|>{"name": "f", "parameters": {"a": 1}}; {"name": "g", "parameters": {}}'
    assert _parse("llama3_json", [llama]) == ("", [("f", '{"a": 1}'), ("g", "{}")])
    assert _parse("llama3_json", ["Just text"]) == ("Just text", [])


TOOL_TEMPLATE = (
    "{% if tools %}TOOLS:"
    "{{ tools | map(attribute='function') | map(attribute='name') | join(',') }}\n{% endif %}"
    "{% for m in messages %}{{ m.role }}:{{ m.content }}"
    "{% for c in m.tool_calls or [] %}[{{ c.function.name }}({{ c.function.arguments | tojson }})]"
    "{% endfor %}{% if m.tool_call_id %}#{{ m.tool_call_id }}{% endif %}\n{% endfor %}"
)
HISTORY = [
    ChatMessage(role="user", content="Weather?"),
    ChatMessage.model_validate(
        {
            "role": "assistant",
            "tool_calls": [
                {"id": "c1", "function": {"name": "f", "arguments": '{"city": "Oslo"}'}}
            ],
        }
    ),
    ChatMessage(role="tool", content="-3 C", tool_call_id="c1"),
]


def test_a_template_that_takes_tools_renders_them_and_the_calls() -> None:
    tools = [Tool.model_validate({"type": "function", "function": {"name": "f"}})]
    messages, variable = prompt_messages(HISTORY, tools, True, "hermes")
    prompt = ChatTemplate(TOOL_TEMPLATE).render(messages, tools=variable)
    assert prompt.startswith("TOOLS:f\n")
    assert 'assistant:[f({"city": "Oslo"})]' in prompt and "tool:-3 C#c1" in prompt


def test_a_template_without_tools_gets_the_default_block_and_plain_roles() -> None:
    tools = [Tool.model_validate({"type": "function", "function": {"name": "f"}})]
    messages, variable = prompt_messages(HISTORY, tools, False, "hermes")
    assert variable is None and messages[0]["role"] == "system"
    assert '{"name": "f"' in messages[0]["content"] and "<tool_call>" in messages[0]["content"]
    assert messages[2] == {
        "role": "assistant",
        "content": '<tool_call>\n{"name": "f", "arguments": {"city": "Oslo"}}\n</tool_call>',
    }
    assert messages[3] == {"role": "user", "content": "<tool_response>\n-3 C\n</tool_response>"}


def _check_calls(message: dict[str, Any], allowed: set[str]) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = message["tool_calls"]
    assert calls
    for call in calls:
        name = call["function"]["name"]
        assert name in allowed and call["id"].startswith("call_") and call["type"] == "function"
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[name])
    return calls


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(
    ("tool_choice", "allowed"),
    [
        ("required", {"get_weather", "get_time"}),
        ({"type": "function", "function": {"name": "get_time"}}, {"get_time"}),
    ],
)
def test_required_and_named_calls_are_well_formed_on_random_weights(
    tiny_server_url: str, tool_choice: Any, allowed: set[str], seed: int
) -> None:
    body = {"messages": ASK, "tools": TOOLS, "tool_choice": tool_choice, "n": 3, "seed": seed}
    body |= {"temperature": 1.0, "max_tokens": 300, "parallel_tool_calls": False}
    response = httpx.post(tiny_server_url + CHAT, json=body, timeout=120)
    assert response.status_code == 200, response.text
    for choice in response.json()["choices"]:
        assert choice["finish_reason"] == "tool_calls"
        assert choice["message"]["content"] is None
        assert len(_check_calls(choice["message"], allowed)) == 1


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        (
            {"tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "nope",
        ),
        ({"tool_choice": "required", "tools": []}, "tool_choice", "required"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 7}}}]},
            "tools",
            "parameters",
        ),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools", "unique"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools", "pattern"),
        ({"response_format": {"type": "json_object"}}, "response_format", "tool"),
    ],
)
def test_bad_tools_are_a_400_naming_the_field(
    tiny_server_url: str, body: dict[str, Any], param: str, words: str
) -> None:
    request = {"messages": ASK, "tools": TOOLS, "tool_choice": "required", **body}
    response = httpx.post(tiny_server_url + CHAT, json=request, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"].startswith(param) and words in error["message"], error


# The default model through the official client.


@pytest.fixture(scope="module")
def client(smollm2_folder: Path) -> Iterator[openai.OpenAI]:
    # Repeatable: a test compares a streamed call with the same call whole.
    with running_server(serve_command(smollm2_folder, *REPEATABLE)) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def _create(client: openai.OpenAI, **fields: Any) -> Any:
    return client.chat.completions.create(
        model="default", tools=TOOLS, max_tokens=150, temperature=0, **fields
    )


def test_streamed_and_whole_calls_agree_on_the_default_model(client: openai.OpenAI) -> None:
    fields = {"messages": ASK, "tool_choice": "required", "parallel_tool_calls": False}
    whole = _create(client, **fields).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.tool_calls
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in _create(client, stream=True, **fields):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for part in choice.delta.tool_calls or []:
                call = calls.setdefault(part.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += part.id or ""
                call["name"] += (part.function and part.function.name) or ""
                call["arguments"] += (part.function and part.function.arguments) or ""
    expected = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert [(c["name"], c["arguments"]) for c in calls.values()] == expected
    assert finish == "tool_calls" and all(c["id"].startswith("call_") for c in calls.values())
    for name, arguments in expected:
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def test_a_conversation_continues_after_a_tool_result(client: openai.OpenAI) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    first = _create(client, messages=ASK, tool_choice=named).choices[0].message
    (call,) = first.tool_calls or []
    history = [
        *ASK,
        first.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "clear"}'},
    ]
    answer = _create(client, messages=history, tool_choice="none").choices[0]
    assert answer.finish_reason in ("stop", "length") and not answer.message.tool_calls
    assert answer.message.content


def test_models_say_what_structured_features_the_model_has(tiny_server_url: str) -> None:
    (model,) = httpx.get(f"{tiny_server_url}/v1/models", timeout=30).json()["data"]
    capabilities = model["capabilities"]
    assert capabilities["tools"] is True and capabilities["tool_call_parser"] == "hermes"
    assert capabilities["chat_template_takes_tools"] is False  # SmolLM2's template has no tools
    assert "json_schema" in capabilities["response_format"]
