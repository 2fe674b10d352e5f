"""The emulator's "now", which tests may move forward.

Files that expire (``expires_at``) and batch jobs' timestamps are measured on this
clock, so that a test can see a file expire an hour on without waiting an hour: the
admin route ``POST /v1/_emulator/clock {"advance": SECONDS}`` moves it. Signed URLs
keep the wall clock (their expiry is checked by a storage host, not by the API).
"""

from __future__ import annotations

import threading
import time

MAX_ADVANCE = 1e10  # seconds at once: about three centuries


class Clock:
    """Wall-clock time plus an offset that only grows (time never runs backwards)."""

    def __init__(self) -> None:
        self._offset = 0.0
        self._lock = threading.Lock()

    @property
    def offset(self) -> float:
        return self._offset

    def time(self) -> float:
        """Seconds since the epoch, as the emulator sees it."""
        return time.time() + self._offset

    def now(self) -> int:
        """Whole seconds since the epoch: what the API's timestamps hold."""
        return int(self.time())

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds`` (>= 0)."""
        if not 0 <= seconds <= MAX_ADVANCE:
            raise ValueError(f"the clock moves forward, by at most {MAX_ADVANCE:g} seconds")
        with self._lock:
            self._offset += seconds
