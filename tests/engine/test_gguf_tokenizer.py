"""tokenizer.json built from GGUF metadata, checked against llama.cpp's own tokenizer."""

import logging
from pathlib import Path
from typing import Any

import gguf
import pytest
from conftest import SMOLLM2_GGUF, TRICKY_STRINGS
from tokenizers import Tokenizer

from mlc_engine.engine.weights.gguf_tokenizer import (
    GGUFVocab,
    tokenizer_json_from_gguf,
    tokenizer_json_from_reader,
)

llama_cpp = pytest.importorskip("llama_cpp")

SMOLLM = SMOLLM2_GGUF

TRICKY = TRICKY_STRINGS


def llama_cpp_ids(path: Path, text: str) -> list[int]:
    vocab = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    ids: list[int] = vocab.tokenize(text.encode(), add_bos=False, special=True)
    return ids


def write_vocab_gguf(path: Path, tokenizer_model: str, **fields: Any) -> Path:
    """A GGUF file with no tensors: just enough llama hyper-parameters for llama.cpp to load."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_feed_forward_length(8)
    writer.add_head_count(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_token_list(fields.pop("tokens"))
    writer.add_token_types(fields.pop("token_types"))
    for key, value in fields.items():
        getattr(writer, f"add_{key}")(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def smollm_reader() -> gguf.GGUFReader:
    return gguf.GGUFReader(SMOLLM)


@pytest.fixture(scope="module")
def smollm(smollm_reader: gguf.GGUFReader) -> Tokenizer:
    return Tokenizer.from_str(tokenizer_json_from_reader(smollm_reader))


@pytest.fixture(scope="module")
def smollm_llama_cpp() -> Any:
    return llama_cpp.Llama(model_path=str(SMOLLM), vocab_only=True, verbose=False)


@pytest.mark.parametrize("text", TRICKY)
def test_smollm_ids_match_llama_cpp(smollm: Tokenizer, smollm_llama_cpp: Any, text: str) -> None:
    expected = smollm_llama_cpp.tokenize(text.encode(), add_bos=False, special=True)
    assert smollm.encode(text, add_special_tokens=False).ids == expected


@pytest.mark.parametrize("text", TRICKY)
def test_smollm_decode_inverts_encode(smollm: Tokenizer, text: str) -> None:
    ids = smollm.encode(text, add_special_tokens=False).ids
    assert smollm.decode(ids, skip_special_tokens=False) == text


def test_smollm_control_tokens_are_special(smollm: Tokenizer) -> None:
    ids = smollm.encode("<|im_start|>hi<|im_end|>", add_special_tokens=False).ids
    assert ids[0] == 1 and ids[-1] == 2
    assert smollm.decode(ids, skip_special_tokens=True) == "hi"
    assert smollm.get_vocab_size(with_added_tokens=True) == 49152


def test_smollm_json_has_no_bos_post_processor(smollm: Tokenizer) -> None:
    assert smollm.post_processor is None
    assert smollm.encode("hi").ids == smollm.encode("hi", add_special_tokens=False).ids


@pytest.fixture(scope="module")
def small_byte_level_vocab(smollm_reader: gguf.GGUFReader) -> dict[str, Any]:
    """SmolLM2's first 3000 tokens (all 256 bytes included) and the merges that stay inside."""
    vocab = GGUFVocab.from_reader(smollm_reader)
    tokens = vocab.tokens[:3000]
    kept = set(tokens)
    merges = []
    for merge in vocab.merges:
        left, _, right = merge.partition(" ")
        if left in kept and right in kept and left + right in kept:
            merges.append(merge)
    return {"tokens": tokens, "token_types": vocab.token_types[:3000], "token_merges": merges}


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "smollm", "gpt-2"])
def test_pre_tokenizer_matches_llama_cpp(
    tmp_path: Path, small_byte_level_vocab: dict[str, Any], pre: str
) -> None:
    path = write_vocab_gguf(
        tmp_path / f"{pre}.gguf", "gpt2", tokenizer_pre=pre, **small_byte_level_vocab
    )
    tokenizer = Tokenizer.from_str(tokenizer_json_from_gguf(path))
    for text in TRICKY:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert ids == llama_cpp_ids(path, text), text
        assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_qwen2_normalizes_to_nfc_like_hugging_face(
    tmp_path: Path, small_byte_level_vocab: dict[str, Any]
) -> None:
    # Qwen2's tokenizer.json has an NFC normalizer; llama.cpp skips it.
    path = write_vocab_gguf(
        tmp_path / "qwen2.gguf", "gpt2", tokenizer_pre="qwen2", **small_byte_level_vocab
    )
    tokenizer = Tokenizer.from_str(tokenizer_json_from_gguf(path))
    decomposed = tokenizer.encode("e\u0301", add_special_tokens=False).ids
    assert decomposed == tokenizer.encode("é", add_special_tokens=False).ids


