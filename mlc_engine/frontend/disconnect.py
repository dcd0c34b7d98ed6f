"""Noticing a client that goes away while its request runs, streamed or not.

Falcon reads the request body through ASGI's `receive`; once it has, the next `receive` call
returns only when the client disconnects. `track_receive` wraps the app so the handlers can
find `receive` in the scope, and `until_disconnected` stops (and so closes, which aborts the
engine request) an iterator of results the moment the client is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any, TypeVar

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
ASGIApp = Callable[..., Awaitable[None]]
RECEIVE_KEY = "mlc_engine.receive"

T = TypeVar("T")


def track_receive(app: ASGIApp) -> ASGIApp:
    async def wrapped(scope: Scope, receive: Receive, send: Any) -> None:
        if scope["type"] == "http":
            scope[RECEIVE_KEY] = receive
        await app(scope, receive, send)

    return wrapped


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(source: AsyncIterator[T], scope: Scope) -> AsyncGenerator[T, None]:
    """The items of `source` until it ends or the client disconnects; closes `source` then."""
    receive = scope.get(RECEIVE_KEY)
    watcher = asyncio.ensure_future(_disconnected(receive) if receive else asyncio.Event().wait())
    try:
        while True:
            step = asyncio.ensure_future(anext(source))
            await asyncio.wait({step, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                step.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await step
                return
            try:
                item = step.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            await aclose()
