"""Where each engine runs, as a supervisor that places engines elsewhere (Ray) sees it: a JSON
file in the server's private run directory, rewritten whole (atomically) when anything changes
and read by every uvicorn worker of the frontend. Also the frontend's own CURVE key pair, kept
beside it so that no secret goes through the environment."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import zmq

STARTING = "starting"  # placed, loading its model, or waiting for the cluster to have room
RUNNING = "running"
RESTARTING = "restarting"  # died; Ray starts it again when a node has the resources
DEAD = "dead"  # will not come back


@dataclasses.dataclass
class EnginePlace:
    """One engine: its state, the node it runs on, and how to reach it."""

    index: int
    state: str = STARTING
    node: str = ""
    input: str = ""
    output: str = ""
    server_key: str = ""  # the engine's CURVE public key
    message: str = ""  # why it is not running

    @property
    def address(self) -> tuple[str, str, str]:
        return self.input, self.output, self.server_key


def write_table(path: Path, places: list[EnginePlace]) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps([dataclasses.asdict(place) for place in places]))
    os.replace(partial, path)


def read_table(path: Path) -> list[EnginePlace]:
    return [EnginePlace(**entry) for entry in json.loads(path.read_text())]


def new_frontend_keys(path: Path) -> str:
    """A new CURVE key pair for this frontend, written to `path` (this user only); returns
    the public key."""
    public, secret = zmq.curve_keypair()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(f"{public.decode()} {secret.decode()}")
    return public.decode()


def read_frontend_keys(path: Path) -> tuple[str, str]:
    public, secret = path.read_text().split()
    return public, secret
