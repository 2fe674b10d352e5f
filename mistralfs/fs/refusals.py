"""An upload that did not happen, told to whoever listens (the daemon's desktop notifier).

A program hears an errno; a file manager shows little more, so the daemon tells the
person too. The filesystem knows nothing of how: it calls `RefusalListener`, which
`build_filesystem` wires in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class UploadRefused:
    """`where` (purpose/name written to) was not stored, because of `reason`."""

    where: str
    reason: str  # the service's own message when it answered
    kept: str | None = None  # the recovery entry's id, if its content is kept
    renamed_from: str | None = None  # a rename's source, which stays as it was


RefusalListener = Callable[[UploadRefused], None]


def ignore(_event: UploadRefused) -> None:
    """The listener when nobody listens."""
