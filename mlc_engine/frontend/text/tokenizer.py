"""The model's tokenizer: text to token ids and back, plus its BOS and stop tokens."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import tokenizers

from mlc_engine.common.config import ModelConfig

TOKENIZER_FILE = "tokenizer.json"


class Tokenizer:
    """A Hugging Face `tokenizers.Tokenizer` together with the special tokens from the config."""

    def __init__(self, inner: tokenizers.Tokenizer, config: ModelConfig) -> None:
        self._inner = inner
        self._add_bos = config.add_bos_token
        self._bos_token_id = config.bos_token_id
        self._eos_token_ids = list(config.eos_token_ids)

    @classmethod
    def from_folder(cls, folder: Path, config: ModelConfig) -> Tokenizer:
        return cls(tokenizers.Tokenizer.from_file(str(folder / TOKENIZER_FILE)), config)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special tokens written in it (`<|im_start|>`) become their ids.

        `add_bos` defaults to the config's `add_bos_token`. No second BOS is added to text that
        already starts with one, as a rendered chat template often does.
        """
        ids: list[int] = self._inner.encode(text, add_special_tokens=False).ids
        if add_bos is None:
            add_bos = self._add_bos
        bos = self._bos_token_id
        if add_bos and bos is not None and ids[:1] != [bos]:
            ids.insert(0, bos)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        text: str = self._inner.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return text

    @property
    def vocab_size(self) -> int:
        size: int = self._inner.get_vocab_size(with_added_tokens=True)
        return size

    def token_to_id(self, token: str) -> int | None:
        token_id: int | None = self._inner.token_to_id(token)
        return token_id

    def id_to_token(self, token_id: int) -> str | None:
        token: str | None = self._inner.id_to_token(token_id)
        return token

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self._eos_token_ids)

    @property
    def bos_token(self) -> str:
        """The BOS token's text (for chat templates), or "" when the model has none."""
        return self._token_text(self._bos_token_id)

    @property
    def eos_token(self) -> str:
        """The first stop token's text (for chat templates), or "" when the model has none."""
        return self._token_text(self._eos_token_ids[0] if self._eos_token_ids else None)

    def _token_text(self, token_id: int | None) -> str:
        if token_id is None:
            return ""
        return self.id_to_token(token_id) or ""
