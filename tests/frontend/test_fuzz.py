"""A property-based fuzz of every route in /openapi.json (schemathesis, on hypothesis) against
`mlc-engine serve` on the tiny chat model: no 5xx, no hang, and every status, content type and
body (each event of a stream too) as the spec documents it.

Bounded and reproducible: a fixed number of examples per operation, a fixed seed and
derandomized generation, no shrinking, a deadline per example, and timeouts on every request
and on each operation's test. Valid generation requests are kept to a few tokens (`_small`).
"""

from __future__ import annotations

import json
import time
from datetime import timedelta

import httpx
import hypothesis
import pydantic
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
)

from mlc_engine.frontend import response_schemas
from mlc_engine.frontend.docs import openapi_spec

EXAMPLES = 100  # per operation, for valid and invalid requests alike
REQUEST_SECONDS = 10.0
CONFIG = schemathesis.Config.from_dict(
    {
        "seed": 14,
        "request-timeout": REQUEST_SECONDS,
        "generation": {
            "mode": "all",
            "max-examples": EXAMPLES,
            "deterministic": True,
            "database": "none",
            "no-shrink": True,  # a failure is reported as found: shrinking could take minutes
        },
        "phases": {"stateful": {"enabled": False}},
    }
)
CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]
TOKEN_LIMITS = ("max_tokens", "max_completion_tokens", "max_gen_len")
GENERATION = ("/v1/chat/completions", "/v1/completions")
WINDOW = 1024  # the tiny chat model's context window (conftest.tiny_chat_model)
SMALL = 16
# What the data of a stream's event may hold, besides "[DONE]".
EVENT_DATA = pydantic.TypeAdapter(
    response_schemas.ChatCompletionChunk
    | response_schemas.Completion
    | response_schemas.ErrorResponse
)


# The spec as the server builds it, loaded at collection so that each operation is a test of
# its own; test_the_served_spec_is_the_one_fuzzed pins that the server serves the same. (Loading
# it from the server in a fixture needs schemathesis' lazy schema, which sets pytest's
# Function._nodeid, gone in pytest 9.)
TITLE = "mlc-engine: tiny-chat-q0f32"
schema = schemathesis.openapi.from_dict(openapi_spec(TITLE), config=CONFIG)


def _small(case: schemathesis.Case) -> None:
    """Valid requests ask for few tokens, so that each ends well within the request timeout: a
    token limit the context window could hold becomes SMALL at most, and a chat request with
    none (which would get the rest of the window) gets SMALL. Limits beyond the window still
    go as drawn, for their 400s."""
    body = case.body
    if case.path not in GENERATION or not isinstance(body, dict):
        return
    for key in TOKEN_LIMITS:
        value = body.get(key)
        if type(value) is int and SMALL < value <= WINDOW:
            body[key] = SMALL
    if "messages" in body and all(body.get(key) is None for key in TOKEN_LIMITS):
        body["max_tokens"] = SMALL


def _check_events(response: schemathesis.Response) -> None:
    """Each event's data is a chunk, an error or the final [DONE], as StreamEvent says."""
    for line in response.content.decode().splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            EVENT_DATA.validate_json(line.removeprefix("data: "))


@pytest.mark.timeout(120)
@schema.parametrize()
@hypothesis.settings(deadline=timedelta(seconds=2 * REQUEST_SECONDS))
def test_every_route_answers_within_its_schema(
    case: schemathesis.Case, tiny_server_url: str
) -> None:
    _small(case)
    response = case.call_and_validate(base_url=tiny_server_url, checks=CHECKS)
    if response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
        _check_events(response)


def test_the_served_spec_is_the_one_fuzzed(tiny_server_url: str) -> None:
    assert httpx.get(f"{tiny_server_url}/openapi.json", timeout=10).json() == openapi_spec(TITLE)


def test_the_fuzz_leaves_no_sequence_behind(tiny_server_url: str) -> None:
    """Runs after the fuzz: every request it made, finished or dropped, has freed its pages."""
    deadline = time.monotonic() + 10
    while True:
        engines = httpx.get(f"{tiny_server_url}/verbose_stats", timeout=10).json()["engines"]
        if all(e["kv_pages_free"] == e["kv_pages_total"] for e in engines):
            break
        assert time.monotonic() < deadline, json.dumps(engines)
        time.sleep(0.1)
    assert all(e["num_running"] == 0 and e["num_waiting"] == 0 for e in engines)
