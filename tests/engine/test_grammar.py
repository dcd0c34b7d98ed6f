"""Constrained decoding in the engine (in-process, real compiled model): every output matches
its grammar, checked by independent validators (re, json + jsonschema), whatever the seed and
choice; unconstrained requests beside them are untouched; a bad grammar fails alone."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import llguidance
import pytest
import tokenizers
from conftest import CPU

from mlc_engine.common.device import tvm_device
from mlc_engine.common.protocol import AddRequest, ErrorCode, SamplingParams, SequenceOutput
from mlc_engine.engine.core import Engine, EngineConfig
from mlc_engine.engine.models import prepare_library
from mlc_engine.engine.runtime import ModelRuntime

FRONTEND = "f" * 32
PROMPT = [1, 504, 3260, 28, 260, 1131, 30, 2]
PHONE = r"\(\d{3}\) \d{3}-[a-z]{2,4}"
CHOICES = ["yes", "no", "maybe so"]
COMPACT: Any = {"whitespace_flexible": False}  # else random weights write whitespace forever
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "size": {"enum": ["S", "M", "L"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
        "nested": {
            "type": "object",
            "properties": {"ok": {"type": "boolean"}},
            "required": ["ok"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "size", "count", "tags", "nested"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine(tiny_chat_model: Path) -> Engine:
    """The tiny random model with SmolLM2's tokenizer (which llguidance needs)."""
    library = prepare_library(tiny_chat_model, CPU)
    runtime = ModelRuntime(library, tiny_chat_model, tvm_device(CPU))
    return Engine(runtime, EngineConfig())


@pytest.fixture(scope="module")
def tokenizer(tiny_chat_model: Path) -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_file(str(tiny_chat_model / "tokenizer.json"))


def run(engine: Engine, requests: list[AddRequest]) -> dict[tuple[str, int], list[SequenceOutput]]:
    outputs: dict[tuple[str, int], list[SequenceOutput]] = {}
    for request in requests:
        for output in engine.add(request):
            outputs.setdefault((output.request_id, output.index), []).append(output)
    for _ in range(3000):
        if not engine.has_work:
            return outputs
        for output in engine.step():
            outputs.setdefault((output.request_id, output.index), []).append(output)
    raise AssertionError("the engine did not finish")


def request(request_id: str, **params: object) -> AddRequest:
    return AddRequest(request_id, FRONTEND, PROMPT, SamplingParams(**params))  # type: ignore[arg-type]


def text_of(outputs: list[SequenceOutput], tokenizer: tokenizers.Tokenizer) -> str:
    """The choice's text: every token but the stop token that ended it."""
    assert outputs[-1].finish_reason == "stop", outputs[-1]
    tokens = [token for output in outputs for token in output.token_ids]
    return str(tokenizer.decode(tokens[:-1], skip_special_tokens=False))


GRAMMARS = {
    "regex": (llguidance.LLMatcher.grammar_from_regex(PHONE), lambda t: re.fullmatch(PHONE, t)),
    "choice": (llguidance.grammar_from("choice", json.dumps(CHOICES)), lambda t: t in CHOICES),
    "json": (
        llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults=COMPACT),
        lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None,
    ),
}


@pytest.mark.parametrize("kind", sorted(GRAMMARS))
def test_every_choice_of_every_seed_matches_its_grammar(
    engine: Engine, tokenizer: tokenizers.Tokenizer, kind: str
) -> None:
    grammar, valid = GRAMMARS[kind]
    requests = [
        request(f"{kind}-{seed}", grammar=grammar, seed=seed, n=3, max_tokens=300, temperature=1.0)
        for seed in range(4)
    ]
    outputs = run(engine, requests)
    assert len(outputs) == 12
    texts = [text_of(choice, tokenizer) for choice in outputs.values()]
    assert all(valid(text) for text in texts), texts


def test_unconstrained_requests_beside_constrained_ones_are_unchanged(engine: Engine) -> None:
    plain = [request(f"plain-{i}", max_tokens=12, temperature=0, ignore_eos=True) for i in range(3)]
    alone = run(engine, plain)
    grammar, _ = GRAMMARS["json"]
    constrained = [request(f"json-{i}", grammar=grammar, max_tokens=40) for i in range(3)]
    beside = run(engine, [*constrained, *plain])
    for key, outputs in alone.items():
        assert [o.token_ids for o in beside[key]] == [o.token_ids for o in outputs]


def test_a_grammar_that_cannot_compile_fails_alone(engine: Engine) -> None:
    broken = llguidance.LLMatcher.grammar_from_json_schema({"type": "objectt"})
    (failed,) = engine.add(request("broken", grammar=broken))
    assert failed.finish_reason == "error" and failed.error_code == ErrorCode.INVALID_REQUEST
    assert "does not compile" in (failed.error or "")
    outputs = run(engine, [request("fine", max_tokens=5, temperature=0, ignore_eos=True)])
    assert sum(len(o.token_ids) for o in outputs[("fine", 0)]) == 5


def test_a_grammar_is_compiled_once(engine: Engine) -> None:
    grammar = llguidance.LLMatcher.grammar_from_regex("[0-9]{5}")
    before = engine.grammars.num_compiled
    run(engine, [request(f"zip-{i}", grammar=grammar, seed=i, temperature=1.0) for i in range(4)])
    assert engine.grammars.num_compiled == before + 1
