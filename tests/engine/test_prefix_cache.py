"""The prefix cache on the tiny model: a request that shares whole pages with a finished one
computes only the rest, and answers as it would without the cache."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from conftest import LoadedModel
from test_core import pages_free, request, run, tokens

from mlc_engine.common.protocol import AddRequest, SequenceOutput
from mlc_engine.engine.core import Engine, EngineConfig

HISTORY = list(range(3, 43))  # 40 tokens: two full pages of 16 and a partly filled one


@pytest.fixture(scope="module")
def tiny(tiny_model: Callable[..., LoadedModel]) -> LoadedModel:
    return tiny_model("q0f32")


def greedy(request_id: str, prompt: list[int], **params: object) -> AddRequest:
    params = {"max_tokens": 8, "temperature": 0, "ignore_eos": True, **params}
    return request(request_id, prompt, logprobs=True, top_logprobs=2, **params)


def answers(engine: Engine, rounds: list[list[AddRequest]]) -> dict:
    """Each round's requests run together, after the rounds before them have finished."""
    outputs: dict = {}
    for requests in rounds:
        outputs.update(run(engine, requests))
    return outputs


def assert_same(cached: dict, uncached: dict) -> None:
    assert cached.keys() == uncached.keys()
    for key, outputs in uncached.items():
        assert tokens(cached[key]) == tokens(outputs), key
        assert logprobs(cached[key]) == pytest.approx(logprobs(outputs), abs=1e-4), key


def logprobs(outputs: list[SequenceOutput]) -> list[float]:
    return [entry.logprob for output in outputs for entry in output.logprobs or []]


def with_and_without(
    tiny: LoadedModel, rounds: list[list[AddRequest]], max_total_tokens: int = 0
) -> Engine:
    """Runs the rounds with the prefix cache and without; returns the cached engine."""
    engine = Engine(
        tiny.runtime, EngineConfig(max_total_tokens=max_total_tokens, prefix_cache=True)
    )
    cached = answers(engine, rounds)
    plain = Engine(
        tiny.runtime, EngineConfig(max_total_tokens=max_total_tokens, prefix_cache=False)
    )
    assert_same(cached, answers(plain, rounds))
    assert plain.stats.prefix_cache_hit_tokens == 0
    assert pages_free(engine) == engine.kv_cache.num_pages
    return engine


def test_a_shared_prefix_of_whole_pages_is_not_computed_again(tiny: LoadedModel) -> None:
    rounds = [[greedy("a", HISTORY)], [greedy("b", HISTORY[:32] + [7, 8, 9, 10])]]
    engine = with_and_without(tiny, rounds)
    assert engine.stats.prefix_cache_hit_tokens == 32
    assert engine.stats.prefix_cache_queried_tokens == 40 + 36
    assert engine.stats.prefill_tokens == 40 + 4


def test_a_prefix_that_ends_inside_a_page_shares_its_whole_pages(tiny: LoadedModel) -> None:
    rounds = [[greedy("a", HISTORY)], [greedy("b", HISTORY[:37] + [7, 8])]]
    engine = with_and_without(tiny, rounds)
    assert engine.stats.prefix_cache_hit_tokens == 32
    assert engine.stats.prefill_tokens == 40 + 7


def test_a_prompt_equal_to_a_cached_one_still_computes_its_last_token(tiny: LoadedModel) -> None:
    aligned = HISTORY[:32]
    rounds = [[greedy("a", HISTORY), greedy("p", aligned)]]
    rounds += [[greedy("b", HISTORY)], [greedy("q", aligned)]]
    engine = with_and_without(tiny, rounds)
    assert engine.stats.prefix_cache_hit_tokens == 32 + 16


def test_the_next_turn_of_a_chat_reuses_the_answer_too(tiny: LoadedModel) -> None:
    engine = Engine(tiny.runtime, EngineConfig(prefix_cache=True))
    first = tokens(run(engine, [greedy("t1", HISTORY, max_tokens=20)])[("t1", 0)])
    turn = HISTORY + first + [5, 6, 7]  # the history, the answer (19 of it computed), the user
    rounds = [[greedy("t2", turn)]]
    plain = Engine(tiny.runtime, EngineConfig(prefix_cache=False))
    assert_same(answers(engine, rounds), answers(plain, rounds))
    assert engine.stats.prefix_cache_hit_tokens == 48  # 59 tokens in the KV: three whole pages


def test_n_choices_of_a_cached_prefix_match_those_without_the_cache(tiny: LoadedModel) -> None:
    sampled = {"temperature": 1.0, "seed": 3, "n": 3}
    rounds = [[greedy("a", HISTORY)], [greedy("b", HISTORY[:35] + [11], **sampled)]]
    engine = with_and_without(tiny, rounds)
    assert engine.stats.prefix_cache_hit_tokens == 32


