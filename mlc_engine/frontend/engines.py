"""The engines a frontend talks to: connecting, routing each request to the least loaded
one, bounding their queues, and their health."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from mlc_engine.common.client import EngineClient, EngineUnavailableError
from mlc_engine.common.protocol import EngineInfo, StatsSnapshot
from mlc_engine.frontend.errors import BadRequestError, QueueFullError, UnavailableError

log = logging.getLogger(__name__)

# How long a request waits for a handshake still under way (a uvicorn worker that has just
# started) before it is answered 503; an engine that is still loading its model takes minutes.
READY_WAIT_SECONDS = 5.0


class EnginePool:
    """One `EngineClient` per engine; `connect` runs in the background while they load."""

    def __init__(self, endpoints: list[list[str]], max_queue: int):
        self.clients = [EngineClient(inputs, outputs) for inputs, outputs in endpoints]
        self.max_queue = max_queue
        self.ready = False
        self.failure: str | None = None
        self._settled = asyncio.Event()  # set once `connect` has succeeded or failed

    async def connect(self, timeout: float = 3600.0) -> None:
        try:
            await asyncio.gather(*(client.connect(timeout) for client in self.clients))
        except EngineUnavailableError as error:
            self.failure = str(error)
            log.error("engine handshake failed: %s", error)
        else:
            self.ready = True
        finally:
            self._settled.set()

    async def wait_ready(self, seconds: float = READY_WAIT_SECONDS) -> None:
        """Give a handshake under way a few seconds; 503 if the engines are not ready by then."""
        if not self.ready:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._settled.wait(), seconds)
        problem = self.health() if not self.ready else None
        if problem:
            raise UnavailableError(problem)

    @property
    def info(self) -> EngineInfo:
        infos = [client.info for client in self.clients if client.info is not None]
        if not infos:
            raise UnavailableError("the model is still loading")
        return min(infos, key=lambda info: info.context_window)

    def health(self) -> str | None:
        """Why the server cannot serve right now, or None when it can."""
        if self.failure:
            return self.failure
        if not self.ready:
            return "the model is still loading"
        dead = [f"engine {i}: {c.dead}" for i, c in enumerate(self.clients) if c.dead]
        return "; ".join(dead) if dead else None

    def pick(self, sequences: int) -> EngineClient:
        """The live engine with the fewest sequences, for a request of `sequences` (prompts x
        n); 429 when no engine has room for them, 400 when none ever could. The engine itself
        also refuses what would overfill it, which holds across uvicorn workers too."""
        if not self.ready:
            raise UnavailableError(self.health() or "the model is still loading")
        live = [client for client in self.clients if client.dead is None]
        if not live:
            raise UnavailableError(self.health() or "no engine is running")
        client = min(live, key=lambda c: c.num_sequences)
        assert client.info is not None
        room = client.info.max_num_seqs + self.max_queue
        if sequences > room:
            raise BadRequestError(
                f"n: the request needs {sequences} sequences (prompts x n); an engine here "
                f"holds {room} at most",
                param="n",
            )
        if client.num_sequences + sequences > room:
            raise QueueFullError(
                f"all engines are busy ({client.num_sequences} sequences each); retry later"
            )
        return client

    def snapshots(self) -> list[StatsSnapshot]:
        return [client.stats for client in self.clients]

    async def fetch_stats(self, reset: bool = False) -> list[StatsSnapshot]:
        live = [client for client in self.clients if client.dead is None and client.info]
        if not live:
            raise UnavailableError(self.health() or "no engine is running")
        try:
            return list(await asyncio.gather(*(c.fetch_stats(reset) for c in live)))
        except EngineUnavailableError as error:
            raise UnavailableError(str(error)) from None

    async def close(self) -> None:
        await asyncio.gather(*(client.close() for client in self.clients))
