"""The async Files API client: one httpx.AsyncClient, used from trio.

Security rules enforced here rather than left to callers:
- the API key is attached per request, and only when the request goes to the
  server URL's own origin; signed-URL reads never carry it, whatever host
  they point at;
- nothing logged or kept on an error contains a signed URL's query string.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import pathlib
import re
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Collection, Generator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import quote

import httpx
import trio

from mistralfs import __version__
from mistralfs.api import storage
from mistralfs.api.errors import (
    ApiError,
    AuthError,
    NotFound,
    ProtocolError,
    Rejected,
    ServerError,
    TooLarge,
    Unavailable,
    UrlExpired,
    extract_message,
    strip_query,
)
from mistralfs.api.lost_uploads import (
    FileDigest,
    RecentFiles,
    SentFile,
    StoredFileSearch,
    UploadAttempt,
)
from mistralfs.api.models import FilePage, RemoteFile, SignedUrl
from mistralfs.api.retry import (
    RETRY_STATUSES,
    RetryableStatus,
    RetryPolicy,
    parse_retry_after,
    run_with_retries,
)
from mistralfs.api.tls import client_context
from mistralfs.api.transport import PIECE_SIZE, PREFETCH, ThreadedTransport
from mistralfs.api.upload_answer import SeenIds, checked_upload_answer
from mistralfs.api.upload_body import (
    CHUNK_SIZE,
    GrowingFile,
    GrowingSpoolBody,
    SpoolBody,
    file_identity,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_SERVER_URL = "https://api.mistral.ai"
CONNECT_TIMEOUT = 10.0
MAX_ERROR_BODY = 64 * 1024
MAX_JSON_BODY = 64 * 1024 * 1024
# A listing is read no further than this many files (about 0.5 KiB of memory each):
# a server whose pages never end must not take all the memory there is.
MAX_LISTED_FILES = 500_000
MAX_ODD_RECORDS = 10_000  # bad listing records remembered, so that each is warned about once
MAX_UPLOAD_BYTES = 512 * 1024 * 1024  # the service's documented per-file limit
# A growing upload stops if its file is not written to or closed for this long.
GROWING_IDLE_LIMIT = 5.0
# Statuses by which a server says it wants a Content-Length (no chunked bodies).
LENGTH_REQUIRED_STATUSES = (411, 501)


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    default = {"http": 80, "https": 443}.get(url.scheme)
    return (url.scheme, url.host.lower(), url.port or default)


class _ServerOnlyBearerAuth(httpx.Auth):
    """Adds the bearer key only to requests for the API's own origin (never to storage hosts)."""

    def __init__(self, api_key: str, origin: tuple[str, str, int | None]) -> None:
        self._header = f"Bearer {api_key}"
        self._origin = origin
        self._ours: dict[str, bool] = {}  # "scheme://host:port" -> whether it is the API's

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if _origin(request.url) == self._origin:
            request.headers["Authorization"] = self._header
        yield request

    def headers_for(self, url: str) -> dict[str, str]:
        """The same rule for requests sent without httpx; each host is parsed once (by
        httpx, so that both paths compare hosts alike), not each URL."""
        scheme, _, rest = url.partition("://")
        site = f"{scheme}://{rest.split('/', 1)[0].split('?', 1)[0]}"
        ours = self._ours.get(site)
        if ours is None:
            ours = self._ours[site] = _origin(httpx.URL(site)) == self._origin
        return {"Authorization": self._header} if ours else {}

    def __repr__(self) -> str:  # never show the key
        return f"_ServerOnlyBearerAuth(origin={self._origin!r})"


