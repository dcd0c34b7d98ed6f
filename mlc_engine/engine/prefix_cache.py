"""Automatic prefix caching: finished sequences stay in the KV cache as entries, and a new
sequence whose tokens start with the same full pages forks from one (sharing those pages, no copy)
and computes only the rest.

Entries are found by a hash chain over full pages of token ids, as vLLM does: a page's key hashes
its tokens with the previous page's key, so one key names the whole prefix up to that page. A hit
is checked against the entry's tokens, so a hash collision costs a miss, never a wrong answer.
The scheduler evicts entries, least recently used first, whenever it needs their pages.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from mlc_engine.engine.runtime import KVCache


@dataclass
class Hit:
    """The entry `entry_id` holds the first `length` tokens (whole pages) asked about."""

    entry_id: int
    length: int


class PrefixCache:
    """Entries by KV cache sequence id, least recently used first, each with the tokens it holds."""

    def __init__(self, kv_cache: KVCache):
        self.kv_cache = kv_cache
        self.entries: OrderedDict[int, list[int]] = OrderedDict()
        self._holders: dict[int, dict[int, None]] = {}  # prefix key -> entries with that prefix

    def _keys(self, tokens: Sequence[int]) -> list[int]:
        size = self.kv_cache.page_size
        keys, key = [], 0
        for start in range(0, len(tokens) - size + 1, size):
            key = hash((key, *tokens[start : start + size]))
            keys.append(key)
        return keys

    def insert(self, seq_id: int, tokens: Sequence[int]) -> None:
        """Keep the sequence `seq_id`, whose KV holds `tokens`; one short of a page is removed."""
        keys = self._keys(tokens)
        if not keys:
            self.kv_cache.remove_sequence(seq_id)
            return
        self.entries[seq_id] = list(tokens)
        for key in keys:
            self._holders.setdefault(key, {})[seq_id] = None

    def match(self, tokens: Sequence[int]) -> Hit | None:
        """The entry holding the longest prefix of `tokens` in whole pages, short of the last
        token: that one is always computed, for the logits to sample from."""
        found: tuple[int, dict[int, None]] | None = None
        for pages, key in enumerate(self._keys(tokens[:-1]), 1):
            holders = self._holders.get(key)
            if not holders:
                break
            found = pages, holders
        if found is None:
            return None
        pages, holders = found
        length = pages * self.kv_cache.page_size
        for entry_id in reversed(holders):  # the newest first
            if self.entries[entry_id][:length] == list(tokens[:length]):
                return Hit(entry_id, length)
        return None

    def fork(self, hit: Hit, seq_id: int) -> None:
        """Start the sequence `seq_id` in the KV cache with the hit's prefix."""
        self.kv_cache.fork_sequence(hit.entry_id, seq_id, hit.length)
        self.entries.move_to_end(hit.entry_id)

    def evict(self, keep: int | None = None) -> bool:
        """Remove the least recently used entry other than `keep`; False if there is none."""
        oldest = next((entry_id for entry_id in self.entries if entry_id != keep), None)
        if oldest is None:
            return False
        self.remove(oldest)
        return True

    def remove(self, entry_id: int) -> None:
        for key in self._keys(self.entries.pop(entry_id)):
            holders = self._holders[key]
            del holders[entry_id]
            if not holders:
                del self._holders[key]
        self.kv_cache.remove_sequence(entry_id)

    def clear(self) -> None:
        while self.evict():
            pass

    def pages(self) -> int:
        """The pages only entries hold: evicting them all frees this many."""
        return self.kv_cache.pages_held_only_by(set(self.entries))
