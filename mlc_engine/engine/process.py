"""One engine process behind ZeroMQ: PULL for requests, PUB for outputs.

The engine loop runs in the main thread; one thread receives and decodes requests and one
publishes outputs and heartbeats, so both go on while the model computes (TVM releases the
GIL). SIGTERM drains: running requests finish, new ones are refused, then the process exits.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from mlc_engine.common.curve import secure_server_socket, serve_securely
from mlc_engine.common.device import Device, tvm_device
from mlc_engine.common.protocol import (
    BROADCAST,
    PROTOCOL_VERSION,
    Abort,
    AddRequest,
    EngineDead,
    FrontendCommand,
    Hello,
    MessageType,
    ProtocolError,
    SequenceOutput,
    Shutdown,
    StatsSnapshot,
    StepOutput,
    pack,
    unpack,
)
from mlc_engine.engine.core import Engine, EngineConfig
from mlc_engine.engine.models import prepare_library, prepare_model
from mlc_engine.engine.runtime import ModelRuntime

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 0.5
POLL_MS = 100
IDLE_RELEASE_SECONDS = 1.0  # idle this long, the engine gives the VM's pooled memory back
INPUT_TYPES: dict[MessageType, type] = {
    MessageType.HELLO: Hello,
    MessageType.ADD: AddRequest,
    MessageType.ABORT: Abort,
    MessageType.RESET: FrontendCommand,
    MessageType.STATS: FrontendCommand,
    MessageType.SHUTDOWN: Shutdown,
    MessageType.KEEPALIVE: FrontendCommand,
}


@dataclass
class Outgoing:
    topic: bytes
    kind: MessageType
    payload: bytes


def decode_request(frames: list[bytes]) -> tuple[MessageType, Any]:
    """A received [type, payload] pair, checked; ProtocolError if it is not one."""
    if len(frames) != 2:
        raise ProtocolError(f"expected 2 frames, got {len(frames)}")
    try:
        kind = MessageType(frames[0])
    except ValueError:
        raise ProtocolError(f"unknown message type {frames[0]!r:.20}") from None
    if kind not in INPUT_TYPES:
        raise ProtocolError(f"{kind.name} is not a request")
    return kind, unpack(INPUT_TYPES[kind], frames[1])


class EngineServer:
    """Serves one `Engine` on an input (PULL) and an output (PUB) endpoint, both bound here;
    with `curve_dir`, encrypted and only to the frontends whose keys it holds (common/curve)."""

    def __init__(
        self,
        engine: Engine,
        input_endpoint: str,
        output_endpoint: str,
        curve_dir: Path | None = None,
    ):
        self.engine = engine
        self.frontend_seen: dict[str, float] = {}
        self._next_expiry_check = 0.0
        self.context = zmq.Context()
        self._curve_dir = curve_dir
        self._authenticator = serve_securely(self.context, curve_dir) if curve_dir else None
        self.inbox: queue.Queue[tuple[MessageType, Any]] = queue.Queue()
        self.outbox: queue.Queue[Outgoing | None] = queue.Queue()
        self.stopping = threading.Event()  # no new requests; exit once the running ones end
        self.owners: dict[str, tuple[str, int]] = {}  # request id -> (frontend id, open choices)
        self.latest = StatsSnapshot()
        self._closing = threading.Event()  # the IO threads close their sockets and end
        self._endpoints = (input_endpoint, output_endpoint)
        self._input = self._bind(zmq.PULL, input_endpoint)
        self._output = self._bind(zmq.PUB, output_endpoint)
        self._threads = [
            threading.Thread(target=self._receive, name="engine-input", daemon=True),
            threading.Thread(target=self._publish, name="engine-output", daemon=True),
        ]

    def _bind(self, kind: int, endpoint: str) -> zmq.Socket:
        sock = self.context.socket(kind)
        sock.setsockopt(zmq.SNDHWM, 0)  # 0: no limit, so no output or request is dropped
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.LINGER, 2000)
        if self._curve_dir is not None:
            secure_server_socket(sock, self._curve_dir)
        sock.bind(endpoint)
        return sock

    def serve(self) -> None:
        """Run until SHUTDOWN or SIGTERM (after draining); publishes ENGINE_DEAD on a crash."""
        for thread in self._threads:
            thread.start()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: self.stopping.set())
        try:
            self._loop()
        except BaseException as error:
            log.exception("engine loop died")
            self._send(BROADCAST, MessageType.ENGINE_DEAD, EngineDead(f"engine died: {error!r}"))
            raise
        finally:
            self._closing.set()
            self.outbox.put(None)
            for thread in self._threads:
                thread.join(timeout=5)
            if self._authenticator is not None:
                self._authenticator.stop()
            self.context.term()
            for endpoint in self._endpoints:
                if endpoint.startswith("ipc://"):  # ZeroMQ leaves the socket file behind
                    Path(endpoint.removeprefix("ipc://")).unlink(missing_ok=True)

    def _loop(self) -> None:
        last_work: float | None = None  # when the engine last stepped, if not released since
        while not (self.stopping.is_set() and not self.engine.has_work):
            self._handle_messages(block=not self.engine.has_work)
            if self.engine.has_work:
                self._publish_outputs(self.engine.step())
                last_work = time.monotonic()
            elif last_work is not None and time.monotonic() - last_work > IDLE_RELEASE_SECONDS:
                self.engine.runtime.release_memory()
                last_work = None
            self._expire_frontends()
            self.latest = self.engine.snapshot()

    def _handle_messages(self, block: bool) -> None:
        try:
            message = self.inbox.get(timeout=POLL_MS / 1000) if block else self.inbox.get_nowait()
            while True:
                self._handle(*message)
                message = self.inbox.get_nowait()
        except queue.Empty:
            return

    def _expire_frontends(self) -> None:
        """Abort the requests of frontends that stopped sending anything (crashed, killed)."""
        now = time.monotonic()
        if now < self._next_expiry_check:
            return
        self._next_expiry_check = now + 1.0
        lease = self.engine.config.frontend_lease
        gone = [f for f, seen in self.frontend_seen.items() if now - seen > lease]
        for frontend_id in gone:
            del self.frontend_seen[frontend_id]
            orphans = [rid for rid, (owner, _) in self.owners.items() if owner == frontend_id]
            if orphans:
                log.warning("frontend %s silent: aborting %d requests", frontend_id, len(orphans))
                self._publish_outputs(self.engine.abort(orphans))

    def _handle(self, kind: MessageType, message: Any) -> None:
        frontend_id = getattr(message, "frontend_id", None)
        if frontend_id is not None:
            self.frontend_seen[frontend_id] = time.monotonic()
        if kind is MessageType.HELLO:
            info = self.engine.info()
            if message.protocol_version != PROTOCOL_VERSION:
                info.error = (
                    f"protocol version {message.protocol_version} is not the engine's "
                    f"({PROTOCOL_VERSION}); upgrade the older side"
                )
            self._send(message.frontend_id.encode(), MessageType.READY, info)
        elif kind is MessageType.ADD:
            self._add(message)
        elif kind is MessageType.ABORT:
            self._publish_outputs(self.engine.abort(message.request_ids))
        elif kind in (MessageType.RESET, MessageType.STATS):
            if kind is MessageType.RESET:
                self.engine.reset_stats()
            topic = message.frontend_id.encode()
            self._send(topic, MessageType.STATS_REPLY, self.engine.snapshot())
        elif kind is MessageType.SHUTDOWN:
            if not message.drain:
                self._publish_outputs(self.engine.abort(list(self.engine.requests)))
            self.stopping.set()

    def _add(self, request: AddRequest) -> None:
        self.owners[request.request_id] = (request.frontend_id, request.params.n)
        if self.stopping.is_set():
            outputs = [
                SequenceOutput(
                    request.request_id,
                    0,
                    [],
                    finish_reason="error",
                    error="the engine is shutting down",
                )
            ]
        else:
            outputs = self.engine.add(request)
        self._publish_outputs(outputs)

    def _publish_outputs(self, outputs: list[SequenceOutput]) -> None:
        """One STEP message per frontend with outputs in it."""
        if not outputs:
            return
        by_frontend: dict[str, list[SequenceOutput]] = {}
        for output in outputs:
            owner = self._owner(output)
            if owner is not None:
                by_frontend.setdefault(owner, []).append(output)
        stats = self.engine.snapshot()
        for frontend_id, own in by_frontend.items():
            self._send(frontend_id.encode(), MessageType.STEP, StepOutput(own, stats))

    def _owner(self, output: SequenceOutput) -> str | None:
        """The frontend an output goes to; forgets a request with its last terminal output."""
        if output.request_id not in self.owners:
            log.warning("output for unknown request %s dropped", output.request_id)
            return None
        frontend_id, open_choices = self.owners[output.request_id]
        if output.finish_reason is not None:
            open_choices = 0 if output.finish_reason == "error" else open_choices - 1
            if open_choices == 0:
                del self.owners[output.request_id]
            else:
                self.owners[output.request_id] = (frontend_id, open_choices)
        return frontend_id

    def _send(self, topic: bytes, kind: MessageType, message: Any) -> None:
        self.outbox.put(Outgoing(topic, kind, pack(message)))

    def _receive(self) -> None:
        poller = zmq.Poller()
        poller.register(self._input, zmq.POLLIN)
        while not self._closing.is_set():
            if not poller.poll(POLL_MS):
                continue
            frames = self._input.recv_multipart()
            try:
                self.inbox.put(decode_request(frames))
            except ProtocolError as error:
                log.warning("dropped a malformed message: %s", error)
        self._input.close()

    def _publish(self) -> None:
        last_beat = 0.0
        while True:
            try:
                item = self.outbox.get(timeout=HEARTBEAT_SECONDS / 2)
            except queue.Empty:
                pass
            else:
                if item is None:
                    break
                self._output.send_multipart([item.topic, item.kind.value, item.payload])
            if time.monotonic() - last_beat >= HEARTBEAT_SECONDS:
                beat = [BROADCAST, MessageType.HEARTBEAT.value, pack(self.latest)]
                self._output.send_multipart(beat)
                last_beat = time.monotonic()
        self._output.close()


def run_engine(
    model: str | None,
    device: Device,
    input_endpoint: str,
    output_endpoint: str,
    config: EngineConfig,
    lib_path: Path | None = None,
    num_threads: int | None = None,
    curve_dir: Path | None = None,
) -> None:
    """Load (converting and compiling as needed) and serve until told to stop. The sockets
    are bound only once the model is loaded, so READY means ready."""
    folder = prepare_model(model, device)
    library = prepare_library(folder, device, lib_path)
    runtime = ModelRuntime(library, folder, tvm_device(device), num_threads)
    log.info("serving %s (%s) on %s", folder.name, library.name, device)
    engine = Engine(runtime, config, folder.name)
    EngineServer(engine, input_endpoint, output_endpoint, curve_dir).serve()
