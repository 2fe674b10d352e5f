"""A bounded log of the requests the emulator answered, for tests to count API calls.

Admin routes (``/v1/_emulator/...``) are not recorded, so reading the log does
not change it. Signed URL query strings (the signature) are never kept.
"""

from __future__ import annotations

import collections
import time
from dataclasses import asdict, dataclass
from typing import Any

MAX_ENTRIES = 10_000


@dataclass(frozen=True)
class RequestEntry:
    """One answered request."""

    method: str
    path: str
    query: str
    status: int
    range: str | None
    time: float
    fault: str | None = None


class RequestLog:
    """The most recent MAX_ENTRIES requests, plus a count since the last clear."""

    def __init__(self, maxlen: int = MAX_ENTRIES) -> None:
        self._entries: collections.deque[RequestEntry] = collections.deque(maxlen=maxlen)
        self.count = 0

    def record(
        self,
        method: str,
        path: str,
        query: str,
        status: int,
        range_: str | None,
        fault: str | None = None,
    ) -> None:
        """Remember one request; ``status`` 0 when a fault dropped the connection unanswered."""
        self._entries.append(RequestEntry(method, path, query, status, range_, time.time(), fault))
        self.count += 1

    def clear(self) -> None:
        """Forget everything; the count restarts at zero."""
        self._entries.clear()
        self.count = 0

    def to_json(self) -> dict[str, Any]:
        """``{"count": N, "requests": [{method, path, query, status, range, time, fault}]}``."""
        return {"count": self.count, "requests": [asdict(e) for e in self._entries]}
