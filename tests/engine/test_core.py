"""The engine loop in-process on real compiled models: batching, preemption, forking, logprobs.

These drive `Engine.step()` directly, so page counts can be read between steps; the tests in
test_process.py cover the same engine behind its ZeroMQ sockets.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from conftest import LoadedModel

from mlc_engine.common.protocol import AddRequest, ErrorCode, SamplingParams, SequenceOutput
from mlc_engine.engine.core import Engine, EngineConfig
from mlc_engine.engine.sampler import log_softmax

FRONTEND = "f" * 32
PROMPTS = [[1, 5, 9, 200, 31], [1, 77, 78], [1, 300] * 20, [1, 4, 4, 4, 4, 4, 4, 4, 4, 4, 11]]


def request(request_id: str, prompt: list[int], **params: object) -> AddRequest:
    return AddRequest(request_id, FRONTEND, prompt, SamplingParams(**params))  # type: ignore[arg-type]


def run(engine: Engine, requests: list[AddRequest], max_steps: int = 2000) -> dict:
    """Every request's outputs by (request id, choice index), after running to completion."""
    outputs: dict[tuple[str, int], list[SequenceOutput]] = {}
    for req in requests:
        for output in engine.add(req):
            outputs.setdefault((output.request_id, output.index), []).append(output)
    for _ in range(max_steps):
        if not engine.has_work:
            return outputs
        for output in engine.step():
            outputs.setdefault((output.request_id, output.index), []).append(output)
    raise AssertionError("the engine did not finish")


def tokens(outputs: list[SequenceOutput]) -> list[int]:
    return [token for output in outputs for token in output.token_ids]


def pages_free(engine: Engine) -> int:
    """Free KV pages, counting those only the prefix cache holds (checking the page mirror)."""
    kv = engine.kv_cache
    assert kv.pages_in_use() == kv.num_pages - kv.free_pages()
    assert kv.count_parked_pages() == kv.parked_pages
    return engine.snapshot().kv_pages_free


@pytest.fixture(scope="module")
def tiny(tiny_model: Callable[..., LoadedModel]) -> LoadedModel:
    return tiny_model("q0f32")


def test_concurrent_greedy_requests_match_each_alone(tiny: LoadedModel) -> None:
    engine = Engine(tiny.runtime, EngineConfig(max_num_seqs=8))
    requests = [request(f"r{i}", PROMPTS[i % 4], max_tokens=24, temperature=0) for i in range(8)]
    alone = {}
    for req in requests:
        alone.update(run(engine, [req]))
    together = run(engine, requests)
    assert {key: tokens(out) for key, out in together.items()} == {
        key: tokens(out) for key, out in alone.items()
    }
    assert all(len(tokens(out)) == 24 for out in together.values())
    assert all(out[-1].finish_reason == "length" for out in together.values())


def test_preemption_under_a_small_kv_budget_keeps_every_answer(tiny: LoadedModel) -> None:
    requests = [
        request(f"r{i}", PROMPTS[i % 4], max_tokens=40, temperature=0, ignore_eos=True)
        for i in range(6)
    ]
    roomy = run(Engine(tiny.runtime, EngineConfig(max_num_seqs=8)), requests)
    tight = Engine(tiny.runtime, EngineConfig(max_num_seqs=8, max_total_tokens=128))
    pressured = run(tight, requests)
    assert tight.stats.preemptions > 0
    assert {k: tokens(v) for k, v in pressured.items()} == {k: tokens(v) for k, v in roomy.items()}
    assert pages_free(tight) == tight.kv_cache.num_pages


def test_long_prompts_are_prefilled_in_chunks_within_the_token_budget(tiny: LoadedModel) -> None:
    prompt = list(range(3, 203))
    whole = run(
        Engine(tiny.runtime, EngineConfig()), [request("a", prompt, max_tokens=8, temperature=0)]
    )
    chunked = Engine(tiny.runtime, EngineConfig(max_batch_tokens=64))
    pieces = run(chunked, [request("a", prompt, max_tokens=8, temperature=0)])
    assert chunked.stats.steps == 4 + 7  # 200 prompt tokens in 64-token chunks, then 7 decodes
    assert tokens(pieces[("a", 0)]) == tokens(whole[("a", 0)])


def test_seeded_sampling_does_not_depend_on_the_batch(tiny: LoadedModel) -> None:
    engine = Engine(tiny.runtime, EngineConfig(max_num_seqs=8))
    seeded = request("s", PROMPTS[0], max_tokens=20, temperature=2.0, top_k=50, seed=7)
    alone = tokens(run(engine, [seeded])[("s", 0)])
    busy = [request(f"b{i}", PROMPTS[i % 4], max_tokens=30, temperature=0.8) for i in range(5)]
    together = run(engine, [*busy, seeded])
    assert tokens(together[("s", 0)]) == alone
    other_seed = request("o", PROMPTS[0], max_tokens=20, temperature=2.0, top_k=50, seed=8)
    assert tokens(run(engine, [other_seed])[("o", 0)]) != alone


