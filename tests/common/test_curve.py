"""An engine on tcp:// with CURVE (`mlc-engine engine --curve-dir`): a frontend whose public key
it holds is served; one it does not know, or one without CURVE, is refused at the handshake."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq
from conftest import LoadedModel, free_port

from mlc_engine.common.client import EngineClient, EngineUnavailableError
from mlc_engine.common.curve import ClientKeys, authorize, new_server_folder
from mlc_engine.common.protocol import SamplingParams


@pytest.fixture(scope="module")
def secured_engine(
    tiny_model: Callable[..., LoadedModel], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[list[str], Path, str]]:
    """An engine bound to 127.0.0.1 with CURVE: its endpoints, key folder and public key."""
    folder = tmp_path_factory.mktemp("curve") / "keys"
    server_key = new_server_folder(folder)
    endpoints = [f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"]
    command = [sys.executable, "-m", "mlc_engine", "engine", "--device", "cpu"]
    command += ["--model", str(tiny_model("q0f32").folder), "--curve-dir", str(folder)]
    command += ["--input", endpoints[0], "--output", endpoints[1]]
    process = subprocess.Popen(command)
    try:
        yield endpoints, folder, server_key
    finally:
        process.kill()
        process.wait()


def _generate(client: EngineClient, timeout: float) -> list[int]:
    async def scenario() -> list[int]:
        try:
            await client.connect(timeout)
            tokens: list[int] = []
            params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
            async for output in client.generate("r1", [1, 5, 9], params):
                tokens += output.token_ids
            return tokens
        finally:
            await client.close()

    return asyncio.run(scenario())


def test_a_frontend_the_engine_knows_is_served_over_curve(
    secured_engine: tuple[list[str], Path, str],
) -> None:
    endpoints, folder, server_key = secured_engine
    public, secret = (key.decode() for key in zmq.curve_keypair())
    authorize(folder, public)
    client = EngineClient(*endpoints, keys=ClientKeys(public, secret, server_key))
    assert len(_generate(client, timeout=120)) == 4


def test_an_unknown_frontend_or_one_without_curve_is_refused(
    secured_engine: tuple[list[str], Path, str],
) -> None:
    endpoints, folder, server_key = secured_engine
    public, secret = (key.decode() for key in zmq.curve_keypair())
    known = EngineClient(*endpoints, keys=ClientKeys(public, secret, server_key))
    authorize(folder, public)
    _generate(known, timeout=120)  # the engine is up
    stranger_public, stranger_secret = (key.decode() for key in zmq.curve_keypair())
    stranger = EngineClient(
        *endpoints, keys=ClientKeys(stranger_public, stranger_secret, server_key)
    )
    with pytest.raises(EngineUnavailableError, match="refused this frontend's CURVE key"):
        _generate(stranger, timeout=60)
    with pytest.raises(EngineUnavailableError, match="another security mechanism"):
        _generate(EngineClient(*endpoints), timeout=60)


def test_authorize_refuses_what_is_not_a_public_key(tmp_path: Path) -> None:
    new_server_folder(tmp_path)
    with pytest.raises(ValueError, match="not a Z85"):
        authorize(tmp_path, "../../etc/passwd")
