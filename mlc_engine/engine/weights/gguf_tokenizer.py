"""Build a Hugging Face `tokenizer.json` from the `tokenizer.ggml.*` metadata of a GGUF file.

A GGUF file carries its vocabulary in llama.cpp's form; the frontend only speaks `tokenizers`,
so the converter turns one into the other once. The result mirrors the tokenizer.json that ships
with the original Hugging Face model: byte-level BPE for `gpt2` vocabularies (SmolLM, Llama 3,
Qwen2) and SentencePiece-style BPE with byte fallback for `llama` vocabularies (Llama 2, TinyLlama).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import gguf
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

logger = logging.getLogger(__name__)

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2 differs from Llama 3 only in splitting numbers into single digits.
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
# llama.cpp's `tokenizer.ggml.pre` names, grouped by the pre-tokenizer their HF originals use.
_LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3")
_DIGITS_PRE = ("smollm", "starcoder", "refact")
_GPT2_PRE = ("default", "gpt-2", "gpt2")
_SPIECE_SPACE = "▁"


@dataclasses.dataclass
class GGUFVocab:
    """The tokenizer fields of a GGUF file, as plain Python values."""

    model: str
    pre: str
    tokens: list[str]
    token_types: list[int]
    scores: list[float]
    merges: list[str]
    unknown_token_id: int | None
    add_space_prefix: bool

    @classmethod
    def from_reader(cls, reader: gguf.GGUFReader) -> GGUFVocab:
        fields = reader.fields

        def get(key: str, default: Any = None) -> Any:
            field = fields.get(f"tokenizer.ggml.{key}")
            return default if field is None else field.contents()

        tokens = get("tokens")
        if tokens is None:
            raise ValueError("the GGUF file has no tokenizer.ggml.tokens")
        model = get("model", "llama")
        vocab = cls(
            model=model,
            pre=get("pre", "default"),
            tokens=tokens,
            token_types=get("token_type", [gguf.TokenType.NORMAL] * len(tokens)),
            scores=get("scores", [0.0] * len(tokens)),
            merges=get("merges", []),
            unknown_token_id=get("unknown_token_id"),
            # llama.cpp prefixes SentencePiece text with a space unless told otherwise.
            add_space_prefix=get("add_space_prefix", model == "llama"),
        )
        if not len(vocab.tokens) == len(vocab.token_types) == len(vocab.scores):
            raise ValueError("the GGUF tokens, token types and scores differ in length")
        return vocab

    def token_ids(self) -> dict[str, int]:
        """Token text to id; a repeated text keeps its last id, as in llama.cpp."""
        return {token: i for i, token in enumerate(self.tokens)}


def tokenizer_json_from_gguf(path: Path) -> str:
    """The `tokenizer.json` text equivalent to the tokenizer stored in the GGUF file at `path`."""
    return tokenizer_json_from_reader(gguf.GGUFReader(path))


def tokenizer_json_from_reader(reader: gguf.GGUFReader) -> str:
    """Like `tokenizer_json_from_gguf`, for a file already open (parsing one takes seconds)."""
    vocab = GGUFVocab.from_reader(reader)
    if vocab.model == "gpt2":
        tokenizer = _byte_level_bpe(vocab)
    elif vocab.model == "llama":
        tokenizer = _sentencepiece_bpe(vocab)
    else:
        raise ValueError(f"unsupported GGUF tokenizer model {vocab.model!r}")
    _add_special_tokens(tokenizer, vocab)
    return tokenizer.to_str()


def _byte_level_bpe(vocab: GGUFVocab) -> Tokenizer:
    merges = [(left, right) for left, _, right in (merge.partition(" ") for merge in vocab.merges)]
    model = models.BPE(
        vocab=vocab.token_ids(),
        merges=merges,
        # Llama 3 looks a whole pre-token up in the vocabulary before merging (llama.cpp too).
        ignore_merges=vocab.pre in _LLAMA3_PRE,
    )
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = _byte_level_pre_tokenizer(vocab.pre)
    if vocab.pre == "qwen2":
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The pre-tokenizer of the HF tokenizer.json that llama.cpp's `tokenizer.ggml.pre` names."""
    if pre in _LLAMA3_PRE or pre == "qwen2":
        split = _QWEN2_SPLIT if pre == "qwen2" else _LLAMA3_SPLIT
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if pre in _DIGITS_PRE:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre not in _GPT2_PRE:
        logger.warning("unknown tokenizer.ggml.pre %r; using the GPT-2 pre-tokenizer", pre)
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _sentencepiece_bpe(vocab: GGUFVocab) -> Tokenizer:
    """The tokenizer LlamaTokenizerFast builds from a SentencePiece BPE model."""
    unk = None if vocab.unknown_token_id is None else vocab.tokens[vocab.unknown_token_id]
    model = models.BPE(
        vocab=vocab.token_ids(),
        merges=_merges_from_scores(vocab),
        unk_token=unk,
        fuse_unk=True,
        byte_fallback=True,
    )
    tokenizer = Tokenizer(model)
    replace_space = normalizers.Replace(" ", _SPIECE_SPACE)
    decode_steps = [
        decoders.Replace(_SPIECE_SPACE, " "),
        decoders.ByteFallback(),
        decoders.Fuse(),
    ]
    if vocab.add_space_prefix:
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.Prepend(_SPIECE_SPACE), replace_space]
        )
        decode_steps.append(decoders.Strip(content=" ", left=1, right=0))
    else:
        tokenizer.normalizer = replace_space
    tokenizer.decoder = decoders.Sequence(decode_steps)
    return tokenizer


def _merges_from_scores(vocab: GGUFVocab) -> list[tuple[str, str]]:
    """BPE merges ranked by the score of the piece they make, highest first.

    SentencePiece merges whichever adjacent pair forms the best-scoring piece; a BPE merge list
    ordered by that score does the same. Only normal pieces take part: control, byte and
    user-defined pieces are never the product of a merge.
    """
    normal = {
        token: score
        for token, kind, score in zip(vocab.tokens, vocab.token_types, vocab.scores, strict=True)
        if kind == gguf.TokenType.NORMAL
    }
    ranked: list[tuple[float, str, str]] = []
    for piece, score in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((score, left, right))
    ranked.sort(key=lambda merge: -merge[0])  # stable: ties keep vocabulary order
    return [(left, right) for _, left, right in ranked]


def _add_special_tokens(tokenizer: Tokenizer, vocab: GGUFVocab) -> None:
    """Register control, unknown and user-defined tokens so raw text can name them."""
    special_kinds = (gguf.TokenType.CONTROL, gguf.TokenType.UNKNOWN)
    special, user = [], []
    for token, kind in zip(vocab.tokens, vocab.token_types, strict=True):
        if kind in special_kinds:
            special.append(AddedToken(token, normalized=False, special=True))
        elif kind == gguf.TokenType.USER_DEFINED:
            user.append(AddedToken(token, normalized=False, special=False))
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(user)
