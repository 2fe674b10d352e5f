"""The one boundary between fsspec's asyncio and the client's trio: a trio thread.

The client (`FilesClient`) is trio code through and through: its retries sleep with
trio, its listings fan out in trio nurseries, its transport hands each exchange to a
worker thread with `trio.to_thread`. fsspec runs its async methods on an asyncio loop
(its own IO thread, or the caller's). So each filesystem runs its client on a trio
loop of its own, in a daemon thread, and reaches it through an anyio `BlockingPortal`:
`call_async` awaits the trio task from asyncio, and cancelling the asyncio side cancels
the trio task (without waiting for it). Nothing of the client is touched from any other thread.

The thread is started here rather than by anyio's `start_blocking_portal`, whose
generator, garbage-collected in a forked child (Dask and multiprocessing fork), would
wait there for a loop that only the parent has.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import TypeVar

import anyio
import trio
from anyio.from_thread import BlockingPortal

from mistralfs.api import FilesClient

T = TypeVar("T")


class TrioThread:
    """A trio loop in a thread of its own, holding one client for its whole life."""

    def __init__(self, make_client: Callable[[], FilesClient]) -> None:
        started: Future[BlockingPortal] = Future()
        self._thread = threading.Thread(
            target=self._serve, args=(started,), name="mistralfs-trio", daemon=True
        )
        self._thread.start()
        self._portal = started.result()
        self._pid = os.getpid()
        self._closed = False
        self._close_lock = threading.Lock()
        try:
            # Built on the trio thread: its locks and limiters belong to that loop.
            self._client = self._portal.call(make_client)
        except BaseException:
            self._stop_loop()
            raise

    @staticmethod
    def _serve(started: Future[BlockingPortal]) -> None:
        async def serve() -> None:
            async with BlockingPortal() as portal:
                started.set_result(portal)
                await portal.sleep_until_stopped()

        try:
            anyio.run(serve, backend="trio")
        except BaseException as exc:
            if not started.done():
                started.set_exception(exc)
            raise

    async def run(self, call: Callable[[FilesClient], Awaitable[T]]) -> T:
        """Await `call(client)` on the trio thread, from any asyncio (or anyio) loop.

        Cancelled, it returns at once: the trio task is cancelled too, and ends when its
        HTTP exchange, which a worker thread cannot drop halfway, is over."""
        return await self._portal.call_async(call, self._client, abandon_on_cancel=True)

    def close(self) -> None:
        """Close the client's connections, then stop the loop and its thread. Idempotent,
        from any thread: a finalizer may run wherever the garbage collector does, and a
        trio thread (this one or another filesystem's) may not block, so from there
        another thread closes. In a forked child the thread is not there: nothing to
        close (the parent still uses it)."""
        with self._close_lock:
            if self._closed or os.getpid() != self._pid:
                return
            self._closed = True
        if trio.lowlevel.in_trio_run():
            threading.Thread(target=self._stop, name="mistralfs-trio-close").start()
        else:
            self._stop()

    def _stop(self) -> None:
        try:
            self._portal.call(self._client.aclose)
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._portal.call(self._portal.stop)
        self._thread.join()