class _RedactQueryFilter(logging.Filter):
    """httpx logs full request URLs at INFO; drop query strings so signed URLs stay secret."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(
            isinstance(a, httpx.URL) and a.query for a in record.args
        ):
            record.args = tuple(
                a.copy_with(query=None) if isinstance(a, httpx.URL) else a for a in record.args
            )
        return True


_httpx_logger = logging.getLogger("httpx")
if not any(isinstance(f, _RedactQueryFilter) for f in _httpx_logger.filters):
    _httpx_logger.addFilter(_RedactQueryFilter())


def _cut(chunks: list[bytes], skip: int, length: int, piece_size: int) -> list[bytes]:
    """`length` bytes after the first `skip` of `chunks`, in pieces of `piece_size`."""
    if not skip and _already_cut(chunks, length, piece_size):
        return chunks  # no copy at all
    pieces: list[bytes] = []
    parts: list[memoryview] = []
    filled, remaining = 0, length
    want = min(piece_size, remaining)
    for chunk in chunks:
        view = memoryview(chunk)
        if skip:
            if len(view) <= skip:
                skip -= len(view)
                continue
            view, skip = view[skip:], 0
        while view and remaining:
            take = min(len(view), want - filled)
            parts.append(view[:take])
            view, filled = view[take:], filled + take
            if filled == want:
                pieces.append(b"".join(parts))
                parts, remaining, filled = [], remaining - want, 0
                want = min(piece_size, remaining)
    if parts:  # a short body: the caller sees the missing bytes
        pieces.append(b"".join(parts))
    return pieces


def _already_cut(chunks: list[bytes], length: int, piece_size: int) -> bool:
    """Whether `chunks` are `length` bytes in pieces of `piece_size` (the last shorter)."""
    if sum(len(chunk) for chunk in chunks) != length:
        return False
    return all(len(chunk) == piece_size for chunk in chunks[:-1]) and (
        not chunks or len(chunks[-1]) <= piece_size
    )


def _attach_body(
    request: httpx.Request, stream: httpx.AsyncByteStream, headers: dict[str, str]
) -> None:
    """Give a built request an upload body: its stream and the headers that describe it
    (a Content-Length, or else chunked)."""
    request.headers.pop("Content-Length", None)
    request.headers.update(headers)
    if "Content-Length" not in headers:
        request.headers["Transfer-Encoding"] = "chunked"
    request.stream = stream


async def _read_bounded(response: httpx.Response, limit: int) -> bytes:
    """Read at most ``limit`` bytes of a streamed body (error pages can be huge)."""
    buf = bytearray()
    async for chunk in response.aiter_bytes():
        buf += chunk
        if len(buf) >= limit:
            break
    return bytes(buf[:limit])


def _parse_json(body: bytes, response: httpx.Response, method: str, url: str) -> object:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than json can take
        ctype = response.headers.get("content-type", "?")
        raise ProtocolError(
            f"expected JSON, got {ctype}: {extract_message(body)[:200]}",
            status=response.status_code,
            method=method,
            url=url,
        ) from None


IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "DELETE"})
_ID_SEGMENT = re.compile(r"/[0-9a-fA-F-]{36}(?=/|$)")


def _route(url: str) -> str:
    """`/v1/files/<uuid>/url` -> `/v1/files/{id}/url`, to count requests by kind."""
    return _ID_SEGMENT.sub("/{id}", urllib.parse.urlsplit(url).path)  # httpx.URL: 10x slower


@dataclass
class RequestStats:
    """Requests sent (attempts, by route) and errors raised (by kind), since start."""

    requests: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)


class FilesClient:
    """Async client for the Mistral Files API (``/v1/files``) and its signed URLs.

    Every request goes through one httpx.AsyncClient, over `ThreadedTransport`
    (transport.py) unless ``transport`` replaces it (tests: httpx.MockTransport).
    ``ca_file`` (PEM) is the only trust of every connection when given; else see tls.py.
    """

    def __init__(
        self,
        server_url: str,
        api_key: str,
        *,
        retry: RetryPolicy | None = None,
        timeout: float = 30.0,
        user_agent: str = f"mistralfs/{__version__}",
        max_upload_bytes: int | None = MAX_UPLOAD_BYTES,
        transport: httpx.AsyncBaseTransport | None = None,
        ca_file: pathlib.Path | None = None,
    ) -> None:
        base = httpx.URL(server_url.rstrip("/"))
        if base.scheme not in ("http", "https") or not base.host:
            raise ValueError(f"server URL must be http(s)://host[:port]: {strip_query(server_url)}")
        if base.path.rstrip("/").endswith("/v1"):
            # Same convention as the SDK's server_url: the host without /v1.
            base = base.copy_with(path=base.path.rstrip("/")[: -len("/v1")])
        self._base = str(base.copy_with(query=None, fragment=None)).rstrip("/")
        self._auth = _ServerOnlyBearerAuth(api_key, _origin(base))
        self._retry = retry or RetryPolicy()
        self.stats = RequestStats()
        self._max_upload = max_upload_bytes
        self._recent = RecentFiles()
        self._seen = SeenIds()  # to refuse an upload answer that names a known file
        self._odd_records: set[str] = set()  # listed records already warned about
        self._stored_search = StoredFileSearch(
            self._list_page, self._api_url("/v1/files"), self._recent
        )
        self._timeout = timeout
        tls = client_context(ca_file)  # one trust for every connection
        self._transport = ThreadedTransport(tls) if transport is None else None
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT),
            headers={"User-Agent": user_agent},
            follow_redirects=False,
            transport=transport or self._transport,
            verify=tls,
        )
        # Uploads that follow a growing file are sent only by the client's own transport,
        # by sendfile(2) as the file grows (a replaced transport, or a proxy's, is given
        # whole files); cleared when the service refuses a body of unknown length.
        self.sends_growing_uploads = (
            self._transport is not None
            and self._transport.proxy_for(httpx.URL(self._api_url("/v1/files"))) is None
        )

    @property
    def server_url(self) -> str:
        return self._base

    @property
    def retry_policy(self) -> RetryPolicy:
        return self._retry

    async def aclose(self) -> None:
        await self._http.aclose()  # and its transport

    def idle_connections(self, url: str | None = None) -> int:
        """Connections kept open for reuse, to the origin of `url` or to all (0 when
        the transport was replaced)."""
        return self._transport.idle_connections(url) if self._transport is not None else 0

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ core

    def _api_url(self, path: str) -> str:
        return self._base + path

    def _error(
        self, response: httpx.Response, body: bytes, method: str, url: str, *, storage: bool
    ) -> ApiError:
        """Map an HTTP error answer to the exception a caller reacts to."""
        status = response.status_code
        message = extract_message(
            body, response.headers.get("content-type"), response.reason_phrase
        )
        cls: type[ApiError]
        if storage and status in (401, 403):
            cls = UrlExpired
        elif status in (401, 403):
            cls = AuthError
        elif status == 404:
            cls = NotFound
        elif status == 413:
            cls = TooLarge
        elif status in RETRY_STATUSES or status >= 500:
            cls = ServerError
        elif 400 <= status < 500:
            cls = Rejected
        else:
            cls = ProtocolError
            message = f"unexpected HTTP status {status}: {message}"
        return cls(message, status=status, method=method, url=url)

    async def _call(
        self,
        method: str,
        url: str,
        handle: Callable[[httpx.Response, int], Awaitable[T]],
        *,
        storage: bool = False,
        params: list[tuple[str, str]] | None = None,
        headers: dict[str, str] | None = None,
        body: Callable[[], Awaitable[tuple[Any, dict[str, str], Any]]] | None = None,
        pass_statuses: Collection[int] = (),
        follow_redirects: bool = False,
        deadline: float | None = None,
        resume: Callable[[int], Awaitable[T | None]] | None = None,
        policy: RetryPolicy | None = None,
        answer_limit: int | None = None,
        piece_size: int | None = None,
    ) -> T:
        """One logical request, retried as the policy says; ``handle`` reads a good answer.

        ``body`` (for uploads) opens a fresh request body per attempt and
        returns (the body stream, its headers, resource to close afterwards).
        ``storage`` marks signed-URL requests: sent without the key, logged
        without the query, 401/403 meaning an expired URL. ``deadline`` (trio
        clock) bounds the whole call, retries included; by default it is the
        policy's ``total_budget`` from now. Every attempt's timeouts are cut to
        what is left of it, so a server that never answers cannot hold a call
        past its budget. ``resume(n)`` runs before attempt ``n`` > 1; a result
        other than None ends the call with that result (an upload that turns
        out to have been stored by an earlier attempt). ``policy`` replaces the
        client's retry policy for this call. ``answer_limit`` says how much of the
        answer the caller reads at most: the transport reads that much with the
        headers (in pieces of ``piece_size``), so a whole answer costs one worker
        thread hop (see transport.py).
        """
        log_url = strip_query(url) if storage else url
        kind = "storage" if storage else f"{method} {_route(url)}"
        if deadline is None:
            deadline = trio.current_time() + self._retry.total_budget
        extensions: dict[str, int] = {}
        if answer_limit is not None:
            extensions[PREFETCH] = answer_limit
        if piece_size is not None:
            extensions[PIECE_SIZE] = piece_size

        async def attempt(n: int) -> T:
            if resume is not None and n > 1:
                found = await resume(n)
                if found is not None:
                    return found
            self.stats.requests[kind] += 1
            resource: Any = None
            try:
                request = self._http.build_request(
                    method,
                    url,
                    params=params,
                    headers=headers,
                    timeout=self._attempt_timeout(deadline),
                    extensions=extensions,
                )
                if body is not None:
                    stream, body_headers, resource = await body()
                    _attach_body(request, stream, body_headers)
                if logger.isEnabledFor(logging.DEBUG):
                    shown = strip_query(str(request.url)) if storage else str(request.url)
                    logger.debug("%s %s (attempt %d)", method, shown, n)
                response = await self._http.send(
                    request,
                    auth=None if storage else self._auth,
                    stream=True,
                    follow_redirects=follow_redirects,
                )
                try:
                    status = response.status_code
                    if status >= 300 and status not in pass_statuses:
                        err_body = await _read_bounded(response, MAX_ERROR_BODY)
                        err = self._error(response, err_body, method, log_url, storage=storage)
                        if status in RETRY_STATUSES:
                            retry_after = parse_retry_after(response.headers.get("retry-after"))
                            raise RetryableStatus(err, retry_after)
                        raise err
                    return await handle(response, n)
                finally:
                    await response.aclose()
            finally:
                if resource is not None:
                    await resource.aclose()

        try:
            return await run_with_retries(
                policy or self._retry, attempt, method=method, url=log_url, deadline=deadline
            )
        except ApiError as exc:
            self.stats.errors[type(exc).__name__] += 1
            raise

    def _attempt_timeout(self, deadline: float) -> httpx.Timeout:
        """This attempt's timeouts: the configured ones, never more than the budget left.

        They bound each wait for the network (connect, a read, a write), not a
        transfer that keeps progressing: a large upload may take longer than
        the budget, a server that stops answering may not.
        """
        left = max(0.01, deadline - trio.current_time())
        return httpx.Timeout(min(self._timeout, left), connect=min(CONNECT_TIMEOUT, left))

    async def _json_call(
        self,
        method: str,
        path: str,
        *,
        params: list[tuple[str, str]] | None = None,
        deadline: float | None = None,
    ) -> object:
        url = self._api_url(path)

        async def handle(response: httpx.Response, n: int) -> object:
            data = await _read_bounded(response, MAX_JSON_BODY)
            try:
                return _parse_json(data, response, method, url)
            except ProtocolError as exc:
                if method in IDEMPOTENT_METHODS:
                    # A proxy's error page or a cut answer: asking again is harmless.
                    raise RetryableStatus(exc, None) from exc
                raise

        return await self._call(
            method,
            url,
            handle,
            params=params,
            headers={"Accept": "application/json"},
            deadline=deadline,
            answer_limit=MAX_JSON_BODY,
        )

    # ------------------------------------------------------------ operations

    async def list_files(
        self,
        *,
        purpose: str | None = None,
        page: int = 0,
        page_size: int = 100,
        search: str | None = None,
        sample_types: Sequence[str] = (),
        sources: Sequence[str] = (),
        mimetypes: Sequence[str] = (),
        include_total: bool = True,
        deadline: float | None = None,
    ) -> FilePage:
        """One page of ``GET /v1/files``; array filters are sent as repeated keys.

        ``deadline`` (trio clock) bounds it, retries included, as in `_call`."""
        params: list[tuple[str, str]] = [
            ("page", str(page)),
            ("page_size", str(page_size)),
            ("include_total", "true" if include_total else "false"),
        ]
        if purpose is not None:
            params.append(("purpose", purpose))
        if search is not None:
            params.append(("search", search))
        params += [("sample_type", v) for v in sample_types]
        params += [("source", v) for v in sources]
        params += [("mimetypes", v) for v in mimetypes]
        data = await self._json_call("GET", "/v1/files", params=params, deadline=deadline)
        url = self._api_url("/v1/files")
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise ProtocolError(
                "listing is not an object with a 'data' array", method="GET", url=url
            )
        files = self._listed_files(data["data"])
        self._recent.note(files)
        self._seen.note(files)
        total = data.get("total")
        if not isinstance(total, int) or isinstance(total, bool) or total < 0:
            total = None
        return FilePage(files=files, total=total)

    def _listed_files(self, items: list[object]) -> list[RemoteFile]:
        """The files of a listing page. One bad record must not hide the others: it is
        skipped, or repaired, with one WARNING naming it (the first time it is seen)."""
        files = []
        for item in items:
            notes: list[str] = []
            try:
                files.append(RemoteFile.from_json(item, notes))
            except ProtocolError as exc:
                self._warn_once(item, f"skipped: {exc.message}")
                continue
            if notes:
                self._warn_once(item, "; ".join(notes))
        return files

    def _warn_once(self, item: object, what: str) -> None:
        file_id = item.get("id") if isinstance(item, dict) else None
        name = file_id if isinstance(file_id, str) else repr(item)[:80]
        if name in self._odd_records:
            return
        if len(self._odd_records) >= MAX_ODD_RECORDS:
            self._odd_records.clear()
        self._odd_records.add(name)
        logger.warning("GET /v1/files: file %s in a listing: %s", name, what)

    async def list_all(
        self,
        *,
        purpose: str | None = None,
        page_size: int = 100,
        max_parallel: int = 8,
        search: str | None = None,
        sample_types: Sequence[str] = (),
        sources: Sequence[str] = (),
        mimetypes: Sequence[str] = (),
    ) -> list[RemoteFile]:
        """Every matching file, in the service's order, each id once.

        Page 0 comes first; once ``total`` is known all remaining pages are
        fetched at once (bounded by ``max_parallel``), because a listing is
        what ``ls`` waits on. Without ``total``, pages are read one by one
        until a short page.

        A listing ends, whatever the service says: at the pages ``total`` makes
        (and one more, for files added meanwhile), at a page that brings no file
        not seen, or past ``MAX_LISTED_FILES`` (ProtocolError); and all of it within
        the retry policy's ``total_budget`` (Unavailable), so that a listing nobody
        waits for any more stops too.
        """
        if page_size < 1:
            raise ValueError("page_size must be >= 1")
        filters: dict[str, Any] = {
            "purpose": purpose,
            "search": search,
            "sample_types": sample_types,
            "sources": sources,
            "mimetypes": mimetypes,
        }
        url = self._api_url("/v1/files")
        deadline = trio.current_time() + self._retry.total_budget
        filters["deadline"] = deadline
        first = await self.list_files(page=0, page_size=page_size, include_total=True, **filters)
        pages: dict[int, list[RemoteFile]] = {0: first.files}
        total = first.total
        if total is not None and total > MAX_LISTED_FILES:
            raise ProtocolError(
                f"the listing says it holds {total} files, more than the {MAX_LISTED_FILES} "
                "a listing is read for",
                method="GET",
                url=url,
            )
        if total is not None and len(first.files) < min(page_size, total) and first.files:
            # The service capped the page size: page offsets follow its size, not ours.
            logger.debug("page size capped by the service at %d", len(first.files))
            page_size = len(first.files)
        last_page = 0
        if total is not None and len(first.files) == page_size:
            n_pages = math.ceil(total / page_size)
            limiter = trio.CapacityLimiter(max(1, max_parallel))

            async def fetch(index: int) -> None:
                async with limiter:
                    result = await self.list_files(
                        page=index, page_size=page_size, include_total=False, **filters
                    )
                pages[index] = result.files

            async with trio.open_nursery() as nursery:
                for index in range(1, n_pages):
                    nursery.start_soon(fetch, index)
            last_page = max(0, n_pages - 1)

        # Sequential tail: no total, or more files appeared than ``total`` said. Page 0
        # alone is one consistent answer: if it holds all ``total`` files, that is all.
        complete = total is not None and len(first.files) >= total
        seen = {f.id for files in pages.values() for f in files}
        tail = 1 if total is not None else math.inf  # pages past those ``total`` makes
        while not complete and len(pages[last_page]) == page_size and tail > 0:
            if len(seen) >= MAX_LISTED_FILES:
                raise ProtocolError(
                    f"the listing goes on past {MAX_LISTED_FILES} files", method="GET", url=url
                )
            if trio.current_time() >= deadline:
                late = Unavailable(
                    f"the listing did not end within {self._retry.total_budget:g}s "
                    f"({len(seen)} files in {last_page + 1} pages)",
                    method="GET",
                    url=url,
                )
                late.timed_out = True
                raise late
            last_page += 1
            tail -= 1
            result = await self.list_files(
                page=last_page, page_size=page_size, include_total=False, **filters
            )
            pages[last_page] = result.files
            new = {f.id for f in result.files} - seen
            if not new:  # a service ignoring ``page`` must not loop us forever
                break
            seen |= new

        out: list[RemoteFile] = []
        ids: set[str] = set()
        for index in sorted(pages):
            for f in pages[index]:
                if f.id not in ids:
                    ids.add(f.id)
                    out.append(f)
        return out

    async def upload(
        self,
        path: pathlib.Path,
        *,
        filename: str,
        purpose: str,
        progress: Callable[[int], None] | None = None,
        dedupe: bool = True,
        after: GrowingUpload | None = None,
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
        """
        api_path = "/v1/files"
        url = self._api_url(api_path)
        deadline = trio.current_time() + self._retry.total_budget
        attempts: list[UploadAttempt] = list(after.attempts) if after is not None else []
        # Files already seen cannot be the one an attempt of this upload stored.
        if after is not None:
            known = after.known if dedupe else None
        else:
            known = self._recent.ids() if dedupe and self._retry.max_attempts > 1 else None
        digest = FileDigest(path)
        mark = after.mark if after is not None else self._seen.mark()

        async def open_body() -> tuple[Any, dict[str, str], Any]:
            body = SpoolBody(path, filename, purpose, self._max_upload, progress, url)
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
            stored = await self._call(
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
        data = await _read_bounded(response, MAX_JSON_BODY)
        stored = self._file_from(_parse_json(data, response, "POST", url), "POST", "/v1/files")
        filename, purpose, size, mark = sent
        stored = checked_upload_answer(stored, filename=filename, purpose=purpose, size=size,
                                       seen=self._seen, mark=mark, url=url)  # fmt: skip
        self._recent.note((stored,))
        self._seen.note((stored,))
        return stored

    def growing_upload(
        self,
        path: pathlib.Path,
        growing: GrowingFile,
        *,
        filename: str,
        purpose: str,
        progress: Callable[[int], None] | None = None,
    ) -> GrowingUpload:
        """An upload of ``path`` that starts while the file is still being appended to.

        Nothing is sent until `GrowingUpload.run`. Only for a client whose
        `sends_growing_uploads` is set.
        """
        return GrowingUpload(self, path, growing, filename=filename, purpose=purpose,
                             progress=progress)  # fmt: skip

    async def _send_growing(self, upload: GrowingUpload) -> RemoteFile:
        url = self._api_url("/v1/files")

        async def open_body() -> tuple[Any, dict[str, str], Any]:
            body = GrowingSpoolBody(
                upload.path,
                upload.growing,
                upload.filename,
                upload.purpose,
                upload.progress,
                GROWING_IDLE_LIMIT,
            )
            upload.attempts.append(UploadAttempt(started=time.time(), body=body))
            return body, body.headers, body

        async def handle(response: httpx.Response, n: int) -> RemoteFile:
            sent = (upload.filename, upload.purpose, upload.attempts[-1].body.size, upload.mark)
            return await self._stored_file(response, url, sent)

        try:
            return await self._call(
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

    async def _list_page(self, params: list[tuple[str, str]], deadline: float) -> object:
        return await self._json_call("GET", "/v1/files", params=params, deadline=deadline)

    async def retrieve(self, file_id: str) -> RemoteFile:
        """``GET /v1/files/{id}``: metadata of one file (``deleted`` may be set)."""
        path = f"/v1/files/{quote(file_id, safe='')}"
        data = await self._json_call("GET", path)
        found = self._file_from(data, "GET", path)
        self._seen.note((found,))
        return found

    async def delete(self, file_id: str) -> None:
        """``DELETE /v1/files/{id}``.

        A 404 on a retry (after an attempt whose outcome was unknown) counts
        as success: the first attempt most likely deleted it.
        """
        path = f"/v1/files/{quote(file_id, safe='')}"
        url = self._api_url(path)

        async def handle(response: httpx.Response, n: int) -> object:
            if response.status_code == 404:
                body = await _read_bounded(response, MAX_ERROR_BODY)
                if n > 1:
                    logger.info("DELETE %s: 404 on retry; treating as already deleted", path)
                    return None
                raise self._error(response, body, "DELETE", url, storage=False)
            data = await _read_bounded(response, MAX_JSON_BODY)
            return _parse_json(data, response, "DELETE", url)

        # 404 reaches ``handle`` so that it can tell a first attempt from a retry.
        data = await self._call(
            "DELETE", url, handle, pass_statuses=(404,), answer_limit=MAX_JSON_BODY
        )
        if isinstance(data, dict) and data.get("deleted") is False:
            raise ProtocolError("service answered deleted: false", method="DELETE", url=url)

    async def download(self, file_id: str, dest: pathlib.Path) -> int:
        """``GET /v1/files/{id}/content`` streamed into ``dest`` (rewritten on each retry).

        Returns the number of bytes written. On failure ``dest`` may hold a
        partial copy; the caller owns it.
        """
        path = f"/v1/files/{quote(file_id, safe='')}/content"

        async def handle(response: httpx.Response, n: int) -> int:
            written = 0
            async with await trio.open_file(dest, "wb") as out:
                async for chunk in response.aiter_bytes(CHUNK_SIZE):
                    await out.write(chunk)
                    written += len(chunk)
            return written

        # Redirects are followed (the service may hand off to storage); httpx
        # drops Authorization when a redirect leaves the API's origin.
        return await self._call("GET", self._api_url(path), handle, follow_redirects=True)

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
        deadline = trio.current_time() + self._retry.total_budget
        return await self._stored_search.find(
            filename, purpose, [attempt], frozenset(), FileDigest(path), deadline
        )

    async def content(self, file_id: str, size: int) -> bytes:
        """``GET /v1/files/{id}/content`` of a small file, in memory: one request in all.

        ``size`` is the file's listed size; more than that is refused, never read.
        """
        path = f"/v1/files/{quote(file_id, safe='')}/content"
        url = self._api_url(path)

        async def handle(response: httpx.Response, n: int) -> bytes:
            data = await _read_bounded(response, size + 1)
            if len(data) != size:
                raise ProtocolError(
                    f"expected {size} bytes of content, got {len(data)}"
                    + (" or more" if len(data) > size else ""),
                    status=response.status_code,
                    method="GET",
                    url=url,
                )
            return data

        return await self._call(
            "GET", url, handle, follow_redirects=True, answer_limit=max(size + 1, MAX_ERROR_BODY)
        )

    async def signed_url(self, file_id: str, expiry_hours: int = 24) -> SignedUrl:
        """``GET /v1/files/{id}/url?expiry=H``; ``expires_at`` is estimated from request time."""
        path = f"/v1/files/{quote(file_id, safe='')}/url"
        requested_at = time.time()
        data = await self._json_call("GET", path, params=[("expiry", str(expiry_hours))])
        url = data.get("url") if isinstance(data, dict) else None
        if not isinstance(url, str) or "://" not in url:
            raise ProtocolError(
                "signed URL answer has no usable 'url'", method="GET", url=self._api_url(path)
            )
        return SignedUrl(url=url, expires_at=requested_at + expiry_hours * 3600)

    async def read_range(self, url: str, start: int, length: int) -> bytes:
        """Bytes ``[start, start+length)`` of a signed URL, via HTTP Range, never with the key.

        206 and 200 (sliced) are accepted; a range past the end gives b"".
        403/401 -> UrlExpired, 404 -> NotFound; transient failures are retried.
        """
        pieces = await self.read_range_pieces(url, start, length, max(length, 1))
        return pieces[0] if pieces else b""

    async def read_range_pieces(
        self, url: str, start: int, length: int, piece_size: int
    ) -> list[bytes]:
        """Like `read_range`, cut into pieces of `piece_size` bytes (the last may be
        shorter; all of them shorter than asked if the body is): each byte copied once.
        """
        if start < 0 or length < 0 or piece_size < 1:
            raise ValueError("start and length must be >= 0, piece_size >= 1")
        if length == 0:
            return []
        try:
            httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise ProtocolError(f"invalid signed URL: {exc}", method="GET", url=url) from None
        end = start + length - 1

        async def handle(response: httpx.Response, n: int) -> list[bytes]:
            if response.status_code == 416:
                return []
            skip, wanted = 0, start + length
            if response.status_code == 206:
                try:
                    wanted = storage.range_length(
                        response.headers.get("content-range"),
                        _content_length(response),
                        start,
                        length,
                    )
                except storage.BadRange as exc:
                    raise ProtocolError(str(exc), status=206, method="GET", url=url) from None
            elif response.status_code == 200:
                skip = start
            else:
                raise ProtocolError(
                    f"unexpected HTTP status {response.status_code}",
                    status=response.status_code,
                    method="GET",
                    url=url,
                )
            # A 206 is read to its end (no further than its Content-Range, so that the
            # connection goes back to the pool); a 200 (the whole file) is dropped as soon
            # as the range is in. The transport reads the range with the headers, in
            # pieces of `piece_size`: they are kept as they come.
            chunks: list[bytes] = []
            got = 0
            async for chunk in response.aiter_raw():
                chunks.append(chunk)
                got += len(chunk)
                if got > wanted and response.status_code == 206:
                    raise ProtocolError(
                        "206 answer longer than its Content-Range",
                        status=206,
                        method="GET",
                        url=url,
                    )
                if got >= wanted and response.status_code == 200:
                    break
            return _cut(chunks, skip, length, piece_size)

        try:
            return await self._call(
                "GET",
                url,
                handle,
                storage=True,
                headers={"Range": f"bytes={start}-{end}", "Accept-Encoding": "identity"},
                pass_statuses=(416,),
                follow_redirects=True,
                answer_limit=length + 1,  # one byte more tells a 206 that runs on
                piece_size=piece_size,
            )
        except httpx.UnsupportedProtocol as exc:
            raise ProtocolError(f"unsupported signed URL: {exc}", method="GET", url=url) from None

    async def connect_ahead(self, url: str) -> None:
        """Open a connection for reading the signed URL `url`, if none is open, so that
        the first read of a file does not also wait for a connection to storage."""
        if self._transport is None:
            return
        try:
            await self._transport.connect_ahead(url, CONNECT_TIMEOUT)
        except OSError as exc:  # the read will connect, and say what fails
            logger.debug("no connection ahead to %s: %s", strip_query(url), exc)

    async def check_auth(self) -> None:
        """A cheap authenticated call, so ``mount`` fails early on a bad key or no network."""
        await self.list_files(page_size=1, include_total=False)

    # --------------------------------------------------------------- helpers

    def _file_from(self, data: object, method: str, path: str) -> RemoteFile:
        try:
            return RemoteFile.from_json(data)
        except ProtocolError as exc:
            raise ProtocolError(exc.message, method=method, url=self._api_url(path)) from None


class GrowingUpload:
    """One attempt at uploading a file while it is still being written, sent chunked.

    `run` sends it; it raises `StreamAbandoned` if the file changed in a way the
    body cannot follow, and any error the one attempt met (it is never retried:
    the file is uploaded whole once finished instead, with ``upload(after=...)``,
    which knows what this attempt may have stored).
    """

    def __init__(
        self,
        client: FilesClient,
        path: pathlib.Path,
        growing: GrowingFile,
        *,
        filename: str,
        purpose: str,
        progress: Callable[[int], None] | None,
    ) -> None:
        self._client = client
        self.path = path
        self.growing = growing
        self.filename = filename
        self.purpose = purpose
        self.progress = progress
        self.attempts: list[UploadAttempt] = []
        self.refusal: Rejected | None = None  # a 4xx answer to it
        # Files already seen cannot be the one this attempt stored.
        self.known = client._recent.ids()
        self.mark = client._seen.mark()

    @property
    def complete(self) -> bool:
        """Whether the whole body went out (only then can the service have stored it)."""
        return any(a.body.complete for a in self.attempts)

    async def run(self) -> RemoteFile:
        return await self._client._send_growing(self)


def _content_length(response: httpx.Response) -> int | None:
    """The answer's Content-Length, if it gives a number."""
    value = response.headers.get("content-length", "")
    return int(value) if value.isdigit() else None