def test_n_choices_share_the_prompt_pages(tiny: LoadedModel) -> None:
    engine = Engine(tiny.runtime, EngineConfig())
    prompt = list(range(3, 43))  # 40 tokens: two full pages and one partly filled
    engine.add(request("n", prompt, max_tokens=5, n=2, temperature=1.0, seed=1))
    first = engine.step()
    used = engine.kv_cache.num_pages - engine.kv_cache.free_pages()
    assert used == 3 + 1  # the prompt's pages once, plus a copy of the partial page
    assert sorted(output.index for output in first) == [0, 1]
    rest = run(engine, [])
    assert all(len(tokens(rest[("n", i)])) == 4 for i in (0, 1))
    assert pages_free(engine) == engine.kv_cache.num_pages


def test_logprobs_are_the_log_softmax_of_the_logits(tiny: LoadedModel) -> None:
    engine = Engine(tiny.runtime, EngineConfig())
    prompt = PROMPTS[0]
    req = request("l", prompt, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    req.params.prompt_logprobs = True
    outputs = run(engine, [req])[("l", 0)]
    generated = tokens(outputs)
    sequence = prompt + generated
    kv = tiny.runtime.create_kv_cache(1, 256)
    kv.add_sequence(0)
    logits = tiny.runtime.prefill(kv, [0], [sequence[:-1]], all_logits=True)
    expected = log_softmax(logits.astype(np.float64))
    reported = [lp for out in outputs for lp in out.logprobs or []]
    for position, logprob in enumerate(reported, start=len(prompt) - 1):
        token = sequence[position + 1]
        assert logprob.logprob == pytest.approx(expected[position, token], abs=1e-4)
        best = np.argsort(-expected[position])[:3]
        assert [t for t, _ in logprob.top] == best.tolist()
    prompt_logprobs = outputs[0].prompt_logprobs
    assert prompt_logprobs is not None and prompt_logprobs[0] is None
    for position, entry in enumerate(prompt_logprobs[1:]):
        assert entry is not None
        assert entry.logprob == pytest.approx(expected[position, prompt[position + 1]], abs=1e-4)


def test_abort_frees_pages_and_is_idempotent(tiny: LoadedModel) -> None:
    engine = Engine(tiny.runtime, EngineConfig())
    idle = pages_free(engine)
    engine.add(request("a", PROMPTS[2], max_tokens=100, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert pages_free(engine) < idle
    (aborted,) = engine.abort(["a"])
    assert aborted.finish_reason == "abort"
    assert engine.abort(["a"]) == []
    assert pages_free(engine) == idle
    assert not engine.has_work


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ([], {}, "empty"),
        ([1, 600], {}, "token ids"),
        (list(range(3, 300)) * 2, {}, "context window"),
        ([1, 2], {"temperature": 3.0}, "temperature"),
        ([1, 2], {"logit_bias": {9999: 1.0}}, "logit_bias"),
    ],
)
def test_a_bad_request_fails_alone(
    tiny: LoadedModel, prompt: list[int], params: dict, message: str
) -> None:
    engine = Engine(tiny.runtime, EngineConfig())
    good = request("good", PROMPTS[0], max_tokens=4, temperature=0)
    (failed,) = engine.add(request("bad", prompt, **params))
    assert failed.finish_reason == "error" and message in (failed.error or "")
    assert len(tokens(run(engine, [good])[("good", 0)])) == 4


def test_max_tokens_zero_returns_only_prompt_logprobs(tiny: LoadedModel) -> None:
    engine = Engine(tiny.runtime, EngineConfig(max_batch_tokens=16))
    req = request("e", list(range(3, 40)), max_tokens=0, logprobs=True, top_logprobs=1)
    req.params.prompt_logprobs = True
    (only,) = run(engine, [req])[("e", 0)]
    assert only.token_ids == [] and only.finish_reason == "length"
    assert only.prompt_logprobs is not None and len(only.prompt_logprobs) == 37
    assert all(entry is not None and len(entry.top) == 1 for entry in only.prompt_logprobs[1:])


def test_a_full_engine_refuses_by_sequences_and_runs_what_it_took(tiny: LoadedModel) -> None:
    """Room is max_num_seqs + max_queue sequences, n of each request counting."""
    engine = Engine(tiny.runtime, EngineConfig(max_num_seqs=2, max_queue=1))
    taken = [request("two", PROMPTS[0], n=2, max_tokens=3), request("one", PROMPTS[1])]
    assert engine.add(taken[0]) == [] and engine.add(taken[1]) == []
    (refused,) = engine.add(request("more", PROMPTS[1], max_tokens=3))
    assert refused.finish_reason == "error" and refused.error_code == ErrorCode.QUEUE_FULL
    assert "3 sequences running or waiting, 3 at most" in (refused.error or "")
    outputs = run(engine, [])
    assert {key for key, got in outputs.items() if got[-1].finish_reason} == {
        ("two", 0),
        ("two", 1),
        ("one", 0),
    }
    assert engine.add(request("more", PROMPTS[1], max_tokens=3)) == []  # room again


def test_a_sampled_stop_token_is_the_last_output_token(tiny: LoadedModel) -> None:
    """The stop token that ended a choice comes out with its logprob, as vLLM reports it."""
    engine = Engine(tiny.runtime, EngineConfig())
    eos = tiny.runtime.config.eos_token_ids[0]
    forced = request("s", PROMPTS[0], max_tokens=5, logprobs=True, logit_bias={eos: 100.0})
    (only,) = run(engine, [forced])[("s", 0)]
    assert only.token_ids == [eos] and only.finish_reason == "stop"
    assert only.logprobs is not None and only.logprobs[0].logprob < 0
