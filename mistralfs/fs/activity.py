"""What the daemon is doing, for `mistralfs status`, systemd's STATUS= and the logs.

Uploads in flight report their progress here as the client streams them; failed
uploads are remembered for a while; reads and uploads report how long they took to
`timings` (the metrics endpoint's histograms, when it is on). Nothing here changes
behaviour.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class UploadProgress:
    """One upload in flight: bytes sent of the total, for a progress bar."""

    name: str
    purpose: str
    total: int
    sent: int = 0
    started: float = field(default_factory=time.monotonic)

    def update(self, sent: int) -> None:
        self.sent = sent

    def snapshot(self, now: float) -> dict[str, object]:
        elapsed = max(now - self.started, 1e-6)
        rate = self.sent / elapsed
        left = (self.total - self.sent) / rate if rate > 0 else None
        return {
            "name": self.name,
            "purpose": self.purpose,
            "bytes": self.total,
            "sent": self.sent,
            "rate": rate,
            "seconds_left": left,
            "seconds": elapsed,
        }


@dataclass
class FailedUpload:
    name: str
    purpose: str
    error: str
    at: float = field(default_factory=time.time)


def _ignore(seconds: float, ok: bool) -> None:
    """No one measures: the metrics endpoint is off."""


@dataclass
class Timings:
    """Where durations go: each is called with (seconds, whether it succeeded)."""

    read: Callable[[float, bool], None] = _ignore
    upload: Callable[[float, bool], None] = _ignore


class Activity:
    """Uploads in flight, recent failures, and totals since the mount started."""

    def __init__(self) -> None:
        self._ids = itertools.count()
        self.uploads: dict[int, UploadProgress] = {}
        self.failed: deque[FailedUpload] = deque(maxlen=50)
        self.failed_total = 0  # `failed` keeps the last ones only
        self.uploaded = 0
        self.uploaded_bytes = 0
        self.started = time.time()
        self.timings = Timings()

    def read_done(self, started: float, ok: bool) -> None:
        """A read of remote content that began at `started` (time.perf_counter()) ended."""
        self.timings.read(time.perf_counter() - started, ok)

    def start_upload(self, name: str, purpose: str, total: int) -> int:
        key = next(self._ids)
        self.uploads[key] = UploadProgress(name, purpose, total)
        return key

    def progress(self, key: int) -> UploadProgress:
        return self.uploads[key]

    def drop_upload(self, key: int) -> None:
        """Forget an upload that was stopped on purpose: neither done nor failed."""
        del self.uploads[key]

    def finish_upload(self, key: int, error: str | None = None) -> float:
        """Forget the upload; return how long it took."""
        upload = self.uploads.pop(key)
        if error is None:
            self.uploaded += 1
            self.uploaded_bytes += upload.total
        else:
            self.failed.append(FailedUpload(upload.name, upload.purpose, error))
            self.failed_total += 1
        seconds = time.monotonic() - upload.started
        self.timings.upload(seconds, error is None)
        return seconds

    def summary(self) -> str:
        """One line for systemd's STATUS=."""
        if not self.uploads:
            return f"idle; {self.uploaded} uploaded since start"
        sent = sum(u.sent for u in self.uploads.values())
        total = sum(u.total for u in self.uploads.values())
        count = len(self.uploads)
        plural = "s" if count != 1 else ""
        return f"{count} upload{plural} in flight, {mib(sent)} of {mib(total)}"

    def snapshot(self) -> dict[str, object]:
        now = time.monotonic()
        return {
            "uploads": [u.snapshot(now) for u in self.uploads.values()],
            "failed": [vars(f) for f in self.failed],
            "failed_total": self.failed_total,
            "uploaded": self.uploaded,
            "uploaded_bytes": self.uploaded_bytes,
            "started": self.started,
        }


def mib(size: float) -> str:
    """A size as people read it in `status` and in the log: `12.3 MiB`."""
    return f"{size / 1024**2:.1f} MiB"
