"""Structured output over real HTTP: `response_format` and `structured_outputs` on the tiny
model (random weights, so only the grammar makes the output valid) and, through the official
`openai` client's `parse`, on the real default model. Outputs are checked by independent
validators (json, jsonschema, re), not by the grammar engine that produced them."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pydantic
import pytest
from conftest import running_server, serve_command

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
ASK = [{"role": "user", "content": "Describe an item as JSON."}]
ITEM = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "size": {"enum": ["S", "M", "L"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "parts": {
            "type": "array",
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {"ok": {"type": "boolean"}},
                "required": ["ok"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["name", "size", "count", "parts"],
    "additionalProperties": False,
}
LARK = 'start: "go " DIRECTION\nDIRECTION: "north" | "south"'
NUMBERS = {
    "type": "array",
    "items": {"type": "integer", "minimum": 0, "maximum": 999},
    "maxItems": 4,
}
ITEM_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "item", "schema": ITEM, "strict": True},
}


def _post(url: str, route: str, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(url + route, json=body, timeout=120)
    assert response.status_code == 200, response.text
    reply: dict[str, Any] = response.json()
    return reply


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_schema_output_validates_for_every_choice(tiny_server_url: str, seed: int) -> None:
    body = {"messages": ASK, "response_format": ITEM_FORMAT, "n": 3, "seed": seed}
    reply = _post(tiny_server_url, CHAT, {**body, "temperature": 1.0, "max_tokens": 300})
    for choice in reply["choices"]:
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["message"]["content"]), ITEM)


def test_completions_take_response_format_too(tiny_server_url: str) -> None:
    body = {"prompt": "Item:", "response_format": ITEM_FORMAT, "max_tokens": 300, "seed": 3}
    (choice,) = _post(tiny_server_url, COMPLETIONS, {**body, "temperature": 1.0})["choices"]
    jsonschema.validate(json.loads(choice["text"]), ITEM)


@pytest.mark.parametrize(
    ("constraint", "valid"),
    [
        ({"regex": r"[A-Z]{2}-\d{4}"}, lambda text: re.fullmatch(r"[A-Z]{2}-\d{4}", text)),
        ({"choice": ["red", "green", "blue"]}, lambda text: text in ("red", "green", "blue")),
        ({"grammar": LARK}, lambda text: re.fullmatch("go (north|south)", text)),
        ({"grammar": 'root ::= "x" [0-9] [0-9]'}, lambda text: re.fullmatch(r"x\d\d", text)),
        ({"json": NUMBERS}, lambda text: jsonschema.validate(json.loads(text), NUMBERS) is None),
    ],
)  # fmt: skip
def test_structured_outputs_regex_choice_grammar_and_json(
    tiny_server_url: str, constraint: dict[str, Any], valid: Any
) -> None:
    body = {"messages": ASK, "structured_outputs": constraint, "n": 4, "temperature": 1.0}
    reply = _post(tiny_server_url, CHAT, {**body, "max_tokens": 100, "seed": 5})
    texts = [choice["message"]["content"] for choice in reply["choices"]]
    assert all(valid(text) for text in texts), texts


def test_a_streamed_constrained_answer_joins_to_the_whole_one(tiny_server_url: str) -> None:
    body = {"messages": ASK, "response_format": ITEM_FORMAT, "seed": 11, "max_tokens": 300}
    whole = _post(tiny_server_url, CHAT, body)["choices"][0]["message"]["content"]
    pieces = []
    with httpx.stream("POST", tiny_server_url + CHAT, json={**body, "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    pieces.append(choice["delta"].get("content") or "")
    assert "".join(pieces) == whole


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "x"}}}},
            "response_format.json_schema.schema",
            "Invalid type",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
        ({"response_format": {"type": "xml"}}, "response_format.type", "json_object"),
        ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs.regex", "regex"),
        ({"structured_outputs": {"grammar": "start: b"}}, "structured_outputs.grammar", "b"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "one"),
        (
            {"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
            "structured_outputs",
            "response_format",
        ),
    ],
)
def test_a_constraint_that_cannot_work_is_a_400_naming_it(
    tiny_server_url: str, body: dict[str, Any], param: str, words: str
) -> None:
    response = httpx.post(tiny_server_url + CHAT, json={"messages": ASK, **body}, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error
    fine = {"messages": ASK, "max_tokens": 2}
    assert httpx.post(tiny_server_url + CHAT, json=fine, timeout=60).status_code == 200


# The real default model through the official client's `parse`, which sends the Pydantic
# model's JSON schema as a strict json_schema response_format and parses the reply into it.


class Color(StrEnum):
    RED = "red"
    GREEN = "green"
    BLUE = "blue"


class City(pydantic.BaseModel):
    name: str
    country: str
    population_millions: float


class Trip(pydantic.BaseModel):
    destination: City
    days: int
    activities: list[str]
    favourite_color: Color


class Answer(pydantic.BaseModel):
    answer: bool
    reason: str


@pytest.fixture(scope="module")
def smollm2_client(smollm2_folder: Path) -> Iterator[openai.OpenAI]:
    with running_server(serve_command(smollm2_folder)) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize(
    ("model", "question"),
    [
        (City, "Give the capital of France as JSON."),
        (Trip, "Plan a short trip to Rome."),
        (Answer, "Is the sky blue? Answer as JSON."),
    ],
)
def test_openai_parse_returns_the_pydantic_object_on_the_default_model(
    smollm2_client: openai.OpenAI, model: type[pydantic.BaseModel], question: str
) -> None:
    completion = smollm2_client.chat.completions.parse(
        model="default",
        messages=[{"role": "user", "content": question}],
        response_format=model,
        max_tokens=400,
        temperature=0,
        # The grammar guarantees the form; greedy, a 135M model repeats a digit or an array
        # item until max_tokens ("population_millions": 1111...) unless repeats cost it.
        extra_body={"repetition_penalty": 1.2},
    )
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "stop", message.content
    assert isinstance(message.parsed, model)


def test_json_object_output_parses_on_the_default_model(smollm2_client: openai.OpenAI) -> None:
    completion = smollm2_client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": 'Reply with a JSON object: {"ok": true}.'}],
        response_format={"type": "json_object"},
        max_tokens=200,
        temperature=0,
    )
    content = completion.choices[0].message.content or ""
    assert completion.choices[0].finish_reason == "stop", content
    assert isinstance(json.loads(content), dict)


@pytest.mark.parametrize("seed", [0, 1])
def test_sampled_choices_of_the_default_model_validate(
    smollm2_client: openai.OpenAI, seed: int
) -> None:
    completion = smollm2_client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": "Describe a tool in a shop as JSON."}],
        response_format=ITEM_FORMAT,  # type: ignore[arg-type]
        n=3,
        seed=seed,
        temperature=1.0,
        max_tokens=300,
    )
    for choice in completion.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content or ""), ITEM)
