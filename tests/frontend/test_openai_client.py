"""The official `openai` Python client, unmodified, against `mlc-engine serve` (tiny model)."""

from __future__ import annotations

import asyncio

import openai
import pytest

MESSAGES = [{"role": "user", "content": "Tell me a story"}]


@pytest.fixture
def client(tiny_server_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{tiny_server_url}/v1", api_key="unused", max_retries=0)


def test_sync_chat_completion(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=5,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 5


def test_async_chat_completions_run_concurrently(tiny_server_url: str) -> None:
    async def main() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{tiny_server_url}/v1", api_key="unused")
        replies = await asyncio.gather(
            *(
                client.chat.completions.create(
                    model="tiny", messages=MESSAGES, max_tokens=6, temperature=0
                )
                for _ in range(4)
            )
        )
        await client.close()
        return [reply.choices[0].message.content or "" for reply in replies]

    texts = asyncio.run(main())
    assert len(set(texts)) == 1 and texts[0]


def test_streaming_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=8,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8


def test_n_choices_with_logprobs(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=4,
        n=2,
        seed=5,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    assert [choice.index for choice in reply.choices] == [0, 1]
    for choice in reply.choices:
        assert choice.logprobs is not None and choice.logprobs.content is not None
        assert len(choice.logprobs.content) == 4
        for token in choice.logprobs.content:
            assert token.logprob <= 0 and len(token.top_logprobs) == 3
            assert token.top_logprobs[0].logprob >= token.logprob
    assert reply.usage is not None and reply.usage.completion_tokens == 8


def test_legacy_completions_and_models(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="tiny", prompt="Once upon", max_tokens=3, logprobs=1)
    assert reply.choices[0].logprobs is not None
    assert [model.id for model in client.models.list()] == ["tiny-chat-q0f32"]


def test_errors_arrive_as_openai_exceptions(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=5)
    assert "temperature" in str(caught.value)
