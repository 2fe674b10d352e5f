"""Fetches that just failed because the service did not answer, remembered a moment.

One system call can make the kernel send several requests for the same thing, one
after the other: a `read` sends the readahead's request, and when that fails, a
request for the page itself; a `stat` of a name whose entry has expired revalidates
it, and when that fails, looks it up again. Each would wait the whole retry time
again (with `--retry-time 30`, a `dd` failed after 60 s, a `cat` after 85 s). So a
fetch that gave up because its retry time ran out waiting for the service
(`Unavailable.timed_out`) makes the same fetch fail at once for `MEMORY_SECONDS`: the
call ends within one retry time. A failure the service answered (errors, garbage) is
not remembered: the next call asks again, and works as soon as the service does.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from typing import TypeVar

import trio
from cachetools import TTLCache

from mistralfs.api import Unavailable

T = TypeVar("T")

MEMORY_SECONDS = 2.0
MAX_REMEMBERED = 4096


class RecentFailures:
    """What gave up lately, by key (a folder's purpose, a file's id)."""

    def __init__(self, seconds: float = MEMORY_SECONDS) -> None:
        self._failed: TTLCache[Hashable, Unavailable] = TTLCache(
            maxsize=MAX_REMEMBERED, ttl=seconds, timer=trio.current_time
        )

    async def run(self, key: Hashable, call: Callable[[], Awaitable[T]]) -> T:
        """`call()`, unless the same fetch just gave up: then its error, at once."""
        failed = self._failed.get(key)
        if failed is not None:
            again = type(failed)(
                f"{failed.message} (moments ago; not asked again yet)",
                status=failed.status,
                method=failed.method,
                url=failed.url,
            )
            again.timed_out = True
            raise again
        try:
            return await call()
        except Unavailable as exc:
            if exc.timed_out:
                self._failed[key] = exc
            raise
