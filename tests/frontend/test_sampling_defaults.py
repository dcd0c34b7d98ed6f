"""The model's recommended sampling over real HTTP: a request that leaves a field out, or sends
null, gets mlc-chat-config.json's value; one that sets it keeps its own.

The served model is the tiny chat model with its config edited by hand to recommend greedy
decoding. Which temperature a reply was drawn at shows in its logprobs: greedy decoding picks
the most likely token every time, while temperature 1 on these random weights soon picks
another (every draw is seeded, so each assertion holds the same way on every run).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import running_server, serve_command

from mlc_engine.common.config import CONFIG_FILE

HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def greedy_model(tiny_chat_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("edited") / "tiny-chat-greedy"
    shutil.copytree(tiny_chat_model, folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert config["sampling"] == {}
    config["sampling"] = {"temperature": 0}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return folder


@pytest.fixture(scope="module")
def greedy_server(
    greedy_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    """The server's URL, and the file its stderr (where `serve` reports) goes to."""
    log = tmp_path_factory.mktemp("logs") / "stderr.txt"
    with log.open("w") as stderr, running_server(serve_command(greedy_model), stderr=stderr) as url:
        yield url, log


@pytest.fixture(scope="module")
def greedy_url(greedy_server: tuple[str, Path]) -> str:
    return greedy_server[0]


def picked_most_likely(url: str, route: str, fields: dict) -> list[bool]:
    """For each generated token, whether it was the most likely one."""
    body = {"max_tokens": 12, "ignore_eos": True, "seed": 3, **fields}
    if route == "chat":
        body |= {"messages": HELLO, "logprobs": True, "top_logprobs": 1}
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        tokens = reply.json()["choices"][0]["logprobs"]["content"]
        return [token["logprob"] == token["top_logprobs"][0]["logprob"] for token in tokens]
    body |= {"prompt": "Hello there", "logprobs": 1}
    reply = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    logprobs = reply.json()["choices"][0]["logprobs"]
    return [
        chosen == max(top.values())
        for chosen, top in zip(logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True)
    ]


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_omitted_or_null_fields_get_the_models_default(greedy_url: str, route: str) -> None:
    assert all(picked_most_likely(greedy_url, route, {}))
    assert all(picked_most_likely(greedy_url, route, {"temperature": None, "top_p": None}))


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_an_explicit_value_wins_over_the_models_default(greedy_url: str, route: str) -> None:
    picks = picked_most_likely(greedy_url, route, {"temperature": 1.0})
    assert len(picks) == 12 and not all(picks)


def test_a_model_without_defaults_samples_at_temperature_one(tiny_server_url: str) -> None:
    assert not all(picked_most_likely(tiny_server_url, "chat", {}))


def test_serve_shows_the_models_defaults_at_start(
    greedy_model: Path, greedy_server: tuple[str, Path]
) -> None:
    where = greedy_model / CONFIG_FILE
    shown = f"sampling defaults from {where}: temperature 0 (a request's own values win)\n"
    assert shown in greedy_server[1].read_text()


def test_models_route_reports_the_defaults_a_request_gets(
    greedy_url: str, tiny_server_url: str
) -> None:
    def model(url: str) -> dict:
        return httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]

    neutral = {
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
    }
    assert model(tiny_server_url)["sampling"] == neutral
    assert model(greedy_url)["sampling"] == neutral | {"temperature": 0.0}
    assert model(greedy_url)["max_model_len"] == 1024
