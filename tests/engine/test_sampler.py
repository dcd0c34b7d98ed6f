"""The sampler against distributions computed independently here, on synthetic logits."""

from __future__ import annotations

import numpy as np
import pytest

from mlc_engine.common.protocol import AddRequest, SamplingParams
from mlc_engine.engine.sampler import Sampler
from mlc_engine.engine.sequence import Sequence

VOCAB = 6
LOGITS = np.log(np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04], dtype=np.float32))


def sequence(prompt: list[int] | None = None, index: int = 0, **params: object) -> Sequence:
    request = AddRequest("r", "f" * 32, prompt or [0], SamplingParams(**params))  # type: ignore[arg-type]
    return Sequence(1, request, index, 0.0)


def draws(count: int, logits: np.ndarray = LOGITS, **params: object) -> np.ndarray:
    """How often each token comes up in `count` draws of one seeded sequence."""
    seq = sequence(seed=11, **params)
    sampler = Sampler()
    tokens = [sampler.sample(logits[None, :], [seq])[0].token for _ in range(count)]
    return np.bincount(tokens, minlength=len(logits)) / count


def expected(probs: np.ndarray, keep: np.ndarray) -> np.ndarray:
    kept = np.where(keep, probs, 0.0)
    return kept / kept.sum()


PROBS = np.exp(LOGITS.astype(np.float64)) / np.exp(LOGITS.astype(np.float64)).sum()


@pytest.mark.parametrize(
    ("params", "keep"),
    [
        ({}, np.ones(VOCAB, bool)),
        ({"top_k": 3}, np.arange(VOCAB) < 3),
        ({"top_p": 0.7}, np.arange(VOCAB) < 3),  # 0.4 + 0.25 < 0.7 <= 0.8: three tokens
        ({"min_p": 0.3}, 0.3 * PROBS.max() <= PROBS),
    ],
)
def test_sampled_frequencies_follow_the_filtered_distribution(
    params: dict, keep: np.ndarray
) -> None:
    found = draws(6000, temperature=1.0, **params)
    assert np.abs(found - expected(PROBS, keep)).max() < 0.025
    assert np.all(found[~keep] == 0)


def test_temperature_sharpens_as_softmax_of_scaled_logits() -> None:
    found = draws(6000, temperature=0.5)
    scaled = np.exp(LOGITS.astype(np.float64) / 0.5)
    assert np.abs(found - scaled / scaled.sum()).max() < 0.025


def test_greedy_is_the_argmax_and_logit_bias_moves_it() -> None:
    assert draws(5, temperature=0)[0] == 1.0
    assert draws(5, temperature=0, logit_bias={4: 100.0})[4] == 1.0


def test_penalties_follow_their_formulas() -> None:
    seq = sequence(
        prompt=[0, 0, 1],
        temperature=0,
        repetition_penalty=2.0,
        frequency_penalty=0.5,
        presence_penalty=0.25,
        logprobs=True,
    )
    seq.append(1)
    seq.append(1)
    logits = np.array([3.0, 2.9, -1.0, 2.5, 0.0, 0.0], dtype=np.float32)
    manual = logits.copy()
    manual[[0, 1]] = manual[[0, 1]] / 2.0  # seen tokens with positive logits: divided
    manual[1] -= 0.5 * 2 + 0.25  # generated twice
    sample = Sampler().sample(logits[None, :], [seq])[0]
    assert sample.token == int(np.argmax(manual)) == 3
    # Logprobs stay the model's own, before any penalty.
    raw = logits - np.log(np.exp(logits.astype(np.float64)).sum())
    assert sample.logprob is not None and sample.logprob.logprob == pytest.approx(raw[3], abs=1e-5)


def test_a_seeded_choice_draws_the_same_whatever_the_batch() -> None:
    rng = np.random.default_rng(0)
    batch_logits = rng.standard_normal((5, 50)).astype(np.float32)
    alone = [
        Sampler().sample(batch_logits[2:3], [sequence(seed=3, temperature=1.0, top_p=0.9)])[0]
        for _ in range(1)
    ]
    others = [sequence(temperature=1.0) for _ in range(4)]
    mine = sequence(seed=3, temperature=1.0, top_p=0.9)
    together = Sampler().sample(batch_logits, [*others[:2], mine, *others[2:]])
    assert together[2].token == alone[0].token


@pytest.mark.parametrize("params", [{"top_p": 0.9}, {"min_p": 0.5}])
def test_filters_reach_past_the_first_candidates_when_the_mass_is_spread(params: dict) -> None:
    """Nearly flat logits over 1000 tokens: the nucleus holds far more than 256 of them."""
    logits = np.linspace(0.0, 0.1, 1000, dtype=np.float32)
    found = draws(3000, logits, temperature=1.0, **params)
    assert np.count_nonzero(found) > 600


def test_the_most_likely_token_survives_any_top_p() -> None:
    """A top_p so small it rounds to 0 in float32 keeps the most likely token, rather than
    failing the step (and every request in it)."""
    found = draws(20, temperature=1.0, top_p=5e-324)
    assert found[0] == 1.0


def test_a_grammar_mask_leaves_only_its_tokens() -> None:
    seq = sequence(seed=3, temperature=1.0)
    allowed = np.zeros(VOCAB, bool)
    allowed[[3, 5]] = True
    tokens = {Sampler().sample(LOGITS[None, :], [seq], {0: allowed})[0].token for _ in range(200)}
    assert tokens == {3, 5}
