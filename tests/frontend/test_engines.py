"""The frontend's engine pool against a real engine process that comes up after it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import LoadedModel, engine_process

from mlc_engine.frontend.engines import EnginePool
from mlc_engine.frontend.errors import UnavailableError


def test_a_request_waits_for_a_handshake_under_way(
    tiny_model: Callable[..., LoadedModel], tmp_path: Path
) -> None:
    """A uvicorn worker that has just started must not answer 503 while its handshake with
    an engine that is already up takes a moment."""
    run_dir = tmp_path / "run"

    async def scenario() -> None:
        pool = EnginePool([[f"ipc://{run_dir}/input", f"ipc://{run_dir}/output"]], max_queue=4)
        connecting = asyncio.create_task(pool.connect(timeout=120))
        with pytest.raises(UnavailableError, match="still loading"):
            await pool.wait_ready(seconds=0.2)
        with engine_process(tiny_model("q0f32").folder, run_dir):
            await pool.wait_ready(seconds=120)
            assert pool.pick(1).info is not None
            await pool.close()
        await connecting

    asyncio.run(scenario())


def test_a_failed_handshake_answers_at_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        pool = EnginePool([[f"ipc://{tmp_path}/input", f"ipc://{tmp_path}/output"]], max_queue=4)
        await pool.connect(timeout=0.5)
        started = time.monotonic()
        with pytest.raises(UnavailableError, match="no answer"):
            await pool.wait_ready(seconds=30)
        assert time.monotonic() - started < 1
        await pool.close()

    asyncio.run(scenario())
