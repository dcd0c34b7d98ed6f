"""Runs one workload against every server, level by level, the servers taking turns.

Servers never run at the same time (they would compete for the same cores); instead each load
level's requests are split into rounds and the servers take turns, in the order A B, B A, A B...,
so that whatever else the machine does in that time weighs on all of them alike. Every server
gets the same conversations and, at a request rate, the same arrival times. A conversation is a
unit of work: concurrency and arrival times count conversations, whose turns go one after
another, each as soon as the reply before it has ended.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from mlc_engine.bench.client import RequestResult, request_body, stream_request
from mlc_engine.bench.metrics import Batch, Summary, summarize
from mlc_engine.bench.workload import (
    DEFAULT_TEXT,
    Conversation,
    LoadLevel,
    PromptSource,
    Workload,
    arrival_offsets,
)

WARMUP_TOKENS = 8
CONNECT_SECONDS = 10.0


@dataclass(frozen=True)
class Target:
    """A server under test: its base URL (without /v1) and the model name it is asked for."""

    url: str
    model: str


@dataclass
class LevelResult:
    """One load level: each server's summary (in the order of the targets) and raw batches."""

    level: LoadLevel
    summaries: list[Summary]
    batches: dict[str, list[Batch]]  # by server URL


@dataclass
class BenchmarkResult:
    """Everything one run measured."""

    workload: Workload
    targets: list[Target]
    levels: list[LevelResult]
    run_id: str  # the first word of every prompt of this run


def turn_order(servers: int, round_index: int) -> list[int]:
    """Which server goes when in a round: forward in even rounds, backward in odd ones."""
    order = list(range(servers))
    return order if round_index % 2 == 0 else order[::-1]


