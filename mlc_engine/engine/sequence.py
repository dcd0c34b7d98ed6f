"""One choice of one request as the engine sees it: its tokens, KV cache slot and progress."""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING

import numpy as np

from mlc_engine.common.protocol import AddRequest, SamplingParams, TokenLogprob

if TYPE_CHECKING:
    import llguidance


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Tokens so far (prompt then output) and how many of them the KV cache holds.

    A sequence is fed `token_ids[num_computed:]` each time it is scheduled: the rest of its
    prompt in chunks, then one sampled token per decode step. After preemption `num_computed`
    drops to 0 and the prompt plus the output so far is computed again."""

    def __init__(self, seq_id: int, request: AddRequest, index: int, arrival: float):
        self.seq_id = seq_id
        self.request = request
        self.index = index
        self.arrival = arrival
        self.token_ids = list(request.prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.num_computed = 0
        # Of the tokens in the KV cache, those that came from the prefix cache at admission.
        self.num_cached_tokens = 0
        self.cached_tokens_sent = False
        self.status = Status.WAITING
        # Choices 1..n-1 of a request wait here until choice 0 has computed the prompt; then
        # they fork its KV (sharing the prompt's pages) and sample from the same logits.
        self.children: list[Sequence] = []
        self.prompt_logprobs: list[TokenLogprob | None] = [None]
        self.prompt_logprobs_sent = False
        self.preemptions = 0
        self.first_token_time: float | None = None
        self.last_token_time = 0.0
        seed = request.params.seed
        # Each choice draws from its own stream, so its tokens do not depend on the batch.
        self.rng = np.random.default_rng(None if seed is None else [seed % 2**64, index])
        self.output_counts: dict[int, int] = {}
        # What the request's grammar allows next (engine/grammar.py); None: unconstrained.
        self.matcher: llguidance.LLMatcher | None = None

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_pending(self) -> int:
        """Tokens not yet in the KV cache."""
        return len(self.token_ids) - self.num_computed

    @property
    def in_prompt(self) -> bool:
        """Still computing its prompt (or recomputing after preemption)."""
        return self.num_pending > 1 or self.num_computed == 0

    @property
    def scores_prompt(self) -> bool:
        """Wants prompt logprobs it does not have yet (they need every prompt token's logits)."""
        return self.params.prompt_logprobs and len(self.prompt_logprobs) < self.num_prompt_tokens

    def append(self, token: int) -> None:
        now = time.monotonic()
        if self.first_token_time is None:
            self.first_token_time = now
        self.last_token_time = now
        self.token_ids.append(token)
        self.output_counts[token] = self.output_counts.get(token, 0) + 1

    def reset_for_recompute(self) -> None:
        self.num_computed = 0
        # Of the tokens in the KV cache, those that came from the prefix cache at admission.
        self.num_cached_tokens = 0
        self.status = Status.WAITING
        self.preemptions += 1
