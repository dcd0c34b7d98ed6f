"""Constrained decoding: each sequence with a grammar gets an llguidance matcher, which says
which tokens may come next.

The grammar arrives as llguidance's own definition (the frontend turned a JSON schema, regex
or Lark grammar into one and checked it). Compiled grammars are cached by their text, so a
schema sent again costs a copy of a matcher, not a compile. The masks of a step are computed
on a worker thread while the model runs that step (llguidance and TVM both release the GIL),
and come back as one bitmask row per sequence: bit t of a row is set when token t is allowed.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence as Seq
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import llguidance
import llguidance.numpy
import numpy as np

from mlc_engine.engine.sequence import Sequence

TOKENIZER_FILE = "tokenizer.json"
CACHED_GRAMMARS = 256


class GrammarError(ValueError):
    """A grammar llguidance cannot compile."""


class Grammars:
    """Matchers for sequences, compiled once per grammar, and their masks for a batch."""

    def __init__(self, model_folder: Path, vocab_size: int, eos_token_ids: list[int]):
        self.vocab_size = vocab_size
        self._tokenizer_path = model_folder / TOKENIZER_FILE
        self._eos_token_ids = eos_token_ids
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        # One thread: its masks take about 1 ms a step for 16 sequences, and more threads would
        # contend with the model's own thread pool, which the step is waiting on.
        self._executor = llguidance.LLExecutor(num_threads=1)
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="grammar")
        self._lock = threading.Lock()  # the cache and the tokenizer are built on two threads

    def matcher(self, grammar: str) -> llguidance.LLMatcher:
        """A fresh matcher at the start of `grammar`; GrammarError if it does not compile."""
        with self._lock:
            compiled = self._compiled.get(grammar)
            if compiled is None:
                compiled = llguidance.LLMatcher(self._llg_tokenizer(), grammar, log_level=0)
                if compiled.is_error():
                    raise GrammarError(compiled.get_error())
                self._compiled[grammar] = compiled
                if len(self._compiled) > CACHED_GRAMMARS:
                    self._compiled.popitem(last=False)
            self._compiled.move_to_end(grammar)
            return compiled.deep_copy()

    @property
    def num_compiled(self) -> int:
        """Grammars compiled and cached."""
        return len(self._compiled)

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        """Loaded on first use (a quarter of a second): engines that never see a grammar skip it."""
        if self._tokenizer is None:
            self._tokenizer = llguidance.LLTokenizer(
                str(self._tokenizer_path), n_vocab=self.vocab_size, eos_token=self._eos_token_ids
            )
        return self._tokenizer

    def start_masks(self, seqs: Seq[Sequence]) -> Future[np.ndarray] | None:
        """The masks of the constrained sequences among `seqs` (a row each, in order),
        computed on the worker thread; None when none is constrained."""
        constrained = [seq.matcher for seq in seqs if seq.matcher is not None]
        if not constrained:
            return None
        return self._worker.submit(self._masks, constrained)

    def _masks(self, matchers: list[llguidance.LLMatcher]) -> np.ndarray:
        bitmask = llguidance.numpy.allocate_token_bitmask(len(matchers), self.vocab_size)
        pairs = [(matcher, row) for row, matcher in enumerate(matchers)]
        llguidance.numpy.fill_next_token_bitmask_par(self._executor, pairs, bitmask)
        return bitmask


def allowed_tokens(bitmask_row: np.ndarray, vocab_size: int) -> np.ndarray:
    """A bitmask row as one boolean per token."""
    bits = np.unpackbits(bitmask_row.view(np.uint8), bitorder="little")
    return bits[:vocab_size].astype(bool)


def refusal(seq: Sequence, token: int) -> str | None:
    """Advance `seq`'s matcher past `token`; why not, if its grammar refuses the token."""
    matcher = seq.matcher
    if matcher is None or matcher.consume_token(token):
        return None
    return f"the grammar refused token {token}: {matcher.get_error()}"
