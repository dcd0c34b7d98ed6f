"""ZeroMQ CURVE for engines reached over tcp://: encryption, and only known frontends let in.

An engine's keys live in a folder of its own node (`--curve-dir`): its secret key in `server`,
and the public key of each frontend it lets in under `clients/`. A frontend holds its own key
pair and the engine's public key (`ClientKeys`). Secret keys never leave the process or node
that made them; only public keys travel.

Keys are Z85 text (40 characters), as `zmq.curve_keypair()` makes them.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import zmq
import zmq.auth.thread
from zmq.utils import z85

SERVER_SECRET = "server"
CLIENTS = "clients"


def check_curve() -> None:
    """RuntimeError when this libzmq was built without CURVE (libsodium or tweetnacl)."""
    if not zmq.has("curve"):
        raise RuntimeError(
            f"libzmq {zmq.zmq_version()} has no CURVE support; install pyzmq's wheel, "
            "which bundles a libzmq with it"
        )


@dataclasses.dataclass
class ClientKeys:
    """What a frontend needs to reach one engine: its own key pair and the engine's public key."""

    public: str
    secret: str
    server: str

    def apply(self, sock: zmq.Socket) -> None:
        """Make `sock` a CURVE client of the engine; before connect()."""
        sock.curve_publickey = self.public.encode()
        sock.curve_secretkey = self.secret.encode()
        sock.curve_serverkey = self.server.encode()


def new_server_folder(folder: Path) -> str:
    """Make an engine's key folder (private to this user) with a new key pair; its public key."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    (folder / CLIENTS).mkdir(mode=0o700, exist_ok=True)
    public, secret = zmq.curve_keypair()
    _write_private(folder / SERVER_SECRET, secret.decode())
    return public.decode()


def authorize(folder: Path, client_public: str) -> None:
    """Let the frontend with this public key in (it takes effect at its next connection)."""
    # The file name is the key itself, in hex: Z85 may hold '/'.
    (folder / CLIENTS / _decode(client_public.encode()).hex()).write_text(client_public)


class AuthorizedClients:
    """pyzmq's credentials provider: a client key is let in when its file is in `clients/`.
    Read at each connection, so keys added while the engine runs count."""

    def __init__(self, folder: Path):
        self.folder = folder / CLIENTS

    def callback(self, domain: str, key: bytes) -> bool:
        try:
            return (self.folder / _decode(key).hex()).is_file()
        except ValueError:
            return False


def serve_securely(context: zmq.Context, folder: Path) -> zmq.auth.thread.ThreadAuthenticator:
    """Start the ZAP handler that checks clients against `folder`; before any socket binds."""
    check_curve()
    authenticator = zmq.auth.thread.ThreadAuthenticator(context)
    authenticator.start()
    authenticator.configure_curve_callback("*", credentials_provider=AuthorizedClients(folder))
    return authenticator


def secure_server_socket(sock: zmq.Socket, folder: Path) -> None:
    """Make `sock` a CURVE server with the engine's secret key; before bind()."""
    sock.curve_server = True
    sock.curve_secretkey = (folder / SERVER_SECRET).read_text().strip().encode()


def _write_private(path: Path, text: str) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(text)


def _decode(key: bytes) -> bytes:
    try:
        raw = z85.decode(key) if len(key) == 40 else b""
    except (ValueError, TypeError, KeyError):
        raw = b""
    if len(raw) != 32:
        raise ValueError("not a Z85 CURVE public key")
    return raw
