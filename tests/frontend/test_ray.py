"""`mlc-engine serve --ray`: a local Ray cluster of two nodes on this machine (two `ray start`,
each with one `mlc_slot`, so each node takes one engine), two engines on the tiny chat model
reached over tcp:// with CURVE, requests spread across both, a second frontend sharing them,
and a node killed mid-stream while the other keeps serving.

One cluster and one server for the module (Ray takes seconds to start); the node is killed by
the last test. Skipped where Ray is not installed (`pip install 'mlc-engine[ray]'`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import free_port, running_server, serve_command

pytest.importorskip("ray", reason="Ray is not installed: pip install 'mlc-engine[ray]'")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

RAY = str(Path(sys.executable).parent / "ray")
COMPLETIONS = "/v1/completions"


@dataclass
class Cluster:
    address: str
    nodes: dict[str, subprocess.Popen[bytes]]  # `ray start --block` of each node, by name

    def kill_node(self, name: str) -> None:
        """Kill every process of the node at once (its raylet, workers and engines), as a
        machine that loses power would."""
        node = self.nodes[name]
        for pid in [node.pid, *_descendants(node.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        node.wait()


def _descendants(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, IndexError):
            if (
                entry.name.isdigit()
                and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid
            ):
                children.append(int(entry.name))
    return children + [grandchild for child in children for grandchild in _descendants(child)]


def _ray_start(temp_dir: str, *options: str) -> subprocess.Popen[bytes]:
    command = [RAY, "start", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "1"]
    command += ["--resources", json.dumps({"mlc_slot": 1}), "--disable-usage-stats"]
    command += ["--dashboard-agent-listen-port", str(free_port()), *options]
    # Its own process group, so that killing the group takes the whole node.
    return subprocess.Popen(
        command,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=open(Path(temp_dir) / f"ray-start-{len(os.listdir(temp_dir))}.log", "wb"),  # noqa: SIM115
    )


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray puts sockets there
    port = free_port()
    nodes: dict[str, subprocess.Popen[bytes]] = {}
    try:
        nodes["head"] = _ray_start(
            temp_dir, "--head", "--port", str(port), "--temp-dir", temp_dir,
            "--include-dashboard", "false", "--dashboard-port", str(free_port()),
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            assert nodes["head"].poll() is None, "ray start --head failed"
            time.sleep(0.2)
        nodes["worker"] = _ray_start(temp_dir, "--address", f"127.0.0.1:{port}")
        yield Cluster(f"127.0.0.1:{port}", nodes)
    finally:
        leftovers = [pid for node in nodes.values() for pid in _descendants(node.pid)]
        for node in nodes.values():
            if node.poll() is None:
                node.send_signal(signal.SIGTERM)  # `ray start --block` stops its node's processes
        for node in nodes.values():
            try:
                node.wait(timeout=30)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()
        for pid in leftovers:  # none, unless Ray left one behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["rm", "-rf", temp_dir], check=False)


def _ray_serve(folder: Path, address: str) -> list[str]:
    return serve_command(
        folder, "--ray", address, "--engines", "2", "--engine-resource", "mlc_slot=1"
    )


def _engines(url: str) -> list[dict[str, str]]:
    return list(httpx.get(f"{url}/health", timeout=10).json().get("engines", []))


def _wait_running(url: str, count: int, seconds: float = 120) -> list[dict[str, str]]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        engines = _engines(url)
        if sum(engine["state"] == "running" for engine in engines) == count:
            return engines
        time.sleep(0.3)
    raise AssertionError(f"not {count} engines running: {_engines(url)}")


@pytest.fixture(scope="module")
def ray_server(cluster: Cluster, tiny_chat_model: Path) -> Iterator[str]:
    with running_server(_ray_serve(tiny_chat_model, cluster.address)) as url:
        _wait_running(url, 2)
        yield url


def _complete(url: str, max_tokens: int = 8) -> httpx.Response:
    body = {"prompt": "Hello there", "max_tokens": max_tokens, "ignore_eos": True}
    return httpx.post(url + COMPLETIONS, json=body, timeout=60)


def _finished_per_engine(url: str) -> list[int]:
    stats = httpx.get(f"{url}/verbose_stats", timeout=10).json()
    return [engine["requests_finished"] for engine in stats["engines"]]


def test_engines_land_on_both_nodes_and_requests_spread_across_them(ray_server: str) -> None:
    engines = _engines(ray_server)
    assert len({engine["node"] for engine in engines}) == 2
    metrics = httpx.get(f"{ray_server}/metrics").text
    assert metrics.count('state="running"} 1.0') == 2
    before = _finished_per_engine(ray_server)
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: _complete(ray_server, 32), range(8)))
    assert all(reply.status_code == 200 for reply in replies)
    after = _finished_per_engine(ray_server)
    served = [a - b for a, b in zip(after, before, strict=True)]
    assert sum(served) == 8 and min(served) >= 2, served


def test_a_second_frontend_shares_the_engines(
    ray_server: str, cluster: Cluster, tiny_chat_model: Path
) -> None:
    """A frontend started with the same address finds the engines the first one placed."""
    with running_server(_ray_serve(tiny_chat_model, cluster.address)) as second:
        engines = _wait_running(second, 2)
        assert {e["node"] for e in engines} == {e["node"] for e in _engines(ray_server)}
        before = sum(_finished_per_engine(ray_server))
        assert _complete(second).status_code == 200
        assert sum(_finished_per_engine(ray_server)) == before + 1
    assert _complete(ray_server).status_code == 200  # the engines outlive the second frontend


def _stream(url: str, max_tokens: int, heard: threading.Semaphore) -> tuple[int, str]:
    """Tokens received, and how the stream ended: a finish reason or the error's message;
    releases `heard` at the first token."""
    body = {"prompt": "Hello", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    tokens, end = 0, "cut off"
    with httpx.stream("POST", url + COMPLETIONS, json=body, timeout=60) as response:
        if response.status_code != 200:
            return 0, f"HTTP {response.status_code}: {response.read().decode()}"
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line.removeprefix("data: "))
            if "error" in event:
                end = event["error"]["message"]
            else:
                tokens += 1
                end = event["choices"][0]["finish_reason"] or end
                if tokens == 1:
                    heard.release()
    return tokens, end


def test_a_node_killed_mid_stream_ends_its_streams_and_the_rest_keep_serving(
    ray_server: str, cluster: Cluster
) -> None:
    """Streams that have had tokens from the dead node end with its error; the others finish.
    (A request that had heard nothing yet would start again on the living engine.)"""
    heard = threading.Semaphore(0)
    with ThreadPoolExecutor(4) as pool:
        streams = [pool.submit(_stream, ray_server, 900, heard) for _ in range(4)]
        for _ in streams:
            assert heard.acquire(timeout=30), "a stream had no token in 30 s"
        assert min(e["num_running"] for e in _verbose(ray_server)["engines"]) >= 1
        killed = time.monotonic()
        cluster.kill_node("worker")
        ends = [stream.result() for stream in streams]
    failed = [end for _, end in ends if end != "length"]
    assert failed and len(failed) < len(ends), ends
    assert all("engine" in end for end in failed), ends
    assert time.monotonic() - killed < 30
    for _ in range(4):  # new requests go to the living engine at once
        assert _complete(ray_server).status_code == 200
    health = httpx.get(f"{ray_server}/health").json()
    assert health["status"] == "degraded"
    assert sorted(e["state"] == "running" for e in health["engines"]) == [False, True]


def _verbose(url: str) -> dict[str, list[dict[str, int]]]:
    return dict(httpx.get(f"{url}/verbose_stats", timeout=10).json())
