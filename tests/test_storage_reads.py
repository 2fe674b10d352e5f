"""Signed-URL range reads: whole ranges, cut into blocks, on kept-alive connections."""

from __future__ import annotations

import contextlib
import http.client
import itertools
import mmap
import os
import pathlib
import socket
import typing

import httpx
import pytest
import trio
from conftest import (
    answer,
    answer_range,
    answer_with,
    count_transport_hops,
    emulator_config,
    serve_asgi,
    serve_script,
    start_emulator,
)
from hypothesis import given
from hypothesis import strategies as st

from mistralfs.api import FilesClient
from mistralfs.api.retry import RetryPolicy
from mistralfs.api.storage import cut as _cut
from mistralfs.api.tls import client_context
from mistralfs.api.transport import ThreadedTransport

MiB = 1024 * 1024


async def uploaded_url(client: FilesClient, tmp_path: pathlib.Path, size: int) -> tuple[bytes, str]:
    """Random content of `size` bytes uploaded to batch/, and its signed URL."""
    data = os.urandom(size)
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    remote = await client.upload(path, filename="big.bin", purpose="batch")
    return data, (await client.signed_url(remote.id)).url


async def test_client_reads_multi_mebibyte_ranges_intact(
    emulator: typing.Any, tmp_path: pathlib.Path
) -> None:
    async with FilesClient(emulator.url, emulator.api_key) as client:
        data, url = await uploaded_url(client, tmp_path, 5 * MiB + 12345)
        for start, length in ((0, 4 * MiB), (MiB - 7, 3 * MiB + 99)):
            assert await client.read_range(url, start, length) == data[start : start + length]


def test_chunks_that_are_whole_pieces_are_kept_without_a_copy() -> None:
    """What the transport reads in block-sized pieces is cached as it came."""
    chunks = [os.urandom(100), os.urandom(100), os.urandom(30)]
    pieces = _cut(chunks, 0, 230, 100)
    assert all(piece is chunk for piece, chunk in zip(pieces, chunks, strict=True))


