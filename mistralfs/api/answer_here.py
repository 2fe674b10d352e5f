"""A request and its answer's head on the trio thread, from the non-blocking socket.

A request whose body is in memory, on a connection that is already open, is sent by
the trio thread, and its answer's head and first bytes are received the same way; then
http.client parses them from memory (`HeldAnswer`), so that what the answer says is
read by the same code whichever thread received it. Why: a worker-thread hop per
request cost about 0.2 ms of CPU on its own (a loop of small `/content` reads, 0.75
against 0.95 ms each), and more while FUSE requests keep the trio thread busy: the
worker then waits for the GIL at each of its system calls (reading 300 small files
over the long link, futex waits and wake-ups were a tenth of the daemon's CPU).
Connecting (TCP, then TLS) and bodies that write themselves (uploads, by sendfile)
still go to a worker thread (transport.py).

http.client reads an answer from a file object. `HeldAnswer` is that file object:
what the trio thread received, and past it either `NeedMore` (the trio thread
receives more and parses again) or, once the socket is blocking again, the socket
itself, read by a worker thread as before.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import socket
import ssl
import sys
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

RECEIVE_SIZE = 64 * 1024  # what one receive takes from the socket, at most
# An answer whose status line and headers are not whole after this many bytes is
# refused: http.client bounds each line (64 KiB) and their number (100), not the sum.
MAX_HEAD = 256 * 1024


class NeedMore(Exception):
    """The bytes received so far end before what was asked of them."""


class HeldAnswer(io.BufferedIOBase):
    """An answer's bytes as received by the trio thread, read by http.client.

    A read past them raises `NeedMore` while the socket is non-blocking (the trio
    thread's); once it is made blocking again, for a worker thread, it reads the socket.
    """

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self._sock = sock
        self._data = bytearray()
        self._pos = 0
        self.ended = False  # the server closed its side: nothing more will come

    @property
    def held(self) -> int:
        """Bytes received and not read yet."""
        return len(self._data) - self._pos

    @property
    def received(self) -> int:
        return len(self._data)

    def add(self, data: bytes) -> None:
        """Bytes just received; b"" is the server's end of the connection."""
        if not data:
            self.ended = True
            return
        if self._pos == len(self._data):
            self._data.clear()
            self._pos = 0
        self._data += data

    def rewind(self) -> None:
        """Read again from the first byte received (an answer parsed again)."""
        self._pos = 0

    def take_into(self, view: memoryview) -> int:
        """Move held bytes into `view`, as many as fit; never reads the socket."""
        n = min(len(view), self.held)
        view[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n

    def readable(self) -> bool:
        return True

    def readline(self, size: int | None = -1) -> bytes:
        limit = size if size is not None and size >= 0 else sys.maxsize
        while True:
            end = self._data.find(b"\n", self._pos, self._pos + limit)
            if end >= 0:
                return self._take(end + 1 - self._pos)
            if self.held >= limit or not self._fill():
                return self._take(min(limit, self.held))

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            while self._fill():
                pass
            return self._take(self.held)
        while self.held < size and self._fill():
            pass
        return self._take(min(size, self.held))

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        got = self.take_into(view)
        while got < len(view) and self._may_read_socket():
            n = self._sock.recv_into(view[got:])
            if not n:
                self.ended = True
                break
            got += n
        return got

    def _take(self, n: int) -> bytes:
        data = bytes(self._data[self._pos : self._pos + n])
        self._pos += n
        return data

    def _may_read_socket(self) -> bool:
        """Whether a read may go on past the held bytes: not at the answer's end, and
        only on a blocking socket (a worker thread's); the trio thread gets `NeedMore`."""
        if self.ended:
            return False
        if self._sock.gettimeout() == 0:
            raise NeedMore
        return True

    def _fill(self) -> bool:
        """Receive more from the socket (a worker thread); False at the answer's end."""
        if not self._may_read_socket():
            return False
        self.add(self._sock.recv(RECEIVE_SIZE))
        return not self.ended


class _Source:
    """What http.client takes an answer from: it asks for a file object."""

    def __init__(self, reader: HeldAnswer) -> None:
        self._reader = reader

    def makefile(self, mode: str) -> HeldAnswer:
        return self._reader


def socket_wait(timeout: float | None) -> contextlib.AbstractContextManager[object]:
    """A bound on one wait for a socket, as the socket's own timeout would be."""
    return trio.fail_after(timeout) if timeout is not None else contextlib.nullcontext()


# What a non-blocking socket raises when it must wait; `wait_for` knows which way.
BLOCKED = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


async def wait_for(
    sock: socket.socket, blocked: OSError, each_wait: float | None, *, sending: bool
) -> None:
    """Wait with trio until the non-blocking socket can go on after `blocked` (one of
    `BLOCKED`): TLS says which way it needs a record; a plain socket, the way it was
    going (`sending`). At most `each_wait` seconds, as a socket timeout would."""
    if isinstance(blocked, ssl.SSLWantReadError):
        readable = True
    elif isinstance(blocked, ssl.SSLWantWriteError):
        readable = False
    else:
        readable = not sending
    with socket_wait(each_wait):
        if readable:
            await trio.lowlevel.wait_readable(sock)
        else:
            await trio.lowlevel.wait_writable(sock)


async def send_here(sock: socket.socket, data: bytes, each_wait: float | None) -> None:
    """All of `data` to the non-blocking socket, waiting with trio while it is full."""
    view = memoryview(data)
    sent = 0
    while sent < len(view):
        try:
            sent += sock.send(view[sent:])
        except BLOCKED as exc:
            await wait_for(sock, exc, each_wait, sending=True)


async def receive_more(sock: socket.socket, reader: HeldAnswer, each_wait: float | None) -> None:
    """One receive from the non-blocking socket into `reader`, waiting with trio until
    there is something (or the server's end) to take."""
    while True:
        try:
            data = sock.recv(RECEIVE_SIZE)
        except BLOCKED as exc:
            await wait_for(sock, exc, each_wait, sending=False)
            continue
        reader.add(data)
        return


async def answer_here(
    sock: socket.socket, method: str, each_wait: float | None
) -> tuple[http.client.HTTPResponse, HeldAnswer]:
    """The answer's status and headers, received until http.client can parse them."""
    reader = HeldAnswer(sock)
    while True:
        if reader.held or reader.ended:
            reader.rewind()
            response = http.client.HTTPResponse(_Source(reader), method=method)  # type: ignore[arg-type]
            try:
                response.begin()
                return response, reader
            except NeedMore:
                if reader.received > MAX_HEAD:
                    raise http.client.HTTPException(
                        f"the answer's headers go on past {MAX_HEAD} bytes"
                    ) from None
        await receive_more(sock, reader, each_wait)


async def hold_body(
    sock: socket.socket, reader: HeldAnswer, want: int, each_wait: float | None
) -> None:
    """Receive until `want` bytes of the body are held, or the answer ends."""
    while reader.held < want and not reader.ended:
        await receive_more(sock, reader, each_wait)


def early_answer_here(
    sock: socket.socket, method: str
) -> tuple[http.client.HTTPResponse, HeldAnswer] | None:
    """The refusal a server sent before it stopped reading a body (see transport.py's
    `_early_answer`), from what the socket holds now; None if there is none."""
    reader = HeldAnswer(sock)
    with contextlib.suppress(OSError):
        while not reader.ended:
            reader.add(sock.recv(RECEIVE_SIZE))
    reader.ended = True  # what is there is all there will be
    response = http.client.HTTPResponse(_Source(reader), method=method)  # type: ignore[arg-type]
    try:
        response.begin()
    except (OSError, http.client.HTTPException):
        return None
    if response.status < 400:
        response.close()
        return None
    return response, reader
