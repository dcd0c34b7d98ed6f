"""Automatic prefix caching: a new sequence whose tokens start with the same full pages as a
running or a finished sequence forks from it (sharing those pages, no copy) and computes only
the rest. Finished sequences stay in the KV cache as entries until their pages are needed.

Sequences are found by a hash chain over full pages of token ids, as vLLM does: a page's key
hashes its tokens with the previous page's key, so one key names the whole prefix up to that
page. A running sequence is indexed by its prompt from admission on, and offers the pages it
has computed so far; an entry offers all it holds. A hit is checked against the holder's tokens,
so a hash collision costs a miss, never a wrong answer. The scheduler evicts entries, least
recently used first, whenever it needs their pages; running sequences are never evicted.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from mlc_engine.engine.runtime import KVCache


@dataclass
class Hit:
    """The sequence `holder_id` holds the first `length` tokens (whole pages) asked about."""

    holder_id: int
    length: int


class PrefixCache:
    """Indexed sequences by KV cache sequence id with their tokens: entries (finished, least
    recently used first) and running sequences (their prompts)."""

    def __init__(self, kv_cache: KVCache):
        self.kv_cache = kv_cache
        self.entries: OrderedDict[int, list[int]] = OrderedDict()
        self.running: dict[int, list[int]] = {}
        self._holders: dict[int, dict[int, None]] = {}  # prefix key -> sequences with it

    def _keys(self, tokens: Sequence[int]) -> list[int]:
        size = self.kv_cache.page_size
        keys, key = [], 0
        for start in range(0, len(tokens) - size + 1, size):
            key = hash((key, *tokens[start : start + size]))
            keys.append(key)
        return keys

    def _index(self, seq_id: int, tokens: list[int]) -> None:
        for key in self._keys(tokens):
            self._holders.setdefault(key, {})[seq_id] = None

    def _unindex(self, seq_id: int, tokens: list[int]) -> None:
        for key in self._keys(tokens):
            holders = self._holders[key]
            del holders[seq_id]
            if not holders:
                del self._holders[key]

    def admit(self, seq_id: int, prompt: Sequence[int]) -> None:
        """Offer the running sequence `seq_id`'s prompt pages as it computes them."""
        self.running[seq_id] = list(prompt)
        self._index(seq_id, self.running[seq_id])

    def forget(self, seq_id: int) -> None:
        """`seq_id` stops running without becoming an entry (its KV is removed)."""
        tokens = self.running.pop(seq_id, None)
        if tokens is not None:
            self._unindex(seq_id, tokens)

    def insert(self, seq_id: int, tokens: Sequence[int]) -> None:
        """Keep the finished sequence `seq_id`, whose KV holds `tokens`, as an entry; one short
        of a page is removed."""
        self.forget(seq_id)
        if len(tokens) < self.kv_cache.page_size:
            self.kv_cache.remove_sequence(seq_id)
            return
        self.entries[seq_id] = list(tokens)
        self._index(seq_id, self.entries[seq_id])
        self.kv_cache.park(seq_id)

    def match(self, tokens: Sequence[int]) -> Hit | None:
        """The sequence holding the longest prefix of `tokens` in whole pages, short of the last
        token: that one is always computed, for the logits to sample from."""
        found: list[dict[int, None]] = []  # the holders of each page's key, while there are any
        for key in self._keys(tokens[:-1]):
            holders = self._holders.get(key)
            if not holders:
                break
            found.append(holders)
        size = self.kv_cache.page_size
        for pages in range(len(found), 0, -1):
            length = pages * size
            for holder in reversed(found[pages - 1]):  # the newest first
                held = self.entries.get(holder) or self.running[holder]
                computed = self.kv_cache.lengths[holder]
                if computed >= length and held[:length] == list(tokens[:length]):
                    return Hit(holder, length)
        return None

    def fork(self, hit: Hit, seq_id: int) -> None:
        """Start the sequence `seq_id` in the KV cache with the hit's prefix."""
        self.kv_cache.fork_sequence(hit.holder_id, seq_id, hit.length)
        if hit.holder_id in self.entries:
            self.entries.move_to_end(hit.holder_id)

    def evict(self, keep: int | None = None) -> bool:
        """Remove the least recently used entry other than `keep`; False if there is none."""
        oldest = next((entry_id for entry_id in self.entries if entry_id != keep), None)
        if oldest is None:
            return False
        self.remove(oldest)
        return True

    def remove(self, entry_id: int) -> None:
        self._unindex(entry_id, self.entries.pop(entry_id))
        self.kv_cache.remove_sequence(entry_id)

    def clear(self) -> None:
        while self.evict():
            pass

    def pages(self) -> int:
        """The pages only entries hold: evicting them all frees this many."""
        return self.kv_cache.parked_pages
