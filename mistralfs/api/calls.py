"""The calling layer every endpoint shares.

One httpx client over one transport (transport.py); the API key sent to the API's own
origin only; each attempt's timeouts cut to what is left of the call's deadline; the
retry policy (retry.py); the mapping of error answers to the exceptions callers react
to; and the request and error counts that `status` shows. Endpoints (client.py,
listing.py, uploads.py, storage.py) say what to send and how to read the answer.
"""

from __future__ import annotations

import collections
import json
import logging
import pathlib
import re
import urllib.parse
from collections.abc import Awaitable, Callable, Collection, Generator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import trio

from mistralfs.api.buffers import BlockBuffers
from mistralfs.api.errors import (
    ApiError,
    AuthError,
    NotFound,
    ProtocolError,
    Rejected,
    ServerError,
    TooLarge,
    UrlExpired,
    extract_message,
    strip_query,
)
from mistralfs.api.models import RemoteFile
from mistralfs.api.retry import (
    RETRY_STATUSES,
    RetryableStatus,
    RetryPolicy,
    parse_retry_after,
    run_with_retries,
)
from mistralfs.api.tls import client_context
from mistralfs.api.transport import (
    BLOCK_BUFFERS,
    PIECE_SIZE,
    PREFETCH,
    RECEIVE_KEY,
    ThreadedTransport,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

CONNECT_TIMEOUT = 10.0
MAX_ERROR_BODY = 64 * 1024
MAX_JSON_BODY = 64 * 1024 * 1024
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "DELETE"})
_ID_SEGMENT = re.compile(r"/[0-9a-fA-F-]{36}(?=/|$)")


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    default = {"http": 80, "https": 443}.get(url.scheme)
    return (url.scheme, url.host.lower(), url.port or default)


class _ServerOnlyBearerAuth(httpx.Auth):
    """Adds the bearer key only to requests for the API's own origin (never to storage hosts)."""

    def __init__(self, api_key: str, origin: tuple[str, str, int | None]) -> None:
        self._header = f"Bearer {api_key}"
        self._origin = origin

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if _origin(request.url) == self._origin:
            request.headers["Authorization"] = self._header
        yield request

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


def attach_body(
    request: httpx.Request, stream: httpx.AsyncByteStream, headers: dict[str, str]
) -> None:
    """Give a built request an upload body: its stream and the headers that describe it
    (a Content-Length, or else chunked)."""
    request.headers.pop("Content-Length", None)
    request.headers.update(headers)
    if "Content-Length" not in headers:
        request.headers["Transfer-Encoding"] = "chunked"
    request.stream = stream


async def read_bounded(response: httpx.Response, limit: int) -> bytes:
    """Read at most ``limit`` bytes of a streamed body (error pages can be huge)."""
    buf = bytearray()
    async for chunk in response.aiter_bytes():
        buf += chunk
        if len(buf) >= limit:
            break
    return bytes(buf[:limit])


def parse_json(body: bytes, response: httpx.Response, method: str, url: str) -> object:
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


def route(url: str) -> str:
    """`/v1/files/<uuid>/url` -> `/v1/files/{id}/url`, to count requests by kind."""
    return _ID_SEGMENT.sub("/{id}", urllib.parse.urlsplit(url).path)  # httpx.URL: 10x slower


def _unobserved(kind: str, seconds: float) -> None:
    """No one measures how long calls take: the metrics endpoint is off."""


@dataclass
@dataclass
class RequestStats:
    """Requests sent (attempts, by route) and errors raised (by kind), since start."""

    requests: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    # Answers by route and HTTP status (`GET /v1/files/{id}/url 404`), and attempts after
    # the first by route: for `status --json` and the metrics endpoint.
    answers: collections.Counter[str] = field(default_factory=collections.Counter)
    retries: collections.Counter[str] = field(default_factory=collections.Counter)
    # Told (kind, seconds) as each call ends, its retries included: the metrics' histogram.
    observe: Callable[[str, float], None] = _unobserved


class _LeanCookies(httpx.Cookies):
    """httpx's cookie jar, that looks at an answer only when it sets a cookie: taking
    cookies in (httpx wraps each answer in urllib's request and email's message to ask
    http.cookiejar) cost about 45 us of the daemon's CPU per answer, which set none."""

    def extract_cookies(self, response: httpx.Response) -> None:
        if "set-cookie" in response.headers:
            super().extract_cookies(response)


class _LeanCookieClient(httpx.AsyncClient):
    """httpx's client, its cookies in a `_LeanCookies` jar; the rest as it is."""

    def __init__(self, **kwargs: Any) -> None:
        self._jar = _LeanCookies()
        super().__init__(**kwargs)

    @property
    def cookies(self) -> httpx.Cookies:
        return self._jar

    @cookies.setter
    def cookies(self, cookies: Any) -> None:
        self._jar = _LeanCookies(cookies)