def test_prompt_logprobs_bypass_the_cache(tiny: LoadedModel) -> None:
    echo = greedy("e", HISTORY[:36])
    echo.params.prompt_logprobs = True
    rounds = [[greedy("a", HISTORY)], [echo]]
    engine = Engine(tiny.runtime, EngineConfig(prefix_cache=True))
    cached = answers(engine, rounds)
    plain = answers(Engine(tiny.runtime, EngineConfig(prefix_cache=False)), rounds)
    assert_same(cached, plain)
    assert engine.stats.prefix_cache_hit_tokens == 0
    scored = prompt_scores(cached[("e", 0)])
    assert len(scored) == 35
    assert scored == pytest.approx(prompt_scores(plain[("e", 0)]), abs=1e-4)


def prompt_scores(outputs: list[SequenceOutput]) -> list[float]:
    scored = outputs[0].prompt_logprobs or []
    return [entry.logprob for entry in scored if entry is not None]


def test_an_aborted_prompt_leaves_a_sound_prefix(tiny: LoadedModel) -> None:
    engine = Engine(tiny.runtime, EngineConfig(max_batch_tokens=32, prefix_cache=True))
    engine.add(greedy("x", HISTORY + [1] * 30))
    engine.step()  # 32 of its 70 prompt tokens computed
    engine.abort(["x"])
    rounds = [[greedy("b", HISTORY)]]
    plain = Engine(tiny.runtime, EngineConfig(prefix_cache=False, max_batch_tokens=32))
    assert_same(answers(engine, rounds), answers(plain, rounds))
    assert engine.stats.prefix_cache_hit_tokens == 32


def test_a_small_kv_budget_evicts_cached_prefixes_and_refuses_nothing(tiny: LoadedModel) -> None:
    prompts = [HISTORY[: 20 + 4 * i] + [100 + i] * 9 for i in range(5)]
    together = [greedy(f"t{i}", prompt, max_tokens=30) for i, prompt in enumerate(prompts)]
    one_by_one = [[greedy(f"s{i}", prompt, max_tokens=30)] for i, prompt in enumerate(prompts)]
    engine = with_and_without(tiny, [together, *one_by_one], max_total_tokens=128)
    assert engine.stats.prefix_cache_hit_tokens > 0
    assert engine.stats.requests_failed == 0


def test_a_prompt_forks_the_pages_a_running_sequence_has_computed(tiny: LoadedModel) -> None:
    def later(engine: Engine) -> dict:
        """ "a" runs its prompt and a few decodes, then "b" arrives while "a" is still running."""
        outputs = {}
        engine.add(greedy("a", HISTORY + [9] * 30, max_tokens=12))
        for _ in range(4):
            for output in engine.step():
                outputs.setdefault((output.request_id, output.index), []).append(output)
        assert engine.requests["a"][0].num_output_tokens == 4
        outputs.update(answers(engine, [[greedy("b", HISTORY + [9] * 10 + [4, 5])]]))
        return outputs

    engine = Engine(tiny.runtime, EngineConfig(prefix_cache=True))
    assert_same(later(engine), later(Engine(tiny.runtime, EngineConfig(prefix_cache=False))))
    assert engine.stats.prefix_cache_hit_tokens == 48
    assert pages_free(engine) == engine.kv_cache.num_pages


def test_a_running_sequence_offers_only_the_pages_it_has_computed(tiny: LoadedModel) -> None:
    # "a" and "b" are admitted in the same step: "a" has computed nothing yet, so "b" computes
    # its whole prompt; "c", a step later, forks the two whole pages they computed.
    engine = Engine(tiny.runtime, EngineConfig(prefix_cache=True))
    short = HISTORY[:36] + [3]
    engine.add(greedy("a", HISTORY, max_tokens=4))
    engine.add(greedy("b", short, max_tokens=4))
    engine.step()
    assert engine.stats.prefix_cache_hit_tokens == 0
    assert engine.stats.prefill_tokens == len(HISTORY) + len(short)
    later = [[greedy("c", short, max_tokens=4)]]
    cached = answers(engine, later)
    assert engine.stats.prefix_cache_hit_tokens == 32
    plain = answers(Engine(tiny.runtime, EngineConfig(prefix_cache=False)), later)
    assert_same({("c", 0): cached[("c", 0)]}, plain)


def test_a_preempted_holder_leaves_its_forks_their_pages(tiny: LoadedModel) -> None:
    # Prompts that share two pages with the first, in a KV cache too small for all of them:
    # the newest are preempted and computed again, and every answer stays as without the cache.
    prompts = [HISTORY[:32] + [50 + i] * (12 + 3 * i) for i in range(4)]
    rounds = [[greedy(f"r{i}", prompt, max_tokens=40) for i, prompt in enumerate(prompts)]]
    engine = with_and_without(tiny, rounds, max_total_tokens=160)
    assert engine.stats.preemptions > 0
    assert engine.stats.prefix_cache_hit_tokens > 0
