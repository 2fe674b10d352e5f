"""Uploads: ``POST /v1/files`` of a finished file, or of one still being written.

The service has no idempotency keys. An upload whose outcome is unknown (the whole
body went out, then no readable answer) may have stored the file: before any retry
the file it may have stored is looked for (lost_uploads.py), so that nothing is stored
twice; an answer is checked against what was sent (upload_answer.py).
"""

from __future__ import annotations

import logging
import math
import os
import pathlib
import time
from collections.abc import Callable
from typing import Any

import httpx
import trio

from mistralfs.api.calls import MAX_JSON_BODY, ApiCalls, parse_json, read_bounded
from mistralfs.api.errors import ApiError, ProtocolError, Rejected, Unavailable
from mistralfs.api.lost_uploads import (
    FileDigest,
    RecentFiles,
    SentFile,
    StoredFileSearch,
    UploadAttempt,
)
from mistralfs.api.models import RemoteFile
from mistralfs.api.protocol import GrowingSend
from mistralfs.api.retry import RetryPolicy
from mistralfs.api.upload_answer import SeenIds, checked_upload_answer
from mistralfs.api.upload_body import GrowingFile, GrowingSpoolBody, SpoolBody, file_identity

logger = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 512 * 1024 * 1024  # the service's documented per-file limit
# A growing upload stops if its file is not written to or closed for this long.
GROWING_IDLE_LIMIT = 5.0
# Statuses by which a server says it wants a Content-Length (no chunked bodies).
LENGTH_REQUIRED_STATUSES = (411, 501)


def optional_fields(expiry: int | None, visibility: str | None) -> list[tuple[str, str]]:
    """The upload's optional form fields, only those given (the service's defaults apply
    to the others): ``expiry`` (an integer; its unit is the service's) and ``visibility``
    (``workspace`` or ``user``)."""
    fields = []
    if expiry is not None:
        fields.append(("expiry", str(int(expiry))))
    if visibility is not None:
        fields.append(("visibility", visibility))
    return fields


