"""Signed-URL range reads through http.client in worker threads (see direct.py).

A cold sequential read is bound by the daemon's CPU, and on the trio thread most of it
went to receiving bodies: h11 and httpcore copy each byte several times and do Python
work per 64 KiB. http.client reads each block straight from the socket into the bytes
it returns.

Only plain GETs of a byte range go this way, only to hosts no proxy applies to
(http.client does not read proxy settings), and never with the API key. Anything
unusual (a redirect) is left to the caller's httpx path.
"""

from __future__ import annotations

import functools
import http.client
import ssl
from dataclasses import dataclass, field

import httpx

from mistralfs.api.direct import DirectConnections, set_timeout

MAX_ERROR_BODY = 64 * 1024
# Ranged reads in flight at once, across files: a sequential reader on a long link
# keeps up to 16 parts of 4 MiB on their way (reader.py), as many connections.
MAX_CONNECTIONS = 16


class NotForDirectRead(Exception):
    """The answer needs what only the httpx path does (a redirect)."""


class BadRange(Exception):
    """A 206 that does not answer the range asked: another start, more bytes than
    asked, or a Content-Length that disagrees with its Content-Range."""


def range_length(
    content_range: str | None, content_length: int | None, start: int, length: int
) -> int:
    """How many bytes a 206 answer to `length` bytes at `start` carries (fewer at the
    end of the file); `BadRange` unless its headers answer that range and no more.

    A body is never read past this: a server whose 206 carries a gigabyte for a
    megabyte asked must not make the reader hold a gigabyte.
    """
    parsed = _content_range(content_range)
    last_wanted = start + length - 1
    if parsed is None:
        raise BadRange(f"206 answer with a missing or malformed Content-Range {content_range!r}")
    first, last = parsed
    if first != start or not first <= last <= last_wanted:
        raise BadRange(f"206 answer with Content-Range {content_range!r} for {start}-{last_wanted}")
    size = last - first + 1
    if content_length is not None and content_length != size:
        raise BadRange(f"206 answer of {content_length} bytes for Content-Range {content_range!r}")
    return size


def _content_range(value: str | None) -> tuple[int, int] | None:
    """(first, last) of `Content-Range: bytes first-last/total`; None if malformed."""
    unit, _, rest = (value or "").strip().partition(" ")
    first, dash, rest = rest.partition("-")
    last = rest.partition("/")[0]
    if unit.lower() != "bytes" or not dash or not first.isdigit() or not last.isdigit():
        return None
    return int(first), int(last)


@dataclass
class RangeAnswer:
    """One attempt's answer: the status, and the range in pieces or an error body."""

    status: int
    headers: list[tuple[str, str]]
    ranged: bool = False  # the range was read: `pieces` hold it (short if the body was)
    pieces: list[bytes] = field(default_factory=list)
    error_body: bytes = b""
    problem: str = ""  # why a 206 was not taken (see BadRange)

    def as_httpx(self) -> httpx.Response:
        """The answer as an httpx.Response, for the client's error mapping."""
        return httpx.Response(self.status, headers=self.headers, content=self.error_body)


class DirectRangeReader:
    """Reads signed-URL ranges over a few kept-alive connections per storage host."""

    def __init__(self, *, user_agent: str, tls: ssl.SSLContext) -> None:
        self._user_agent = user_agent
        self._connections = DirectConnections(MAX_CONNECTIONS, tls)

    def serves(self, url: str) -> bool:
        """Whether a URL can be read directly: http(s), and no proxy configured for it."""
        return self._connections.serves(url)

    async def get_range(
        self, url: str, start: int, length: int, piece_size: int, socket_timeout: float
    ) -> RangeAnswer:
        """One attempt. Network failures raise httpx transport errors, so that the
        client's retry policy treats them as it treats httpx's own."""
        headers = {
            "Range": f"bytes={start}-{start + length - 1}",
            "User-Agent": self._user_agent,
        }
        return await self._connections.exchange(
            url, functools.partial(_get_range, headers=headers, start=start, length=length,
                                   piece_size=piece_size, timeout=socket_timeout)
        )  # fmt: skip

    async def connect_ahead(self, url: str, socket_timeout: float) -> None:
        await self._connections.connect_ahead(url, socket_timeout)

    def idle_connections(self) -> int:
        return self._connections.idle()

    def close(self) -> None:
        self._connections.close()


def _get_range(
    conn: http.client.HTTPConnection,
    target: str,
    *,
    headers: dict[str, str],
    start: int,
    length: int,
    piece_size: int,
    timeout: float,
) -> tuple[RangeAnswer, bool]:
    """Blocking: send the GET, read the answer; (answer, whether the connection is reusable)."""
    set_timeout(conn, timeout)
    try:
        conn.request("GET", target, headers=headers)
        response = conn.getresponse()
        answer = RangeAnswer(response.status, response.getheaders())
        if response.status in (301, 302, 303, 307, 308):
            raise NotForDirectRead(f"redirect ({response.status})")
        if response.status == 206:
            try:
                size = range_length(
                    response.getheader("content-range"), response.length, start, length
                )
            except BadRange as exc:
                answer.problem = str(exc)
                return answer, False  # its body is left unread, and the connection dropped
            answer.pieces = _read_pieces(response, size, piece_size)
            if response.length is None and response.read(1):  # chunked, and longer
                answer.pieces, answer.problem = [], "206 answer longer than its Content-Range"
                return answer, False
            answer.ranged = True
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
