"""Decide what each engine step computes: every running decode plus prefill chunks within a
token budget, admitting waiting sequences while KV pages and `max_num_seqs` allow.

A sequence admitted with a prefix that a running or finished sequence holds forks it and
computes only the rest (engine/prefix_cache.py).
When the KV cache cannot hold the next step, cached prefixes are evicted first; then the newest
running sequence is preempted: its pages are freed and it goes back to the front of the queue,
to be computed again later.

When decodes are running and a step-time budget is set, prefill gets only the tokens that fit
in the rest of the budget (by the engine's measured step costs), so running streams keep
flowing while long prompts arrive; with no decodes running, prefill takes whole chunks.
Prompts are served first come, first served: the oldest prompt part-way through gets the
budget first, and a waiting prompt is never passed over by a later one. Every step gives
prefill at least `MIN_PREFILL_TOKENS`, so a prompt is never starved however busy decoding is.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from mlc_engine.engine.prefix_cache import Hit, PrefixCache
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

    # Prompt tokens looked up in the prefix cache at admission, and those found there.
    queried_tokens: int = 0
    hit_tokens: int = 0

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
        prefix_cache: PrefixCache | None = None,
        max_step_seconds: float = 0.0,
    ):
        self.kv_cache = kv_cache
        self.prefix_cache = prefix_cache
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

    def remove(self, seq: Sequence, cache: bool = True) -> None:
        """Drop a finished or aborted sequence: its KV goes to the prefix cache if there is one
        and `cache` says its KV is sound, else its pages are freed."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            if self.prefix_cache is not None and cache:
                held = seq.token_ids[: self.kv_cache.lengths[seq.seq_id]]
                self.prefix_cache.insert(seq.seq_id, held)
            else:
                self._drop(seq)
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

    def reclaim(self, wanted: int, keep: int | None = None) -> int:
        """Evict cached prefixes (least recently used first, never `keep`) until `wanted` pages
        are free or no entry is left; returns the free pages."""
        while self.kv_cache.free_pages() < wanted and self.prefix_cache is not None:
            if not self.prefix_cache.evict(keep):
                break
        return self.kv_cache.free_pages()

    def _consults_cache(self, seq: Sequence) -> bool:
        # A sequence that still wants its prompt's logprobs needs the logits of every prompt
        # token, so it computes them all: the cache is bypassed.
        return self.prefix_cache is not None and not seq.scores_prompt

    def _hit(self, seq: Sequence) -> Hit | None:
        if self.prefix_cache is None or not self._consults_cache(seq):
            return None
        return self.prefix_cache.match(seq.token_ids)

    def _drop(self, seq: Sequence) -> None:
        if self.prefix_cache is not None:
            self.prefix_cache.forget(seq.seq_id)
        self.kv_cache.remove_sequence(seq.seq_id)

    def _preempt_newest(self, batch: Batch) -> None:
        victim = self.running.pop()
        self._drop(victim)
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
                free = self._reclaim(free, self._growth(seq, min(seq.num_pending, budget)))
                chunk = self._chunk(seq, seq.num_computed, budget, free)
                if chunk is None:
                    continue
                batch.prefills.append(chunk)
                budget -= chunk.end - chunk.start
                free -= self._growth(seq, chunk.end - chunk.start)
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if len(self.running) + 1 + len(seq.children) > self.max_num_seqs:
                break
            hit = self._hit(seq)
            reserve = self.watermark + self._fork_pages(seq)
            chunk, free = self._admission_chunk(seq, hit, budget, free, reserve)
            cache = self.prefix_cache
            if chunk is None and hit and cache is not None and hit.holder_id in cache.entries:
                # Its own pages may be what the rest needs: without it, as without the cache.
                cache.remove(hit.holder_id)
                hit = None
                chunk, free = self._admission_chunk(seq, hit, budget, free, reserve)
            if chunk is None:
                break
            self.waiting.popleft()
            self._start(seq, hit, batch)
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

    def _admission_chunk(
        self, seq: Sequence, hit: Hit | None, budget: int, free: int, reserve: int
    ) -> tuple[Chunk | None, int]:
        """The first chunk of `seq` (after the hit's prefix) and the pages then free, evicting
        other cached prefixes for as much of it as the budget allows."""
        start = hit.length if hit else 0
        size = self.kv_cache.page_size
        wanted = pages_for(start + min(len(seq.token_ids) - start, budget), size)
        wanted -= pages_for(start, size)
        free = self._reclaim(free, wanted + reserve, hit.holder_id if hit else None)
        return self._chunk(seq, start, budget, free - reserve), free

    def _start(self, seq: Sequence, hit: Hit | None, batch: Batch) -> None:
        seq.num_cached_tokens = 0
        if self._consults_cache(seq):
            batch.queried_tokens += len(seq.token_ids)
        if hit is None or self.prefix_cache is None:
            self.kv_cache.add_sequence(seq.seq_id)
        else:
            self.prefix_cache.fork(hit, seq.seq_id)
            seq.num_computed = seq.num_cached_tokens = hit.length
            batch.hit_tokens += hit.length
        if self.prefix_cache is not None:
            self.prefix_cache.admit(seq.seq_id, seq.token_ids)
        seq.status = Status.RUNNING
        self.running.append(seq)

    def _reclaim(self, free: int, wanted: int, keep: int | None = None) -> int:
        """`free` (pages free less those this step has planned for) after evicting cached
        prefixes until `wanted` of them are free."""
        planned = self.kv_cache.free_pages() - free
        return self.reclaim(planned + wanted, keep) - planned

    def _make_room_for_decodes(self, batch: Batch) -> int:
        """Schedule every running decode, preempting the newest sequences until they fit;
        returns the pages left free."""
        while True:
            decodes = [seq for seq in self.running if not seq.in_prompt]
            needed = sum(self._growth(seq, 1) for seq in decodes)
            free = self.reclaim(needed)
            if needed <= free or not self.running:
                batch.decodes = decodes
                return free - needed
            self._preempt_newest(batch)

    def _chunk(self, seq: Sequence, start: int, budget: int, free_pages: int) -> Chunk | None:
        """The longest piece of `seq` from `start` within `budget` tokens and `free_pages`."""
        size = self.kv_cache.page_size
        room = (pages_for(start, size) + max(free_pages, 0)) * size - start
        length = min(len(seq.token_ids) - start, budget, room)
        if length <= 0:
            return None
        return Chunk(seq, start, start + length)