class Uploads:
    """Whole and growing uploads, and the search for what a lost attempt stored."""

    def __init__(
        self,
        calls: ApiCalls,
        recent: RecentFiles,
        seen: SeenIds,
        stored_search: StoredFileSearch,
        max_upload: int | None,
    ) -> None:
        self._calls = calls
        self.recent = recent
        self.seen = seen
        self._stored_search = stored_search
        self._max_upload = max_upload
        # Uploads that follow a growing file are sent only by the client's own transport,
        # by sendfile(2) as the file grows (a replaced transport, or a proxy's, is given
        # whole files); cleared when the service refuses a body of unknown length.
        transport = calls.transport
        self.sends_growing_uploads = (
            transport is not None and transport.proxy_for(httpx.URL(calls.url("/v1/files"))) is None
        )

    async def upload(
        self,
        path: pathlib.Path,
        *,
        filename: str,
        purpose: str,
        progress: Callable[[int], None] | None = None,
        dedupe: bool = True,
        after: GrowingSend | None = None,
        expiry: int | None = None,
        visibility: str | None = None,
    ) -> RemoteFile:
        """``POST /v1/files`` streaming ``path`` from disk; reopened on every attempt.

        ``progress`` is called with the bytes of the file sent so far (from 0 again
        when an attempt is retried).

        The service has no idempotency keys, so a retry after an attempt whose
        outcome is unknown (the whole body went out, then the answer was a 5xx,
        a reset, a timeout, a cut or unreadable body) could store the file
        twice. With ``dedupe`` (the default), before any such retry the files
        with this name are listed: one with this purpose, this size, the MD5 of
        the bytes that attempt sent (when the service gives a signature),
        created no earlier than ``CLOCK_SKEW`` seconds before that attempt
        began, and not seen by this client before the upload began, is the one
        it stored, and is returned instead of uploading again. An upload whose
        first attempt is answered costs that one request: no listing, no MD5.
        Look-ups share the retry budget of the upload.

        ``after`` is a `GrowingUpload` of the same file that did not succeed: its
        attempt counts as this upload's first, so if its whole body went out, the
        file it may have stored is looked for before uploading again.

        ``expiry`` and ``visibility`` are sent only when given (see `optional_fields`).
        """
        api_path = "/v1/files"
        url = self._calls.url(api_path)
        deadline = trio.current_time() + self._calls.retry.total_budget
        if after is not None and not isinstance(after, GrowingUpload):
            raise TypeError(f"not a growing upload of this client: {after!r}")
        attempts: list[UploadAttempt] = list(after.attempts) if after is not None else []
        # Files already seen cannot be the one an attempt of this upload stored.
        if after is not None:
            known = after.known if dedupe else None
        else:
            known = self.recent.ids() if dedupe and self._calls.retry.max_attempts > 1 else None
        digest = FileDigest(path)
        mark = after.mark if after is not None else self.seen.mark()
        fields = optional_fields(expiry, visibility)

        async def open_body() -> tuple[Any, dict[str, str], Any]:
            body = SpoolBody(path, filename, purpose, self._max_upload, progress, url, fields)
            attempts.append(UploadAttempt(started=time.time(), body=body))
            return body, body.headers, body

        async def find_stored() -> RemoteFile | None:
            if known is None:
                return None
            return await self._stored_search.find(
                filename, purpose, attempts, known, digest, deadline
            )

        async def handle(response: httpx.Response, n: int) -> RemoteFile:
            sent = (filename, purpose, attempts[-1].body.size, mark)
            try:
                return await self._stored_file(response, url, sent)
            except ProtocolError:
                # Stored, most likely, with an answer we cannot read: find it, or fail
                # rather than store it again.
                found = await find_stored()
                if found is not None:
                    return found
                raise

        async def resume(n: int) -> RemoteFile | None:
            return await find_stored()

        if after is not None and after.complete:  # the growing upload's answer was lost
            found = await find_stored()
            if found is not None:
                return found
        try:
            stored = await self._calls.call(
                "POST",
                url,
                handle,
                headers={"Accept": "application/json"},
                body=open_body,
                deadline=deadline,
                resume=resume,
                answer_limit=MAX_JSON_BODY,
            )
            if after is not None and after.refusal is not None:
                # Refused as it was sent, taken whole: the service wants a length.
                self._stop_growing_uploads(after.refusal)
            return stored
        except Unavailable:
            # Out of attempts after an ambiguous one: one last look, if time is left.
            if known is None or not attempts or not attempts[-1].body.complete:
                raise
            if trio.current_time() >= deadline:
                raise
            try:
                found = await find_stored()
            except ApiError:
                found = None
            if found is None:
                raise
            return found

    async def _stored_file(
        self, response: httpx.Response, url: str, sent: tuple[str, str, int, int]
    ) -> RemoteFile:
        """The file an upload's answer describes, if it is the one `sent` (its filename,
        purpose, size, and the `SeenIds` mark when the upload began): noted as seen, for
        later dedupes. `UploadMismatch` otherwise (see upload_answer.py)."""
        data = await read_bounded(response, MAX_JSON_BODY)
        stored = self._calls.file_from(parse_json(data, response, "POST", url), "POST", "/v1/files")
        filename, purpose, size, mark = sent
        stored = checked_upload_answer(stored, filename=filename, purpose=purpose, size=size,
                                       seen=self.seen, mark=mark, url=url)  # fmt: skip
        self.recent.note((stored,))
        self.seen.note((stored,))
        return stored

    def growing_upload(
        self,
        path: pathlib.Path,
        growing: GrowingFile,
        *,
        filename: str,
        purpose: str,
        progress: Callable[[int], None] | None = None,
        expiry: int | None = None,
        visibility: str | None = None,
    ) -> GrowingUpload:
        """An upload of ``path`` that starts while the file is still being appended to.

        Nothing is sent until `GrowingUpload.run`. Only for a client whose
        `sends_growing_uploads` is set.
        """
        return GrowingUpload(self, path, growing, filename=filename, purpose=purpose,
                             progress=progress,
                             fields=optional_fields(expiry, visibility))  # fmt: skip

    async def send_growing(self, upload: GrowingUpload) -> RemoteFile:
        url = self._calls.url("/v1/files")

        async def open_body() -> tuple[Any, dict[str, str], Any]:
            body = GrowingSpoolBody(
                upload.path,
                upload.growing,
                upload.filename,
                upload.purpose,
                upload.progress,
                GROWING_IDLE_LIMIT,
                upload.fields,
            )
            upload.attempts.append(UploadAttempt(started=time.time(), body=body))
            return body, body.headers, body

        async def handle(response: httpx.Response, n: int) -> RemoteFile:
            sent = (upload.filename, upload.purpose, upload.attempts[-1].body.size, upload.mark)
            return await self._stored_file(response, url, sent)

        try:
            return await self._calls.call(
                "POST",
                url,
                handle,
                headers={"Accept": "application/json"},
                body=open_body,
                # The file is written at the program's pace: no budget for the call, but
                # every wait for the network is still bounded by the client's timeout.
                deadline=math.inf,
                policy=RetryPolicy(max_attempts=1),
                answer_limit=MAX_JSON_BODY,
            )
        except Rejected as exc:
            upload.refusal = exc
            if exc.status in LENGTH_REQUIRED_STATUSES:
                self._stop_growing_uploads(exc)
            raise

    def _stop_growing_uploads(self, refusal: ApiError) -> None:
        """The service turned down a body of unknown length: send only whole files from now."""
        if self.sends_growing_uploads:
            self.sends_growing_uploads = False
            logger.warning(
                "POST /v1/files: the service refused an upload of unknown length (%s %s) "
                "and took the same file whole; files are uploaded once closed from now on",
                refusal.status,
                refusal.message,
            )

    async def find_upload(
        self, path: pathlib.Path, *, filename: str, purpose: str, started: float
    ) -> RemoteFile | None:
        """The file an upload of ``path`` begun at ``started`` (wall clock) stored, if any.

        For an upload whose answer never came back to anyone: a daemon that crashed
        while it was in flight. The same rules recognise it as a lost answer within
        `upload` (name, purpose, size, MD5, created since shortly before ``started``).
        """
        found = os.stat(path)
        attempt = UploadAttempt(started, SentFile(found.st_size, file_identity(found)))
        deadline = trio.current_time() + self._calls.retry.total_budget
        return await self._stored_search.find(
            filename, purpose, [attempt], frozenset(), FileDigest(path), deadline
        )


