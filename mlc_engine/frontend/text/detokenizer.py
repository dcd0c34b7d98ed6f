"""Streams generated token ids out as text, a token (or a few) at a time."""

from __future__ import annotations

from collections.abc import Sequence

from mlc_engine.frontend.text.tokenizer import Tokenizer

# Tokens of already-emitted text decoded again as context for the new ones.
_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns one sequence's generated ids into text chunks that concatenate to the full decode.

    Decoding a token on its own is wrong twice over: a byte-level token may hold half of a UTF-8
    character, and a SentencePiece decoder drops the leading space of the first token it sees. So,
    as vLLM does, each step decodes a window that starts a few tokens back (`prefix_offset`), and
    returns what it adds to the text already returned for that window (up to `read_offset`);
    text that ends in U+FFFD is held back until the rest of its character arrives.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids = list(prompt_ids)
        self._prefix_offset = max(len(self._ids) - _CONTEXT_TOKENS, 0)
        self._read_offset = len(self._ids)

    def push(self, token_ids: Sequence[int]) -> str:
        """Add generated ids; returns the text they complete, possibly ""."""
        self._ids.extend(token_ids)
        prefix_text, text = self._window_texts()
        if len(text) <= len(prefix_text) or text.endswith(_REPLACEMENT_CHAR):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return text[len(prefix_text) :]

    def flush(self) -> str:
        """The text still held back, even if it ends in an incomplete character."""
        prefix_text, text = self._window_texts()
        self._prefix_offset = self._read_offset = len(self._ids)
        return text[len(prefix_text) :]

    def _window_texts(self) -> tuple[str, str]:
        """The window decoded up to what was already returned, and up to the newest id."""
        window = self._ids[self._prefix_offset :]
        read = self._read_offset - self._prefix_offset
        prefix_text = self._decode(window[:read])
        return prefix_text, self._decode(window)

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)
