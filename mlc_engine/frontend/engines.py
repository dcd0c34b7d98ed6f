"""The engines a frontend talks to: connecting, routing each request to the least loaded
one, bounding their queues, and their health.

Engines are either fixed endpoints (children of `mlc-engine serve`, restarted in place) or
placed by a supervisor elsewhere (Ray), which says where each one is in an engine table: a
client follows its engine to each new address, over CURVE."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

from mlc_engine.common.client import EngineClient, EngineUnavailableError
from mlc_engine.common.curve import ClientKeys
from mlc_engine.common.protocol import EngineInfo, StatsSnapshot
from mlc_engine.frontend.engine_table import (
    RUNNING,
    EnginePlace,
    read_frontend_keys,
    read_table,
)
from mlc_engine.frontend.errors import BadRequestError, QueueFullError, UnavailableError

log = logging.getLogger(__name__)

# How long a request waits for a handshake still under way (a uvicorn worker that has just
# started) before it is answered 503; an engine that is still loading its model takes minutes.
READY_WAIT_SECONDS = 5.0
TABLE_POLL_SECONDS = 0.2
PLACED_HANDSHAKE_SECONDS = 60.0  # a placed engine is loaded before the table names it


class EnginePool:
    """One `EngineClient` per engine; `connect` runs in the background while they load."""

    def __init__(
        self,
        endpoints: list[list[str]],
        max_queue: int,
        table: Path | None = None,
        frontend_keys: Path | None = None,
    ):
        self.clients: list[EngineClient] = [
            EngineClient(inputs, outputs) for inputs, outputs in endpoints
        ]
        self.places = [EnginePlace(i, RUNNING, "local") for i in range(len(self.clients))]
        self.max_queue = max_queue
        self.ready = False
        self.failure: str | None = None
        self._settled = asyncio.Event()  # set once `connect` has succeeded or failed
        self._table = table
        self._keys = read_frontend_keys(frontend_keys) if frontend_keys else None
        self._placed: dict[int, EngineClient] = {}  # placed engines by index, once connected
        self._table_version = 0.0

    async def connect(self, timeout: float = 3600.0) -> None:
        if self._table is not None:
            await self._follow_table()
            return
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

    async def _follow_table(self) -> None:
        """Connect to each placed engine named in the table, and again wherever it moves."""
        assert self._table is not None
        tasks: set[asyncio.Task[None]] = set()
        try:
            while True:
                with contextlib.suppress(OSError, ValueError):
                    version = self._table.stat().st_mtime
                    if version != self._table_version:
                        self._table_version = version
                        for place in read_table(self._table):
                            task = asyncio.create_task(self._place(place))
                            tasks.add(task)
                            task.add_done_callback(tasks.discard)
                await asyncio.sleep(TABLE_POLL_SECONDS)
        finally:
            for task in list(tasks):
                task.cancel()

    async def _place(self, place: EnginePlace) -> None:
        """Take the table's word on one engine; a new address gets a new client."""
        old = self.places[place.index] if place.index < len(self.places) else None
        self.places += [EnginePlace(i) for i in range(len(self.places), place.index + 1)]
        self.places[place.index] = place
        moved = old is None or old.address != place.address
        if not moved or not place.input:
            return
        client = self._placed.pop(place.index, None)
        if client is not None:
            await client.close(f"engine {place.index} moved to {place.node}")
        if place.state != RUNNING:
            return
        assert self._keys is not None
        keys = ClientKeys(*self._keys, place.server_key)
        client = EngineClient(place.input, place.output, keys=keys)
        try:
            await client.connect(PLACED_HANDSHAKE_SECONDS)
        except EngineUnavailableError as error:
            log.error("engine %d at %s: %s", place.index, place.input, error)
            await client.close(str(error))
            return
        if self.places[place.index].address != place.address:  # moved again meanwhile
            await client.close("the engine moved")
            return
        self._placed[place.index] = client
        self.clients = [self._placed[i] for i in sorted(self._placed)]
        self.ready = True
        self._settled.set()

    def states(self) -> list[dict[str, Any]]:
        """Each engine's state and node, for /health and /metrics."""
        if self._table is None:
            return [
                {"engine": i, "node": "local", "state": "dead" if c.dead else self._loading(c)}
                | ({"message": c.dead} if c.dead else {})
                for i, c in enumerate(self.clients)
            ]
        states = []
        for place in self.places:
            client = self._placed.get(place.index)
            state, message = place.state, place.message
            if state == RUNNING and client is None:
                state = "connecting"
            elif state == RUNNING and client is not None and client.dead:
                state, message = "unreachable", client.dead
            entry = {"engine": place.index, "node": place.node, "state": state}
            states.append(entry | ({"message": message} if message else {}))
        return states

    @staticmethod
    def _loading(client: EngineClient) -> str:
        return RUNNING if client.info is not None else "starting"

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
        if any(state["state"] == RUNNING for state in self.states()):
            return None
        return "; ".join(
            f"engine {s['engine']}: {s.get('message', s['state'])}" for s in self.states()
        )

    def pick(self, sequences: int) -> EngineClient:
        """The live engine with the fewest sequences, for a request of `sequences` (prompts x
        n); 429 when no engine has room for them, 400 when none ever could. The engine itself
        also refuses what would overfill it, which holds across uvicorn workers too."""
        if not self.ready:
            raise UnavailableError(self.health() or "the model is still loading")
        live = [client for client in self.clients if client.dead is None]
        if not live:
            raise UnavailableError(self.health() or "no engine is running")
        client = min(live, key=lambda c: c.load)
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
        if self._table is None:
            return [client.stats for client in self.clients]
        placed = [self._placed.get(place.index) for place in self.places]
        return [client.stats if client else StatsSnapshot() for client in placed]

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
