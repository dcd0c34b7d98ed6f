"""Bad and hostile input over real HTTP: each is answered at once with a 4xx naming what is
wrong, never a 5xx or a hang, and the server keeps serving (issue 14)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import engine_process, running_server, serve_command

from mlc_engine.common.config import ModelConfig
from mlc_engine.common.protocol import SamplingParams
from mlc_engine.frontend.errors import EngineFailureError
from mlc_engine.frontend.generation import Generation
from mlc_engine.frontend.metrics import Metrics
from mlc_engine.frontend.schemas import MAX_PROMPTS
from mlc_engine.frontend.text import Tokenizer

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HELLO = [{"role": "user", "content": "Hello there"}]


def _bad_request(url: str, route: str, body: dict | bytes) -> dict:
    """The error body of a request that must be answered 400, promptly."""
    if isinstance(body, bytes):
        headers = {"Content-Type": "application/json"}
        response = httpx.post(url + route, content=body, headers=headers, timeout=10)
    else:
        response = httpx.post(url + route, json=body, timeout=10)
    assert response.status_code == 400, response.text
    error: dict = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    return error


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        (COMPLETIONS, {"prompt": "Hi", "seed": 2**64}, "seed"),
        (COMPLETIONS, {"prompt": "Hi", "top_k": 1180591620717411303424}, "top_k"),
        (CHAT, {"messages": HELLO, "seed": -(2**64)}, "seed"),
        (CHAT, {"messages": HELLO, "max_tokens": 2**70}, "max_tokens"),
        (COMPLETIONS, {"prompt": [2**70, 5]}, "prompt"),
        ("/detokenize", {"tokens": [2**64]}, "tokens.0"),
    ],
)
def test_out_of_range_integers_are_a_400_naming_the_field(
    tiny_server_url: str, route: str, body: dict, param: str
) -> None:
    error = _bad_request(tiny_server_url, route, body)
    assert error["param"] == param and param.split(".")[0] in error["message"]


@pytest.mark.parametrize(
    ("route", "raw", "param"),
    [
        (CHAT, b'{"messages": [{"role": "user", "content": "Hi \\ud800 there"}]}', "content"),
        (COMPLETIONS, b'{"prompt": "Hi \\udfff"}', "prompt"),
        (CHAT, b'{"messages": [{"role": "user", "content": "Hi"}], "stop": ["\\ud800"]}', "stop"),
    ],
)
def test_a_lone_surrogate_is_a_400(
    tiny_server_url: str, route: str, raw: bytes, param: str
) -> None:
    error = _bad_request(tiny_server_url, route, raw)
    assert param in error["param"] and "surrogate" in error["message"]
    pair = raw.replace(b"\\ud800", b"\\ud83d\\ude00").replace(b"\\udfff", b"\\ud83d\\ude00")
    headers = {"Content-Type": "application/json"}
    fine = httpx.post(tiny_server_url + route, content=pair, headers=headers, timeout=60)
    assert fine.status_code == 200, fine.text  # a surrogate pair is one emoji: fine


SHARED_NULLS = [
    "model", "temperature", "top_p", "top_k", "min_p", "n", "stop", "seed", "presence_penalty",
    "frequency_penalty", "repetition_penalty", "logit_bias", "ignore_eos", "stream",
    "stream_options", "user", "logprobs", "max_tokens",
]  # fmt: skip


def test_explicit_null_means_the_default(tiny_server_url: str) -> None:
    chat_nulls = [*SHARED_NULLS, "top_logprobs", "max_completion_tokens", "response_format"]
    body = {"messages": HELLO, **dict.fromkeys(chat_nulls)}
    reply = httpx.post(tiny_server_url + CHAT, json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["logprobs"] is None
    body = {"prompt": "Hi", **dict.fromkeys([*SHARED_NULLS, "echo", "suffix"])}
    reply = httpx.post(tiny_server_url + COMPLETIONS, json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] <= 16  # max_tokens' default for completions


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        (CHAT, {"messages": HELLO, "functions": []}, "functions"),
        (CHAT, {"messages": HELLO, "function_call": "auto"}, "function_call"),
        (CHAT, {"messages": HELLO, "temprature": 0.5}, "temprature"),
        (COMPLETIONS, {"prompt": "Hi", "best_of": 2}, "best_of"),
        (CHAT, {"messages": [{"role": "assistant", "function_call": {}}]}, "messages.0"),
    ],
)
def test_fields_not_implemented_are_refused_by_name(
    tiny_server_url: str, route: str, body: dict, param: str
) -> None:
    error = _bad_request(tiny_server_url, route, body)
    assert error["param"] == param and "does not support" in error["message"]


def test_fields_that_change_nothing_are_accepted(tiny_server_url: str) -> None:
    body = {"messages": HELLO, "max_tokens": 2, "store": False, "metadata": {"a": "b"}}
    reply = httpx.post(tiny_server_url + CHAT, json={**body, "service_tier": "auto"}, timeout=60)
    assert reply.status_code == 200, reply.text


def test_prompts_per_call_are_bounded(tiny_server_url: str) -> None:
    body = {"prompt": [[1, 2]] * (MAX_PROMPTS + 1), "max_tokens": 1}
    assert "prompt" in _bad_request(tiny_server_url, COMPLETIONS, body)["param"]
    body = {"prompt": ["Hi"] * MAX_PROMPTS, "max_tokens": 1, "n": 16}
    error = _bad_request(tiny_server_url, COMPLETIONS, body)
    assert error["param"] == "n" and f"{MAX_PROMPTS * 16} sequences" in error["message"]


def _eos_id(url: str) -> int:
    reply = httpx.post(
        f"{url}/tokenize", json={"prompt": "<|im_end|>", "add_special_tokens": False}
    )
    (eos,) = reply.json()["tokens"]
    return int(eos)


def test_echo_logprobs_include_the_sampled_stop_token(tiny_server_url: str) -> None:
    """lm-evaluation-harness reads token_logprobs[ctxlen:-1]: the sampled stop token must be the
    last entry, with text "" and its logprob."""
    eos = _eos_id(tiny_server_url)
    prompt = [300, 420, 770, 3000]  # no special tokens, so the text and its offsets agree
    body = {"prompt": prompt, "max_tokens": 5, "echo": True, "logprobs": 1}
    reply = httpx.post(
        tiny_server_url + COMPLETIONS, json={**body, "logit_bias": {str(eos): 100}}, timeout=60
    ).json()
    choice = reply["choices"][0]
    logprobs = choice["logprobs"]
    assert choice["finish_reason"] == "stop"
    assert len(logprobs["tokens"]) == len(prompt) + 1 and logprobs["tokens"][-1] == ""
    # The model's own logprob of the token, before the logit bias that forced it.
    assert logprobs["token_logprobs"][0] is None and logprobs["token_logprobs"][-1] < 0
    assert logprobs["text_offset"][-1] == len(choice["text"])
    assert reply["usage"]["completion_tokens"] == 1
    streamed = {**body, "logit_bias": {str(eos): 100}, "stream": True}
    with httpx.stream("POST", tiny_server_url + COMPLETIONS, json=streamed, timeout=60) as response:
        chunks = [
            json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")
        ]
    tokens = [token for chunk in chunks for token in chunk["choices"][0]["logprobs"]["tokens"]]
    assert tokens == logprobs["tokens"]


def test_a_stop_token_in_chat_logprobs_has_no_text(tiny_server_url: str) -> None:
    eos = _eos_id(tiny_server_url)
    body = {"messages": HELLO, "max_tokens": 5, "logprobs": True, "logit_bias": {str(eos): 100}}
    reply = httpx.post(tiny_server_url + CHAT, json=body, timeout=60).json()
    choice = reply["choices"][0]
    assert choice["message"]["content"] == "" and choice["finish_reason"] == "stop"
    (entry,) = choice["logprobs"]["content"]
    assert entry["token"] == "" and entry["bytes"] == [] and entry["logprob"] < 0


@pytest.fixture(scope="module")
def two_worker_server(tiny_chat_model: Path) -> Iterator[str]:
    """Two uvicorn workers sharing one engine that takes one sequence and queues none."""
    options = ("--workers", "2", "--max-num-seqs", "1", "--max-queue", "0")
    with running_server(serve_command(tiny_chat_model, *options)) as url:
        yield url


def _answers_while_busy(url: str) -> list[httpx.Response]:
    """Short requests, one at a time, each answered while a long stream certainly ran (it ran
    before, and the engine still ran it after): until the engine itself refuses one."""
    long = {"messages": HELLO, "max_tokens": 990, "ignore_eos": True, "stream": True}
    short = {"messages": HELLO, "max_tokens": 1}
    answers: list[httpx.Response] = []
    with httpx.stream("POST", url + CHAT, json=long, timeout=60) as response:
        lines = response.iter_lines()  # kept: a dropped iterator closes the connection
        next(lines)
        for _ in range(40):
            answer = httpx.post(url + CHAT, json=short, timeout=30)
            if _running(url) != 1:
                break
            answers.append(answer)
            if "the engine is full" in answer.text:
                break
    return answers


def test_the_queue_limit_holds_across_uvicorn_workers(two_worker_server: str) -> None:
    """While one long stream runs, every other request is a 429, whichever worker takes it:
    each worker alone would count nothing running and let it through."""
    answers: list[httpx.Response] = []
    for _ in range(5):  # a busy host may end the long stream before a request meets the engine
        answers += _answers_while_busy(two_worker_server)
        if answers and "the engine is full" in answers[-1].text:
            break
    assert [r.status_code for r in answers] == [429] * len(answers), [r.text for r in answers]
    assert all(r.json()["error"]["code"] == "queue_full" for r in answers)
    # One went to the worker that runs nothing itself: refused by the engine, not the worker.
    assert answers and "the engine is full" in answers[-1].text
    deadline = time.monotonic() + 10  # the long stream's abort is on its way to the engine
    while _running(two_worker_server) and time.monotonic() < deadline:
        time.sleep(0.05)
    short = {"messages": HELLO, "max_tokens": 1}
    assert httpx.post(two_worker_server + CHAT, json=short, timeout=30).status_code == 200


def _running(url: str) -> int:
    stats = httpx.get(f"{url}/verbose_stats", timeout=30).json()
    return int(stats["engines"][0]["num_running"])


def test_a_failure_inside_a_request_ends_it_at_once(tiny_chat_model: Path, tmp_path: Path) -> None:
    """A request whose parameters cannot even be sent (a seed msgpack cannot hold, past the
    HTTP checks) fails with an error instead of waiting forever."""
    config = ModelConfig.load(tiny_chat_model)
    tokenizer = Tokenizer.from_folder(tiny_chat_model, config)

    async def run() -> None:
        client = started.client()
        await client.connect(timeout=300)
        try:
            params = SamplingParams(max_tokens=4, seed=2**64)
            generation = Generation(
                client, tokenizer, "r1", [[1, 2, 3]], params, [], Metrics(lambda: [], lambda: [])
            )
            with pytest.raises(EngineFailureError, match="OverflowError"):
                async with asyncio.timeout(10):
                    async for _ in generation.deltas():
                        pass
            assert client.num_sequences == 0
        finally:
            await client.close()

    with engine_process(tiny_chat_model, tmp_path) as started:
        asyncio.run(run())
