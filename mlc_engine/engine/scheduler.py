"""Decide what each engine step computes: every running decode plus prefill chunks within a
token budget, admitting waiting sequences while KV pages and `max_num_seqs` allow.

When decodes are running and a step-time budget is set, prefill gets only the tokens that fit
in the rest of the budget (by the engine's measured step costs), so running streams keep
flowing while long prompts arrive; with no decodes running, prefill takes whole chunks.
Prompts are served first come, first served: the oldest prompt part-way through gets the
budget first, and a waiting prompt is never passed over by a later one. Every step gives
prefill at least `MIN_PREFILL_TOKENS`, so a prompt is never starved however busy decoding is.

When the KV cache cannot hold the next step, the newest running sequence is preempted: its
pages are freed and it goes back to the front of the queue, to be computed again later.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from mlc_engine.engine.runtime import KVCache
from mlc_engine.engine.sequence import Sequence, Status
from mlc_engine.engine.step_costs import StepCosts

MIN_PREFILL_TOKENS = 16


@dataclass
class Chunk:
    """`seq.token_ids[start:end]` go into the KV cache this step."""

    seq: Sequence
    start: int
    end: int

    @property
    def completes(self) -> bool:
        """After this chunk the sequence has computed all it has, so it samples."""
        return self.end == len(self.seq.token_ids)


@dataclass
class Batch:
    prefills: list[Chunk] = field(default_factory=list)
    decodes: list[Sequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    prefill_budget: int = 0  # the prefill tokens this step was allowed

    @property
    def prefill_tokens(self) -> int:
        return sum(chunk.end - chunk.start for chunk in self.prefills)

    @property
    def empty(self) -> bool:
        return not self.prefills and not self.decodes


def pages_for(length: int, page_size: int) -> int:
    return -(-length // page_size)


class Scheduler:
    """The waiting queue (FIFO, preempted sequences first) and the running set (by admission)."""

    def __init__(
        self,
        kv_cache: KVCache,
        max_num_seqs: int,
        max_batch_tokens: int,
        max_step_seconds: float = 0.0,
    ):
        self.kv_cache = kv_cache
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self.max_step_seconds = max_step_seconds  # 0: no time budget
        self.costs = StepCosts()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # Pages kept free at admission so that running sequences can grow without preemption.
        self.watermark = max(1, kv_cache.num_pages // 100)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence, freeing its pages."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self.kv_cache.remove_sequence(seq.seq_id)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED

    def _growth(self, seq: Sequence, tokens: int) -> int:
        size = self.kv_cache.page_size
        return pages_for(seq.num_computed + tokens, size) - pages_for(seq.num_computed, size)

    def _fork_pages(self, seq: Sequence) -> int:
        """Each forked choice copies the prompt's partly filled last page."""
        partial = seq.num_prompt_tokens % self.kv_cache.page_size != 0
        return len(seq.children) if partial else 0

    def _preempt_newest(self, batch: Batch) -> None:
        victim = self.running.pop()
        self.kv_cache.remove_sequence(victim.seq_id)
        victim.reset_for_recompute()
        self.waiting.appendleft(victim)
        batch.preempted.append(victim)

    def schedule(self) -> Batch:
        batch = Batch()
        while True:
            self._fill(batch)
            # Sequences part-way through their prompts can hold every page between them: then
            # the newest gives way. (The engine admits no sequence that cannot fit alone.)
            if not batch.empty or not self.running:
                return batch
            self._preempt_newest(batch)

    def _fill(self, batch: Batch) -> None:
        free = self._make_room_for_decodes(batch)
        budget = self._prefill_budget(len(batch.decodes))
        batch.prefill_budget = budget
        for seq in self.running:
            if seq.in_prompt and budget > 0:
                chunk = self._chunk(seq, budget, free)
                if chunk is None:
                    continue
                batch.prefills.append(chunk)
                budget -= chunk.end - chunk.start
                free -= self._growth(seq, chunk.end - chunk.start)
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if len(self.running) + 1 + len(seq.children) > self.max_num_seqs:
                break
            chunk = self._chunk(seq, budget, free - self.watermark - self._fork_pages(seq))
            if chunk is None:
                break
            self.waiting.popleft()
            self.kv_cache.add_sequence(seq.seq_id)
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.prefills.append(chunk)
            budget -= chunk.end - chunk.start
            free -= self._growth(seq, chunk.end - chunk.start) + self._fork_pages(seq)

    def _prefill_budget(self, decodes: int) -> int:
        """Prefill tokens for a step with `decodes` decodes: what the token budget leaves, and
        with decodes running, no more than fits in the step-time budget."""
        budget = self.max_batch_tokens - decodes
        if decodes and self.max_step_seconds:
            timed = self.costs.prefill_tokens_within(self.max_step_seconds, decodes)
            if timed is not None:
                budget = min(budget, max(timed, MIN_PREFILL_TOKENS))
        return budget

    def _make_room_for_decodes(self, batch: Batch) -> int:
        """Schedule every running decode, preempting the newest sequences until they fit;
        returns the pages left free."""
        while True:
            decodes = [seq for seq in self.running if not seq.in_prompt]
            needed = sum(self._growth(seq, 1) for seq in decodes)
            free = self.kv_cache.free_pages()
            if needed <= free or not self.running:
                batch.decodes = decodes
                return free - needed
            self._preempt_newest(batch)

    def _chunk(self, seq: Sequence, budget: int, free_pages: int) -> Chunk | None:
        """The longest next piece of `seq` within `budget` tokens and `free_pages`."""
        size = self.kv_cache.page_size
        room = (pages_for(seq.num_computed, size) + max(free_pages, 0)) * size - seq.num_computed
        length = min(seq.num_pending, budget, room)
        if length <= 0:
            return None
        return Chunk(seq, seq.num_computed, seq.num_computed + length)
