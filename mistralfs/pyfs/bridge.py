"""The one boundary between fsspec's asyncio and the client's trio: a trio thread.

The client (`FilesClient`) is trio code through and through: its retries sleep with
trio, its listings fan out in trio nurseries, its transport hands each exchange to a
worker thread with `trio.to_thread`. fsspec runs its async methods on an asyncio loop
(its own IO thread, or the caller's). So each filesystem runs its client on a trio
loop of its own, in a daemon thread, and reaches it through an anyio `BlockingPortal`:
`call_async` awaits the trio task from asyncio, and cancelling the asyncio side cancels
the trio task. Nothing of the client is touched from any other thread.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal

from mistralfs.api import FilesClient

T = TypeVar("T")


class TrioThread:
    """A trio loop in a thread of its own, holding one client for its whole life."""

    def __init__(self, make_client: Callable[[], FilesClient]) -> None:
        self._exit = contextlib.ExitStack()
        self._portal: BlockingPortal = self._exit.enter_context(
            start_blocking_portal("trio", name="mistralfs-trio")
        )
        try:
            # Built on the trio thread: its locks and limiters belong to that loop.
            self._client = self._portal.call(make_client)
        except BaseException:
            self._exit.close()
            raise
        self._closed = threading.Event()

    async def run(self, call: Callable[[FilesClient], Awaitable[T]]) -> T:
        """Await `call(client)` on the trio thread, from any asyncio (or anyio) loop."""
        return await self._portal.call_async(call, self._client)

    def close(self) -> None:
        """Close the client's connections, then stop the loop and its thread. Idempotent;
        called from any thread but the trio one (a finalizer, or `close()`)."""
        if self._closed.is_set():
            return
        self._closed.set()
        try:
            self._portal.call(self._client.aclose)
        finally:
            self._exit.close()