class GrowingUpload:
    """One attempt at uploading a file while it is still being written, sent chunked.

    `run` sends it; it raises `StreamAbandoned` if the file changed in a way the
    body cannot follow, and any error the one attempt met (it is never retried:
    the file is uploaded whole once finished instead, with ``upload(after=...)``,
    which knows what this attempt may have stored).
    """

    def __init__(
        self,
        uploads: Uploads,
        path: pathlib.Path,
        growing: GrowingFile,
        *,
        filename: str,
        purpose: str,
        progress: Callable[[int], None] | None,
        fields: list[tuple[str, str]] | None = None,
    ) -> None:
        self._uploads = uploads
        self.path = path
        self.growing = growing
        self.filename = filename
        self.purpose = purpose
        self.progress = progress
        self.fields = fields or []  # the optional form fields (expiry, visibility)
        self.attempts: list[UploadAttempt] = []
        self.refusal: Rejected | None = None  # a 4xx answer to it
        # Files already seen cannot be the one this attempt stored.
        self.known = uploads.recent.ids()
        self.mark = uploads.seen.mark()

    @property
    def complete(self) -> bool:
        """Whether the whole body went out (only then can the service have stored it)."""
        return any(a.body.complete for a in self.attempts)

    async def run(self) -> RemoteFile:
        return await self._uploads.send_growing(self)
