"""Recognising the file an upload stored when the answer to it was lost.

The service has no idempotency keys: an attempt whose whole body went out and whose
answer never came (a 5xx, a reset, a timeout, a cut or unreadable body) may have
stored the file. Before sending it again, the files with its name are listed, and
one with its purpose, size and MD5 (when the service gives a signature), created
since shortly before that attempt began and never seen by this client before the
upload began, is taken for the one it stored.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import pathlib
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

import trio

from mistralfs.api.errors import ProtocolError
from mistralfs.api.models import RemoteFile
from mistralfs.api.upload_body import (
    CHUNK_SIZE,
    GrowingSpoolBody,
    Identity,
    SpoolBody,
    file_identity,
)

log = logging.getLogger(__name__)

# How far the server's clock (``created_at``, whole seconds) may lag ours when
# recognising a file an upload attempt created.
CLOCK_SKEW = 5.0
MATCH_PAGE_SIZE = 100
MATCH_MAX_PAGES = 20  # past this many pages of same-named files, the search gives up (safely)

# GET /v1/files with these query parameters, within this deadline: the parsed JSON.
ListPage = Callable[[list[tuple[str, str]], float], Awaitable[object]]


@dataclass(frozen=True)
class SentFile:
    """A file whose whole upload body went out earlier, seen only as it is now (a
    daemon that crashed after sending it left no body object behind)."""

    size: int
    identity: Identity
    complete: bool = True


@dataclass
class UploadAttempt:
    """One upload attempt: when it began (wall clock, like ``created_at``) and its body."""

    started: float
    body: SpoolBody | GrowingSpoolBody | SentFile

    @property
    def identity(self) -> Identity:
        return self.body.identity

    def may_have_stored(self, f: RemoteFile) -> bool:
        """Whether ``f`` can be the file this attempt stored, but for its MD5.

        Name and purpose are checked apart.
        """
        if not self.body.complete or f.bytes != self.body.size:
            return False
        return f.created_at >= math.floor(self.started - CLOCK_SKEW)


class FileDigest:
    """The MD5 of an upload's file, computed only if a look-up needs it, once per version.

    An attempt records the file's identity when it opened it; the digest counts for
    that attempt only if the file still has that identity before and after hashing,
    so bytes changed since are never vouched for.
    """

    def __init__(self, path: pathlib.Path) -> None:
        self._path = path
        self._digests: dict[Identity, str | None] = {}

    async def of(self, identity: Identity) -> str | None:
        if identity not in self._digests:
            self._digests[identity] = await trio.to_thread.run_sync(self._md5, identity)
        return self._digests[identity]

    def _md5(self, identity: Identity) -> str | None:
        try:
            with open(self._path, "rb") as f:
                if file_identity(os.fstat(f.fileno())) != identity:
                    return None
                digest = hashlib.md5(usedforsecurity=False)
                while chunk := f.read(CHUNK_SIZE):
                    digest.update(chunk)
                if file_identity(os.fstat(f.fileno())) != identity:
                    return None
        except OSError:
            return None
        return digest.hexdigest()


class RecentFiles:
    """Recently created files this client has seen, by id.

    An upload whose answer was lost looks for the file it stored among files with
    its name, size and MD5 created since shortly before it began; a file seen
    before the upload began cannot be that file, however alike. Only files that
    young can be mistaken, so older ones are not kept.
    """

    def __init__(self) -> None:
        self._created: dict[str, int] = {}

    def note(self, files: Iterable[RemoteFile]) -> None:
        cutoff = math.floor(time.time() - CLOCK_SKEW)
        for f in files:
            if f.created_at >= cutoff:
                self._created[f.id] = f.created_at
        if self._created:
            self._created = {i: c for i, c in self._created.items() if c >= cutoff}

    def ids(self) -> frozenset[str]:
        return frozenset(self._created)


class StoredFileSearch:
    """Looks for the file that an attempt with a lost answer stored."""

    def __init__(self, list_page: ListPage, url: str, recent: RecentFiles) -> None:
        self._list_page = list_page
        self._url = url  # of the listing, for errors
        self._recent = recent  # what the search lists is noted as seen too

    async def find(
        self,
        filename: str,
        purpose: str,
        attempts: Sequence[UploadAttempt],
        known: frozenset[str],
        digest: FileDigest,
        deadline: float,
    ) -> RemoteFile | None:
        """The file an earlier, ambiguous attempt stored, if the listing shows one."""
        sent = [a for a in attempts if a.body.complete]
        if not sent:
            return None  # no attempt got its whole body out: none can have stored it
        listed = await self._same_name(filename, purpose, deadline)
        if listed is None:
            return None
        matches = []
        for f in listed:
            if f.id in known or f.deleted:
                continue
            for a in sent:
                if not a.may_have_stored(f):
                    continue
                if f.signature is None or f.signature.lower() == await digest.of(a.identity):
                    matches.append(f)
                    break
        self._recent.note(listed)
        if not matches:
            return None
        best = max(matches, key=lambda f: f.created_at)  # ties: the first listed (newest)
        if len(matches) > 1:
            log.warning(
                "POST /v1/files: %d new files match %r; taking the newest, %s",
                len(matches),
                filename,
                best.id,
            )
        log.info(
            "POST /v1/files: answer lost, but %r was stored as %s; not uploading again",
            filename,
            best.id,
        )
        return best

    async def _same_name(
        self, filename: str, purpose: str, deadline: float
    ) -> list[RemoteFile] | None:
        """Every file the service finds for ``search=filename`` in ``purpose``.

        Returns the parsed files whose name and purpose are exactly these; None
        when there are too many pages to be sure of having seen them all. Items
        that do not parse are skipped.
        """
        ids: set[str] = set()
        files: list[RemoteFile] = []
        page_size = MATCH_PAGE_SIZE
        for page in range(MATCH_MAX_PAGES):
            params = [
                ("page", str(page)),
                ("page_size", str(page_size)),
                ("include_total", "true"),
                ("purpose", purpose),
                ("search", filename),
            ]
            data = await self._list_page(params, deadline)
            items = data.get("data") if isinstance(data, dict) else None
            if not isinstance(items, list):
                raise ProtocolError(
                    "listing is not an object with a 'data' array", method="GET", url=self._url
                )
            total = data.get("total") if isinstance(data, dict) else None
            if not isinstance(total, int) or isinstance(total, bool):
                total = None
            new = 0
            for item in items:
                file_id = item.get("id") if isinstance(item, dict) else None
                if not isinstance(file_id, str) or file_id in ids:
                    continue
                ids.add(file_id)
                new += 1
                try:
                    f = RemoteFile.from_json(item)
                except ProtocolError:
                    continue
                if f.filename == filename and f.purpose == purpose:
                    files.append(f)
            if page == 0 and total is not None and 0 < len(items) < min(page_size, total):
                page_size = len(items)  # the service capped the page size
            if not new or (total is not None and len(ids) >= total):
                return files
            if total is None and len(items) < page_size:
                return files
        return None
