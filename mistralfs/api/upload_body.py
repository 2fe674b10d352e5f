"""The multipart/form-data bodies of uploads, read from a spool file.

Two kinds: `SpoolBody` sends a finished file with a `Content-Length`; `GrowingSpoolBody`
follows a file that is still being appended to (`GrowingFile`) and is sent chunked,
so that an upload can be under way while the program is still writing.

Both are classes rather than async generators, so that an early stop (the server
answering 413 mid-upload) leaves no generator to finalise; the attempt that opened
a body closes it. `complete` says whether the whole body was handed to the
transport: only then can the server have stored the file.
"""

from __future__ import annotations

import http.client
import mimetypes
import os
import pathlib
import secrets
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from typing import BinaryIO

import httpx
import trio

from mistralfs.api.errors import TooLarge

CHUNK_SIZE = 1 << 20

Identity = tuple[int, int, int, int]


def file_identity(stat: os.stat_result) -> Identity:
    """What changes when a file's content may have: device, inode, size, mtime."""
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def form_quote(value: str) -> str:
    """Quote a multipart header parameter as an RFC 7230 quoted-string.

    Backslash escapes round-trip through python-multipart (what FastAPI and
    Starlette servers parse with), unlike the HTML5 ``%22`` form, which would
    store a literal ``%22`` in the remote filename. CR/LF cannot appear in a
    header at all, so they are percent-encoded.
    """
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\r", "%0D").replace("\n", "%0A")


