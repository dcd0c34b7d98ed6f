"""`mlc-engine serve` as a client sees it: a real server process on 127.0.0.1, a real engine,
the tiny chat model (SmolLM2's tokenizer and template, random weights)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "Hello there"}]


def events(response: httpx.Response) -> list[str]:
    return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


def test_chat_completion_has_text_usage_and_ids(tiny_server_url: str) -> None:
    body = {"model": "x", "messages": HELLO, "max_tokens": 7, "temperature": 0, "ignore_eos": True}
    reply = httpx.post(tiny_server_url + CHAT, json=body, timeout=60).json()
    assert reply["object"] == "chat.completion" and reply["id"].startswith("chatcmpl-")
    assert reply["model"] == "tiny-chat-q0f32" and isinstance(reply["created"], int)
    choice = reply["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert choice["finish_reason"] == "length"
    assert reply["usage"]["completion_tokens"] == 7
    prompt = httpx.post(f"{tiny_server_url}/tokenize", json={"messages": HELLO}).json()
    assert reply["usage"]["prompt_tokens"] == prompt["count"]


def test_streamed_chat_matches_the_whole_reply(tiny_server_url: str) -> None:
    body = {"messages": HELLO, "max_tokens": 9, "temperature": 0, "ignore_eos": True}
    whole = httpx.post(tiny_server_url + CHAT, json=body, timeout=60).json()
    stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", tiny_server_url + CHAT, json=stream_body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        data = events(response)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(item) for item in data[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_completions_take_token_ids_lists_and_echo_logprobs(tiny_server_url: str) -> None:
    body = {
        "prompt": ["The cat", "A dog"],
        "max_tokens": 3,
        "temperature": 0,
        "logprobs": 2,
        "echo": True,
        "ignore_eos": True,
    }
    reply = httpx.post(f"{tiny_server_url}/v1/completions", json=body, timeout=60).json()
    assert [c["index"] for c in reply["choices"]] == [0, 1]
    first = reply["choices"][0]
    assert first["text"].startswith("The cat")
    logprobs = first["logprobs"]
    prompt_len = len(
        httpx.post(f"{tiny_server_url}/tokenize", json={"prompt": "The cat"}).json()["tokens"]
    )
    assert len(logprobs["tokens"]) == prompt_len + 3
    assert logprobs["token_logprobs"][0] is None
    assert all(lp <= 0 for lp in logprobs["token_logprobs"][1:])
    assert all(len(top) <= 2 for top in logprobs["top_logprobs"][1:])
    assert reply["usage"]["completion_tokens"] == 6
    ids = {**body, "prompt": [[504, 3458, 314], [504]], "echo": False}
    by_ids = httpx.post(f"{tiny_server_url}/v1/completions", json=ids, timeout=60).json()
    assert by_ids["usage"]["prompt_tokens"] == 4 and len(by_ids["choices"]) == 2


def test_max_tokens_zero_with_echo_scores_the_prompt(tiny_server_url: str) -> None:
    body = {"prompt": "One two three four", "max_tokens": 0, "logprobs": 1, "echo": True}
    reply = httpx.post(f"{tiny_server_url}/v1/completions", json=body, timeout=60).json()
    choice = reply["choices"][0]
    assert choice["text"] == "One two three four"
    assert choice["logprobs"]["token_logprobs"][0] is None
    assert len(choice["logprobs"]["token_logprobs"]) == reply["usage"]["prompt_tokens"]
    assert reply["usage"]["completion_tokens"] == 0


def test_stop_strings_cut_the_text(tiny_server_url: str) -> None:
    body = {"messages": HELLO, "max_tokens": 30, "temperature": 0, "ignore_eos": True}
    text = httpx.post(tiny_server_url + CHAT, json=body, timeout=60).json()["choices"][0]
    content = text["message"]["content"]
    stop = content[5:8]
    cut = httpx.post(tiny_server_url + CHAT, json={**body, "stop": [stop]}, timeout=60).json()
    assert cut["choices"][0]["message"]["content"] == content[: content.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": HELLO, "temperature": "hot"}, "temperature"),
        ({"messages": HELLO, "temperature": 3}, "temperature"),
        ({"messages": HELLO, "top_p": 0}, "top_p"),
        # Each rounded to 0 in the engine's float32 sampling and failed its whole step (a 500).
        ({"messages": HELLO, "top_p": 5e-324}, "top_p"),
        ({"messages": HELLO, "repetition_penalty": 1e-300}, "repetition_penalty"),
        ({"messages": HELLO, "n": 0}, "n"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"messages": HELLO, "max_tokens": -1}, "max_tokens"),
        ({"messages": HELLO, "logit_bias": {"x": 1}}, "logit_bias"),
        ({"messages": HELLO, "logit_bias": {"99999999": 1}}, "logit_bias"),
        ({"messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": [{"role": "user", "content": "word " * 2000}]}, "messages"),
        ({"messages": HELLO, "max_tokens": 100000}, "max_tokens"),
    ],
)
def test_invalid_requests_get_400_naming_the_field(
    tiny_server_url: str, body: dict, param: str
) -> None:
    response = httpx.post(tiny_server_url + CHAT, json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param and param.split(".")[0] in error["message"]


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_bad_json_gets_400_and_the_server_stays_up(tiny_server_url: str, raw: bytes) -> None:
    response = httpx.post(tiny_server_url + CHAT, content=raw, timeout=30)
    assert response.status_code == 400 and "error" in response.json()
    assert httpx.get(f"{tiny_server_url}/health").status_code == 200


def test_unknown_route_is_404_in_openai_shape(tiny_server_url: str) -> None:
    response = httpx.get(f"{tiny_server_url}/v1/nothing")
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"


def _kv_free(url: str) -> int:
    stats = httpx.get(f"{url}/verbose_stats", timeout=30).json()
    return sum(engine["kv_pages_free"] for engine in stats["engines"])


def _decoded(url: str) -> int:
    return int(httpx.get(f"{url}/verbose_stats", timeout=30).json()["decode_tokens"])


def test_client_disconnect_frees_kv_pages(tiny_server_url: str) -> None:
    idle, decoded = _kv_free(tiny_server_url), _decoded(tiny_server_url)
    body = {"messages": HELLO, "max_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", tiny_server_url + CHAT, json=body, timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
        assert _kv_free(tiny_server_url) < idle
    deadline = time.monotonic() + 5
    while _kv_free(tiny_server_url) < idle and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _kv_free(tiny_server_url) == idle
    assert _decoded(tiny_server_url) - decoded < 800  # aborted, not run to the end


def test_a_client_that_gives_up_on_a_whole_reply_frees_kv_pages(tiny_server_url: str) -> None:
    idle, decoded = _kv_free(tiny_server_url), _decoded(tiny_server_url)
    body = {"messages": HELLO, "max_tokens": 900, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(tiny_server_url + CHAT, json=body, timeout=httpx.Timeout(5, read=0.5))
    deadline = time.monotonic() + 5
    while _kv_free(tiny_server_url) < idle and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _kv_free(tiny_server_url) == idle
    assert _decoded(tiny_server_url) - decoded < 800  # aborted, not run to the end


def test_models_health_tokenize_detokenize_and_metrics(tiny_server_url: str) -> None:
    models = httpx.get(f"{tiny_server_url}/v1/models").json()
    assert models["data"][0]["id"] == "tiny-chat-q0f32"
    assert httpx.get(f"{tiny_server_url}/health").json() == {"status": "ok"}
    tokens = httpx.post(f"{tiny_server_url}/tokenize", json={"prompt": "Hello world"}).json()
    text = httpx.post(f"{tiny_server_url}/detokenize", json={"tokens": tokens["tokens"]}).json()
    assert text["prompt"] == "Hello world"
    httpx.post(tiny_server_url + CHAT, json={"messages": HELLO, "max_tokens": 3}, timeout=60)
    metrics = httpx.get(f"{tiny_server_url}/metrics").text
    for name in (
        "mlc_engine_prompt_tokens_total",
        "mlc_engine_generation_tokens_total",
        "mlc_engine_time_to_first_token_seconds_bucket",
        "mlc_engine_inter_token_latency_seconds_bucket",
        'mlc_engine_kv_pages_free{engine="0"}',
        'mlc_engine_num_waiting{engine="0"}',
        'mlc_engine_kv_pages_cached{engine="0"}',
        'mlc_engine_prefix_cache_hit_tokens{engine="0"}',
    ):
        assert name in metrics


def test_openapi_lists_every_endpoint_and_docs_are_served(tiny_server_url: str) -> None:
    spec = httpx.get(f"{tiny_server_url}/openapi.json").json()
    for path in (CHAT, "/v1/completions", "/v1/models", "/chat/reset", "/stats",
                 "/verbose_stats", "/health", "/metrics", "/tokenize", "/detokenize"):  # fmt: skip
        assert path in spec["paths"]
    chat_schema = spec["components"]["schemas"]["ChatCompletionRequest"]
    assert "stream_options" in chat_schema["properties"]
    replies = spec["paths"][CHAT]["post"]["responses"]
    ok = replies["200"]["content"]
    assert ok["application/json"]["schema"]["$ref"].endswith("/ChatCompletion")
    assert ok["text/event-stream"]["schema"]["$ref"].endswith("/StreamEvent")
    error = replies["default"]["content"]["application/json"]["schema"]
    assert error["$ref"].endswith("/ErrorResponse")
    page = httpx.get(f"{tiny_server_url}/docs")
    assert page.status_code == 200 and "swagger-ui-bundle.js" in page.text
    script = httpx.get(f"{tiny_server_url}/docs/static/swagger-ui-bundle.js")
    assert script.status_code == 200 and len(script.content) > 100_000


def test_api_key_is_required_when_set(guarded_server: str) -> None:
    body = {"messages": HELLO, "max_tokens": 2}
    response = httpx.post(guarded_server + CHAT, json=body, timeout=30)
    assert (
        response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    )
    wrong = {"Authorization": "Bearer nope"}
    assert (
        httpx.post(guarded_server + CHAT, json=body, headers=wrong, timeout=30).status_code == 401
    )
    right = {"Authorization": "Bearer sesame"}
    assert (
        httpx.post(guarded_server + CHAT, json=body, headers=right, timeout=60).status_code == 200
    )
    assert httpx.get(f"{guarded_server}/health").status_code == 200


def test_a_full_queue_answers_429_with_retry_after(guarded_server: str) -> None:
    headers = {"Authorization": "Bearer sesame"}
    body = {"messages": HELLO, "max_tokens": 900, "ignore_eos": True}

    def post(_: int) -> httpx.Response:
        return httpx.post(guarded_server + CHAT, json=body, headers=headers, timeout=120)

    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(post, range(4)))
    statuses = sorted(response.status_code for response in responses)
    assert statuses[0] == 200 and statuses[-1] == 429
    busy = next(response for response in responses if response.status_code == 429)
    assert int(busy.headers["Retry-After"]) >= 1
    assert busy.json()["error"]["type"] == "rate_limit_error"


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="needs Chromium (apt-get install chromium)"
)
def test_docs_render_every_route_in_headless_chromium(tiny_server_url: str, tmp_path: Path) -> None:
    script = Path(__file__).parents[2] / "scripts" / "docs_screenshot.py"
    shot = tmp_path / "docs.png"
    result = subprocess.run(
        [sys.executable, str(script), tiny_server_url, "--output", str(shot)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "10 of 10 routes listed" in result.stdout
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cors_headers_for_an_allowed_origin(guarded_server: str) -> None:
    allowed = httpx.get(f"{guarded_server}/health", headers={"Origin": "http://app.example"})
    assert allowed.headers["Access-Control-Allow-Origin"] == "http://app.example"
    other = httpx.get(f"{guarded_server}/health", headers={"Origin": "http://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers


def test_a_body_over_the_limit_gets_413(tiny_server_url: str) -> None:
    huge = {"messages": [{"role": "user", "content": "x" * (9 * 1024 * 1024)}]}
    response = httpx.post(tiny_server_url + CHAT, json=huge, timeout=60)
    assert response.status_code == 413 and "larger than" in response.json()["error"]["message"]
