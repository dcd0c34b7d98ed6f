"""Soak: rounds of bounded mixed load with client disconnects, and what the server holds after each.

Starts `mlc-engine serve` on 127.0.0.1 at a free port (the default model unless --model) and
sends, per round, `--requests` requests with `--concurrency` in flight: streamed and not, chat
and completions, n 1-3, stop strings, logprobs, random max_tokens and temperature; about a sixth
of the streams are closed by the client mid-stream. Once the server is idle after a round it
prints: requests finished, dropped (by the client, on purpose), lost (no answer, an error, or
cut off at the round's time limit), corrupted (an answer whose token count disagrees with its
usage, or that lacks a choice, its finish reason or its usage), the most KV pages in use at
once during the round and the pages and sequences left after it (/verbose_stats), and the RSS
of every server process (/proc). The end compares the run with the targets of issue 14.
Nothing leaves 127.0.0.1.

    python benchmarks/soak.py                       # 10 rounds of 300 requests, 32 in flight
    python benchmarks/soak.py --rounds 3 --requests 60
    python benchmarks/soak.py --llama-server /work/llama-build-noamx/bin/llama-server
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import httpx

TEXT = Path(__file__).parent / "data" / "pd_english.txt"
STOPS = [".", "\n", " and", "!", "?", ","]
READY_SECONDS = 300.0
IDLE_SECONDS = 60.0  # after a round, for the engines to finish or abort what is left
REQUEST_SECONDS = 120.0
DROP_SHARE = 1 / 6
CONSTRAINED_SHARE = 1 / 8
CONSTRAINTS: list[dict[str, Any]] = [
    {"regex": "[a-z]+( [a-z]+)*"},
    {"choice": ["yes", "no", "perhaps"]},
    {"json": {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]}},
]
FRONTEND_RSS_TARGET_MB = 150.0
ENGINE_GROWTH_TARGET = 0.10
PEAK_SECONDS = 0.25
SETTLE_SECONDS = 2.0  # an engine idle for 1 s gives its pooled memory back (engine/process.py)
PAGE_SIZE = 16  # tokens per KV page (mlc_engine/engine/model/attention.py, not imported: TVM)


class Outcome(Enum):
    FINISHED = "finished"
    DROPPED = "dropped"
    LOST = "lost"
    CORRUPTED = "corrupted"


@dataclass
class Request:
    """One request of a round: its body, where it goes, and whether the client drops it."""

    endpoint: str  # "chat" or "completions"
    body: dict[str, Any]
    drop_after: int | None  # events read before the client closes the stream; None: never

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.endpoint == "chat" else "/v1/completions"

    @property
    def wants_logprobs(self) -> bool:
        return bool(self.body.get("logprobs"))


@dataclass
class RoundResult:
    outcomes: dict[Outcome, int] = field(default_factory=lambda: dict.fromkeys(Outcome, 0))
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    pages_left: int = 0
    peak_pages: int = 0  # the most KV pages in use at once, sampled every PEAK_SECONDS
    sequences_left: int = 0
    rss_mb: dict[str, float] = field(default_factory=dict)


def make_request(rng: random.Random, words: list[str]) -> Request:
    start = rng.randrange(len(words) - 300)
    prompt = " ".join(words[start : start + rng.randint(3, 250)])
    endpoint = rng.choice(["chat", "completions"])
    stream = rng.random() < 0.5
    body: dict[str, Any] = {
        "model": "default",
        "max_tokens": rng.randint(1, 64),
        "temperature": rng.choice([0.0, 0.7, 1.0]),
        "n": rng.randint(1, 3),
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    if rng.random() < 0.3:
        body["stop"] = rng.sample(STOPS, rng.randint(1, 2))
    if rng.random() < 0.5:
        top = rng.randint(0, 3)
        if endpoint == "chat":
            body["logprobs"] = True
            body["top_logprobs"] = top
        else:
            body["logprobs"] = top
    if rng.random() < CONSTRAINED_SHARE:  # the grammar path: masks, matchers, their cache
        body["structured_outputs"] = rng.choice(CONSTRAINTS)
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    drop = stream and rng.random() < DROP_SHARE
    return Request(endpoint, body, rng.randint(1, 6) if drop else None)


def _tokens_of(choice: dict[str, Any], endpoint: str) -> int | None:
    """The tokens a choice (or a stream chunk's choice) carries, counted by their logprobs."""
    logprobs = choice.get("logprobs")
    if not logprobs:
        return None
    if endpoint == "chat":
        return len(logprobs.get("content") or [])
    return len(logprobs.get("tokens") or [])


def check_answer(request: Request, choices: list[dict[str, Any]], usage: Any) -> str | None:
    """Why a finished answer is corrupted, or None: every choice present with a finish reason,
    usage present, and (with logprobs) one logprob per counted token."""
    n = request.body["n"]
    if not isinstance(usage, dict) or "completion_tokens" not in usage:
        return "no usage"
    reasons = {c.get("index"): c.get("finish_reason") for c in choices if c.get("finish_reason")}
    if sorted(reasons) != list(range(n)):
        return f"finish reasons for choices {sorted(reasons)}, expected {n}"
    completion = usage["completion_tokens"]
    if completion > n * request.body["max_tokens"]:
        return f"usage says {completion} tokens, more than n x max_tokens"
    if request.wants_logprobs:
        counted = sum(_tokens_of(c, request.endpoint) or 0 for c in choices)
        if counted != completion:
            return f"{counted} tokens streamed or returned, usage says {completion}"
    return None


async def _stream(client: httpx.AsyncClient, url: str, request: Request) -> tuple[Outcome, str]:
    chunks: list[dict[str, Any]] = []
    usage = None
    events = 0
    async with client.stream("POST", url + request.path, json=request.body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            return Outcome.LOST, f"HTTP {response.status_code}: {text[:160]}"
        done = False
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                return Outcome.LOST, f"error event: {json.dumps(event['error'])[:160]}"
            chunks += event.get("choices") or []
            usage = event.get("usage") or usage
            events += 1
            if request.drop_after is not None and events >= request.drop_after:
                return Outcome.DROPPED, ""  # leaving the block closes the connection
        if not done:
            if request.drop_after is not None:
                return Outcome.DROPPED, ""  # it ended before the client could drop it
            return Outcome.LOST, "the stream ended without [DONE]"
    if request.drop_after is not None:
        return Outcome.DROPPED, ""
    problem = check_answer(request, _merged(chunks, request.endpoint), usage)
    return (Outcome.CORRUPTED, problem) if problem else (Outcome.FINISHED, "")


def _merged(chunks: list[dict[str, Any]], endpoint: str) -> list[dict[str, Any]]:
    """A stream's chunks as whole choices: the last finish reason and every logprob of each."""
    merged: dict[int, dict[str, Any]] = {}
    key = "content" if endpoint == "chat" else "tokens"
    for chunk in chunks:
        choice = merged.setdefault(chunk.get("index", 0), {"index": chunk.get("index", 0)})
        if chunk.get("finish_reason"):
            choice["finish_reason"] = chunk["finish_reason"]
        count = _tokens_of(chunk, endpoint)
        if count is not None:
            logprobs = choice.setdefault("logprobs", {key: []})
            logprobs[key] += [None] * count
    return list(merged.values())


async def send(client: httpx.AsyncClient, url: str, request: Request) -> tuple[Outcome, str]:
    try:
        if request.body["stream"]:
            return await _stream(client, url, request)
        response = await client.post(url + request.path, json=request.body)
        if response.status_code != 200:
            return Outcome.LOST, f"HTTP {response.status_code}: {response.text[:160]}"
        answer = response.json()
        problem = check_answer(request, answer.get("choices") or [], answer.get("usage"))
        return (Outcome.CORRUPTED, problem) if problem else (Outcome.FINISHED, "")
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as error:
        return Outcome.LOST, f"{type(error).__name__}: {error}"[:160]


async def run_round(
    client: httpx.AsyncClient, url: str, requests: list[Request], concurrency: int, seconds: float
) -> RoundResult:
    """Send `requests`, `concurrency` at a time; what has not ended after `seconds` is lost."""
    limit = asyncio.Semaphore(concurrency)
    result = RoundResult()

    async def one(request: Request) -> tuple[Outcome, str]:
        async with limit:
            return await send(client, url, request)

    async def watch_pages() -> None:
        while True:
            engines = await engine_stats(client, url)
            used = sum(e["kv_pages_total"] - e["kv_pages_free"] for e in engines)
            result.peak_pages = max(result.peak_pages, used)
            await asyncio.sleep(PEAK_SECONDS)

    start = time.perf_counter()
    watcher = asyncio.create_task(watch_pages())
    tasks = [asyncio.create_task(one(request)) for request in requests]
    done, pending = await asyncio.wait(tasks, timeout=seconds)
    for task in [*pending, watcher]:
        task.cancel()
    await asyncio.gather(*pending, watcher, return_exceptions=True)
    result.seconds = time.perf_counter() - start
    result.outcomes[Outcome.LOST] += len(pending)
    for task in done:
        outcome, problem = task.result()
        result.outcomes[outcome] += 1
        if problem:
            result.problems.append(f"{outcome.value}: {problem}")
    return result


async def engine_stats(client: httpx.AsyncClient, url: str) -> list[dict[str, Any]]:
    response = await client.get(url + "/verbose_stats")
    response.raise_for_status()
    return list(response.json()["engines"])


async def wait_idle(client: httpx.AsyncClient, url: str) -> tuple[int, int]:
    """KV pages in use and sequences waiting or running, once none run (or IDLE_SECONDS pass)."""
    deadline = time.monotonic() + IDLE_SECONDS
    while True:
        engines = await engine_stats(client, url)
        pages = sum(e["kv_pages_total"] - e["kv_pages_free"] for e in engines)
        sequences = sum(e["num_running"] + e["num_waiting"] for e in engines)
        if (pages == 0 and sequences == 0) or time.monotonic() > deadline:
            await asyncio.sleep(SETTLE_SECONDS)
            return pages, sequences
        await asyncio.sleep(0.5)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(stat[1]) == pid:
                found.append(int(entry.name))
    return found


def server_processes(server_pid: int) -> dict[str, int]:
    """The frontend (the `serve` process, which runs uvicorn) and each engine, by name."""
    processes = {"frontend": server_pid}
    engines = 0
    for pid in sorted(_children(server_pid)):
        with contextlib.suppress(OSError):
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"engine" in args:
                processes[f"engine{engines}"] = pid
                engines += 1
    return processes


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def running(command: list[str], health: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Start `command` (its output to `log`), wait until `health` answers 200, SIGTERM it at
    the end."""
    with log.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + READY_SECONDS
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"{command[:4]} exited with code {process.returncode}; see {log}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(health, timeout=2, trust_env=False).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{command[:4]} was not ready in {READY_SECONDS} s; see {log}")
            time.sleep(0.3)
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _row(index: str, result: RoundResult) -> str:
    counts = " ".join(f"{o.value} {result.outcomes[o]:4d}" for o in Outcome)
    rss = " ".join(f"{name} {mb:6.0f}" for name, mb in result.rss_mb.items())
    return (
        f"round {index:>5}  {counts}  KV peak pages {result.peak_pages:4d}  "
        f"pages left {result.pages_left}  "
        f"sequences left {result.sequences_left}  RSS MB: {rss}  ({result.seconds:.0f} s)"
    )


async def soak(
    url: str, server_pid: int, args: argparse.Namespace
) -> tuple[list[RoundResult], int]:
    """The rounds' results, and the KV pages of the first engine."""
    words = TEXT.read_text(encoding="utf-8").split()
    rng = random.Random(args.seed)
    timeout = httpx.Timeout(REQUEST_SECONDS, connect=10.0)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
        idle = RoundResult()
        idle.rss_mb = {n: rss_mb(p) for n, p in server_processes(server_pid).items()}
        print(_row("start", idle), flush=True)
        results = []
        for index in range(args.rounds):
            requests = [make_request(rng, words) for _ in range(args.requests)]
            result = await run_round(client, url, requests, args.concurrency, args.round_seconds)
            result.pages_left, result.sequences_left = await wait_idle(client, url)
            result.rss_mb = {n: rss_mb(p) for n, p in server_processes(server_pid).items()}
            print(_row(str(index + 1), result), flush=True)
            for problem in sorted(set(result.problems))[:5]:
                print(f"    {problem}", flush=True)
            results.append(result)
        kv_pages = (await engine_stats(client, url))[0]["kv_pages_total"]
    return results, kv_pages


def summary(results: list[RoundResult]) -> list[tuple[str, bool]]:
    """Each target of issue 14 that the run can judge, and whether it was met."""
    first, last = results[0].rss_mb, results[-1].rss_mb
    engines = [name for name in last if name.startswith("engine")]
    checks = [
        (
            "nothing lost: "
            + str(sum(r.outcomes[Outcome.LOST] + r.outcomes[Outcome.CORRUPTED] for r in results))
            + " lost or corrupted",
            all(r.outcomes[Outcome.LOST] + r.outcomes[Outcome.CORRUPTED] == 0 for r in results),
        ),
        (
            "no page or sequence left after any round",
            all(r.pages_left == 0 and r.sequences_left == 0 for r in results),
        ),
    ]
    for name in engines:
        growth = last[name] / first[name] - 1
        checks.append(
            (
                f"{name} RSS after round {len(results)} within 10% of after round 1: "
                f"{first[name]:.0f} -> {last[name]:.0f} MB ({growth:+.1%})",
                abs(growth) <= ENGINE_GROWTH_TARGET,
            )
        )
    frontend = max(r.rss_mb["frontend"] for r in results)
    checks.append(
        (
            f"frontend RSS under {FRONTEND_RSS_TARGET_MB:.0f} MB: at most {frontend:.0f} MB",
            frontend < FRONTEND_RSS_TARGET_MB,
        )
    )
    return checks


def serve_command(args: argparse.Namespace, port: int) -> list[str]:
    command = [sys.executable, "-m", "mlc_engine", "serve", "--device", args.device]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    command += ["--model", args.model] if args.model else []
    return command + args.serve_option


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="Default: the default model.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--requests", type=int, default=300, help="Requests per round.")
    parser.add_argument("--concurrency", type=int, default=32, help="Requests in flight.")
    parser.add_argument("--round-seconds", type=float, default=900.0, help="Time limit of a round.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--serve-option",
        action="append",
        default=[],
        help="Passed on to `mlc-engine serve` (repeat it: --serve-option=--max-num-seqs ...).",
    )
    parser.add_argument("--log", type=Path, default=Path("soak-server.log"))
    parser.add_argument(
        "--llama-server",
        type=Path,
        default=None,
        help="Also measure this llama-server's RSS at our engine's KV size (llama_rss.py).",
    )
    args = parser.parse_args()
    if min(args.rounds, args.requests, args.concurrency) < 1:
        parser.error("--rounds, --requests and --concurrency must be at least 1")
    signal.signal(signal.SIGTERM, _interrupt)  # unwinds like Ctrl-C, stopping the server
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with running(serve_command(args, port), url + "/health", args.log) as server:
        results, kv_pages = asyncio.run(soak(url, server.pid, args))
    print("\nsummary:")
    checks = summary(results)
    for text, met in checks:
        print(f"  [{'met' if met else 'MISSED'}] {text}")
    if args.llama_server:
        from llama_rss import compare_with_llama_server

        engine_mb = results[-1].rss_mb["engine0"]
        print(compare_with_llama_server(args.llama_server, kv_pages * PAGE_SIZE, engine_mb))
    return 0 if all(met for _, met in checks) else 1


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
