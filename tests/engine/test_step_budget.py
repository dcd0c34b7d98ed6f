"""The step-time budget: with decodes running, prefill gets only what fits in the budget by the
engine's measured costs (never less than MIN_PREFILL_TOKENS), prompts are served first come,
first served, none starves, and outputs do not change."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from conftest import LoadedModel

from mlc_engine.common.protocol import AddRequest, SamplingParams, SequenceOutput
from mlc_engine.engine.core import Engine, EngineConfig
from mlc_engine.engine.scheduler import MIN_PREFILL_TOKENS, Batch
from mlc_engine.engine.step_costs import StepCosts

FRONTEND = "f" * 32
LONG_PROMPT = [3 + (i * 7) % 500 for i in range(400)]


@pytest.fixture(scope="module")
def tiny(tiny_model: Callable[..., LoadedModel]) -> LoadedModel:
    return tiny_model("q0f32")


def test_costs_are_learned_from_steps() -> None:
    costs = StepCosts()
    assert costs.prefill_tokens_within(0.1, 4) is None  # nothing measured yet
    costs.observe(decodes=4, prefill_tokens=0, seconds=0.020)
    costs.observe(decodes=4, prefill_tokens=100, seconds=0.070)  # 0.5 ms a prefill token
    assert costs.decoding(8) == pytest.approx(0.040)  # scaled from the nearest batch size
    assert costs.prefill_tokens_within(0.1, 4) == 160  # (100 - 20) ms / 0.5 ms
    # A host too slow for the budget: prefill still gets half the decodes' time.
    assert costs.prefill_tokens_within(0.01, 4) == 20  # 0.5 x 20 ms / 0.5 ms


def _run(engine: Engine, requests: list[AddRequest]) -> tuple[dict[str, list[int]], list[Batch]]:
    """Each request's tokens, and every batch the scheduler decided on."""
    batches: list[Batch] = []
    schedule = engine.scheduler.schedule

    def recorded() -> Batch:
        batch = schedule()
        batches.append(batch)
        return batch

    engine.scheduler.schedule = recorded  # type: ignore[method-assign]
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}

    def take(outputs: list[SequenceOutput]) -> None:
        for output in outputs:
            tokens[output.request_id] += output.token_ids

    for request in requests[:-1]:  # the streams start first
        take(engine.add(request))
    for _ in range(5):
        take(engine.step())
    take(engine.add(requests[-1]))  # then a long prompt arrives
    for _ in range(2000):
        if not engine.has_work:
            return tokens, batches
        take(engine.step())
    raise AssertionError("the engine did not finish")


def _requests() -> list[AddRequest]:
    params = {"temperature": 0.0, "ignore_eos": True}
    streams = [
        AddRequest(f"s{i}", FRONTEND, [1, 10 + i, 20], SamplingParams(max_tokens=80, **params))
        for i in range(4)
    ]
    long = AddRequest("long", FRONTEND, LONG_PROMPT, SamplingParams(max_tokens=8, **params))
    return [*streams, long]


def test_prefill_beside_decodes_stays_within_the_time_budget(tiny: LoadedModel) -> None:
    budgeted = Engine(tiny.runtime, EngineConfig(max_step_ms=1.0))
    tokens, batches = _run(budgeted, _requests())
    mixed = [batch for batch in batches if batch.decodes and batch.prefills]
    assert mixed
    for batch in mixed:
        assert batch.prefill_tokens <= batch.prefill_budget
        assert batch.prefill_budget >= MIN_PREFILL_TOKENS  # the prompt always moves on
    assert any(batch.prefill_budget < 512 - len(batch.decodes) for batch in mixed)
    assert len(tokens["long"]) == 8  # not starved
    unbudgeted = Engine(tiny.runtime, EngineConfig(max_step_ms=0))
    reference, unbudgeted_batches = _run(unbudgeted, _requests())
    assert tokens == reference  # the same tokens, in smaller prefill chunks
    assert max(b.prefill_tokens for b in unbudgeted_batches if b.decodes) > max(
        b.prefill_tokens for b in mixed
    )


def test_prompts_are_served_first_come_first_served(tiny: LoadedModel) -> None:
    engine = Engine(tiny.runtime, EngineConfig(max_step_ms=1.0, max_batch_tokens=64))
    first = AddRequest("first", FRONTEND, LONG_PROMPT, SamplingParams(max_tokens=1))
    second = AddRequest("second", FRONTEND, LONG_PROMPT[:100], SamplingParams(max_tokens=1))
    engine.add(first)
    engine.add(second)
    finished = []
    for _ in range(200):
        if not engine.has_work:
            break
        finished += [o.request_id for o in engine.step() if o.finish_reason]
    assert finished == ["first", "second"]
