"""The Ray actor that keeps one engine on its node: it makes the engine's CURVE keys, starts
`mlc-engine engine` bound to the node's address, lets frontends' public keys in, and dies with
the engine, so that Ray starts both again (on this node or another with room).

It runs on the engine's node but imports nothing of the engine: the engine is a child process,
as under `mlc-engine serve`, and this file only needs the standard library, pyzmq and Ray.
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

import mlc_engine
from mlc_engine.common.curve import authorize, check_curve, new_server_folder

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1
PROBE_SECONDS = 0.2
LOAD_FAILURE_PAUSE_SECONDS = 5.0


class EngineActor:
    """One `mlc-engine engine` on this node, reached at `address()` over CURVE."""

    def __init__(self, engine_args: list[str]):
        import ray

        check_curve()
        self.folder = Path(tempfile.mkdtemp(prefix="mlc-engine-curve-"))
        self.server_key = new_server_folder(self.folder)
        self.host = ray.util.get_node_ip_address()
        self.node = f"{ray.get_runtime_context().get_node_id()[:12]}@{self.host}"
        ports = _free_ports(self.host, 2)
        self.endpoints = [f"tcp://{_bracket(self.host)}:{port}" for port in ports]
        # -P: the working directory Ray gives the actor is no place to import mlc_engine from.
        self.command = [sys.executable, "-P", "-m", "mlc_engine", "engine", *engine_args]
        self.command += ["--input", self.endpoints[0], "--output", self.endpoints[1]]
        self.command += ["--curve-dir", str(self.folder)]
        self.process: subprocess.Popen[bytes] | None = None
        self.loaded = False
        self.exited = threading.Event()
        started = threading.Event()
        # The thread that starts the engine waits for it: the engine's parent-death signal
        # follows the thread that forked it, so that thread must live as long as the actor.
        threading.Thread(target=self._run, args=(started,), daemon=True).start()
        started.wait()

    def _run(self, started: threading.Event) -> None:
        # The engine runs the code this actor runs, wherever Ray found it.
        package_root = str(Path(mlc_engine.__file__).parent.parent)
        path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
        environment = {**os.environ, "PYTHONPATH": path}
        self.process = subprocess.Popen(self.command, env=environment, preexec_fn=_die_with_parent)
        started.set()
        code = self.process.wait()
        self.exited.set()
        shutil.rmtree(self.folder, ignore_errors=True)
        log.error("engine exited with code %s; the actor goes with it so Ray restarts both", code)
        if not self.loaded:  # it fails as it loads: do not restart it in a tight loop
            time.sleep(LOAD_FAILURE_PAUSE_SECONDS)
        os._exit(1)  # an actor that fails, not one that ends: Ray restarts it

    def authorize(self, client_public_key: str) -> None:
        """Let the frontend with this CURVE public key in."""
        authorize(self.folder, client_public_key)

    def address(self, timeout: float = 3600.0) -> dict[str, str]:
        """Once the engine has loaded its model (it binds its sockets only then): where it is
        and its CURVE public key."""
        host, port = self.endpoints[1].removeprefix("tcp://").rsplit(":", 1)
        deadline = time.monotonic() + timeout
        while not self.exited.is_set():
            with contextlib.suppress(OSError):
                socket.create_connection((host.strip("[]"), int(port)), PROBE_SECONDS).close()
                self.loaded = True
                return {
                    "input": self.endpoints[0],
                    "output": self.endpoints[1],
                    "server_key": self.server_key,
                    "node": self.node,
                }
            if time.monotonic() > deadline:
                raise TimeoutError(f"the engine did not load in {timeout:.0f} s")
            time.sleep(PROBE_SECONDS)
        raise RuntimeError("the engine exited while loading")

    def wait(self) -> None:
        """Returns only if the engine exits; the actor then dies, and a caller's wait fails."""
        self.exited.wait()


def _die_with_parent() -> None:
    # SIGKILL, not SIGTERM: an actor gone means its node or its owner is gone, and a draining
    # engine would go on serving frontends that have already given its requests up.
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _free_ports(host: str, count: int) -> list[int]:
    """Ports free on `host` now (the engine binds them a moment later)."""
    probes = [
        socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) for _ in range(count)
    ]
    try:
        for probe in probes:
            probe.bind((host, 0))
        return [int(probe.getsockname()[1]) for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host
