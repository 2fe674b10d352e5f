"""Signed-URL range answers: what a 206 must say for its body to be taken.

A body is never read past the range asked for: a server whose 206 carries a gigabyte
for a megabyte asked must not make the reader hold a gigabyte. The reads themselves
go through the client's one transport (transport.py), the range read with the
answer's headers, in block-sized pieces.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import httpx

from mistralfs.api.buffers import FRESH, BlockBuffers
from mistralfs.api.calls import CONNECT_TIMEOUT, ApiCalls
from mistralfs.api.errors import ProtocolError, strip_query

logger = logging.getLogger(__name__)


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


def cut(chunks: list[bytes], skip: int, length: int, piece_size: int) -> list[bytes]:
    """`length` bytes after the first `skip` of `chunks`, in pieces of `piece_size`."""
    cutter = Cutter(skip, length, piece_size)
    for chunk in chunks:
        cutter.feed(chunk)
    return cutter.finish()


class Cutter:
    """`length` bytes of a body after its first `skip`, in pieces of `piece_size` (the
    last may be shorter), cut as the body comes: each byte copied at most once, a chunk
    that is a whole piece not at all."""

    def __init__(self, skip: int, length: int, piece_size: int) -> None:
        self.pieces: list[bytes] = []  # the whole pieces so far
        self._parts: list[memoryview] = []
        self._filled = 0
        self._skip = skip
        self._remaining = length
        self._piece_size = piece_size

    def feed(self, chunk: bytes) -> range:
        """Take the next chunk of the body; the indexes of the pieces it completed."""
        done = len(self.pieces)
        view = memoryview(chunk)
        if self._skip:
            if len(view) <= self._skip:
                self._skip -= len(view)
                return range(done, done)
            view, self._skip = view[self._skip :], 0
        while view and self._remaining:
            want = min(self._piece_size, self._remaining)
            take = min(len(view), want - self._filled)
            if take == want == len(chunk):
                self.pieces.append(chunk)  # the chunk is a piece as it is
            else:
                self._parts.append(view[:take])
                self._filled += take
                if self._filled < want:
                    break
                self.pieces.append(b"".join(self._parts))
                self._parts, self._filled = [], 0
            view = view[take:]
            self._remaining -= want
        return range(done, len(self.pieces))

    def finish(self) -> list[bytes]:
        """All the pieces: a short body's last one is short (the caller sees what is missing)."""
        if self._parts:
            self.pieces.append(b"".join(self._parts))
            self._parts, self._filled = [], 0
        return self.pieces


def _content_length(response: httpx.Response) -> int | None:
    """The answer's Content-Length, if it gives a number."""
    value = response.headers.get("content-length", "")
    return int(value) if value.isdigit() else None


class StorageReads:
    """Reads of signed URLs: sent without the key, logged without the query, 401/403
    meaning an expired URL (the reader then asks for a new one)."""

    def __init__(self, calls: ApiCalls) -> None:
        self._calls = calls

    async def read_range(self, url: str, start: int, length: int) -> bytes:
        """Bytes ``[start, start+length)`` of a signed URL, via HTTP Range, never with the key.

        206 and 200 (sliced) are accepted; a range past the end gives b"".
        403/401 -> UrlExpired, 404 -> NotFound; transient failures are retried.
        """
        pieces = await self.read_range_pieces(url, start, length, max(length, 1))
        return pieces[0] if pieces else b""

    async def read_range_pieces(
        self,
        url: str,
        start: int,
        length: int,
        piece_size: int,
        on_piece: Callable[[int, bytes], None] | None = None,
        buffers: BlockBuffers | None = None,
        receive_key: float | None = None,
    ) -> list[bytes]:
        """Like `read_range`, cut into pieces of `piece_size` bytes (the last may be
        shorter; all of them shorter than asked if the body is): each byte copied once.

        With `on_piece`, the body is read a piece at a time (transport.py) and each whole
        piece but the last is handed to `on_piece(index, piece)` as soon as it is in, so
        that the first blocks of a long range serve reads while the rest is on its way
        (a retry may hand pieces again). The last piece only comes back with the others,
        once the body has ended where its range does: a body that runs on fails the
        call, and the range's last block with it. Without `on_piece`, the whole range
        is read in one worker-thread hop, with the headers. Each piece is read into
        memory of its own, from `buffers` if given (buffers.py). `receive_key`: when a
        streamed range's first piece is needed (lower is sooner; the reader gives its
        block index), so that the transport receives the nearest range first when
        several have bytes waiting (receive_order.py).
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
        last_piece = (length - 1) // piece_size

        async def handle(response: httpx.Response, n: int) -> list[bytes]:
            if response.status_code == 416:
                return []
            skip, wanted = 0, start + length
            if response.status_code == 206:
                try:
                    wanted = range_length(
                        response.headers.get("content-range"),
                        _content_length(response),
                        start,
                        length,
                    )
                except BadRange as exc:
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
            # as the range is in. The transport reads the body in pieces of `piece_size`
            # (the whole range with the headers unless streamed): they are kept as they
            # come.
            cutter = Cutter(skip, length, piece_size)
            got = 0
            async for chunk in response.aiter_raw():
                got += len(chunk)
                if got > wanted and response.status_code == 206:
                    raise ProtocolError(
                        "206 answer longer than its Content-Range",
                        status=206,
                        method="GET",
                        url=url,
                    )
                for index in cutter.feed(chunk):
                    if on_piece is not None and index < last_piece:
                        on_piece(index, cutter.pieces[index])
                if got >= wanted and response.status_code == 200:
                    break
            return cutter.finish()

        try:
            return await self._calls.call(
                "GET",
                url,
                handle,
                storage=True,
                headers={"Range": f"bytes={start}-{end}", "Accept-Encoding": "identity"},
                pass_statuses=(416,),
                follow_redirects=True,
                # The whole range with the headers, and one byte more that tells a 206
                # that runs on; streamed, nothing: the trio thread reads all of the body
                # (transport.py), and a worker thread no piece of it (30 ms TLS link,
                # read_probe A/B of 6 each: 3.14 against 3.36 CPU-s/GiB).
                answer_limit=length + 1 if on_piece is None else 0,
                piece_size=piece_size,
                block_buffers=buffers or FRESH,
                receive_key=receive_key if on_piece is not None else None,
            )
        except httpx.UnsupportedProtocol as exc:
            raise ProtocolError(f"unsupported signed URL: {exc}", method="GET", url=url) from None

    async def connect_ahead(self, url: str, count: int = 1) -> None:
        """Open connections for reading the signed URL `url` (or any on its host) until
        `count` are open or on their way, so that the first reads of a file do not
        also wait for connections to storage."""
        if self._calls.transport is None:
            return
        try:
            await self._calls.transport.connect_ahead(url, CONNECT_TIMEOUT, count)
        except httpx.TransportError as exc:  # the read will connect, and say what fails
            logger.debug("no connection ahead to %s: %s", strip_query(url), exc)
