"""Pick the next token of every sequence in a batch from its logits.

Work that touches the whole vocabulary (log-softmax, penalties, temperature, argmax) runs on the
batch at once in NumPy. Each sampled sequence then draws one uniform number from its own
generator, so a seeded request gives the same tokens whatever else is in the batch. Logprobs are
the model's own (the log-softmax of the raw logits), as OpenAI reports them.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import numpy as np

from mlc_engine.common.protocol import SamplingParams, TokenLogprob
from mlc_engine.engine.sequence import Sequence

GREEDY_TEMPERATURE = 1e-5
# top_p / min_p first look among this many most likely tokens; the whole vocabulary is sorted
# only when these do not hold enough of the probability mass.
CANDIDATES = 256


@dataclass
class Sample:
    token: int
    logprob: TokenLogprob | None = None


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def top_alternatives(logprobs: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
    """The k most likely (token, logprob) of each row, most likely first."""
    if k == 0:
        return [[] for _ in range(len(logprobs))]
    idx = np.argpartition(-logprobs, k - 1, axis=-1)[:, :k]
    values = np.take_along_axis(logprobs, idx, axis=-1)
    order = np.argsort(-values, axis=-1, kind="stable")
    idx, values = np.take_along_axis(idx, order, -1), np.take_along_axis(values, order, -1)
    return [
        list(zip(ids.tolist(), row.tolist(), strict=True))
        for ids, row in zip(idx, values, strict=True)
    ]


def token_logprobs(logits: np.ndarray, tokens: Seq[int], k: int) -> list[TokenLogprob]:
    """The logprob of `tokens[i]` under row i of `logits`, with the top k alternatives."""
    logprobs = log_softmax(logits)
    chosen = logprobs[np.arange(len(tokens)), np.asarray(tokens)].tolist()
    tops = top_alternatives(logprobs, k)
    return [TokenLogprob(value, top) for value, top in zip(chosen, tops, strict=True)]


def _apply_penalties(row: np.ndarray, seq: Sequence) -> None:
    params = seq.params
    for token, bias in params.logit_bias.items():
        row[token] += bias
    if params.repetition_penalty != 1.0:
        seen = np.unique(np.asarray(seq.token_ids, dtype=np.int64))
        values = row[seen]
        penalty = params.repetition_penalty
        row[seen] = np.where(values > 0, values / penalty, values * penalty)
    if (params.frequency_penalty or params.presence_penalty) and seq.output_counts:
        ids = np.fromiter(seq.output_counts.keys(), dtype=np.int64)
        counts = np.fromiter(seq.output_counts.values(), dtype=np.float32)
        row[ids] -= params.frequency_penalty * counts + params.presence_penalty


def _has_penalties(params: SamplingParams) -> bool:
    return bool(
        params.logit_bias
        or params.repetition_penalty != 1.0
        or params.frequency_penalty
        or params.presence_penalty
    )


def _filtered_candidates(
    scaled: np.ndarray, probs_of: np.ndarray, params: SamplingParams
) -> tuple[np.ndarray, np.ndarray]:
    # `probs_of` is softmax(scaled), normalized over the whole vocabulary.
    """Token ids (most likely first) and probabilities left by top_k, top_p and min_p."""
    vocab = len(scaled)
    k = min(params.top_k or CANDIDATES, vocab)
    idx = np.argpartition(-scaled, k - 1)[:k]
    idx = idx[np.argsort(-scaled[idx], kind="stable")]
    probs = probs_of[idx]
    if not params.top_k and k < vocab:
        short_of_top_p = params.top_p < 1.0 and probs.sum() < params.top_p
        short_of_min_p = params.min_p > 0 and probs[-1] >= params.min_p * probs[0]
        if short_of_top_p or short_of_min_p:
            idx = np.argsort(-scaled, kind="stable")
            probs = probs_of[idx]
    keep = np.ones(len(idx), dtype=bool)
    if params.top_p < 1.0:
        keep &= (np.cumsum(probs) - probs) < params.top_p
    if params.min_p > 0:
        keep &= probs >= params.min_p * probs[0]
    keep[0] = True  # the most likely token stays, however small top_p or large min_p
    return idx[keep], probs[keep]


def _draw(seq: Sequence, scaled: np.ndarray) -> int:
    """One token from softmax(scaled), filtered as `seq` asks, with one draw from its stream."""
    params = seq.params
    weights = np.exp(scaled - scaled.max())
    if params.top_k or params.top_p < 1.0 or params.min_p > 0:
        # top_p compares cumulative probabilities with p: they must sum to one.
        ids, probs = _filtered_candidates(scaled, weights / weights.sum(), params)
    else:
        ids, probs = np.arange(len(scaled)), weights
    cdf = np.cumsum(probs, dtype=np.float64)
    pick = int(np.searchsorted(cdf, seq.rng.random() * cdf[-1], side="right"))
    return int(ids[min(pick, len(ids) - 1)])


class Sampler:
    """Samples a token for each row of a batch's logits."""

    def sample(
        self,
        logits: np.ndarray,
        seqs: Seq[Sequence],
        allowed: dict[int, np.ndarray] | None = None,
    ) -> list[Sample]:
        """`logits[i]` are the logits after `seqs[i]`'s last token; `allowed[i]`, when given,
        the tokens row i may pick (a grammar's mask)."""
        processed = logits
        penalized = [i for i, seq in enumerate(seqs) if _has_penalties(seq.params)]
        if penalized or allowed:
            processed = logits.copy()
            for i in penalized:
                _apply_penalties(processed[i], seqs[i])
            for i, tokens in (allowed or {}).items():
                processed[i][~tokens] = -np.inf
        temperatures = np.array([seq.params.temperature for seq in seqs], dtype=np.float32)
        tokens = np.argmax(processed, axis=-1)
        for i in np.flatnonzero(temperatures > GREEDY_TEMPERATURE).tolist():
            tokens[i] = _draw(seqs[i], processed[i] / temperatures[i])
        samples = [Sample(int(token)) for token in tokens]
        wanted = [i for i, seq in enumerate(seqs) if seq.params.logprobs]
        if wanted:
            k = max(seqs[i].params.top_logprobs for i in wanted)
            found = token_logprobs(logits[wanted], [samples[i].token for i in wanted], k)
            for i, logprob in zip(wanted, found, strict=True):
                logprob.top = logprob.top[: seqs[i].params.top_logprobs]
                samples[i].logprob = logprob
        return samples
