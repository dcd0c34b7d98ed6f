"""What a request constrains its output to, as an llguidance grammar for the engine.

`response_format` (OpenAI's `json_object` and `json_schema`) and `structured_outputs` (vLLM's
extra field: a JSON schema, a regex, a Lark or GBNF grammar, or a choice of strings) become one
llguidance grammar definition. It is checked here, without the tokenizer, so a schema or
grammar that cannot compile is a 400 naming the field before anything reaches the engine.
"""

from __future__ import annotations

import json
from typing import Any

import llguidance

from mlc_engine.frontend.errors import BadRequestError
from mlc_engine.frontend.schemas import ResponseFormat, SamplingFields, StructuredOutputs

# JSON as OpenAI's models write it: ", " and ": " between items, no other whitespace. Free
# whitespace lets a small model wander into newlines and spaces until max_tokens.
JSON_OPTIONS: Any = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT = {"type": "object"}


def request_grammar(request: SamplingFields) -> str | None:
    """The grammar the request's output must match; None when it sets no constraint."""
    if request.response_format is not None:
        return _response_format(request.response_format)
    if request.structured_outputs is not None:
        return _structured_outputs(request.structured_outputs)
    return None


def _response_format(response_format: ResponseFormat) -> str | None:
    if response_format.type == "json_object":
        return _checked(_json(ANY_OBJECT), "response_format")
    if response_format.json_schema is not None:
        schema = response_format.json_schema.json_schema
        return _checked(_json(schema), "response_format.json_schema.schema")
    return None


def _structured_outputs(outputs: StructuredOutputs) -> str:
    if outputs.json_schema is not None:
        return _checked(_json(outputs.json_schema), "structured_outputs.json")
    if outputs.regex is not None:
        grammar = llguidance.LLMatcher.grammar_from_regex(outputs.regex)
        return _checked(grammar, "structured_outputs.regex")
    if outputs.grammar is not None:
        try:
            grammar = llguidance.grammar_from("grammar", outputs.grammar)
        except ValueError as error:  # GBNF that does not convert to Lark
            raise BadRequestError(
                f"structured_outputs.grammar: {error}", param="structured_outputs.grammar"
            ) from None
        return _checked(grammar, "structured_outputs.grammar")
    assert outputs.choice is not None
    grammar = llguidance.grammar_from("choice", json.dumps(outputs.choice))
    return _checked(grammar, "structured_outputs.choice")


def _json(schema: dict[str, Any]) -> str:
    return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)


def _checked(grammar: str, field: str) -> str:
    problem = llguidance.LLMatcher.validate_grammar(grammar)
    if problem:
        raise BadRequestError(f"{field}: {problem.strip()}", param=field)
    return grammar
