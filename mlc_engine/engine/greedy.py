"""In-process greedy generation for one sequence: what `mlc-engine generate` and `chat` run."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from mlc_engine.engine.runtime import KVCache, ModelRuntime


class GreedySession:
    """One conversation's KV cache: each `generate` continues from what came before."""

    SEQ_ID = 0

    def __init__(self, runtime: ModelRuntime, max_total_tokens: int | None = None):
        self.runtime = runtime
        self.context_window = runtime.config.context_window_size
        self.kv_cache: KVCache = runtime.create_kv_cache(1, max_total_tokens or self.context_window)
        self.kv_cache.add_sequence(self.SEQ_ID)
        self.length = 0

    def reset(self) -> None:
        self.kv_cache.remove_sequence(self.SEQ_ID)
        self.kv_cache.add_sequence(self.SEQ_ID)
        self.length = 0

    def generate(
        self, prompt_ids: Sequence[int], max_tokens: int, stop_ids: Sequence[int]
    ) -> Iterator[int]:
        """Yield greedy tokens after `prompt_ids` until a stop token (not yielded), `max_tokens`
        or the context window."""
        if self.length + len(prompt_ids) >= self.context_window:
            raise ValueError(
                f"the prompt ({len(prompt_ids)} tokens after {self.length} in context) does not "
                f"fit the context window of {self.context_window} tokens"
            )
        chunk = self.runtime.config.prefill_chunk_size
        for start in range(0, len(prompt_ids), chunk):
            logits = self.runtime.prefill(
                self.kv_cache, [self.SEQ_ID], [list(prompt_ids[start : start + chunk])]
            )
        self.length += len(prompt_ids)
        for _ in range(max_tokens):
            token = int(np.argmax(logits[0]))
            if token in stop_ids:
                return
            yield token
            self.length += 1
            if self.length >= self.context_window:
                return
            logits = self.runtime.decode(self.kv_cache, [self.SEQ_ID], [token])