def round_indices(num_requests: int, rounds: int) -> list[range]:
    """The conversation indices of each round, as even as possible (empty rounds are dropped)."""
    bounds = [num_requests * r // rounds for r in range(rounds + 1)]
    return [range(a, b) for a, b in itertools.pairwise(bounds) if b > a]


async def _model_of(client: httpx.AsyncClient, url: str) -> str:
    """The first model the server lists; servers serving a single model ignore the name anyway."""
    try:
        response = await client.get(url + "/v1/models")
        response.raise_for_status()
        return str(response.json()["data"][0]["id"])
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as error:
        raise ConnectionError(f"{url}/v1/models: {error or type(error).__name__}") from None


async def _converse(
    client: httpx.AsyncClient,
    target: Target,
    workload: Workload,
    conversation: Conversation,
    label: str,
    max_tokens: int,
    clock: Callable[[], float],
    keep: Callable[[RequestResult], None],
) -> None:
    """Send the conversation's turns one by one, each result to `keep` as it ends (`clock` says
    when a turn is sent); stops after a failed turn."""
    messages = [{"role": "system", "content": conversation.system}] if conversation.system else []
    for turn, text in enumerate(conversation.turns):
        messages.append({"role": "user", "content": text})
        body = request_body(workload.endpoint, target.model, messages, max_tokens)
        result = RequestResult(
            target.url, label, conversation.index, turn, clock(), long=conversation.long
        )
        await stream_request(client, target.url, workload.endpoint, body, result)
        keep(result)
        if not result.ok:
            return
        messages.append({"role": "assistant", "content": result.reply})


async def run_batch(
    client: httpx.AsyncClient,
    target: Target,
    workload: Workload,
    level: LoadLevel,
    conversations: list[Conversation],
    offsets: list[float],
    seconds: float,
) -> Batch:
    """Hold `conversations`, each started no sooner than its offset and within the level's
    concurrency; after `seconds` the requests still running or waiting are cancelled."""
    limit = asyncio.Semaphore(level.concurrency or len(conversations))
    results: list[RequestResult] = []  # requests that ended, as they end
    start = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - start

    async def hold(conversation: Conversation, offset: float) -> None:
        await asyncio.sleep(offset)
        async with limit:
            await _converse(
                client, target, workload, conversation, level.label,
                workload.output_tokens, clock, results.append,
            )  # fmt: skip

    tasks = [
        asyncio.create_task(hold(conversation, offset))
        for conversation, offset in zip(conversations, offsets, strict=True)
    ]
    _, pending = await asyncio.wait(tasks, timeout=seconds)
    duration = clock()
    for task in pending:
        task.cancel()  # closes its connection, so the server can drop the request too
    await asyncio.gather(*pending, return_exceptions=True)
    kept = Counter(result.index for result in results)
    unfinished = sum(
        workload.turns - kept[conversation.index]
        for conversation, task in zip(conversations, tasks, strict=True)
        if task in pending
    )
    return Batch(results, duration, unfinished)


async def _warm_up(
    client: httpx.AsyncClient, target: Target, workload: Workload, conversation: Conversation
) -> None:
    """A short first turn, not counted: the first request may load or compile something, and
    a shared system prompt is then in the server's prompt cache, as in a service running."""
    first_turn = Conversation(conversation.index, conversation.system, conversation.turns[:1])
    ended: list[RequestResult] = []
    await _converse(
        client, target, workload, first_turn, "warm-up", WARMUP_TOKENS, lambda: 0.0, ended.append
    )
    if not ended[0].ok:
        raise ConnectionError(f"{target.url} failed its warm-up request: {ended[0].error}")


async def _level(
    client: httpx.AsyncClient,
    targets: list[Target],
    workload: Workload,
    level: LoadLevel,
    first: int,
    conversation: Callable[[int], Conversation],
    progress: Callable[[str], None],
) -> LevelResult:
    batches: dict[str, list[Batch]] = {target.url: [] for target in targets}
    rounds = round_indices(workload.num_requests, workload.rounds)
    for round_index, indices in enumerate(rounds):
        conversations = [conversation(first + i) for i in indices]
        rng = random.Random(f"{workload.seed}/{level.label}/{round_index}")
        offsets = arrival_offsets(level, len(conversations), rng)
        seconds = workload.max_seconds / len(rounds)
        for server in turn_order(len(targets), round_index):
            target = targets[server]
            batch = await run_batch(
                client, target, workload, level, conversations, offsets, seconds
            )
            batches[target.url].append(batch)
            progress(
                f"{level.label} round {round_index + 1}/{len(rounds)} {target.url}: "
                f"{len(batch.results)} ended, {batch.unfinished} cut off, {batch.duration:.1f} s"
            )
    summaries = [
        summarize(t.url, level.label, batches[t.url], workload.output_tokens) for t in targets
    ]
    return LevelResult(level, summaries, batches)


async def _run(
    urls: list[str],
    workload: Workload,
    levels: list[LoadLevel],
    model: str | None,
    source: PromptSource,
    progress: Callable[[str], None],
) -> BenchmarkResult:
    # trust_env=False: no proxy from the environment, requests go only to the URLs given.
    timeout = httpx.Timeout(workload.max_seconds, connect=CONNECT_SECONDS)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
        targets = [Target(url, model or await _model_of(client, url)) for url in urls]
        # Every user message of the run differs from the others and from other runs': a prompt
        # seen before would let a server's prompt cache skip its prefill.
        run_id = secrets.token_hex(3)

        def conversation(index: int) -> Conversation:
            return workload.conversation(source, index, run_id)

        warmup = conversation(len(levels) * workload.num_requests)  # after all the levels'
        for target in targets:
            await _warm_up(client, target, workload, warmup)
        results = []
        for number, level in enumerate(levels):
            first = number * workload.num_requests
            results.append(
                await _level(client, targets, workload, level, first, conversation, progress)
            )
    return BenchmarkResult(workload, targets, results, run_id)


def run_benchmark(
    urls: list[str],
    workload: Workload,
    levels: list[LoadLevel],
    model: str | None = None,
    source: PromptSource | None = None,
    progress: Callable[[str], None] = lambda line: None,
) -> BenchmarkResult:
    """Run `workload` at each level against each base URL; the first URL is the baseline.

    `model` names the model in every request; by default each server's first listed model.
    Raises ConnectionError when a server does not answer its warm-up request.
    """
    source = source or PromptSource.from_file(DEFAULT_TEXT)
    bases = [url.rstrip("/").removesuffix("/v1") for url in urls]
    return asyncio.run(_run(bases, workload, levels, model, source, progress))
