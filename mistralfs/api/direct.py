"""Plain HTTP/1.1 through the standard library's http.client, in worker threads.

On the trio thread, h11 and httpcore cost several times the CPU of the transfer
itself: each request takes milliseconds of Python work, and each body is copied
several times. http.client reads and writes sockets directly, and does it in a
worker thread (trio.to_thread, so structured), with the GIL released while it waits;
the trio thread is left to answer FUSE. Signed-URL reads, uploads and API calls
without a body go this way; httpx remains the client for every request a proxy
applies to (http.client reads no proxy settings), for redirects, and where a test
injects its own transport.
"""

from __future__ import annotations

import http.client
import select
import socket
import ssl
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import TypeVar

import httpx
import trio

T = TypeVar("T")

Origin = tuple[str, str, int]
# A blocking exchange on one connection: (its result, whether the connection can be reused).
Exchange = Callable[[http.client.HTTPConnection, str], tuple[T, bool]]


class DirectConnections:
    """Idle connections per origin, a bound on those in use, and which URLs may use them."""

    def __init__(self, max_in_use: int, tls: ssl.SSLContext) -> None:
        self._tls = tls  # the client's, the one its httpx client verifies with (tls.py)
        self._idle: dict[Origin, list[http.client.HTTPConnection]] = {}
        self._limiter = trio.CapacityLimiter(max_in_use)
        # Proxy settings are read once (the environment scan costs more than a request's
        # own work), and the answer kept per host.
        self._proxies = urllib.request.getproxies()
        self._direct_hosts: dict[tuple[str, str], bool] = {}

    def serves(self, url: str) -> bool:
        """Whether a URL can be fetched directly: http(s), and no proxy configured for it."""
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

    async def exchange(self, url: str, exchange: Exchange[T]) -> T:
        """Run `exchange` on an idle connection to the URL's origin (or a new one) in a
        worker thread, with the request target (path and query) it is to send."""
        parts = urllib.parse.urlsplit(url)
        key, https = _origin(parts)
        conn = self._take_idle(key) or self._connection(key, https)
        target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        try:
            result, reusable = await trio.to_thread.run_sync(
                exchange, conn, target, limiter=self._limiter
            )
        except BaseException:
            conn.close()
            raise
        if reusable:
            self._idle.setdefault(key, []).append(conn)
        else:
            conn.close()
        return result

    async def connect_ahead(self, url: str, socket_timeout: float) -> None:
        """Open a connection to the URL's origin now, unless one is idle already, so
        that the request that follows does not wait for the connection."""
        key, https = _origin(urllib.parse.urlsplit(url))
        if self._idle.get(key):
            return
        conn = self._connection(key, https)
        conn.timeout = socket_timeout  # each exchange then sets its own
        try:
            await trio.to_thread.run_sync(conn.connect, limiter=self._limiter)
        except BaseException:
            conn.close()
            raise
        self._idle.setdefault(key, []).append(conn)

    def idle(self) -> int:
        """Connections kept open for reuse."""
        return sum(len(conns) for conns in self._idle.values())

    def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()

    def _take_idle(self, key: Origin) -> http.client.HTTPConnection | None:
        """The most recently used idle connection that the server has not closed.

        Servers close connections that stay idle (Hypercorn after 5 s, nginx after 75 s).
        A request sent on one fails, and would then wait for the retry policy's backoff;
        a closed connection reads as readable (its end of file), so it is seen at once.
        """
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if conn.sock is not None and _still_open(conn.sock):
                return conn
            conn.close()  # closed by the server, or sent something nobody asked for
        return None

    def _connection(self, key: Origin, https: bool) -> http.client.HTTPConnection:
        _, host, port = key
        if https:
            return http.client.HTTPSConnection(host, port, context=self._tls)
        return http.client.HTTPConnection(host, port)


def _origin(parts: urllib.parse.SplitResult) -> tuple[Origin, bool]:
    """The pool key of a URL, and whether it is https."""
    https = parts.scheme == "https"
    assert parts.hostname is not None
    return (parts.scheme, parts.hostname, parts.port or (443 if https else 80)), https


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


def set_timeout(conn: http.client.HTTPConnection, timeout: float) -> None:
    """Every socket wait of the next exchange is bounded by `timeout` seconds."""
    conn.timeout = timeout
    if conn.sock is not None:
        conn.sock.settimeout(timeout)


def request(
    conn: http.client.HTTPConnection,
    target: str,
    *,
    method: str,
    headers: dict[str, str],
    send_body: Callable[[http.client.HTTPConnection], None] | None,
    timeout: float,
    max_answer: int,
) -> tuple[httpx.Response, bool]:
    """Blocking: send a request (with the body `send_body` writes, if any), read at most
    `max_answer` bytes of the answer. Network failures raise httpx transport errors, so
    that the client's retry policy treats them as it treats httpx's own."""
    set_timeout(conn, timeout)
    try:
        # http.client asks for Accept-Encoding: identity: its answers are not decoded,
        # and a request with no Accept-Encoding at all accepts any coding.
        conn.putrequest(method, target)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders()
        try:
            if send_body is not None:
                send_body(conn)
        except (BrokenPipeError, ConnectionResetError):
            early = _early_answer(conn)
            if early is None:
                raise
            response, body_sent = early, False
        else:
            response, body_sent = conn.getresponse(), True
        body = response.read(max_answer)
        if response.length and len(body) < max_answer:  # closed before its Content-Length
            raise http.client.IncompleteRead(body, response.length)
        answer = httpx.Response(response.status, headers=response.getheaders(), content=body)
        return answer, body_sent and not response.will_close and response.isclosed()
    except TimeoutError as exc:
        raise httpx.ReadTimeout(f"timed out: {exc}") from None
    except (OSError, http.client.HTTPException) as exc:
        raise httpx.ReadError(f"{type(exc).__name__}: {exc}") from None


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
