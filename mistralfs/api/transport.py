"""httpx's own transport, with socket reads large enough for bulk content.

httpcore reads at most 64 KiB per socket read. On a fast link each read costs more
Python time (h11 events, async generators, cancel scopes) than its bytes take to
arrive, so a signed-URL download is bound by the number of reads, not by the link.
Reading up to 1 MiB at once (whatever the kernel has buffered) cuts that cost several
times over. Only the read size changes: pooling, TLS, timeouts and errors stay
httpx's and httpcore's.
"""

from __future__ import annotations

import ssl
import typing

import httpcore
import httpx

READ_BYTES = 1024 * 1024


class LargeReadStream(httpcore.AsyncNetworkStream):
    """A network stream whose reads grow up to READ_BYTES while they come back full.

    Small answers keep small reads: a 1 MiB receive buffer costs an allocation that
    a 2 KiB answer does not need.
    """

    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner
        self._size = 0

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        size = max(max_bytes, self._size)
        data = await self._inner.read(size, timeout)
        self._size = min(2 * size, READ_BYTES) if len(data) == size else 0
        return data

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return LargeReadStream(await self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> typing.Any:
        return self._inner.get_extra_info(info)


class LargeReadBackend(httpcore.AsyncNetworkBackend):
    """httpcore's trio backend, handing out LargeReadStreams."""

    def __init__(self, inner: httpcore.AsyncNetworkBackend | None = None) -> None:
        self._inner = inner or httpcore.TrioBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return LargeReadStream(stream)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_unix_socket(path, timeout, socket_options)
        return LargeReadStream(stream)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def large_read_transport(limits: httpx.Limits | None = None) -> httpx.AsyncHTTPTransport:
    """An httpx transport like the default one, built on LargeReadBackend.

    httpx has no parameter for httpcore's network backend, so the pool it builds is
    replaced by an identical one that has it.
    """
    limits = limits or httpx.Limits(max_connections=100, max_keepalive_connections=20)
    transport = httpx.AsyncHTTPTransport(limits=limits)
    transport._pool = httpcore.AsyncConnectionPool(  # private: see the docstring
        ssl_context=httpx.create_ssl_context(),
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=LargeReadBackend(),
    )
    return transport
