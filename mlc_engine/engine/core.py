"""The continuous-batching engine: `step()` = schedule -> run the model -> sample -> outputs.

Knows nothing of sockets: requests come in through `add` and `abort`, and each step returns the
`SequenceOutput`s to publish. `engine/process.py` runs it behind ZeroMQ.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from mlc_engine.common.protocol import (
    PROTOCOL_VERSION,
    AddRequest,
    EngineInfo,
    ErrorCode,
    FinishReason,
    RequestMetrics,
    SequenceOutput,
    StatsSnapshot,
)
from mlc_engine.engine.grammar import GrammarError, Grammars, allowed_tokens, refusal
from mlc_engine.engine.prefix_cache import PrefixCache
from mlc_engine.engine.runtime import ModelRuntime
from mlc_engine.engine.sampler import Sample, Sampler, token_logprobs
from mlc_engine.engine.scheduler import Batch, Chunk, Scheduler, pages_for
from mlc_engine.engine.sequence import Sequence, Status

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    max_num_seqs: int = 32
    max_total_tokens: int = 0  # KV cache size in tokens; 0: room for max_num_seqs full contexts
    max_batch_tokens: int = 512  # tokens per step: prefill chunks plus one per running decode
    # A step that carries running decodes aims to take at most this long (0: no limit); the
    # prefill beside them is sized to fit. Off by default until its default is measured
    # (issue 21): the chunk sizes it picks follow the host's timing.
    max_step_ms: float = 0.0
    # Sequences (choices) waiting beyond max_num_seqs; a request that would pass this bound is
    # refused with QUEUE_FULL, so the queue stays bounded however many frontends send.
    max_queue: int = 256
    # A frontend silent for this long (seconds) is gone: its requests are aborted.
    frontend_lease: float = 30.0
    # Reuse the KV of running and finished sequences for prompts that start the same
    # (engine/prefix_cache.py).
    prefix_cache: bool = True


class Engine:
    """Sequences from `add` run in `step` until they finish or are aborted."""

    def __init__(self, runtime: ModelRuntime, config: EngineConfig, model_name: str = ""):
        self.runtime = runtime
        self.config = config
        self.model_name = model_name or runtime.config.model_name
        model = runtime.config
        total_tokens = config.max_total_tokens or min(
            config.max_num_seqs * model.context_window_size, 32768
        )
        self.kv_cache = runtime.create_kv_cache(
            config.max_num_seqs, total_tokens, config.max_batch_tokens
        )
        self.capacity = self.kv_cache.num_pages * self.kv_cache.page_size
        self.prefix_cache = PrefixCache(self.kv_cache) if config.prefix_cache else None
        self.scheduler = Scheduler(
            self.kv_cache,
            config.max_num_seqs,
            config.max_batch_tokens,
            self.prefix_cache,
            config.max_step_ms / 1000,
        )
        self.sampler = Sampler()
        self.eos_token_ids = set(model.eos_token_ids)
        self.grammars = Grammars(runtime.model_folder, model.vocab_size, model.eos_token_ids)
        self.requests: dict[str, list[Sequence]] = {}
        self.stats = StatsSnapshot()
        self._next_seq_id = 0

    def info(self) -> EngineInfo:
        model = self.runtime.config
        return EngineInfo(
            protocol_version=PROTOCOL_VERSION,
            model=self.model_name,
            context_window=min(model.context_window_size, self.capacity),
            vocab_size=model.vocab_size,
            max_num_seqs=self.config.max_num_seqs,
            kv_pages=self.kv_cache.num_pages,
            page_size=self.kv_cache.page_size,
            eos_token_ids=sorted(self.eos_token_ids),
        )

    @property
    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    def snapshot(self) -> StatsSnapshot:
        self.stats.num_waiting = len(self.scheduler.waiting)
        self.stats.num_running = len(self.scheduler.running)
        # Pages only the prefix cache holds count as free: they are evicted when needed.
        cached = self.prefix_cache.pages() if self.prefix_cache else 0
        self.stats.kv_pages_cached = cached
        self.stats.kv_pages_free = self.kv_cache.free_pages() + cached
        self.stats.kv_pages_total = self.kv_cache.num_pages
        return StatsSnapshot(**vars(self.stats))

    def reset_stats(self) -> None:
        self.stats = StatsSnapshot()

    def add(self, request: AddRequest) -> list[SequenceOutput]:
        """Queue a request; a request that cannot run is answered at once with an error."""
        problem = self._check(request)
        if problem:
            self.stats.requests_failed += 1
            return [_error(request.request_id, 0, problem, ErrorCode.INVALID_REQUEST)]
        if self._open_sequences() + request.params.n > self._room:
            return [_error(request.request_id, 0, self._full_message(), ErrorCode.QUEUE_FULL)]
        now = time.monotonic()
        choices = [self._new_sequence(request, i, now) for i in range(request.params.n)]
        if request.params.grammar is not None:
            try:
                for choice in choices:
                    choice.matcher = self.grammars.matcher(request.params.grammar)
            except GrammarError as error:
                self.stats.requests_failed += 1
                message = f"the grammar does not compile: {error}"
                return [_error(request.request_id, 0, message, ErrorCode.INVALID_REQUEST)]
        choices[0].children = choices[1:]
        self.requests[request.request_id] = choices
        self.scheduler.add(choices[0])
        return []

    @property
    def _room(self) -> int:
        return self.config.max_num_seqs + self.config.max_queue

    def _open_sequences(self) -> int:
        """Choices running or waiting, counting those waiting on a parent's prompt."""
        choices = (seq for request in self.requests.values() for seq in request)
        return sum(seq.status is not Status.FINISHED for seq in choices)

    def _full_message(self) -> str:
        return (
            f"the engine is full ({self._open_sequences()} sequences running or waiting, "
            f"{self._room} at most); retry later"
        )

    def _check(self, request: AddRequest) -> str | None:
        prompt = request.prompt_token_ids
        vocab = self.runtime.config.vocab_size
        window = min(self.runtime.config.context_window_size, self.capacity)
        if request.request_id in self.requests:
            return f"request id {request.request_id} is already running"
        if not prompt:
            return "the prompt is empty"
        if min(prompt) < 0 or max(prompt) >= vocab:
            return f"prompt token ids must be in [0, {vocab})"
        if len(prompt) >= window:
            return (
                f"the prompt has {len(prompt)} tokens, more than fit the context window of "
                f"{window} tokens with room for an answer"
            )
        try:
            request.params.check(vocab)
        except ValueError as error:
            return str(error)
        return None

    def _new_sequence(self, request: AddRequest, index: int, now: float) -> Sequence:
        self._next_seq_id += 1
        return Sequence(self._next_seq_id, request, index, now)

    def abort(self, request_ids: list[str]) -> list[SequenceOutput]:
        """End these requests (unknown or finished ones are ignored: aborting is idempotent)."""
        outputs = []
        for request_id in request_ids:
            for seq in self.requests.pop(request_id, []):
                if seq.status is not Status.FINISHED:
                    self.scheduler.remove(seq)
                    outputs.append(self._output(seq, [], None, FinishReason.ABORT))
        return outputs

    def step(self) -> list[SequenceOutput]:
        batch = self.scheduler.schedule()
        self.stats.preemptions += len(batch.preempted)
        self.stats.prefix_cache_queried_tokens += batch.queried_tokens
        self.stats.prefix_cache_hit_tokens += batch.hit_tokens
        if batch.empty:
            return []
        start = time.perf_counter()
        try:
            outputs = self._run(batch)
        except Exception as error:  # a failing step fails its requests, not the engine
            log.exception("engine step failed")
            outputs = self._fail(batch, f"engine step failed: {error}")
        self.stats.steps += 1
        self.stats.last_step_seconds = time.perf_counter() - start
        self.scheduler.costs.observe(
            len(batch.decodes), batch.prefill_tokens, self.stats.last_step_seconds
        )
        return outputs

    def _run(self, batch: Batch) -> list[SequenceOutput]:
        # The grammar masks of the tokens sampled in this step, computed while the model runs.
        samplers = [chunk.seq for chunk in batch.prefills if chunk.completes]
        samplers = [*samplers, *(c for s in samplers for c in s.children), *batch.decodes]
        masks = self.grammars.start_masks(samplers)
        ready: list[tuple[Sequence, np.ndarray]] = []
        if batch.prefills:
            ready += self._prefill(batch.prefills)
        if batch.decodes:
            ready += self._decode(batch.decodes)
        outputs: list[SequenceOutput] = []
        to_sample: list[tuple[Sequence, np.ndarray]] = []
        for seq, logits in ready:
            if seq.params.max_tokens == 0:
                outputs += self._finish_prompt_only(seq)
                continue
            to_sample.append((seq, logits))
            to_sample += [(child, logits) for child in self._fork(seq)]
        allowed = self._allowed(masks, samplers)
        for seq, _ in to_sample:  # a grammar that allows nothing ends its own request only
            if seq.seq_id in allowed and not allowed[seq.seq_id].any():
                outputs += self._fail_request(seq.request_id, "the grammar allows no next token")
        to_sample = [(seq, logits) for seq, logits in to_sample if seq.request_id in self.requests]
        if to_sample:
            rows = np.stack([logits for _, logits in to_sample])
            seqs = [seq for seq, _ in to_sample]
            by_row = {i: allowed[s.seq_id] for i, s in enumerate(seqs) if s.seq_id in allowed}
            for seq, sample in zip(seqs, self.sampler.sample(rows, seqs, by_row), strict=True):
                if seq.request_id in self.requests:  # not failed by another choice just now
                    outputs.append(self._accept(seq, sample))
        return outputs

    def _allowed(
        self, masks: Future[np.ndarray] | None, samplers: list[Sequence]
    ) -> dict[int, np.ndarray]:
        """Sequence id -> the tokens its grammar allows next, for the constrained `samplers`."""
        if masks is None:
            return {}
        bitmask = masks.result()
        constrained = [seq for seq in samplers if seq.matcher is not None]
        vocab = self.runtime.config.vocab_size
        rows = zip(constrained, bitmask, strict=True)
        return {seq.seq_id: allowed_tokens(row, vocab) for seq, row in rows}

    def _prefill(self, chunks: list[Chunk]) -> list[tuple[Sequence, np.ndarray]]:
        start = time.perf_counter()
        whole = [chunk.seq.scores_prompt for chunk in chunks]
        logits = self.runtime.prefill(
            self.kv_cache,
            [chunk.seq.seq_id for chunk in chunks],
            [chunk.seq.token_ids[chunk.start : chunk.end] for chunk in chunks],
            whole,
        )
        self.stats.prefill_seconds += time.perf_counter() - start
        self.stats.prefill_tokens += sum(chunk.end - chunk.start for chunk in chunks)
        ready, row = [], 0
        for chunk, all_rows in zip(chunks, whole, strict=True):
            count = chunk.end - chunk.start if all_rows else 1
            rows = logits[row : row + count]
            row += count
            chunk.seq.num_computed = chunk.end
            if all_rows:
                self._score_prompt(chunk, rows)
            if chunk.completes:
                ready.append((chunk.seq, rows[-1]))
        return ready

    def _decode(self, seqs: list[Sequence]) -> list[tuple[Sequence, np.ndarray]]:
        start = time.perf_counter()
        ids = [seq.seq_id for seq in seqs]
        logits = self.runtime.decode(self.kv_cache, ids, [seq.token_ids[-1] for seq in seqs])
        self.stats.decode_seconds += time.perf_counter() - start
        self.stats.decode_tokens += len(seqs)
        for seq in seqs:
            seq.num_computed += 1
        return list(zip(seqs, logits, strict=True))

    def _score_prompt(self, chunk: Chunk, rows: np.ndarray) -> None:
        """Row j scores token start + j + 1; score the prompt tokens not scored yet."""
        seq = chunk.seq
        first = len(seq.prompt_logprobs)
        end = min(chunk.end + 1, seq.num_prompt_tokens)
        if end <= first:
            return
        scored = rows[first - 1 - chunk.start : end - 1 - chunk.start]
        seq.prompt_logprobs += token_logprobs(
            scored, seq.token_ids[first:end], seq.params.top_logprobs
        )

    def _fork(self, parent: Sequence) -> list[Sequence]:
        """Choices waiting on `parent`'s prompt share its pages from now on."""
        children, parent.children = parent.children, []
        running = self.scheduler.running
        for child in children:
            needed = pages_for(1, self.kv_cache.page_size)
            full = len(running) >= self.config.max_num_seqs
            if full or self.scheduler.reclaim(needed + 1) <= needed:
                self.scheduler.waiting.appendleft(child)  # computes the prompt on its own
                continue
            self.kv_cache.fork_sequence(parent.seq_id, child.seq_id)
            child.prompt_logprobs = parent.prompt_logprobs
            child.num_computed = parent.num_computed
            child.status = Status.RUNNING
            running.append(child)
        return [child for child in children if child.status is Status.RUNNING]

    def _accept(self, seq: Sequence, sample: Sample) -> SequenceOutput:
        token = sample.token
        params = seq.params
        problem = refusal(seq, token)
        if problem:
            (failed,) = self._fail_request(seq.request_id, problem)
            return failed
        seq.append(token)
        logprobs = [sample.logprob] if sample.logprob else None
        # A grammar's output ends at the EOS it allows once complete, ignore_eos or not.
        ends_at_eos = not params.ignore_eos or seq.matcher is not None
        if token in params.stop_token_ids or (ends_at_eos and token in self.eos_token_ids):
            return self._finish(seq, [token], logprobs, FinishReason.STOP)
        if seq.num_output_tokens >= params.max_tokens or len(seq.token_ids) >= min(
            self.runtime.config.context_window_size, self.capacity
        ):
            return self._finish(seq, [token], logprobs, FinishReason.LENGTH)
        return self._output(seq, [token], logprobs, None)

    def _finish(
        self,
        seq: Sequence,
        tokens: list[int],
        logprobs: list | None,
        reason: FinishReason,
    ) -> SequenceOutput:
        self.scheduler.remove(seq)
        choices = self.requests.get(seq.request_id, [])
        if all(choice.status is Status.FINISHED for choice in choices):
            self.requests.pop(seq.request_id, None)
            self.stats.requests_finished += 1
        return self._output(seq, tokens, logprobs, reason)

    def _finish_prompt_only(self, parent: Sequence) -> list[SequenceOutput]:
        """A request for max_tokens 0 (prompt logprobs, say): every choice ends here."""
        choices = self.requests.get(parent.request_id, [parent])
        for child in parent.children:
            child.prompt_logprobs = parent.prompt_logprobs
        parent.children = []
        return [self._finish(seq, [], None, FinishReason.LENGTH) for seq in choices]

    def _fail(self, batch: Batch, message: str) -> list[SequenceOutput]:
        request_ids = {chunk.seq.request_id for chunk in batch.prefills}
        request_ids |= {seq.request_id for seq in batch.decodes}
        return [output for rid in request_ids for output in self._fail_request(rid, message)]

    def _fail_request(self, request_id: str, message: str) -> list[SequenceOutput]:
        """End every choice of a request with one error output (none if it already ended)."""
        choices = self.requests.pop(request_id, None)
        if choices is None:
            return []
        for seq in choices:
            if seq.status is not Status.FINISHED:
                self.scheduler.remove(seq, cache=False)  # a failed step may leave its KV unsound
        self.stats.requests_failed += 1
        return [_error(request_id, 0, message)]

    def _output(
        self,
        seq: Sequence,
        tokens: list[int],
        logprobs: list | None,
        reason: FinishReason | None,
    ) -> SequenceOutput:
        output = SequenceOutput(seq.request_id, seq.index, tokens, logprobs)
        first_output = reason is not None or tokens
        if seq.params.prompt_logprobs and first_output and not seq.prompt_logprobs_sent:
            output.prompt_logprobs = seq.prompt_logprobs
            seq.prompt_logprobs_sent = True
        if seq.index == 0 and first_output and not seq.cached_tokens_sent:
            output.cached_tokens = seq.num_cached_tokens
            seq.cached_tokens_sent = True
        if reason is not None:
            output.finish_reason = reason.value
            output.metrics = _metrics(seq)
        return output


def _error(
    request_id: str, index: int, message: str, code: ErrorCode | None = None
) -> SequenceOutput:
    return SequenceOutput(
        request_id, index, [], finish_reason="error", error=message, error_code=code
    )


def _metrics(seq: Sequence) -> RequestMetrics:
    first = seq.first_token_time or time.monotonic()
    count = seq.num_output_tokens
    return RequestMetrics(
        prompt_tokens=seq.num_prompt_tokens,
        output_tokens=count,
        time_to_first_token=first - seq.arrival,
        mean_inter_token_latency=(seq.last_token_time - first) / (count - 1) if count > 1 else 0.0,
        preemptions=seq.preemptions,
    )