def multipart_parts(
    filename: str, purpose: str, boundary: str, fields: Sequence[tuple[str, str]] = ()
) -> tuple[bytes, bytes]:
    """What goes before the file's bytes (the purpose part, other text `fields`, the file
    part's header) and after."""
    content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
    texts = "".join(
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="{form_quote(name)}"\r\n\r\n'
        f"{value}\r\n"
        for name, value in (("purpose", purpose), *fields)
    )
    head = (
        f"{texts}"
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="file"; filename="{form_quote(filename)}"\r\n'
        f"Content-Type: {content_type}\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    return head, tail


class _FileBody(httpx.AsyncByteStream):
    """What both bodies share: the open file, how much went out, and whether all of it.

    The client's transport has a body write itself from a worker thread
    (`send_blocking`), unless it is all `in_memory` already; any other transport (a
    proxy's, a test's) iterates it."""

    in_memory = False  # the whole body is read already: no need to write it from a thread

    def __init__(self, path: pathlib.Path, progress: Callable[[int], None] | None) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._offset = 0
        self._done = False
        self._progress = progress

    @property
    def complete(self) -> bool:
        return self._done

    def _report(self) -> None:
        if self._progress is not None:
            self._progress(self._offset)

    async def aclose(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class SpoolBody(_FileBody):
    """A finished file's upload body: head, the file's bytes, tail.

    A file of at most one chunk, the common small upload, is read at once and sent
    as one piece; larger files are read a chunk at a time in a worker thread, so a
    spool that has left the page cache never stalls the event loop. Nothing is
    hashed on the way: the MD5 is needed only when an attempt's outcome is
    unknown, and then it is computed from the file.
    """

    def __init__(
        self,
        path: pathlib.Path,
        filename: str,
        purpose: str,
        max_size: int | None,
        progress: Callable[[int], None] | None,
        url: str,
        fields: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__(path, progress)
        try:
            stat = os.fstat(self._fd)
            self.identity = file_identity(stat)
            self.size = size = stat.st_size
            if max_size is not None and size > max_size:
                # Refused locally: a server answering 413 before reading the
                # body can leave an HTTP/1.1 client stuck writing it.
                raise TooLarge(
                    f"{size} bytes is over the {max_size}-byte upload limit",
                    method="POST",
                    url=url,
                )
            boundary = secrets.token_hex(16)
            head, self._tail = multipart_parts(filename, purpose, boundary, fields)
            self.headers = {
                "Content-Type": f"multipart/form-data; boundary={boundary}",
                "Content-Length": str(len(head) + size + len(self._tail)),
            }
            if size <= CHUNK_SIZE:
                data = self._read_now(size)
                self._parts = [head + data + self._tail]
                self._offset = size
                self.in_memory = True  # sent as any body in memory is (transport.py)
            else:
                self._parts = [head]
        except BaseException:
            os.close(self._fd)
            raise
        if progress is not None:
            progress(0)  # small files are read at once, but not sent yet

    def send_blocking(self, conn: http.client.HTTPConnection) -> None:
        """Write the whole body to `conn`, its headers sent; in a worker thread.

        The file's bytes go from the page cache to the socket by sendfile(2) (over TLS,
        read and sent whole: see `_send_part`), never through Python; progress is reported
        every chunk (the callback only stores
        a number, so calling it from this thread is safe).
        """
        for part in self._parts:
            conn.send(part)
        self._parts = []
        if self._offset < self.size:
            assert conn.sock is not None
            with os.fdopen(self._fd, "rb", closefd=False) as file:
                while self._offset < self.size:
                    n = min(CHUNK_SIZE, self.size - self._offset)
                    if not _send_part(conn, file, self._offset, n, chunked=False):
                        raise OSError("file shrank while it was being uploaded")
                    self._offset += n
                    self._report()
            conn.send(self._tail)
        self._done = True
        self._report()

    def _read_now(self, n: int) -> bytes:
        chunk = os.pread(self._fd, n, self._offset)
        if len(chunk) < n:
            raise OSError("file shrank while it was being uploaded")
        return chunk

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while self._parts:
            part = self._parts.pop(0)
            if self._offset == self.size and not self._parts and not self._done:
                self._done = True  # the small file's single piece: head, bytes and tail
                self._report()
            yield part
        while self._offset < self.size:
            n = min(CHUNK_SIZE, self.size - self._offset)
            chunk = await trio.to_thread.run_sync(self._read_now, n)
            self._offset += n
            self._report()
            yield chunk
        if not self._done:
            self._done = True
            yield self._tail


class StreamAbandoned(Exception):
    """An upload that followed a growing file stopped before the file was finished."""


class GrowingFile:
    """A spool being appended to, as an upload in flight sees it.

    The writer reports each append (`grew`), the end (`finish`, at the program's
    close), or a change that an upload already under way cannot follow
    (`abandon`: a write before the end, a truncate, a rename, an unlink). The body
    following the file then stops, and the file is uploaded whole once finished.
    """

    def __init__(self) -> None:
        self.size = 0
        self.final = False
        self.abandoned: str | None = None
        self._changed = trio.Event()

    def grew(self, size: int) -> None:
        self.size = size
        self._changed.set()

    def finish(self, size: int) -> None:
        self.size = size
        self.final = True
        self._changed.set()

    def abandon(self, reason: str) -> None:
        if self.abandoned is None:
            self.abandoned = reason
        self._changed.set()

    async def wait_for_change(self, idle_limit: float) -> None:
        """Return after the next report; raise if none comes within `idle_limit` seconds.

        A program that stops writing without closing would otherwise hold a request
        open at the server for as long as it likes.
        """
        self._changed = trio.Event()
        with trio.move_on_after(idle_limit):
            await self._changed.wait()
            return
        self.abandon(f"nothing was written for {idle_limit:g} s")


class GrowingSpoolBody(_FileBody):
    """An upload body that follows a `GrowingFile`: no length known, so sent chunked.

    Sent by the client's transport only, from a worker thread (`send_blocking`), the
    bytes by sendfile(2) from the page cache the program's writes just went through. `size`
    and `identity` are the finished file's, known once the whole body went out.
    """

    def __init__(
        self,
        path: pathlib.Path,
        growing: GrowingFile,
        filename: str,
        purpose: str,
        progress: Callable[[int], None] | None,
        idle_limit: float,
        fields: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__(path, progress)
        self._growing = growing
        self._idle_limit = idle_limit
        boundary = secrets.token_hex(16)
        self._head, self._tail = multipart_parts(filename, purpose, boundary, fields)
        self.headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        self.size = -1
        self.identity: Identity = (0, 0, -1, 0)
        self._report()

    def send_blocking(self, conn: http.client.HTTPConnection) -> None:
        """Write the body to `conn` as chunks, its headers sent; in a worker thread.

        Each chunk's bytes go by sendfile(2). When all that was written is sent, the
        thread waits on the trio side for the file to grow, finish or be abandoned.
        """
        growing = self._growing
        assert conn.sock is not None
        with os.fdopen(self._fd, "rb", closefd=False) as file:
            _send_chunk(conn, self._head)
            while True:
                if growing.abandoned is not None:
                    raise StreamAbandoned(growing.abandoned)
                if self._offset < growing.size:
                    n = min(CHUNK_SIZE, growing.size - self._offset)
                    if not _send_part(conn, file, self._offset, n, chunked=True):
                        raise StreamAbandoned("the file shrank while it was being uploaded")
                    self._offset += n
                    self._report()
                elif growing.final:
                    break
                else:
                    trio.from_thread.run(growing.wait_for_change, self._idle_limit)
        self.size = self._offset
        self.identity = file_identity(os.fstat(self._fd))
        _send_chunk(conn, self._tail)
        conn.send(b"0\r\n\r\n")
        self._done = True


def _send_part(
    conn: http.client.HTTPConnection, file: BinaryIO, offset: int, n: int, *, chunked: bool
) -> bool:
    """Send `n` bytes of `file` from `offset` (as one chunk of a chunked body if
    `chunked`); False if the file holds fewer.

    Over plain TCP the bytes go by sendfile(2), never through Python. Over TLS,
    sendfile only loops over 8 KiB reads in Python, and each becomes a TLS record that
    the server takes in separately (the emulator then did a thread hop per 8 KiB): the
    part is read at once and sent with one sendall, cut by OpenSSL into 16 KiB records.
    """
    sock = conn.sock
    assert sock is not None
    if isinstance(sock, ssl.SSLSocket):
        data = os.pread(file.fileno(), n, offset)
        if len(data) < n:
            return False
        sock.sendall(b"%X\r\n%b\r\n" % (n, data) if chunked else data)
        return True
    if chunked:
        conn.send(b"%X\r\n" % n)
    if sock.sendfile(file, offset, n) < n:
        return False
    if chunked:
        conn.send(b"\r\n")
    return True


def _send_chunk(conn: http.client.HTTPConnection, data: bytes) -> None:
    conn.send(b"%X\r\n%b\r\n" % (len(data), data))
