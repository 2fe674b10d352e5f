"""Signed-URL range reads through the standard library's http.client, in worker threads.

A cold sequential read is bound by the daemon's CPU, and on the trio thread most of it
went to receiving bodies: h11 and httpcore copy each byte several times and do Python
work per 64 KiB. http.client reads each block straight from the socket into the bytes
it returns, and does it in a worker thread (trio.to_thread, so structured), with the
GIL released while it waits on the socket; the trio thread is left to answer FUSE.

Only plain GETs of a byte range go this way, only to hosts no proxy applies to
(http.client does not read proxy settings), and never with the API key. Anything
unusual (a redirect) is left to the caller's httpx path.
"""

from __future__ import annotations

import http.client
import ssl
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

import httpx
import trio

MAX_ERROR_BODY = 64 * 1024
MAX_CONNECTIONS = 4


class NotForDirectRead(Exception):
    """The answer needs what only the httpx path does (a redirect)."""


@dataclass
class RangeAnswer:
    """One attempt's answer: the status, and the range in pieces or an error body."""

    status: int
    headers: list[tuple[str, str]]
    ranged: bool = False  # the range was read: `pieces` hold it (short if the body was)
    pieces: list[bytes] = field(default_factory=list)
    error_body: bytes = b""

    def as_httpx(self) -> httpx.Response:
        """The answer as an httpx.Response, for the client's error mapping."""
        return httpx.Response(self.status, headers=self.headers, content=self.error_body)


class DirectRangeReader:
    """Keeps a few idle connections per storage host and reads ranges in worker threads."""

    def __init__(self, *, user_agent: str) -> None:
        self._user_agent = user_agent
        self._idle: dict[tuple[str, str, int], list[http.client.HTTPConnection]] = {}
        self._limiter = trio.CapacityLimiter(MAX_CONNECTIONS)
        self._ssl = ssl.create_default_context()
        # Proxy settings are read once (the environment scan costs more than a read's
        # own work), and the answer kept per host.
        self._proxies = urllib.request.getproxies()
        self._direct_hosts: dict[tuple[str, str], bool] = {}

    def serves(self, url: str) -> bool:
        """Whether a URL can be read directly: http(s), and no proxy configured for it."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return False
        key = (parts.scheme, parts.hostname)
        direct = self._direct_hosts.get(key)
        if direct is None:
            direct = self._direct_hosts[key] = parts.scheme not in self._proxies or bool(
                urllib.request.proxy_bypass_environment(parts.hostname, self._proxies)
            )
        return direct

    async def get_range(
        self, url: str, start: int, length: int, piece_size: int, socket_timeout: float
    ) -> RangeAnswer:
        """One attempt. Network failures raise httpx transport errors, so that the
        client's retry policy treats them as it treats httpx's own."""
        parts = urllib.parse.urlsplit(url)
        https = parts.scheme == "https"
        assert parts.hostname is not None
        key = (parts.scheme, parts.hostname, parts.port or (443 if https else 80))
        idle = self._idle.get(key)
        conn = idle.pop() if idle else self._connection(key, https)
        target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        headers = {
            "Range": f"bytes={start}-{start + length - 1}",
            "User-Agent": self._user_agent,
        }
        try:
            answer, reusable = await trio.to_thread.run_sync(
                _get_range, conn, target, headers, start, length, piece_size, socket_timeout,
                limiter=self._limiter,
            )  # fmt: skip
        except BaseException:
            conn.close()
            raise
        if reusable:
            self._idle.setdefault(key, []).append(conn)
        else:
            conn.close()
        return answer

    def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()

    def _connection(self, key: tuple[str, str, int], https: bool) -> http.client.HTTPConnection:
        _, host, port = key
        if https:
            return http.client.HTTPSConnection(host, port, context=self._ssl)
        return http.client.HTTPConnection(host, port)


def _get_range(
    conn: http.client.HTTPConnection,
    target: str,
    headers: dict[str, str],
    start: int,
    length: int,
    piece_size: int,
    timeout: float,
) -> tuple[RangeAnswer, bool]:
    """Blocking: send the GET, read the answer; (answer, whether the connection is reusable)."""
    conn.timeout = timeout
    if conn.sock is not None:
        conn.sock.settimeout(timeout)
    try:
        conn.request("GET", target, headers=headers)
        response = conn.getresponse()
        answer = RangeAnswer(response.status, response.getheaders())
        if response.status in (301, 302, 303, 307, 308):
            raise NotForDirectRead(f"redirect ({response.status})")
        if response.status == 206:
            first = _range_start(response.getheader("content-range"))
            if first is not None and first <= start:
                _skip(response, start - first)
                answer.pieces = _read_pieces(response, length, piece_size)
                answer.ranged = True
                response.read()  # the rest, if any: the connection then goes back
                return answer, not response.will_close
        if response.status == 200:  # the whole file: skip to the range, then drop the rest
            _skip(response, start)
            answer.pieces = _read_pieces(response, length, piece_size)
            answer.ranged = True
            return answer, False
        answer.error_body = response.read(MAX_ERROR_BODY)
        return answer, not response.will_close and response.isclosed()
    except TimeoutError as exc:
        raise httpx.ReadTimeout(f"storage read timed out: {exc}") from None
    except (OSError, http.client.HTTPException) as exc:
        raise httpx.ReadError(f"{type(exc).__name__}: {exc}") from None


def _read_pieces(response: http.client.HTTPResponse, length: int, piece_size: int) -> list[bytes]:
    pieces = []
    while length > 0:
        piece = response.read(min(piece_size, length))
        if piece:
            pieces.append(piece)
            length -= len(piece)
        if len(piece) < piece_size and length > 0:
            if response.length:  # the body stopped before its Content-Length: retry
                raise http.client.IncompleteRead(piece, response.length)
            break  # a range past the end of the file: short, as the server says
    return pieces


def _skip(response: http.client.HTTPResponse, count: int) -> None:
    while count > 0:
        chunk = response.read(min(count, 1 << 20))
        if not chunk:
            return
        count -= len(chunk)


def _range_start(header: str | None) -> int | None:
    """The first byte of a `Content-Range: bytes A-B/N` answer."""
    if not header or not header.startswith("bytes "):
        return None
    first, _, _ = header[len("bytes ") :].partition("-")
    return int(first) if first.isdigit() else None
