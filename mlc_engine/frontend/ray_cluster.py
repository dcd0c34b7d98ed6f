"""Engines placed on a Ray cluster (`mlc-engine serve --ray ADDRESS`): Ray starts one
`EngineActor` per engine on the nodes that have the resources asked for, and starts it again
when it or its node dies; a thread per engine follows it and writes where it is into the engine
table, which each uvicorn worker of this frontend reads (engine_table.py, engines.py).

The engines are named actors (`engine-0`, ...) in a Ray namespace: a second frontend started
with the same address, namespace and `--engines` uses the engines the first one placed. Those
are owned by the frontend that placed them, so stopping it stops them too.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path
from typing import Any

from mlc_engine.frontend.engine_table import (
    RESTARTING,
    RUNNING,
    STARTING,
    EnginePlace,
    write_table,
)
from mlc_engine.frontend.ray_actor import EngineActor

log = logging.getLogger(__name__)
POLL_SECONDS = 0.5
RETRY_SECONDS = 1.0
LOAD_SECONDS = 3600.0  # an engine may convert and compile its model on first use


@dataclasses.dataclass
class Placement:
    """How many engines, and what each one takes from the node it lands on."""

    engines: int = 1
    cpus: float = 1.0
    gpus: float = 0.0
    resources: dict[str, float] = dataclasses.field(default_factory=dict)
    namespace: str = "mlc-engine"


class RayEngines:
    """The engines of one frontend on a Ray cluster, followed into the engine table."""

    def __init__(self, address: str, placement: Placement, engine_args: list[str]):
        self.address = address
        self.placement = placement
        self.engine_args = engine_args
        self.places = [EnginePlace(i) for i in range(placement.engines)]
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._table: Path | None = None
        self._threads: list[threading.Thread] = []

    def start(self, table: Path, frontend_public_key: str) -> None:
        """Join the cluster, place (or find) the engines, and follow each in a thread."""
        import ray

        ray.init(
            address=self.address,
            namespace=self.placement.namespace,
            logging_level=logging.WARNING,
            log_to_driver=True,
        )
        self._table = table
        write_table(table, self.places)
        remote = ray.remote(EngineActor)
        for index in range(self.placement.engines):
            actor = remote.options(  # type: ignore[attr-defined]
                name=f"engine-{index}",
                get_if_exists=True,
                num_cpus=self.placement.cpus,
                num_gpus=self.placement.gpus,
                resources=self.placement.resources,
                max_restarts=-1,
                max_concurrency=4,  # address() waits for the model while authorize() answers
                scheduling_strategy="SPREAD",
            ).remote(self.engine_args)
            thread = threading.Thread(
                target=self._follow,
                args=(index, actor, frontend_public_key),
                name=f"ray-engine-{index}",
                daemon=True,
            )
            self._threads.append(thread)
            thread.start()

    def stop(self) -> None:
        """Stop following; leaving the cluster stops the engines this frontend placed."""
        import ray

        self.stopping.set()
        for thread in self._threads:
            thread.join()
        if ray.is_initialized():
            ray.shutdown()

    def _follow(self, index: int, actor: Any, frontend_public_key: str) -> None:
        """Wait for the engine to load, record where it is, wait for it to die; again."""
        from ray.exceptions import RayError

        while not self.stopping.is_set():
            try:
                self._get(actor.authorize.remote(frontend_public_key))
                address = self._get(actor.address.remote(LOAD_SECONDS))
                self._update(index, state=RUNNING, message="", **address)
                log.warning("engine %d running on %s", index, address["node"])
                self._get(actor.wait.remote())
                self._update(index, state=RESTARTING, message="the engine exited")
            except _Stopped:
                return
            except RayError as error:
                reason = _reason(error)
                if self.places[index].state != STARTING:
                    self._update(index, state=RESTARTING, message=reason)
                log.warning("engine %d: %s", index, reason)
                self.stopping.wait(RETRY_SECONDS)

    def _get(self, ref: Any) -> Any:
        """The call's result; _Stopped if this frontend stops first."""
        import ray

        while not self.stopping.is_set():
            ready, _ = ray.wait([ref], timeout=POLL_SECONDS)
            if ready:
                return ray.get(ready[0])
        raise _Stopped

    def _update(self, index: int, **changes: Any) -> None:
        with self._lock:
            self.places[index] = dataclasses.replace(self.places[index], **changes)
            assert self._table is not None
            write_table(self._table, self.places)


class _Stopped(Exception):
    """This frontend is stopping: leave the engine to Ray."""


def _reason(error: Exception) -> str:
    """What a failed call to an engine's actor says of it, in a line."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError

    if isinstance(error, ActorUnavailableError):
        return "waiting for Ray to start it again (its process or its node died)"
    if isinstance(error, ActorDiedError):
        return "its Ray actor died"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1][:200] if lines else type(error).__name__