class ApiCalls:
    """How every request is made (see the module's docstring).

    ``transport`` replaces `ThreadedTransport` (tests: httpx.MockTransport). ``ca_file``
    (PEM) is the only trust of every connection when given; else see tls.py.
    """

    def __init__(
        self,
        server_url: str,
        api_key: str,
        *,
        retry: RetryPolicy | None,
        timeout: float,
        user_agent: str,
        transport: httpx.AsyncBaseTransport | None,
        ca_file: pathlib.Path | None,
    ) -> None:
        base = httpx.URL(server_url.rstrip("/"))
        if base.scheme not in ("http", "https") or not base.host:
            raise ValueError(f"server URL must be http(s)://host[:port]: {strip_query(server_url)}")
        if base.path.rstrip("/").endswith("/v1"):
            # Same convention as the SDK's server_url: the host without /v1.
            base = base.copy_with(path=base.path.rstrip("/")[: -len("/v1")])
        self.base = str(base.copy_with(query=None, fragment=None)).rstrip("/")
        self._auth = _ServerOnlyBearerAuth(api_key, _origin(base))
        self.retry = retry or RetryPolicy()
        self.timeout = timeout
        self.stats = RequestStats()
        tls = client_context(ca_file)  # one trust for every connection
        self.transport = ThreadedTransport(tls) if transport is None else None
        self._http = _LeanCookieClient(
            timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT),
            headers={"User-Agent": user_agent},
            follow_redirects=False,
            transport=transport or self.transport,
            verify=tls,
        )

    def url(self, path: str) -> str:
        """The URL of an API path (``/v1/...``)."""
        return self.base + path

    async def aclose(self) -> None:
        await self._http.aclose()  # and its transport

    def error(
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

    async def call(
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
        block_buffers: BlockBuffers | None = None,
        receive_key: float | None = None,
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
        thread hop (see transport.py). ``block_buffers``: each piece of a good answer in
        memory of its own, populated at once, taken from these (buffers.py).
        """
        log_url = strip_query(url) if storage else url
        kind = "storage" if storage else f"{method} {route(url)}"
        if deadline is None:
            deadline = trio.current_time() + self.retry.total_budget
        extensions: dict[str, float | bool | BlockBuffers] = {}
        if answer_limit is not None:
            extensions[PREFETCH] = answer_limit
        if piece_size is not None:
            extensions[PIECE_SIZE] = piece_size
        if block_buffers is not None:
            extensions[BLOCK_BUFFERS] = block_buffers
        if receive_key is not None:
            extensions[RECEIVE_KEY] = receive_key

        async def attempt(n: int) -> T:
            if resume is not None and n > 1:
                found = await resume(n)
                if found is not None:
                    return found
            self.stats.requests[kind] += 1
            if n > 1:
                self.stats.retries[kind] += 1
            resource: Any = None
            try:
                request = self._http.build_request(
                    method,
                    url,
                    params=tuple(params) if params else None,
                    headers=headers,
                    timeout=self.attempt_timeout(deadline),
                    extensions=extensions,
                )
                if body is not None:
                    stream, body_headers, resource = await body()
                    attach_body(request, stream, body_headers)
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
                    self.stats.answers[f"{kind} {status}"] += 1
                    if status >= 300 and status not in pass_statuses:
                        err_body = await read_bounded(response, MAX_ERROR_BODY)
                        err = self.error(response, err_body, method, log_url, storage=storage)
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

        started = trio.current_time()
        try:
            return await run_with_retries(
                policy or self.retry, attempt, method=method, url=log_url, deadline=deadline
            )
        except ApiError as exc:
            self.stats.errors[type(exc).__name__] += 1
            raise
        finally:
            self.stats.observe(kind, trio.current_time() - started)

    def attempt_timeout(self, deadline: float) -> httpx.Timeout:
        """This attempt's timeouts: the configured ones, never more than the budget left.

        They bound each wait for the network (connect, a read, a write), not a
        transfer that keeps progressing: a large upload may take longer than
        the budget, a server that stops answering may not.
        """
        left = max(0.01, deadline - trio.current_time())
        return httpx.Timeout(min(self.timeout, left), connect=min(CONNECT_TIMEOUT, left))

    async def json_call(
        self,
        method: str,
        path: str,
        *,
        params: list[tuple[str, str]] | None = None,
        deadline: float | None = None,
        policy: RetryPolicy | None = None,
    ) -> object:
        url = self.url(path)

        async def handle(response: httpx.Response, n: int) -> object:
            data = await read_bounded(response, MAX_JSON_BODY)
            try:
                return parse_json(data, response, method, url)
            except ProtocolError as exc:
                if method in IDEMPOTENT_METHODS:
                    # A proxy's error page or a cut answer: asking again is harmless.
                    raise RetryableStatus(exc, None) from exc
                raise

        return await self.call(
            method,
            url,
            handle,
            params=params,
            headers={"Accept": "application/json"},
            deadline=deadline,
            policy=policy,
            answer_limit=MAX_JSON_BODY,
        )

    def file_from(self, data: object, method: str, path: str) -> RemoteFile:
        try:
            return RemoteFile.from_json(data)
        except ProtocolError as exc:
            raise ProtocolError(exc.message, method=method, url=self.url(path)) from None
