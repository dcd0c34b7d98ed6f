"""`mlc-engine serve`'s process tree: one engine process per device, then, once every engine
has answered the handshake, uvicorn running the frontend (in one or more workers). On Ctrl-C
or SIGTERM uvicorn stops, then the engines, and the run directory with their ipc sockets goes.

Engines run in their own session, so Ctrl-C reaches only this process, which stops them in
order; they also get SIGTERM if this process dies without stopping them (Linux).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import uvicorn

from mlc_engine.common.client import EngineClient, EngineUnavailableError
from mlc_engine.common.errors import MLCEngineError
from mlc_engine.frontend.settings import ServeSettings

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1
STOP_SECONDS = 15
READY_SECONDS = 3600  # loading includes compiling on first use


def _die_with_parent() -> None:
    # Not on Linux: Ctrl-C and SIGTERM still stop the engines through serve().
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def start_engine(
    engine_args: list[str], run_dir: Path, index: int
) -> tuple[subprocess.Popen[bytes], list[str]]:
    endpoints = [f"ipc://{run_dir}/engine{index}-input", f"ipc://{run_dir}/engine{index}-output"]
    command = [sys.executable, "-m", "mlc_engine", "engine", *engine_args]
    command += ["--input", endpoints[0], "--output", endpoints[1]]
    process = subprocess.Popen(command, start_new_session=True, preexec_fn=_die_with_parent)
    return process, endpoints


def stop_engines(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            log.warning("engine %d did not stop in %d s; killing it", process.pid, STOP_SECONDS)
            process.kill()
            process.wait()


async def _wait_ready(processes: list[subprocess.Popen[bytes]], endpoints: list[list[str]]) -> None:
    """Handshake with each engine, failing fast if one exits while it loads."""
    for index, (process, (inputs, outputs)) in enumerate(zip(processes, endpoints, strict=True)):
        client = EngineClient(inputs, outputs)
        handshake = asyncio.create_task(client.connect(timeout=READY_SECONDS))
        try:
            while not handshake.done():
                await asyncio.wait({handshake}, timeout=0.5)
                if process.poll() is not None and not handshake.done():
                    handshake.cancel()
                    raise MLCEngineError(
                        f"engine {index} exited with code {process.returncode} while loading "
                        "(its log is above)"
                    )
            handshake.result()
        except EngineUnavailableError as error:
            raise MLCEngineError(f"engine {index} did not start: {error}") from None
        finally:
            await client.close()


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
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for index, args in enumerate(engine_args):
            process, endpoints = start_engine(args, run_dir, index)
            processes.append(process)
            settings.engines.append(endpoints)
        asyncio.run(_wait_ready(processes, settings.engines))
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
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        stop_engines(processes)
        shutil.rmtree(run_dir, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
