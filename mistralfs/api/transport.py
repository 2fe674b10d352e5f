"""The client's one HTTP layer: an httpx transport that speaks HTTP/1.1 through the
standard library's http.client.

Every request, to the API or to storage, goes through the client's `httpx.AsyncClient`,
so redirects, authentication (the key only for the API's origin), timeouts, the retry
policy and the error mapping are each written once. Only the bytes on the wire are this
module's. httpx's own transport (h11 and httpcore on the trio thread) costs milliseconds
of Python per request and copies each body several times; here http.client parses, and
the socket is written and read either by a worker thread (trio.to_thread, so
structured) or by the trio thread, never blocking it:

- on a connection already open, a request whose body is in memory is sent, and its
  answer's head and first bytes received, by the trio thread from the non-blocking
  socket (answer_here.py): no thread hop per request;
- opening a connection (TCP, TLS) and bodies that write themselves go to a worker
  thread, with the GIL released while it waits.

- One pool per origin (scheme, host, port): idle connections, the most recently used
  first, and a bound on the connections in use.
- A request that a proxy applies to (the usual environment settings) goes through
  httpx's own transport for that proxy: http.client reads no proxy settings.
- A request body with a blocking `send_blocking(conn)` (the upload bodies,
  upload_body.py) writes itself from the worker thread, by sendfile(2); any other body
  is read first, then sent.
- The first `PREFETCH` bytes of an answer (default `DEFAULT_PREFETCH`) are read with
  its headers, in pieces of `PIECE_SIZE` bytes (request extensions, default 1 MiB): a
  JSON answer, a small file or a range costs one exchange, and at most one hop.
  Anything after that is read a piece at a time as the caller iterates (a range read
  streamed block by block).
- With `BLOCK_BUFFERS` (request extension), each piece of a successful answer is read
  into memory of its own, mapped and filled with pages at once (MAP_POPULATE), and
  handed on as a memoryview: a block read from storage is then written once, by the
  socket, into pages that take no fault each (a fresh 4 KiB page's fault was about a
  quarter of the daemon's CPU on a cold read).
- The rest of such a body, after its first exchange, is read by the trio thread from
  the socket, made non-blocking, waiting with trio for it to be readable: no thread hop
  per piece. In worker threads, each 16 KiB TLS record read handed the GIL over and
  back between some thirty threads (futex waits and wake-ups were a fifth of the
  daemon's CPU on a cold read over TLS, bench/README.md); the trio thread only
  decrypts, which costs less than those hand-overs. A body with a key (RECEIVE_KEY,
  when its blocks are needed) is read only while no body with a lower key has bytes
  waiting (receive_order.py).
- Failures are raised as httpx's exceptions, so that one retry policy serves all.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import re
import select
import socket
import ssl
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import httpx
import trio

from mistralfs.api.answer_here import (
    BLOCKED,
    HeldAnswer,
    answer_here,
    early_answer_here,
    hold_body,
    send_here,
    wait_for,
)
from mistralfs.api.buffers import BlockBuffers
from mistralfs.api.receive_order import ReceiveOrder

Origin = tuple[str, str, int]

# Request extensions this transport reads (beside httpx's "timeout").
PREFETCH = "mistralfs.prefetch"  # bytes of the answer to read with its headers
PIECE_SIZE = "mistralfs.piece_size"  # the size of the pieces they are read in
BLOCK_BUFFERS = "mistralfs.block_buffers"  # the `BlockBuffers` that pieces go in, if any
RECEIVE_KEY = "mistralfs.receive_key"  # when a body's first piece is needed (receive_order.py)
DEFAULT_PREFETCH = 64 * 1024
STREAM_PIECE = 1 << 20  # what one thread hop reads of the rest of a body, by default
# Connections in use at once, per origin: a sequential reader on a long link keeps many
# ranged reads on their way to storage (reader.py), and a folder read file by file many
# small /content requests to the API (readahead.py).
MAX_CONNECTIONS_PER_HOST = 32
# A connection that took less than this to open (TCP and TLS: loopback, a LAN) is opened
# when a request needs it: opening several ahead there saves nothing, and takes CPU
# from the read they were for (R3 on loopback: 14 ms against 6.5 with 16 ahead).
CHEAP_CONNECT_SECONDS = 0.015
# What http.client allows in a header's name and value (a line break only as folding).
_LEGAL_HEADER_NAME = re.compile(rb"[^:\s][^:\r\n]*")
_ILLEGAL_HEADER_VALUE = re.compile(rb"\n(?![ \t])|\r(?![ \t\n])")


@runtime_checkable
class BlockingBody(Protocol):
    """A request body that writes itself to a connection whose headers were sent, from a
    worker thread; unless it holds all of itself in memory already (`in_memory`: a small
    file's upload), when it is iterated as any other body is, and sent by the trio
    thread if its connection is open (answer_here.py)."""

    in_memory: bool

    def send_blocking(self, conn: http.client.HTTPConnection) -> None: ...


def _blocking_body(stream: object) -> BlockingBody | None:
    """The body if it writes itself now (`BlockingBody`, not `in_memory`), else None.

    By its method, not `isinstance` against the protocol: a runtime protocol check walks
    the protocol's attributes each time, about 30 us for every request."""
    if not callable(getattr(stream, "send_blocking", None)) or getattr(stream, "in_memory", False):
        return None
    return stream  # type: ignore[return-value]


class _Pool:
    """The connections to one origin: those idle, and a bound on those in use."""

    def __init__(self, max_in_use: int) -> None:
        self.idle: list[http.client.HTTPConnection] = []
        self.max_in_use = max_in_use
        self.slots = trio.Semaphore(max_in_use)
        # Connections being opened ahead (`connect_ahead`), and the requests waiting for
        # one of them: a request that finds none idle waits for one that is on its way
        # rather than open its own, as long as there are more on their way than waiters.
        self.connecting_ahead = 0
        self.awaiting_ahead = 0
        self.opened_ahead = trio.lowlevel.ParkingLot()
        self.connect_seconds: float | None = None  # what opening the last one took

    @property
    def in_use(self) -> int:
        """Connections in use or being opened (each holds a slot)."""
        return self.max_in_use - self.slots.value

    def take_idle(self) -> http.client.HTTPConnection | None:
        """The most recently used idle connection that the server has not closed.

        Servers close connections that stay idle (Hypercorn after 5 s, nginx after
        75 s). A request sent on one fails, and would then wait for the retry policy's
        backoff; a closed connection reads as readable (its end of file), so it is seen
        at once.
        """
        while self.idle:
            conn = self.idle.pop()
            if conn.sock is not None and _still_open(conn.sock):
                return conn
            conn.close()  # closed by the server, or sent something nobody asked for
        return None


class ThreadedTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 by http.client in worker threads, one pool per origin (see above)."""

    def __init__(self, tls: ssl.SSLContext, *, max_per_host: int = MAX_CONNECTIONS_PER_HOST):
        self._tls = tls  # the client's one trust (tls.py), proxied requests' too
        self._max_per_host = max_per_host
        self._pools: dict[Origin, _Pool] = {}
        # Proxy settings are read once (the environment scan costs more than a request's
        # own work), and the answer kept per host.
        self._proxies = urllib.request.getproxies()
        self._proxy_of_host: dict[tuple[str, str], str | None] = {}
        self._proxied: dict[str, httpx.AsyncHTTPTransport] = {}
        # Worker threads of its own, so that requests never wait on the threads that
        # other parts of the daemon use (the disk cache's), nor take them all.
        self._threads = trio.CapacityLimiter(4 * max_per_host)
        self._order = ReceiveOrder()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        proxy = self.proxy_for(request.url)
        if proxy is not None:
            return await self._via_proxy(proxy).handle_async_request(request)
        blocking = _blocking_body(request.stream)
        data = b""
        if blocking is None:  # its stream, not `aread()`: a body attached after the
            # request was built (calls.py's attach_body) is not in what that caches
            assert isinstance(request.stream, httpx.AsyncByteStream)
            data = b"".join([bytes(part) async for part in request.stream])
        origin, https = _origin(request.url)
        pool = self._pool(origin)
        timeouts = request.extensions.get("timeout", {})
        exchange = _Exchange(
            method=request.method,
            target=request.url.raw_path.decode("ascii") or "/",
            headers=request.headers.multi_items(),
            body=blocking if blocking is not None else data,
            connect_timeout=timeouts.get("connect"),
            timeout=timeouts.get("read"),
            prefetch=request.extensions.get(PREFETCH, DEFAULT_PREFETCH),
            piece_size=request.extensions.get(PIECE_SIZE, STREAM_PIECE),
            buffers=request.extensions.get(BLOCK_BUFFERS),
            receive_key=request.extensions.get(RECEIVE_KEY),
        )
        await pool.slots.acquire()
        conn = pool.take_idle()
        try:
            if conn is None and pool.connecting_ahead > pool.awaiting_ahead:
                conn = await self._wait_for_ahead(pool)
            if conn is not None and exchange.may_run_here:
                response = await exchange.run_here(conn, self._threads)
            else:
                conn = conn or self._connection(origin, https)
                response = await trio.to_thread.run_sync(exchange.run, conn, limiter=self._threads)
                if exchange.connect_seconds is not None:
                    pool.connect_seconds = exchange.connect_seconds
        except BaseException:
            if conn is not None:
                conn.close()
            pool.slots.release()
            raise
        stream = _AnswerBody(pool, conn, response, exchange, self._threads, self._order)
        return httpx.Response(
            response.status,
            headers=response.getheaders(),
            stream=stream,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": response.reason.encode()},
        )

    async def connect_ahead(self, url: str, socket_timeout: float, count: int = 1) -> None:
        """Open connections to the URL's origin now, in parallel, until it has `count`
        (idle, in use or on their way), so that the requests that follow do not wait for
        connections (TCP and TLS cost several round trips on a long link): those sent
        meanwhile wait for these rather than open their own. Where the last connection
        opened fast (CHEAP_CONNECT_SECONDS), one is enough. Each takes one of the
        origin's slots while it opens; none is opened past them, nor through a proxy.
        The first failure is raised once the others are done (a request then opens its
        own)."""
        parsed = httpx.URL(url)
        if self.proxy_for(parsed) is not None:
            return
        origin, https = _origin(parsed)
        pool = self._pool(origin)
        failures: list[httpx.TransportError] = []

        async def open_one() -> None:
            conn = self._connection(origin, https)
            try:  # the socket's timeout: each exchange then sets its own
                pool.connect_seconds = await trio.to_thread.run_sync(
                    _connect, conn, socket_timeout, None, limiter=self._threads
                )
                pool.idle.append(conn)
            except httpx.TransportError as exc:  # refused, reset, timed out, a certificate
                conn.close()
                failures.append(exc)
            except BaseException:
                conn.close()
                raise
            finally:
                pool.connecting_ahead -= 1
                pool.slots.release()
                pool.opened_ahead.unpark()  # a waiting request takes it, or opens its own

        if pool.connect_seconds is not None and pool.connect_seconds < CHEAP_CONNECT_SECONDS:
            count = min(count, 1)
        async with trio.open_nursery() as nursery:
            for _ in range(count - len(pool.idle) - pool.in_use):
                try:
                    pool.slots.acquire_nowait()
                except trio.WouldBlock:
                    break
                pool.connecting_ahead += 1
                nursery.start_soon(open_one)
        if failures:
            raise failures[0]

    async def _wait_for_ahead(self, pool: _Pool) -> http.client.HTTPConnection | None:
        """A connection opened ahead for this request, once one is in (None if the one
        it waited for failed, or the server closed it meanwhile)."""
        pool.awaiting_ahead += 1
        try:
            await pool.opened_ahead.park()
        finally:
            pool.awaiting_ahead -= 1
        return pool.take_idle()

    def idle_connections(self, url: str | None = None) -> int:
        """Connections kept open for reuse: to the origin of `url`, or to all."""
        if url is not None:
            pool = self._pools.get(_origin(httpx.URL(url))[0])
            return len(pool.idle) if pool is not None else 0
        return sum(len(pool.idle) for pool in self._pools.values())

    def proxy_for(self, url: httpx.URL) -> str | None:
        """The proxy that the environment sets for `url`, if any."""
        key = (url.scheme, url.host)
        if key not in self._proxy_of_host:
            proxy = self._proxies.get(url.scheme) or self._proxies.get("all")
            if proxy and urllib.request.proxy_bypass(url.host):
                proxy = None
            self._proxy_of_host[key] = proxy or None
        return self._proxy_of_host[key]

    async def aclose(self) -> None:
        for pool in self._pools.values():
            for conn in pool.idle:
                conn.close()
            pool.idle.clear()
        for transport in self._proxied.values():
            await transport.aclose()

    def _pool(self, origin: Origin) -> _Pool:
        pool = self._pools.get(origin)
        if pool is None:
            pool = self._pools[origin] = _Pool(self._max_per_host)
        return pool

    def _connection(self, origin: Origin, https: bool) -> http.client.HTTPConnection:
        _, host, port = origin
        if https:
            return http.client.HTTPSConnection(host, port, context=self._tls)
        return http.client.HTTPConnection(host, port)

    def _via_proxy(self, proxy: str) -> httpx.AsyncHTTPTransport:
        transport = self._proxied.get(proxy)
        if transport is None:
            transport = self._proxied[proxy] = httpx.AsyncHTTPTransport(
                proxy=proxy, verify=self._tls
            )
        return transport


@dataclass(eq=False)  # compared as itself: it is a key of ReceiveOrder's
class _Exchange:
    """One request on one connection, run in a worker thread: send it, read the status,
    the headers and the first `prefetch` bytes of the answer."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    body: BlockingBody | bytes
    connect_timeout: float | None
    timeout: float | None
    prefetch: int
    piece_size: int
    buffers: BlockBuffers | None = None  # where pieces of a good answer go (BLOCK_BUFFERS)
    receive_key: float | None = None  # when the next piece is needed (RECEIVE_KEY)
    connect_seconds: float | None = None  # what opening its connection took, if it did
    pieces: list[bytes] = field(default_factory=list)  # what was read with the headers
    body_sent: bool = False
    # The rest of a block-buffered body is read by the trio thread (`read_here`): the
    # memory for its next piece, and -1 while http.client's buffer is not yet taken.
    partial: tuple[memoryview, int] | None = None

    @property
    def may_run_here(self) -> bool:
        """Whether the trio thread may run it on an open connection (answer_here.py):
        a body in memory, and an answer read into memory or streamed (not block pieces
        read whole, which a worker thread reads straight into their memory)."""
        return isinstance(self.body, bytes) and (self.buffers is None or self.prefetch == 0)

    async def run_here(
        self, conn: http.client.HTTPConnection, threads: trio.CapacityLimiter
    ) -> http.client.HTTPResponse:
        """`run`, on the trio thread, for an open connection (see answer_here.py)."""
        sock = conn.sock
        assert sock is not None and isinstance(self.body, bytes)
        sock.settimeout(0)  # the next exchange sets its own timeout again
        with _as_httpx_errors("read"):
            try:
                await send_here(sock, self._request_head() + self.body, self.timeout)
            except (BrokenPipeError, ConnectionResetError):
                early = early_answer_here(sock, self.method)
                if early is None:
                    raise
                response, reader = early
            else:
                self.body_sent = True
                response, reader = await answer_here(sock, self.method, self.timeout)
            limit = self._answer_limit(response)
            if response.length is not None and not response.chunked:
                await hold_body(sock, reader, min(limit, response.length), self.timeout)
                self.pieces = read_pieces(response, limit, self.piece_size, self.buffers)
            else:  # chunked, or up to the connection's end: as it comes, by a worker thread
                sock.settimeout(self.timeout)
                self.pieces = await trio.to_thread.run_sync(
                    read_pieces, response, limit, self.piece_size, self.buffers, limiter=threads
                )
            self._after_pieces(response)
            if not response.isclosed() and self.partial is None:
                sock.settimeout(self.timeout)  # the rest by worker threads (`read_more`)
            return response

    def _request_head(self) -> bytes:
        """The request line and headers, checked as http.client checks them."""
        lines = [f"{self.method} {self.target} HTTP/1.1".encode("ascii")]
        for name, value in self.headers:
            raw_name, raw_value = name.encode("ascii"), value.encode("latin-1")
            if not _LEGAL_HEADER_NAME.fullmatch(raw_name):
                raise ValueError(f"Invalid header name {raw_name!r}")
            if _ILLEGAL_HEADER_VALUE.search(raw_value):
                raise ValueError(f"Invalid header value {raw_value!r}")
            lines.append(raw_name + b": " + raw_value)
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def _answer_limit(self, response: http.client.HTTPResponse) -> int:
        """How much of the answer to read with its headers: an error's body no further
        than an error message needs, and never into block memory."""
        if response.status >= 300:
            self.buffers = None
            return min(self.prefetch, DEFAULT_PREFETCH)
        return self.prefetch

    def _after_pieces(self, response: http.client.HTTPResponse) -> None:
        """Memory for the next piece of a block-buffered body, read by `read_here`."""
        if self.buffers is not None and response.length:
            view = _take_or_none(self.buffers, min(self.piece_size, response.length))
            self.partial = (view, -1) if view is not None else None

    def run(self, conn: http.client.HTTPConnection) -> http.client.HTTPResponse:
        if conn.sock is None:
            self.connect_seconds = _connect(conn, self.connect_timeout, self.timeout)
        set_timeout(conn, self.timeout)
        with _as_httpx_errors("read"):
            conn.putrequest(self.method, self.target, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers:
                conn.putheader(name, value)
            conn.endheaders()
            try:
                if not isinstance(self.body, bytes):
                    self.body.send_blocking(conn)
                elif self.body:
                    conn.send(self.body)
            except (BrokenPipeError, ConnectionResetError):
                early = _early_answer(conn)
                if early is None:
                    raise
                response = early
            else:
                response = conn.getresponse()
                self.body_sent = True
            limit = self._answer_limit(response)
            self.pieces = read_pieces(response, limit, self.piece_size, self.buffers)
            self._after_pieces(response)
            return response

    async def read_here(
        self, response: http.client.HTTPResponse, sock: socket.socket, order: ReceiveOrder
    ) -> bytes:
        """The next piece of a block-buffered body, read by the trio thread from the
        socket without blocking (see the module's docstring for why), in its turn if it
        has a key (receive_order.py)."""
        assert self.partial is not None and response.length is not None
        view, got = self.partial
        sock.settimeout(0)  # the next exchange sets its own timeout again
        key = self.receive_key
        with _as_httpx_errors("read"):
            if got < 0:  # the first piece after the headers' exchange
                got = _take_buffered(response, view)
                response.length -= got
            if key is not None:
                await order.take_turn(self, key)
            while got < len(view):
                try:
                    n = sock.recv_into(view[got:])
                except BLOCKED as exc:
                    if key is not None:
                        order.step_aside(self)
                    await wait_for(sock, exc, self.timeout, sending=False)
                    if key is not None:
                        await order.take_turn(self, key)
                    continue
                if not n:  # closed before its Content-Length
                    raise http.client.IncompleteRead(b"", response.length)
                got += n
                response.length -= n
        if key is not None:
            self.receive_key = key + 1
        if response.length:
            assert self.buffers is not None
            after = _take_or_none(self.buffers, min(self.piece_size, response.length))
            held = isinstance(response.fp, HeldAnswer) and response.fp.held > 0
            self.partial = (after, -1 if held else 0) if after is not None else None
            if after is None:  # the rest by the worker threads, as the socket was
                sock.settimeout(self.timeout)
        else:
            self.partial = None
            response.close()  # its end: the connection can go back to the pool
        if self.partial is None:  # no more receiving here: no turn held
            order.step_aside(self)
        return view  # type: ignore[return-value]

    def read_more(self, response: http.client.HTTPResponse) -> bytes:
        """The next piece of the body after those prefetched (b"" at its end)."""
        with _as_httpx_errors("read"):
            return _read_piece(response, self.piece_size, self.buffers)


class _AnswerBody(httpx.AsyncByteStream):
    """An answer's body: the pieces read with its headers, then the rest, one thread
    hop per piece. Its connection goes back to the pool once the body was read to its
    end; an answer dropped before then closes it."""

    def __init__(
        self,
        pool: _Pool,
        conn: http.client.HTTPConnection,
        response: http.client.HTTPResponse,
        exchange: _Exchange,
        threads: trio.CapacityLimiter,
        order: ReceiveOrder,
    ) -> None:
        self._pool: _Pool | None = pool
        self._order = order
        self._threads = threads
        self._conn = conn
        self._response = response
        self._exchange = exchange
        if response.isclosed():  # all of it came with the headers
            self._release()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        pieces, self._exchange.pieces = self._exchange.pieces, []
        for piece in pieces:
            yield piece
        while self._pool is not None and not self._response.isclosed():
            if self._exchange.partial is not None and self._conn.sock is not None:
                piece = await self._exchange.read_here(self._response, self._conn.sock, self._order)
            else:
                piece = await trio.to_thread.run_sync(
                    self._exchange.read_more, self._response, limiter=self._threads
                )
            if not piece:
                break
            yield piece
        self._release()

    async def aclose(self) -> None:
        self._release()

    def _release(self) -> None:
        self._order.step_aside(self._exchange)
        pool, self._pool = self._pool, None
        if pool is None:
            return
        response, conn = self._response, self._conn
        if self._exchange.body_sent and not response.will_close and response.isclosed():
            pool.idle.append(conn)
        else:
            conn.close()  # a body left unread, or a server that is closing
        pool.slots.release()


def read_pieces(
    response: http.client.HTTPResponse,
    limit: int,
    piece_size: int,
    buffers: BlockBuffers | None = None,
) -> list[bytes]:
    """Up to `limit` bytes of the body, in pieces of `piece_size` (the last may be
    shorter); never past the body's Content-Length, whatever `limit` says. With
    `buffers`, each piece in populated memory of its own (a memoryview)."""
    pieces = []
    while limit > 0 and not response.isclosed():
        piece = _read_piece(response, min(piece_size, limit), buffers)
        if not piece:
            break
        pieces.append(piece)
        limit -= len(piece)
    return pieces


def _read_piece(
    response: http.client.HTTPResponse, want: int, buffers: BlockBuffers | None
) -> bytes:
    """The next `want` bytes of the body (fewer at its end): as bytes, or with
    `buffers` read straight into populated memory of their own (typed as bytes: every
    reader of a piece takes any buffer). A body that ends before its Content-Length
    raises IncompleteRead: a piece is never handed on short as if whole."""
    if response.length is not None:
        want = min(want, response.length)
    if want <= 0:
        return b""
    view = _take_or_none(buffers, want) if buffers is not None else None
    if view is None:  # a plain buffer, also when no mapping is to be had (vm.max_map_count)
        piece = response.read(want)
    else:
        got = 0
        while got < want:
            n = response.readinto(view[got:])
            if not n:
                break
            got += n
        piece = view if got == want else bytes(view[:got])  # type: ignore[assignment]
    if len(piece) < want and response.length is not None:
        raise http.client.IncompleteRead(bytes(piece), want - len(piece))
    return piece


def _take_or_none(buffers: BlockBuffers, size: int) -> memoryview | None:
    """Memory for a piece, or None when no mapping is to be had (vm.max_map_count)."""
    try:
        return buffers.take(size)
    except OSError:
        return None


def _take_buffered(response: http.client.HTTPResponse, view: memoryview) -> int:
    """Move what http.client's reader holds of the body (read from the socket with the
    headers) into `view`, from its start, without waiting: after it the rest of the body
    is only in the socket. The socket must be non-blocking.

    The reader's buffer is `io.DEFAULT_BUFFER_SIZE` bytes (`socket.makefile`), and one
    `readinto1` of exactly that size either empties it, with no read from the socket, or
    finds it empty and tries one read, all of which it hands over.
    """
    assert response.fp is not None
    if isinstance(response.fp, HeldAnswer):  # received by the trio thread (answer_here.py)
        # Never past the Content-Length: what a lying server sent beyond it is not the
        # body's, and goes with the answer (as it stays in the socket, read by no one,
        # when a worker thread read the head).
        return response.fp.take_into(view[: response.length or 0])
    scratch = bytearray(io.DEFAULT_BUFFER_SIZE)
    try:
        n = response.fp.readinto1(scratch) or 0  # None: nothing buffered, nothing to read
    except ssl.SSLWantReadError:
        return 0  # nothing buffered (no bytes are taken from the buffer before a read)
    if n > len(view):
        raise http.client.HTTPException("more body than its Content-Length")
    view[:n] = scratch[:n]
    return n


def _connect(
    conn: http.client.HTTPConnection, connect_timeout: float | None, timeout: float | None
) -> float:
    """Open the connection (TCP, and TLS for https), as httpx's connect errors; the
    seconds it took (CHEAP_CONNECT_SECONDS)."""
    conn.timeout = connect_timeout if connect_timeout is not None else timeout
    started = time.monotonic()
    with _as_httpx_errors("connect"):
        conn.connect()
    return time.monotonic() - started


@contextlib.contextmanager
def _as_httpx_errors(phase: str) -> Iterator[None]:
    """Network failures in the block, raised as the httpx exceptions that the retry
    policy knows (the original kept as the cause: a certificate failure is found there)."""
    try:
        yield
    except trio.TooSlowError as exc:  # a wait in the trio thread (`socket_wait`)
        raise httpx.ReadTimeout("timed out") from exc
    except (OSError, http.client.HTTPException) as exc:
        error: type[httpx.TransportError]
        if phase == "connect":
            error = httpx.ConnectTimeout if isinstance(exc, TimeoutError) else httpx.ConnectError
        else:
            error = httpx.ReadTimeout if isinstance(exc, TimeoutError) else httpx.ReadError
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise error(detail) from exc


def _readable(sock: socket.socket) -> bool:
    poller = select.poll()  # not select(): descriptors may be past FD_SETSIZE here
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def _still_open(sock: socket.socket) -> bool:
    """Whether an idle connection has nothing to read: no end of file, no stray data.

    Over TLS, readable may also mean records that carry no data: a TLS 1.3 server sends
    its session tickets once the handshake is done, so a connection opened ahead reads
    as readable before any request. They are taken in here, without waiting; only an end
    of file or data nobody asked for make the connection one not to use.
    """
    if not _readable(sock):
        return True
    if not isinstance(sock, ssl.SSLSocket):
        return False
    timeout = sock.gettimeout()
    sock.settimeout(0)
    try:
        sock.recv(1)  # b"" (end of file) or data nobody asked for: not usable either way
    except ssl.SSLWantReadError:
        return True  # only records without data were there
    except OSError:
        return False
    finally:
        sock.settimeout(timeout)
    return False


def set_timeout(conn: http.client.HTTPConnection, timeout: float | None) -> None:
    """Every socket wait of the next exchange is bounded by `timeout` seconds."""
    conn.timeout = timeout
    if conn.sock is not None:
        conn.sock.settimeout(timeout)


def _early_answer(conn: http.client.HTTPConnection) -> http.client.HTTPResponse | None:
    """The refusal a server sent before it stopped reading a body, if there is one.

    A server may answer before reading the whole body (411 for a chunked body, 413,
    a refused form) and close; the next write then fails. Its answer is still in the
    socket, and it is what the caller needs to hear, not the broken pipe. A success
    cannot come before the body was sent, so none is taken.
    """
    try:
        response = conn.getresponse()
    except (OSError, http.client.HTTPException):
        return None
    if response.status < 400:
        response.close()
        return None
    return response


def _origin(url: httpx.URL) -> tuple[Origin, bool]:
    """The pool key of a URL, and whether it is https."""
    https = url.scheme == "https"
    return (url.scheme, url.host, url.port or (443 if https else 80)), https