@given(
    data=st.binary(max_size=300),
    cuts=st.lists(st.integers(min_value=0, max_value=300), max_size=6),
    skip=st.integers(min_value=0, max_value=50),
    length=st.integers(min_value=1, max_value=300),
    piece_size=st.integers(min_value=1, max_value=120),
)
def test_cutting_a_body_into_pieces_keeps_every_byte(
    data: bytes, cuts: list[int], skip: int, length: int, piece_size: int
) -> None:
    """However the body arrived in chunks, the pieces are the range, cut evenly."""
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    chunks = [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    pieces = _cut(chunks, skip, length, piece_size)
    wanted = data[skip : skip + length]
    assert b"".join(pieces) == wanted
    assert all(len(p) == piece_size for p in pieces[:-1])
    assert not pieces or 0 < len(pieces[-1]) <= piece_size


async def test_client_reads_ranges_in_block_pieces(
    emulator: typing.Any, tmp_path: pathlib.Path
) -> None:
    async with FilesClient(emulator.url, emulator.api_key) as client:
        data, url = await uploaded_url(client, tmp_path, 3 * MiB + 500)
        pieces = await client.read_range_pieces(url, 100, 3 * MiB + 400, MiB)
    assert [len(p) for p in pieces] == [MiB, MiB, MiB, 400]
    assert b"".join(pieces) == data[100:]


async def test_range_pieces_are_read_into_memory_of_their_own(
    emulator: typing.Any, tmp_path: pathlib.Path
) -> None:
    """Each block of a range is read by the socket straight into a populated mapping of
    its own (no bytes object, no fault per page; see transport.py), whole pieces kept
    as they came, so that one evicted block frees its memory whatever its neighbours do."""
    async with FilesClient(emulator.url, emulator.api_key) as client:
        data, url = await uploaded_url(client, tmp_path, 2 * MiB + 10)
        streamed: list[bytes] = []
        pieces = await client.read_range_pieces(
            url, 0, 2 * MiB + 10, MiB, lambda _i, piece: streamed.append(piece)
        )
        whole = await client.read_range_pieces(url, 5, MiB, MiB)
    for piece in [*pieces, *whole]:
        assert isinstance(piece, memoryview) and isinstance(piece.obj, mmap.mmap)
    assert len({id(typing.cast(memoryview, p).obj) for p in pieces}) == len(pieces)
    assert b"".join(pieces) == data and streamed == pieces[:2]
    assert bytes(whole[0]) == data[5 : 5 + MiB]


def test_a_proxy_from_the_environment_applies_where_no_proxy_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("http_proxy", "https_proxy", "no_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    url = httpx.URL("https://account.blob.example/c/f?sig=x")

    def proxy(url: httpx.URL) -> str | None:  # proxy settings are read when it is made
        return ThreadedTransport(client_context()).proxy_for(url)

    assert proxy(url) is None
    monkeypatch.setenv("https_proxy", "http://proxy.example:3128")
    assert proxy(url) == "http://proxy.example:3128"  # sent through httpx's proxy transport
    assert proxy(httpx.URL("http://account.blob.example/f")) is None  # https only
    monkeypatch.setenv("no_proxy", "account.blob.example")
    assert proxy(url) is None


async def test_a_request_that_a_proxy_applies_to_goes_through_the_proxy(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """http.client reads no proxy settings: such a request is httpx's own transport's."""
    seen: list[str] = []

    async def proxy(scope: dict, receive: typing.Any, send: typing.Any) -> None:
        seen.append(scope["path"])  # an absolute-form target names the origin
        await answer_range(send, dict(scope["headers"])[b"range"].decode(), b"y" * 100)

    proxy_url = await serve_asgi(nursery, proxy)
    monkeypatch.setenv("http_proxy", proxy_url)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    async with FilesClient("http://api.example", "k") as client:
        assert await client.read_range("http://blob.example/b?sig=1", 5, 10) == b"y" * 10
        assert client.idle_connections() == 0  # none of its own
    assert len(seen) == 1


async def test_direct_reads_keep_their_connection_and_count_as_storage_requests(
    emulator: typing.Any, tmp_path: pathlib.Path
) -> None:
    async with FilesClient(emulator.url, emulator.api_key) as client:
        data, url = await uploaded_url(client, tmp_path, 2 * MiB)
        before = client.stats.requests["storage"]
        for start in range(0, 2 * MiB, MiB // 2):
            [piece] = await client.read_range_pieces(url, start, 1000, MiB)
            assert piece == data[start : start + 1000]
        assert client.stats.requests["storage"] - before == 4
        assert client.idle_connections() == 1  # one connection, reused


async def test_a_connection_opened_ahead_serves_the_first_read(
    nursery: trio.Nursery, emulator: typing.Any, tmp_path: pathlib.Path
) -> None:
    """When a large file's signed URL is fetched ahead (at lookup), a connection to its
    storage is opened too: the first read then waits for neither."""
    connections = []

    async def storage_host(scope: dict, receive: typing.Any, send: typing.Any) -> None:
        connections.append(scope["client"])
        await answer_range(send, dict(scope["headers"])[b"range"].decode(), b"x" * 5000)

    storage_url = await serve_asgi(nursery, storage_host)
    async with FilesClient(emulator.url, emulator.api_key) as client:
        await client.connect_ahead(f"{storage_url}/blob?sig=1")
        assert client.idle_connections(storage_url) == 1 and connections == []  # no request
        await client.connect_ahead(f"{storage_url}/other?sig=2")  # one is open already
        assert client.idle_connections(storage_url) == 1
        assert await client.read_range_pieces(f"{storage_url}/blob?sig=1", 0, 10, 10) == [b"x" * 10]
        assert client.idle_connections(storage_url) == 1
        await client.connect_ahead("http://127.0.0.1:9/nothing-listens")  # left to the read
    assert len(set(connections)) == 1  # the read went on the connection opened ahead


async def test_warming_up_opens_connections_to_the_api_and_to_storage(
    nursery: trio.Nursery, tmp_path: pathlib.Path
) -> None:
    """At mount, one file's signed URL tells where content is served from: the first
    listing and the first read then find their connections open (no handshake)."""
    storage_hits: list[str] = []

    async def storage_host(scope: dict, receive: typing.Any, send: typing.Any) -> None:
        storage_hits.append(scope["path"])

    storage_url = await serve_asgi(nursery, storage_host)
    emulator = await start_emulator(nursery, emulator_config(tmp_path, storage_url=storage_url))
    async with FilesClient(emulator.url, emulator.api_key) as client:
        await client.warm_up()  # an empty account: nothing to learn
        assert client.idle_connections(emulator.url) == 1
        assert client.idle_connections(storage_url) == 0
        await uploaded_url(client, tmp_path, 10)
        async with FilesClient(emulator.url, emulator.api_key) as fresh:
            await fresh.warm_up()
            assert fresh.idle_connections(emulator.url) == 1
            assert fresh.idle_connections(storage_url) == 1
    assert storage_hits == []  # connected, nothing asked


async def test_connections_opened_ahead_at_once_make_one_set(tmp_path: pathlib.Path) -> None:
    """Several files looked up at once each ask for connections ahead to one storage
    host: as many are opened as one asks for, not that many per file."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.listen(16)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/blob"
    try:
        async with FilesClient("http://127.0.0.1:9", "k") as client:
            async with trio.open_nursery() as nursery:
                for index in range(5):
                    nursery.start_soon(client.connect_ahead, f"{url}?sig={index}", 3)
            assert client.idle_connections(url) == 3
        listener.setblocking(False)
        accepted = []
        with contextlib.suppress(BlockingIOError):
            while True:
                accepted.append(listener.accept()[0])
        assert len(accepted) == 3
        for conn in accepted:
            conn.close()
    finally:
        listener.close()


async def test_where_connecting_is_cheap_one_connection_ahead_is_enough(
    nursery: trio.Nursery,
) -> None:
    """On loopback or a LAN (the last connection opened in under
    CHEAP_CONNECT_SECONDS), asking for several connections ahead opens one: a request
    opens its own there in no time, and those opened ahead would take CPU from it."""
    url = await serve_script(nursery, [answer_with(b"ok")] * 2)
    async with FilesClient("http://127.0.0.1:9", "k") as client:
        assert await client.read_range(url, 0, 2) == b"ok"  # a connection, opened fast
        await client.connect_ahead(url, 3)
        assert client.idle_connections(url) == 1


async def test_a_redirected_signed_url_is_followed_without_the_key(emulator: typing.Any) -> None:
    body = bytes(range(256)) * 8
    seen: list[tuple[str, bool]] = []

    async def app(scope: dict[str, typing.Any], receive: typing.Any, send: typing.Any) -> None:
        headers = dict(scope["headers"])
        seen.append((scope["path"], b"authorization" in headers))
        if scope["path"] == "/moved":
            await answer(send, 307, [(b"location", b"/blob?sig=s")], b"")
        else:
            await answer_range(send, headers[b"range"].decode(), body)

    async with trio.open_nursery() as nursery:
        url = await serve_asgi(nursery, app)
        async with FilesClient(emulator.url, emulator.api_key) as client:
            pieces = await client.read_range_pieces(f"{url}/moved?sig=s", 100, 1500, 1024)
        nursery.cancel_scope.cancel()
    assert [len(p) for p in pieces] == [1024, 476]
    assert b"".join(pieces) == body[100:1600]
    assert seen == [("/moved", False), ("/blob", False)]  # never with the key


async def test_a_streamed_range_hands_over_each_piece_as_it_comes(emulator: typing.Any) -> None:
    """With `on_piece`, the first piece of a range is handed over while the rest of the
    body is still on its way (here the server sends the rest only once it was), and the
    last only once the body has ended."""
    body = os.urandom(3 * 4096 + 100)
    first_taken = trio.Event()
    taken: list[tuple[int, int]] = []

    async def app(scope: dict[str, typing.Any], receive: typing.Any, send: typing.Any) -> None:
        headers = [
            (b"content-range", f"bytes 0-{len(body) - 1}/{len(body)}".encode()),
            (b"content-length", str(len(body)).encode()),
        ]
        await send({"type": "http.response.start", "status": 206, "headers": headers})
        await send({"type": "http.response.body", "body": body[:4096], "more_body": True})
        await first_taken.wait()
        await send({"type": "http.response.body", "body": body[4096:]})

    def on_piece(index: int, piece: bytes) -> None:
        taken.append((index, len(piece)))
        first_taken.set()

    async with trio.open_nursery() as nursery:
        url = await serve_asgi(nursery, app)
        async with FilesClient(emulator.url, emulator.api_key) as client:
            with trio.fail_after(10):
                pieces = await client.read_range_pieces(
                    f"{url}/blob?sig=s", 0, len(body), 4096, on_piece
                )
        nursery.cancel_scope.cancel()
    assert b"".join(pieces) == body
    # The last piece comes back with the others, once the body ended where it should.
    assert taken == [(0, 4096), (1, 4096), (2, 4096)]


def test_one_tls_context_serves_every_client_and_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading the trusted certificates takes tens of milliseconds: once per process and
    trust, and httpx and every http.client pool of a client trust the same ones."""
    import ssl

    from mistralfs.api import tls

    made = []
    real = ssl.create_default_context

    def counted(*args: typing.Any, **kwargs: typing.Any) -> ssl.SSLContext:
        made.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(ssl, "create_default_context", counted)
    tls._context.cache_clear()
    try:
        clients = [FilesClient("https://api.example", "k") for _ in range(3)]
        assert len(made) == 1
        context = tls.client_context()
        transport = clients[0]._calls.transport
        assert transport is not None
        conn = transport._connection(("https", "blob.example", 443), True)
        assert isinstance(conn, http.client.HTTPSConnection)
        assert conn._context is context  # type: ignore[attr-defined]
        proxied = transport._via_proxy("http://proxy.example:3128")
        assert proxied._pool._ssl_context is context  # type: ignore[attr-defined]
        assert len(made) == 1
    finally:
        tls._context.cache_clear()


def _no_mapping(*_args: object, **_kwargs: object) -> mmap.mmap:
    raise OSError(12, "Cannot allocate memory")


async def test_blocks_are_read_into_plain_buffers_when_no_mapping_is_to_be_had(
    emulator: typing.Any, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process at its limit of mappings (vm.max_map_count) still reads: each block
    into a plain buffer, as before block buffers."""
    async with FilesClient(emulator.url, emulator.api_key) as client:
        data, url = await uploaded_url(client, tmp_path, 2 * MiB + 10)
        monkeypatch.setattr("mistralfs.api.buffers.mmap.mmap", _no_mapping)
        pieces = await client.read_range_pieces(url, 3, 2 * MiB + 7, MiB, lambda _i, _p: None)
    assert all(isinstance(piece, bytes) for piece in pieces)
    assert b"".join(pieces) == data[3:]


async def test_a_cookie_that_the_server_sets_is_sent_back() -> None:
    """The client's jar looks at an answer only when it sets a cookie (the cost of
    asking http.cookiejar about every answer is saved, see calls.py); one that does is
    kept and sent back, as httpx does."""
    seen: list[str | None] = []
    body = b"0123456789"

    async def app(scope: dict[str, typing.Any], receive: typing.Any, send: typing.Any) -> None:
        cookie = dict(scope["headers"]).get(b"cookie")
        seen.append(cookie.decode() if cookie else None)
        headers = [(b"content-length", b"10")]
        if len(seen) == 2:
            headers.append((b"set-cookie", b"affinity=a1; Path=/"))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async with trio.open_nursery() as nursery:
        url = await serve_asgi(nursery, app)
        async with FilesClient(url, "key") as client:
            for _ in range(3):
                assert await client.content("f1", len(body)) == body
        nursery.cancel_scope.cancel()
    assert seen == [None, None, "affinity=a1"]


async def test_a_streamed_body_is_read_by_the_trio_thread_after_its_headers(
    emulator: typing.Any, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A streamed body is read from the socket by the trio thread: no worker-thread hop
    per piece (each cost GIL hand-overs per TLS record, a fifth of a cold read's CPU),
    and on a connection already open (the upload's) none for the exchange either."""
    async with FilesClient(emulator.url, emulator.api_key) as client:
        data, url = await uploaded_url(client, tmp_path, 3 * MiB)
        hops = count_transport_hops(monkeypatch)
        handed: list[int] = []
        pieces = await client.read_range_pieces(
            url, 5, 2 * MiB, 256 * 1024, lambda index, piece: handed.append(index)
        )
    assert b"".join(bytes(piece) for piece in pieces) == data[5 : 2 * MiB + 5]
    assert handed == list(range(7))  # every piece but the last, as it came
    assert hops == [], hops
    assert all(isinstance(piece, memoryview) for piece in pieces)


@pytest.mark.logs_expected
@pytest.mark.parametrize("blocks", ["mapped", "plain"])
@pytest.mark.parametrize("fault", ["stalls", "closes"])
async def test_a_streamed_body_that_stops_midway_is_read_again(
    fault: str, blocks: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A body that stops coming after its first pieces (a server that hangs, or closes
    before its Content-Length) fails that attempt within the read timeout, and the range
    is asked for again, intact: read by the trio thread into mapped blocks, and by
    worker threads into plain buffers when no mapping is to be had (where a body cut
    short was once handed back short, as if whole)."""
    if blocks == "plain":
        monkeypatch.setattr("mistralfs.api.buffers.mmap.mmap", _no_mapping)
    body = os.urandom(6 * 65536)
    requests = 0

    async def app(scope: dict[str, typing.Any], receive: typing.Any, send: typing.Any) -> None:
        nonlocal requests
        requests += 1
        headers = [
            (b"content-range", f"bytes 0-{len(body) - 1}/{len(body)}".encode()),
            (b"content-length", str(len(body)).encode()),
        ]
        await send({"type": "http.response.start", "status": 206, "headers": headers})
        if requests == 1:
            await send({"type": "http.response.body", "body": body[:150000], "more_body": True})
            if fault == "stalls":
                await trio.sleep_forever()
            raise RuntimeError("cut short")  # Hypercorn closes the connection
        await send({"type": "http.response.body", "body": body})

    policy = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05, total_budget=10.0)
    async with trio.open_nursery() as nursery:
        url = await serve_asgi(nursery, app)
        async with FilesClient(url, "k", retry=policy, timeout=0.5) as client:
            t0 = trio.current_time()
            with trio.fail_after(8):
                pieces = await client.read_range_pieces(
                    f"{url}/blob?sig=s", 0, len(body), 65536, lambda index, piece: None
                )
            elapsed = trio.current_time() - t0
        nursery.cancel_scope.cancel()
    assert b"".join(bytes(piece) for piece in pieces) == body
    assert requests == 2
    if fault == "stalls":
        assert 0.5 <= elapsed < 4, elapsed
