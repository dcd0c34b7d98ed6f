"""An asyncio client of one engine: handshake, requests, and per-request output streams.

`connect()` sends HELLO until the engine's READY arrives on this client's topic, so no request
goes out before the subscription is live. One task reads the PUB socket and routes each output
to its request's stream. The engine counts as dead on ENGINE_DEAD, on the connection dropping
(a killed process), or after `heartbeat_timeout` seconds of silence; every open stream then
ends with an error and new requests fail at once, until an engine restarted at the same
endpoints answers a new handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import typing
import uuid
from collections.abc import AsyncGenerator, Sequence
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from mlc_engine.common.curve import ClientKeys
from mlc_engine.common.protocol import (
    BROADCAST,
    Abort,
    AddRequest,
    EngineDead,
    EngineInfo,
    FrontendCommand,
    Hello,
    MessageType,
    ProtocolError,
    SamplingParams,
    SequenceOutput,
    Shutdown,
    StatsSnapshot,
    StepOutput,
    pack,
    unpack,
)

REVIVE_SECONDS = 3600.0  # a restarted engine may compile its model first
KEEPALIVE_SECONDS = 1.0


class EngineUnavailableError(RuntimeError):
    """The engine is not answering, or has died."""


class EngineClient:
    """Talks to the engine bound at `input_endpoint` (PULL) and `output_endpoint` (PUB), over
    CURVE with `keys` (an engine on another host)."""

    def __init__(
        self,
        input_endpoint: str,
        output_endpoint: str,
        heartbeat_timeout: float = 10.0,
        keys: ClientKeys | None = None,
    ):
        self.frontend_id = uuid.uuid4().hex
        self._topic = self.frontend_id.encode()
        self.heartbeat_timeout = heartbeat_timeout
        self._context = zmq.asyncio.Context()
        # Nothing waits to be sent once the client goes: closing (or garbage-collecting) the
        # context must never block on an engine that is gone.
        self._context.setsockopt(zmq.LINGER, 0)
        self._push = self._context.socket(zmq.PUSH)
        self._push.setsockopt(zmq.SNDHWM, 0)
        self._sub = self._context.socket(zmq.SUB)
        self._sub.setsockopt(zmq.RCVHWM, 0)
        if keys is not None:
            keys.apply(self._push)
            keys.apply(self._sub)
        self._push.connect(input_endpoint)
        self._sub.setsockopt(zmq.SUBSCRIBE, self._topic)
        self._sub.setsockopt(zmq.SUBSCRIBE, BROADCAST)
        self._monitor = self._sub.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED
            | zmq.EVENT_DISCONNECTED
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
        )
        self._sub.connect(output_endpoint)
        self._streams: dict[str, asyncio.Queue[SequenceOutput]] = {}
        self._sequences = 0
        self._replies: dict[MessageType, asyncio.Queue[Any]] = {
            MessageType.READY: asyncio.Queue(),
            MessageType.STATS_REPLY: asyncio.Queue(),
        }
        self._tasks: list[asyncio.Task[None]] = []
        self.info: EngineInfo | None = None
        self.stats = StatsSnapshot()  # the latest the engine sent
        self.dead: str | None = None  # why the engine counts as dead
        self._last_heard = time.monotonic()
        self._reviving = False
        self._refused: str | None = None  # why the engine would not complete a handshake

    async def connect(self, timeout: float = 60.0) -> EngineInfo:
        """Handshake with the engine; EngineUnavailableError if it does not answer in time."""
        self._tasks = [
            asyncio.create_task(self._receive()),
            asyncio.create_task(self._watch_connection()),
            asyncio.create_task(self._watch_heartbeat()),
        ]
        return await self._handshake(timeout)

    async def _handshake(self, timeout: float) -> EngineInfo:
        """Send HELLO until READY comes back on this client's topic."""
        replies = self._replies[MessageType.READY]
        while not replies.empty():  # answers to earlier HELLOs, perhaps from a dead engine
            replies.get_nowait()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._refused:  # a refused key stays refused: no use waiting
                raise EngineUnavailableError(self._refused)
            self._send(MessageType.HELLO, Hello(self.frontend_id))
            with contextlib.suppress(TimeoutError):
                info: EngineInfo = await asyncio.wait_for(replies.get(), 0.2)
                if info.error:
                    raise EngineUnavailableError(info.error)
                self.info, self.dead = info, None
                self._last_heard = time.monotonic()
                return info
        silence = f"no answer from the engine in {timeout:.0f} s"
        raise EngineUnavailableError(self.dead or self._refused or silence)

    def _send(self, kind: MessageType, message: Any) -> None:
        # PUSH with no high-water mark queues rather than blocks, so sending never waits. A
        # connection whose handshake failed takes nothing: the message is dropped (EAGAIN).
        sent = self._push.send_multipart([kind.value, pack(message)], flags=zmq.NOBLOCK)
        future = typing.cast("asyncio.Future[Any]", sent)
        future.add_done_callback(lambda done: done.cancelled() or done.exception())

    @property
    def num_sequences(self) -> int:
        """Choices of this client's open requests (n of each)."""
        return self._sequences

    @property
    def load(self) -> tuple[int, float]:
        """How busy the engine is, for every frontend it serves, lower first: its waiting and
        running sequences (its latest stats, which count other frontends' too, or this
        client's own when more: the stats lag behind a burst), then its KV pages in use."""
        reported = self.stats.num_waiting + self.stats.num_running
        sequences = max(reported, self._sequences)
        total = self.stats.kv_pages_total
        return sequences, 1 - self.stats.kv_pages_free / total if total else 0.0

    async def generate(
        self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> AsyncGenerator[SequenceOutput, None]:
        """The request's outputs as they come, until each choice has finished. A choice that
        fails ends the request with that error output. Leaving the loop early (a client gone,
        a stop string matched) aborts the request in the engine."""
        if self.dead is not None:
            raise EngineUnavailableError(self.dead)
        stream: asyncio.Queue[SequenceOutput] = asyncio.Queue()
        self._streams[request_id] = stream
        self._sequences += params.n
        request = AddRequest(request_id, self.frontend_id, list(prompt_token_ids), params)
        open_choices = params.n
        try:
            self._send(MessageType.ADD, request)
            while open_choices:
                output = await stream.get()
                yield output
                if output.finish_reason == "error":
                    return
                if output.finish_reason is not None:
                    open_choices -= 1
        finally:
            self._streams.pop(request_id, None)
            self._sequences -= params.n
            if open_choices and self.dead is None:
                self.abort([request_id])

    def abort(self, request_ids: list[str]) -> None:
        self._send(MessageType.ABORT, Abort(request_ids))

    async def fetch_stats(self, reset: bool = False, timeout: float = 10.0) -> StatsSnapshot:
        """The engine's counters now (zeroed first with `reset`)."""
        if self.dead is not None:
            raise EngineUnavailableError(self.dead)
        kind = MessageType.RESET if reset else MessageType.STATS
        self._send(kind, FrontendCommand(self.frontend_id))
        try:
            stats: StatsSnapshot = await asyncio.wait_for(
                self._replies[MessageType.STATS_REPLY].get(), timeout
            )
        except TimeoutError:
            raise EngineUnavailableError("the engine did not answer for its stats") from None
        return stats

    def shutdown_engine(self, drain: bool = True) -> None:
        self._send(MessageType.SHUTDOWN, Shutdown(drain))

    async def close(self, reason: str = "the engine client was closed") -> None:
        """Stop talking to the engine; requests still open end with `reason` as their error."""
        self._die(reason)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._sub.disable_monitor()
        self._context.destroy(linger=0)

    async def _receive(self) -> None:
        while True:
            topic, kind, payload = await self._sub.recv_multipart()
            self._last_heard = time.monotonic()
            try:
                self._dispatch(MessageType(kind), payload)
            except (ProtocolError, ValueError):
                continue  # from a newer or broken engine: nothing to route it to

    def _dispatch(self, kind: MessageType, payload: bytes) -> None:
        if kind is MessageType.STEP:
            step = unpack(StepOutput, payload)
            self.stats = step.stats
            for output in step.outputs:
                stream = self._streams.get(output.request_id)
                if stream is not None:
                    stream.put_nowait(output)
        elif kind is MessageType.HEARTBEAT:
            self.stats = unpack(StatsSnapshot, payload)
            self._revive()
        elif kind is MessageType.READY:
            self._replies[kind].put_nowait(unpack(EngineInfo, payload))
        elif kind is MessageType.STATS_REPLY:
            self._replies[kind].put_nowait(unpack(StatsSnapshot, payload))
        elif kind is MessageType.ENGINE_DEAD:
            self._die(unpack(EngineDead, payload).message)

    async def _watch_connection(self) -> None:
        """A dropped connection after the engine was up means the process is gone; a new
        connection after that is an engine restarted at the same endpoint: handshake again.
        An engine with CURVE that refuses this client's key never gets as far."""
        connected = False
        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                connected, self._refused = True, None
                self._revive()
            elif event["event"] == zmq.EVENT_DISCONNECTED and connected:
                connected = False
                self._die("the engine process went away")
            elif event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self._refused = "the engine refused this frontend's CURVE key"
            elif event["event"] == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                self._refused = "the engine speaks another security mechanism (CURVE or none)"

    def _revive(self) -> None:
        """Handshake again with an engine that was dead and shows signs of life."""
        if self.dead is None or self.info is None or self._reviving:
            return
        self._reviving = True

        async def handshake() -> None:
            with contextlib.suppress(EngineUnavailableError):
                await self._handshake(REVIVE_SECONDS)
            self._reviving = False

        self._tasks.append(asyncio.create_task(handshake()))

    async def _watch_heartbeat(self) -> None:
        """Check the engine's heartbeats, and send this client's own (KEEPALIVE): an engine
        aborts the requests of a frontend it has not heard from for a while."""
        while True:
            await asyncio.sleep(KEEPALIVE_SECONDS)
            if self.dead is None:
                self._send(MessageType.KEEPALIVE, FrontendCommand(self.frontend_id))
            silence = time.monotonic() - self._last_heard
            if self.dead is None and self.info is not None and silence > self.heartbeat_timeout:
                self._die(f"no heartbeat from the engine for {silence:.1f} s")

    def _die(self, reason: str) -> None:
        if self.dead is not None:
            return
        self.dead = reason
        for request_id, stream in self._streams.items():
            stream.put_nowait(
                SequenceOutput(request_id, 0, [], finish_reason="error", error=reason)
            )
