"""Tokenizer, chat template and streaming detokenizer on SmolLM2's real vocabulary and template."""

from typing import Any

import gguf
import pytest
from conftest import SMOLLM2_GGUF, TRICKY_STRINGS

from mlc_engine.common.config import ModelConfig
from mlc_engine.engine.weights.gguf_tokenizer import (
    tokenizer_json_from_gguf,
    tokenizer_json_from_reader,
)
from mlc_engine.frontend.text import (
    ChatTemplate,
    ChatTemplateError,
    IncrementalDetokenizer,
    Tokenizer,
)
from mlc_engine.frontend.text.chat_template import CHATML_TEMPLATE
from mlc_engine.frontend.text.tokenizer import TOKENIZER_FILE

SMOLLM = SMOLLM2_GGUF

TRICKY = TRICKY_STRINGS


def model_config(**overrides: Any) -> ModelConfig:
    sizes: dict[str, Any] = dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        vocab_size=49152,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        context_window_size=2048,
    )
    return ModelConfig(**{**sizes, **overrides})


@pytest.fixture(scope="module")
def smollm_reader() -> gguf.GGUFReader:
    return gguf.GGUFReader(SMOLLM)


@pytest.fixture(scope="module")
def smollm_template(smollm_reader: gguf.GGUFReader) -> str:
    template: str = smollm_reader.fields["tokenizer.chat_template"].contents()
    return template


@pytest.fixture(scope="module")
def smollm_config(smollm_template: str) -> ModelConfig:
    return model_config(
        bos_token_id=1, eos_token_ids=[2], add_bos_token=False, chat_template=smollm_template
    )


@pytest.fixture(scope="module")
def smollm(
    tmp_path_factory: pytest.TempPathFactory,
    smollm_reader: gguf.GGUFReader,
    smollm_config: ModelConfig,
) -> Tokenizer:
    folder = tmp_path_factory.mktemp("smollm")
    tokenizer_json = tokenizer_json_from_reader(smollm_reader)
    (folder / TOKENIZER_FILE).write_text(tokenizer_json, encoding="utf-8")
    return Tokenizer.from_folder(folder, smollm_config)


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """A tiny Llama 2-style vocabulary: spaces become '▁' and the decoder strips the first."""
    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "ll", "▁he", "llo", "▁hello"]
    pieces += ["▁w", "or", "▁wor", "ld", "▁world"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * len(pieces)
    path = tmp_path_factory.mktemp("spm") / "tiny.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(pieces))])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    folder = path.parent
    (folder / TOKENIZER_FILE).write_text(tokenizer_json_from_gguf(path), encoding="utf-8")
    return Tokenizer.from_folder(folder, model_config(bos_token_id=1, eos_token_ids=[2]))


def test_encode_recognizes_special_tokens_in_text(smollm: Tokenizer) -> None:
    ids = smollm.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == smollm.token_to_id("<|im_start|>") == 1
    assert ids[-1] == smollm.token_to_id("<|im_end|>") == 2
    assert smollm.decode(ids) == "user\nhi"
    assert smollm.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"


def test_bos_follows_the_config_and_is_never_doubled(smollm: Tokenizer) -> None:
    assert smollm.encode("hi")[0] != 1
    assert smollm.encode("hi", add_bos=True)[0] == 1
    assert smollm.encode("<|im_start|>hi", add_bos=True).count(1) == 1


def test_tokenizer_reports_vocabulary_and_special_ids(smollm: Tokenizer) -> None:
    assert smollm.vocab_size == 49152
    assert smollm.id_to_token(2) == "<|im_end|>"
    assert smollm.token_to_id("no such token") is None
    assert (smollm.bos_token_id, smollm.eos_token_ids) == (1, [2])
    assert (smollm.bos_token, smollm.eos_token) == ("<|im_start|>", "<|im_end|>")


def test_smollm_template_renders_chatml(smollm: Tokenizer, smollm_config: ModelConfig) -> None:
    template = ChatTemplate.from_config(smollm_config, smollm)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
    ]
    assert template.render(messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_smollm_template_adds_its_default_system_prompt(smollm_template: str) -> None:
    template = ChatTemplate(smollm_template)
    rendered = template.render([{"role": "user", "content": "Hi!"}], add_generation_prompt=False)
    assert rendered == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
    )


