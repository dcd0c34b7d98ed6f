"""A real engine process over real ZeroMQ sockets, driven by the asyncio client."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq
from conftest import EngineProcess, LoadedModel, engine_process

from mlc_engine.common.client import EngineClient, EngineUnavailableError
from mlc_engine.common.protocol import (
    PROTOCOL_VERSION,
    AddRequest,
    EngineInfo,
    Hello,
    MessageType,
    SamplingParams,
    SequenceOutput,
    pack,
    unpack,
)

PROMPTS = [[1, 5, 9, 200, 31], [1, 77, 78], [1, 300] * 20, [1, 4, 4, 4, 4, 4, 4, 11]]


@pytest.fixture(scope="module")
def tiny(tiny_model: Callable[..., LoadedModel]) -> LoadedModel:
    return tiny_model("q0f32")


@pytest.fixture(scope="module")
def engine(tiny: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineProcess]:
    with engine_process(tiny.folder, tmp_path_factory.mktemp("engine")) as started:
        yield started


async def collect(
    client: EngineClient, request_id: str, prompt: list[int], params: SamplingParams
) -> list[SequenceOutput]:
    return [output async for output in client.generate(request_id, prompt, params)]


def tokens(outputs: list[SequenceOutput], index: int = 0) -> list[int]:
    return [t for output in outputs if output.index == index for t in output.token_ids]


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0)


async def alone_and_together(engine: EngineProcess, count: int, max_tokens: int) -> None:
    client = engine.client()
    await client.connect()
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(count)]
    alone = [
        tokens(await collect(client, f"a{i}", p, greedy(max_tokens))) for i, p in enumerate(prompts)
    ]
    together = await asyncio.gather(
        *(collect(client, f"t{i}", p, greedy(max_tokens)) for i, p in enumerate(prompts))
    )
    assert [tokens(outputs) for outputs in together] == alone
    assert all(outputs[-1].finish_reason in ("length", "stop") for outputs in together)
    await client.close()


def test_concurrent_greedy_requests_match_each_alone(engine: EngineProcess) -> None:
    asyncio.run(alone_and_together(engine, 8, 24))


@pytest.mark.slow
def test_smollm2_concurrent_greedy_requests_match_each_alone(
    smollm2: LoadedModel, tmp_path: Path
) -> None:
    # Without the prefix cache: the "together" round would prefill only what "alone" did not,
    # and the q4 kernels' logits depend on how a prompt is split into chunks (as with
    # --max-batch-tokens), which can flip a near-tie.
    with engine_process(smollm2.folder, tmp_path, "--no-prefix-cache") as started:
        asyncio.run(alone_and_together(started, 8, 16))


def test_seeded_request_gives_the_same_tokens_in_a_busy_batch(engine: EngineProcess) -> None:
    async def main() -> None:
        client = engine.client()
        await client.connect()
        params = SamplingParams(max_tokens=16, temperature=1.5, top_p=0.95, seed=1234)
        alone = tokens(await collect(client, "s1", PROMPTS[0], params))
        noise = SamplingParams(max_tokens=30, temperature=1.0)
        results = await asyncio.gather(
            *(collect(client, f"n{i}", PROMPTS[i % 4], noise) for i in range(6)),
            collect(client, "s2", PROMPTS[0], params),
        )
        assert tokens(results[-1]) == alone
        await client.close()

    asyncio.run(main())


def test_preempted_requests_complete_with_the_same_tokens(
    tiny: LoadedModel, engine: EngineProcess, tmp_path: Path
) -> None:
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)

    async def answers(started: EngineProcess) -> tuple[list[list[int]], int]:
        client = started.client()
        await client.connect()
        results = await asyncio.gather(
            *(collect(client, f"p{i}", PROMPTS[i % 4], params) for i in range(6))
        )
        stats = await client.fetch_stats()
        await client.close()
        return [tokens(outputs) for outputs in results], stats.preemptions

    roomy, _ = asyncio.run(answers(engine))
    with engine_process(tiny.folder, tmp_path, "--max-total-tokens", "128") as tight:
        pressured, preemptions = asyncio.run(answers(tight))
    assert preemptions > 0
    assert pressured == roomy


def test_abort_mid_generation_frees_pages_and_twice_is_fine(engine: EngineProcess) -> None:
    async def main() -> None:
        client = engine.client()
        await client.connect()
        idle = (await client.fetch_stats()).kv_pages_free
        params = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
        stream = client.generate("ab", PROMPTS[2], params)
        first = await anext(stream)
        assert first.token_ids and (await client.fetch_stats()).kv_pages_free < idle
        client.abort(["ab"])
        client.abort(["ab"])
        rest = [output async for output in stream]
        assert rest[-1].finish_reason == "abort"
        assert len(tokens([first, *rest])) < 400
        assert (await client.fetch_stats()).kv_pages_free == idle
        assert len(tokens(await collect(client, "after", PROMPTS[0], greedy(5)))) == 5
        await client.close()

    asyncio.run(main())


def test_n_choices_and_logprobs_stream_back(engine: EngineProcess) -> None:
    async def main() -> None:
        client = engine.client()
        await client.connect()
        params = SamplingParams(
            max_tokens=6, temperature=1.0, n=2, seed=3, logprobs=True, top_logprobs=2
        )
        outputs = await collect(client, "n2", PROMPTS[1], params)
        for index in (0, 1):
            mine = [output for output in outputs if output.index == index]
            assert len(tokens(mine, index)) == 6 and mine[-1].finish_reason == "length"
            logprobs = [lp for output in mine for lp in output.logprobs or []]
            assert len(logprobs) == 6 and all(len(lp.top) == 2 for lp in logprobs)
            assert all(lp.logprob <= 0 for lp in logprobs)
        await client.close()

    asyncio.run(main())


def test_bad_requests_fail_alone_and_malformed_messages_are_dropped(
    engine: EngineProcess,
) -> None:
    async def main() -> None:
        client = engine.client()
        await client.connect()
        raw = zmq.Context.instance().socket(zmq.PUSH)
        raw.connect(engine.input)
        raw.send_multipart([b"A", b"\xc1 not msgpack"])
        raw.send_multipart([b"?", pack(Hello("x" * 32))])
        raw.send_multipart([b"A"])
        raw.send_multipart([MessageType.ADD.value, pack(Hello("x" * 32))])
        raw.close()
        too_long = await collect(client, "long", [1] * 1000, greedy(4))
        assert too_long[-1].finish_reason == "error" and "context window" in str(too_long[-1].error)
        bad = await collect(client, "bad", [1, 2], SamplingParams(top_p=0))
        assert bad[-1].finish_reason == "error" and "top_p" in str(bad[-1].error)
        assert len(tokens(await collect(client, "good", PROMPTS[0], greedy(5)))) == 5
        await client.close()

    asyncio.run(main())


def test_killed_engine_ends_every_stream_with_an_error_within_2_seconds(
    tiny: LoadedModel, tmp_path: Path
) -> None:
    async def main(started: EngineProcess) -> None:
        client = started.client()
        await client.connect()
        params = SamplingParams(max_tokens=100000, temperature=0, ignore_eos=True)
        streams = [client.generate(f"k{i}", PROMPTS[i % 4], params) for i in range(4)]
        for stream in streams:
            await anext(stream)
        started.process.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        for stream in streams:
            last = [output async for output in stream][-1]
            assert last.finish_reason == "error"
        assert time.monotonic() - killed < 2.0
        with pytest.raises(EngineUnavailableError):
            await collect(client, "late", PROMPTS[0], greedy(2))
        await client.close()

    with engine_process(tiny.folder, tmp_path) as started:
        asyncio.run(main(started))


def test_sigterm_drains_running_requests_then_exits(tiny: LoadedModel, tmp_path: Path) -> None:
    async def main(started: EngineProcess) -> None:
        client = started.client()
        await client.connect()
        stream = client.generate("d", PROMPTS[0], SamplingParams(max_tokens=60, ignore_eos=True))
        first = await anext(stream)
        started.process.send_signal(signal.SIGTERM)
        rest = [output async for output in stream]
        assert len(tokens([first, *rest])) == 60 and rest[-1].finish_reason == "length"
        await client.close()

    with engine_process(tiny.folder, tmp_path) as started:
        asyncio.run(main(started))
        assert started.process.wait(timeout=10) == 0
    assert not list(tmp_path.glob("*put"))  # the ipc socket files are gone


@contextlib.contextmanager
def raw_frontend(
    engine: EngineProcess, frontend_id: str, version: int = PROTOCOL_VERSION
) -> Iterator[tuple[zmq.Socket, list[bytes] | None]]:
    """A frontend on bare sockets: HELLO until the engine answers on its topic; yields the
    PUSH socket and that answer's frames (None if none came)."""
    context = zmq.Context.instance()
    sub, push = context.socket(zmq.SUB), context.socket(zmq.PUSH)
    sub.setsockopt(zmq.SUBSCRIBE, frontend_id.encode())
    sub.connect(engine.output)
    push.connect(engine.input)
    reply = None
    for _ in range(50):  # until the subscription is live
        push.send_multipart([MessageType.HELLO.value, pack(Hello(frontend_id, version))])
        if sub.poll(200):
            reply = sub.recv_multipart()
            break
    sub.close(linger=0)
    try:
        yield push, reply
    finally:
        push.close(linger=1000)  # what was sent still reaches a live engine