def test_unknown_pre_tokenizer_falls_back_to_gpt2(
    tmp_path: Path, small_byte_level_vocab: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    unknown = write_vocab_gguf(
        tmp_path / "unknown.gguf", "gpt2", tokenizer_pre="mystery", **small_byte_level_vocab
    )
    gpt2 = write_vocab_gguf(
        tmp_path / "gpt2.gguf", "gpt2", tokenizer_pre="gpt-2", **small_byte_level_vocab
    )
    with caplog.at_level(logging.WARNING):
        text = tokenizer_json_from_gguf(unknown)
    assert "mystery" in caplog.text
    assert text == tokenizer_json_from_gguf(gpt2)


SPIECE_PIECES = ["▁", "h", "e", "l", "o", "w", "r", "d", "é"]
SPIECE_PIECES += ["▁h", "ll", "▁he", "llo", "▁hello", "▁w", "or", "▁wor", "ld", "▁world"]


@pytest.fixture(scope="module")
def sentencepiece_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TinyLlama-shaped vocabulary: <unk>, <s>, </s>, 256 byte tokens, scored pieces, a tool."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += SPIECE_PIECES + ["<tool>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * len(SPIECE_PIECES)
    types += [gguf.TokenType.USER_DEFINED]
    # Later pieces score lower, as in a SentencePiece model trained by frequency.
    scores = [0.0] * 259 + [-float(i) for i in range(len(SPIECE_PIECES))] + [0.0]
    return write_vocab_gguf(
        tmp_path_factory.mktemp("spm") / "tiny.gguf",
        "llama",
        tokens=tokens,
        token_types=types,
        token_scores=scores,
        bos_token_id=1,
        eos_token_id=2,
        unk_token_id=0,
    )


@pytest.fixture(scope="module")
def sentencepiece(sentencepiece_gguf: Path) -> Tokenizer:
    return Tokenizer.from_str(tokenizer_json_from_gguf(sentencepiece_gguf))


SPIECE_TEXTS = [
    "hello world",
    "hello  world",
    " hello",
    "héllo wörld 😀",
    "hello\nworld",
    "<s>hello</s>",
    "say <tool>hello",
    "\n",
    "",
]


def test_sentencepiece_merges_by_score_with_a_space_prefix(sentencepiece: Tokenizer) -> None:
    encoding = sentencepiece.encode("hello world", add_special_tokens=False)
    assert encoding.tokens == ["▁hello", "▁world"]


def test_sentencepiece_falls_back_to_bytes(sentencepiece: Tokenizer) -> None:
    tokens = sentencepiece.encode("wö", add_special_tokens=False).tokens
    assert tokens == ["▁w", "<0xC3>", "<0xB6>"]


@pytest.mark.parametrize("text", SPIECE_TEXTS)
def test_sentencepiece_ids_match_llama_cpp(
    sentencepiece: Tokenizer, sentencepiece_gguf: Path, text: str
) -> None:
    ids = sentencepiece.encode(text, add_special_tokens=False).ids
    assert ids == llama_cpp_ids(sentencepiece_gguf, text)


@pytest.mark.parametrize("text", [t for t in SPIECE_TEXTS if "<" not in t])
def test_sentencepiece_decode_inverts_encode(sentencepiece: Tokenizer, text: str) -> None:
    ids = sentencepiece.encode(text, add_special_tokens=False).ids
    assert sentencepiece.decode(ids, skip_special_tokens=False) == text


def test_sentencepiece_special_and_user_tokens(sentencepiece: Tokenizer) -> None:
    ids = sentencepiece.encode("<s>hello<tool></s>", add_special_tokens=False).ids
    assert ids == [1, sentencepiece.token_to_id("▁hello"), sentencepiece.token_to_id("<tool>"), 2]
    assert sentencepiece.decode(ids) == "hello<tool>"


def test_sentencepiece_text_after_a_special_token_gets_a_space_prefix(
    sentencepiece: Tokenizer,
) -> None:
    # Llama 2's "legacy" behaviour, kept by HF's tokenizer.json and by llama.cpp alike.
    ids = sentencepiece.encode("<tool>hello", add_special_tokens=False).ids
    assert ids == [sentencepiece.token_to_id("<tool>"), sentencepiece.token_to_id("▁hello")]
    assert sentencepiece.decode(ids) == "<tool> hello"