def test_missing_template_falls_back_to_chatml(smollm: Tokenizer) -> None:
    template = ChatTemplate.from_config(model_config(), smollm)
    assert template.source == CHATML_TEMPLATE
    rendered = template.render([{"role": "user", "content": "Hi"}])
    assert rendered == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_template_sees_special_tokens_kwargs_and_transformers_helpers() -> None:
    source = (
        "{{ bos_token }}{% for m in messages %}{{ m | tojson }}{% endfor %}"
        "{% if tools is not none %}tools{% endif %}{{ greeting }}{{ strftime_now('%Y')[:2] }}"
    )
    rendered = ChatTemplate(source, bos_token="<s>").render(
        [{"role": "user", "content": "<b>é</b>"}], greeting="!"
    )
    assert rendered == '<s>{"role": "user", "content": "<b>é</b>"}!20'


def test_raise_exception_becomes_chat_template_error() -> None:
    source = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Roles must alternate') }}"
    source += "{% endif %}"
    with pytest.raises(ChatTemplateError, match="Roles must alternate"):
        ChatTemplate(source).render([{"role": "assistant", "content": "x"}])


def test_broken_template_is_a_chat_template_error() -> None:
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for m in messages %}")
    with pytest.raises(ChatTemplateError):
        ChatTemplate(CHATML_TEMPLATE).render([{"role": "user", "content": None}])


def stream(detokenizer: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    chunks = [detokenizer.push([token_id]) for token_id in ids]
    return chunks + [detokenizer.flush()]


@pytest.mark.parametrize("text", TRICKY)
def test_streaming_one_token_at_a_time_gives_the_full_decode(smollm: Tokenizer, text: str) -> None:
    ids = smollm.encode(text)
    chunks = stream(IncrementalDetokenizer(smollm), ids)
    assert "".join(chunks) == smollm.decode(ids)
    assert not any("\ufffd" in chunk for chunk in chunks)


def test_emoji_split_across_tokens_comes_out_whole(smollm: Tokenizer) -> None:
    ids = smollm.encode("ok 😀")
    assert len(ids) > 2  # the emoji's four bytes span several byte-level tokens
    chunks = [chunk for chunk in stream(IncrementalDetokenizer(smollm), ids) if chunk]
    assert chunks[-1].endswith("😀") and "".join(chunks) == "ok 😀"


def test_flush_returns_an_unfinished_character(smollm: Tokenizer) -> None:
    first_byte = smollm.encode("😀")[0]
    detokenizer = IncrementalDetokenizer(smollm)
    assert detokenizer.push([first_byte]) == ""
    assert detokenizer.flush() == smollm.decode([first_byte])


def test_streaming_skips_or_keeps_special_tokens(smollm: Tokenizer) -> None:
    ids = smollm.encode("hi<|im_end|>")
    assert "".join(stream(IncrementalDetokenizer(smollm), ids)) == "hi"
    keep = IncrementalDetokenizer(smollm, skip_special_tokens=False)
    assert "".join(stream(keep, ids)) == "hi<|im_end|>"


def test_sentencepiece_streaming_keeps_spaces_between_words(sentencepiece: Tokenizer) -> None:
    ids = sentencepiece.encode("hello world wörld")
    chunks = stream(IncrementalDetokenizer(sentencepiece), ids)
    assert "".join(chunks) == "hello world wörld"


def test_sentencepiece_first_output_token_keeps_its_space_after_the_prompt(
    sentencepiece: Tokenizer,
) -> None:
    prompt = sentencepiece.encode("hello")
    detokenizer = IncrementalDetokenizer(sentencepiece, prompt_ids=prompt)
    assert detokenizer.push(sentencepiece.encode("world")) == " world"