def test_a_frontend_of_another_protocol_version_is_refused(engine: EngineProcess) -> None:
    with raw_frontend(engine, "v" * 32, version=999) as (_, reply):
        pass
    assert reply is not None and reply[1] == MessageType.READY.value
    info = unpack(EngineInfo, reply[2])
    assert info.error is not None and "protocol version 999" in info.error


def test_requests_of_a_silent_frontend_are_aborted_after_its_lease(
    tiny: LoadedModel, tmp_path: Path
) -> None:
    """A frontend that sends nothing more (crashed) loses its requests; a client that stays
    connected past the lease (sending KEEPALIVE) is still served."""

    async def main(started: EngineProcess) -> None:
        watcher = started.client()
        await watcher.connect()
        params = SamplingParams(max_tokens=100000, temperature=0, ignore_eos=True)
        with raw_frontend(started, "s" * 32) as (push, reply):
            assert reply is not None
            request = AddRequest("orphan", "s" * 32, PROMPTS[0], params)
            push.send_multipart([MessageType.ADD.value, pack(request)])
        deadline = time.monotonic() + 10
        stats = await watcher.fetch_stats()
        while stats.num_running == 0 and time.monotonic() < deadline:
            stats = await watcher.fetch_stats()
        assert stats.num_running == 1
        while stats.num_running and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            stats = await watcher.fetch_stats()
        assert stats.num_running == 0 and stats.decode_tokens < 100000
        await asyncio.sleep(2.5)  # idle past the lease
        assert len(tokens(await collect(watcher, "kept", PROMPTS[0], greedy(3)))) == 3
        await watcher.close()

    with engine_process(tiny.folder, tmp_path, "--frontend-lease", "2") as started:
        asyncio.run(main(started))


def test_prefix_cache_hits_are_counted_and_it_is_on_by_default(
    tiny: LoadedModel, tmp_path: Path
) -> None:
    async def hits(engine: EngineProcess) -> tuple[int, int]:
        client = engine.client()
        await client.connect()
        for request_id in ("first", "again"):
            await collect(client, request_id, list(range(3, 43)), greedy(4))
        stats = await client.fetch_stats()
        await client.close()
        return stats.prefix_cache_queried_tokens, stats.prefix_cache_hit_tokens

    with engine_process(tiny.folder, tmp_path / "on") as started:
        assert asyncio.run(hits(started)) == (80, 32)
    with engine_process(tiny.folder, tmp_path / "off", "--no-prefix-cache") as started:
        assert asyncio.run(hits(started)) == (0, 0)
