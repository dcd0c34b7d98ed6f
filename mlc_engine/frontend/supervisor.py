"""`mlc-engine serve`'s process tree: one engine process per device (or engines placed on a Ray
cluster: `serve_on_ray`), and uvicorn running the frontend (in one or more workers), which
answers 503 until the engines have loaded. An engine that dies while loading stops the server
with its error; one that dies while serving is started again at the same endpoints, and the
frontends' clients handshake with it anew. On Ctrl-C or SIGTERM uvicorn stops, then the
engines, and the run directory with their ipc sockets goes.

Engines run in their own session, so Ctrl-C reaches only this process, which stops them in
order; they also get SIGTERM if this process dies without stopping them (Linux).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import uvicorn

from mlc_engine.common.errors import MLCEngineError
from mlc_engine.frontend.engine_table import new_frontend_keys
from mlc_engine.frontend.ray_cluster import RayEngines
from mlc_engine.frontend.settings import ServeSettings

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1
STOP_SECONDS = 15
READY_SECONDS = 3600  # loading includes compiling on first use
WATCH_SECONDS = 0.5
MAX_RESTART_DELAY = 30.0


def _die_with_parent() -> None:
    # Not on Linux: Ctrl-C and SIGTERM still stop the engines through serve().
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class EngineProcess:
    """One `mlc-engine engine` child, with the endpoints it binds in the run directory."""

    def __init__(self, args: list[str], run_dir: Path, index: int):
        self.index = index
        self.endpoints = [
            f"ipc://{run_dir}/engine{index}-input",
            f"ipc://{run_dir}/engine{index}-output",
        ]
        self.command = [sys.executable, "-m", "mlc_engine", "engine", *args]
        self.command += ["--input", self.endpoints[0], "--output", self.endpoints[1]]
        self.restarts = 0
        self.process = self._spawn()

    def _spawn(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.command, start_new_session=True, preexec_fn=_die_with_parent)

    def restart(self) -> None:
        log.error("engine %d exited with code %s; starting it again", self.index, self.returncode)
        self.restarts += 1
        self.process = self._spawn()

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()

    def wait(self) -> None:
        try:
            self.process.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            log.warning("engine %d did not stop in %d s; killing it", self.index, STOP_SECONDS)
            self.process.kill()
            self.process.wait()

    @property
    def loaded(self) -> bool:
        """The engine binds its sockets only once its model is loaded: the ipc file shows it."""
        return Path(self.endpoints[1].removeprefix("ipc://")).exists()


class Watchdog(threading.Thread):
    """Waits until every engine has loaded, stopping the server if one dies while it loads;
    then starts engines that die again, waiting longer after each quick death."""

    def __init__(self, engines: list[EngineProcess]):
        super().__init__(name="engine-watchdog", daemon=True)
        self.engines = engines
        self.stopping = threading.Event()
        self.failure: str | None = None

    def run(self) -> None:
        self.failure = self._wait_loaded()
        if self.failure is not None:
            os.kill(os.getpid(), signal.SIGTERM)  # uvicorn shuts down; serve() reports it
            return
        self._restart_dead()

    def _wait_loaded(self) -> str | None:
        """None once every engine has loaded; what went wrong if one exited first."""
        deadline = time.monotonic() + READY_SECONDS
        while not self.stopping.wait(WATCH_SECONDS):
            for engine in self.engines:
                if engine.returncode is not None and not engine.loaded:
                    return (
                        f"engine {engine.index} exited with code {engine.returncode} while "
                        "loading (its log is above)"
                    )
            if all(engine.loaded for engine in self.engines):
                return None
            if time.monotonic() > deadline:
                return f"the engines did not load in {READY_SECONDS} s"
        return None

    def _restart_dead(self) -> None:
        due: dict[int, float] = {}
        while not self.stopping.wait(WATCH_SECONDS):
            for engine in self.engines:
                if engine.returncode is None:
                    continue
                if engine.index not in due:
                    delay = min(2.0**engine.restarts, MAX_RESTART_DELAY)
                    due[engine.index] = time.monotonic() + delay
                elif time.monotonic() >= due[engine.index] and not self.stopping.is_set():
                    del due[engine.index]
                    engine.restart()


def _check_port_free(host: str, port: int) -> None:
    """Fail before loading anything when the port is taken."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise MLCEngineError(f"cannot listen on {host}:{port}: {error.strerror}") from None


def serve(
    settings: ServeSettings,
    engine_args: list[list[str]],
    host: str,
    port: int,
    workers: int = 1,
) -> None:
    """Start an engine for each entry of `engine_args` and serve until interrupted."""
    _check_port_free(host, port)
    # SIGTERM unwinds like Ctrl-C, through the cleanup below. uvicorn handles both while it
    # runs, then raises the signal again once it has shut down: that lands here too.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    run_dir = Path(tempfile.mkdtemp(prefix="mlc-engine-"))  # mode 0700
    engines: list[EngineProcess] = []
    watchdog = Watchdog(engines)
    try:
        for index, args in enumerate(engine_args):
            engines.append(EngineProcess(args, run_dir, index))
        settings.engines = [engine.endpoints for engine in engines]
        watchdog.start()
        _run_frontend(settings, host, port, workers)
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        watchdog.stopping.set()
        if watchdog.is_alive():
            watchdog.join()
        for engine in engines:
            engine.stop()
        for engine in engines:
            engine.wait()
        shutil.rmtree(run_dir, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)
    if watchdog.failure:
        raise MLCEngineError(watchdog.failure)


def serve_on_ray(
    settings: ServeSettings, cluster: RayEngines, host: str, port: int, workers: int = 1
) -> None:
    """Place the engines on a Ray cluster (or find those placed) and serve until interrupted."""
    _check_port_free(host, port)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    run_dir = Path(tempfile.mkdtemp(prefix="mlc-engine-"))  # mode 0700: the key lives here
    try:
        table, keys = run_dir / "engines.json", run_dir / "frontend.keys"
        settings.engine_table, settings.frontend_keys = str(table), str(keys)
        cluster.start(table, new_frontend_keys(keys))
        _run_frontend(settings, host, port, workers)
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        cluster.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)


def _run_frontend(settings: ServeSettings, host: str, port: int, workers: int) -> None:
    settings.to_env()
    uvicorn.run(
        "mlc_engine.frontend.app:create_app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="warning",
        timeout_graceful_shutdown=5,
    )


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
