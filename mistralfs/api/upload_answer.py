"""Checking an upload's answer against what was sent, before a name is bound to it.

A 200 answer to `POST /v1/files` is believed only if it describes the file sent: the
same size, name and purpose, and an id that this client had not already seen as
another file's before the upload began (the service gives every upload a new id).
Anything else is `UploadMismatch`: taken as true, it would bind the name to a file
that this upload did not create, and `rm` of that name would delete that other file.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable

from mistralfs.api.errors import UploadMismatch
from mistralfs.api.models import RemoteFile

# Ids remembered; past this, the longest known are forgotten (an account this large
# is listed in more than its retry time anyway).
MAX_SEEN_IDS = 1_000_000


class SeenIds:
    """The file ids this client has seen (listings, answers), in the order first seen.

    `mark()` before an upload and `seen_before(id, mark)` after it tell an id known
    before the upload began from one first seen while it ran (a listing made meanwhile
    may already show the new file), without copying the set for each upload.
    """

    def __init__(self, limit: int = MAX_SEEN_IDS) -> None:
        self._order: dict[str, int] = {}
        self._counter = itertools.count(1)
        self._now = 0
        self._limit = limit

    def note(self, files: Iterable[RemoteFile]) -> None:
        order = self._order
        for f in files:
            if f.id not in order:
                self._now = order[f.id] = next(self._counter)
        while len(order) > self._limit:
            del order[next(iter(order))]

    def mark(self) -> int:
        return self._now

    def seen_before(self, file_id: str, mark: int) -> bool:
        first = self._order.get(file_id)
        return first is not None and first <= mark


def checked_upload_answer(
    stored: RemoteFile,
    *,
    filename: str,
    purpose: str,
    size: int,
    seen: SeenIds,
    mark: int,
    url: str,
) -> RemoteFile:
    """`stored`, if it can be the file this upload created (with the size sent, if the
    answer gave none); `UploadMismatch` otherwise."""
    if not stored.size_known:
        stored = dataclasses.replace(stored, bytes=size, size_known=True)
    problems = []
    if seen.seen_before(stored.id, mark):
        problems.append(f"id {stored.id} is another file's, seen before this upload")
    if stored.bytes != size:
        problems.append(f"{stored.bytes} bytes, not the {size} sent")
    if stored.filename != filename:
        problems.append(f"name {stored.filename!r}, not {filename!r}")
    if stored.purpose != purpose:
        problems.append(f"purpose {stored.purpose!r}, not {purpose!r}")
    if problems:
        raise UploadMismatch(
            f"the answer describes another file than {filename!r} ({purpose}, {size} bytes) "
            f"sent: {'; '.join(problems)} (file {stored.id}); not sent again, and not taken",
            status=200,
            method="POST",
            url=url,
        )
    return stored
