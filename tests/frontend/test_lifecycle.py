"""The server's process tree: clean shutdown, a dead engine, several workers, and curl."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from conftest import free_port, running_server, serve_command

HELLO = [{"role": "user", "content": "Hello"}]


def _children(pid: int) -> list[int]:
    """Every process descended from `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid:
                found.append(int(entry.name))
    return found + [grandchild for child in found for grandchild in _children(child)]


def _engine_pids(server_pid: int) -> list[int]:
    pids = []
    for pid in _children(server_pid):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"engine" in command:
            pids.append(pid)
    return pids


def test_sigterm_stops_engines_and_removes_the_run_directory(tiny_chat_model: Path) -> None:
    port = free_port()
    command = [*serve_command(tiny_chat_model), "--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        ready = ""
        while "ready at" not in ready and time.monotonic() < deadline:
            ready = process.stdout.readline() if process.stdout else ""
            assert process.poll() is None
        engines = _engine_pids(process.pid)
        assert engines
        sockets = [
            arg.decode().removeprefix("ipc://")
            for pid in engines
            for arg in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if arg.startswith(b"ipc://")
        ]
        assert sockets and all(Path(path).exists() for path in sockets)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
    for pid in engines:
        assert not Path(f"/proc/{pid}").exists(), "an engine outlived the server"
    assert not any(Path(path).exists() for path in sockets)
    assert not Path(sockets[0]).parent.exists()  # the run directory


def test_a_dead_engine_means_503_until_it_is_started_again(tiny_chat_model: Path) -> None:
    with running_server(serve_command(tiny_chat_model)) as url:
        (engine,) = _engine_pids(_server_pid(url))
        os.kill(engine, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while httpx.get(f"{url}/health").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and "engine" in health.json()["error"]["message"]
        chat = httpx.post(f"{url}/v1/chat/completions", json={"messages": HELLO}, timeout=30)
        assert chat.status_code == 503
        deadline = time.monotonic() + 120
        while httpx.get(f"{url}/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        body = {"messages": HELLO, "max_tokens": 3}
        assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code == 200
        assert _engine_pids(_server_pid(url)) not in ([], [engine])


def _server_pid(url: str) -> int:
    """The `mlc-engine serve` process listening at `url` (found by its --port argument)."""
    port = url.rsplit(":", 1)[1].encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in args and port in args:
            return int(entry.name)
    raise AssertionError(f"no server process for {url}")


def test_the_frontend_process_does_not_load_tvm(tiny_server_url: str) -> None:
    maps = Path(f"/proc/{_server_pid(tiny_server_url)}/maps").read_text()
    assert "libtvm" not in maps


def test_two_workers_serve_alongside_each_other(tiny_chat_model: Path) -> None:
    with running_server(serve_command(tiny_chat_model, "--workers", "2")) as url:
        body = {"messages": HELLO, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
        replies = [
            httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60) for _ in range(6)
        ]
        assert all(reply.status_code == 200 for reply in replies)
        assert len({reply.json()["choices"][0]["message"]["content"] for reply in replies}) == 1


def test_requests_spread_over_two_engines(tiny_chat_model: Path) -> None:
    command = serve_command(tiny_chat_model, "--num-threads", "1")
    command[command.index("cpu")] = "cpu,cpu"
    with running_server(command) as url:
        body = {"messages": HELLO, "max_tokens": 40, "ignore_eos": True}
        with ThreadPoolExecutor(4) as pool:
            replies = list(
                pool.map(
                    lambda _: httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120),
                    range(4),
                )
            )
        assert all(reply.status_code == 200 for reply in replies)
        engines = httpx.get(f"{url}/verbose_stats").json()["engines"]
        assert len(engines) == 2 and all(engine["decode_tokens"] > 0 for engine in engines)


def test_curl_streams_events(tiny_server_url: str) -> None:
    body = {"messages": HELLO, "max_tokens": 3, "stream": True, "ignore_eos": True}
    result = subprocess.run(
        ["curl", "-sN", f"{tiny_server_url}/v1/chat/completions",
         "-H", "Content-Type: application/json", "-d", json.dumps(body)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    events = [line for line in result.stdout.splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) >= 5


def test_health_is_503_while_the_engine_loads(tiny_chat_model: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([*serve_command(tiny_chat_model), "--port", str(port)])
    statuses: list[int] = []
    try:
        deadline = time.monotonic() + 300
        while 200 not in statuses and time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):  # not listening yet
                statuses.append(httpx.get(f"{url}/health", timeout=2).status_code)
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    assert 503 in statuses and statuses[-1] == 200
    assert statuses.index(503) < statuses.index(200)


def test_an_engine_that_fails_to_load_stops_the_server_with_its_error(
    tiny_chat_model: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.so"
    broken.write_bytes(b"not a shared library")
    command = [
        *serve_command(tiny_chat_model, "--lib-path", str(broken)),
        "--port",
        str(free_port()),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "engine 0 exited with code" in result.stderr


def test_a_request_whose_engine_dies_before_answering_starts_again_on_another(
    tiny_chat_model: Path,
) -> None:
    """Engine 1 is stopped (SIGSTOP) while engine 0 streams a long answer, so routing by load
    sends the next request to engine 1; killing engine 1 then must not fail that request: it
    has heard nothing, so it runs on engine 0 instead."""
    command = serve_command(tiny_chat_model, "--num-threads", "1")
    command[command.index("cpu")] = "cpu,cpu"
    with running_server(command) as url:
        pids = {_engine_index(pid): pid for pid in _engine_pids(_server_pid(url))}
        os.kill(pids[1], signal.SIGSTOP)
        try:
            long_body = {"prompt": "Hello", "max_tokens": 1000, "ignore_eos": True, "stream": True}
            with httpx.stream(
                "POST", f"{url}/v1/completions", json=long_body, timeout=60
            ) as long_stream:
                assert long_stream.status_code == 200, long_stream.read()
                lines = long_stream.iter_lines()
                assert next(line for line in lines if line.startswith("data: {"))
                with ThreadPoolExecutor(1) as pool:
                    body = {"prompt": "Hi", "max_tokens": 5, "ignore_eos": True}
                    reply = pool.submit(httpx.post, f"{url}/v1/completions", json=body, timeout=60)
                    time.sleep(0.5)  # routed to the stopped engine 1, and waiting there
                    assert not reply.done()
                    os.kill(pids[1], signal.SIGKILL)
                    assert reply.result().status_code == 200, reply.result().text
                    assert reply.result().json()["usage"]["completion_tokens"] == 5
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pids[1], signal.SIGKILL)


def _engine_index(pid: int) -> int:
    """Which engine of the server the engine process `pid` is (from its socket's name)."""
    command = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
    return int(command.split("/engine", 1)[1].split("-", 1)[0])
