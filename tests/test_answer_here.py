"""Requests on an open connection run on the trio thread (mistralfs/api/answer_here.py):
no worker-thread hop, whatever way the answer arrives."""

from __future__ import annotations

import os
import pathlib
import ssl

import httpx
import pytest
import trio
from conftest import count_transport_hops, serve_script

from mistralfs.api import answer_here
from mistralfs.api.buffers import BlockBuffers
from mistralfs.api.client import FilesClient
from mistralfs.api.transport import (
    BLOCK_BUFFERS,
    PIECE_SIZE,
    PREFETCH,
    ThreadedTransport,
    _Exchange,
)


async def test_requests_on_an_open_connection_take_no_worker_thread(
    emulator: object, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the request that opens the connection goes to a worker thread; a small
    file's upload, listing, content, a signed URL and a delete after it are sent and
    answered by the trio thread, and answer what the emulator holds."""
    source = tmp_path / "a.txt"
    source.write_bytes(b"some bytes")
    async with FilesClient(emulator.url, emulator.api_key) as client:  # type: ignore[attr-defined]
        hops = count_transport_hops(monkeypatch)
        stored = await client.upload(source, filename="a.txt", purpose="batch")
        assert hops == ["_Exchange.run"]  # connecting, with the first request
        again = await client.upload(source, filename="b.txt", purpose="batch", dedupe=False)
        await client.delete(again.id)
        listed = await client.list_files(purpose="batch")
        content = await client.content(stored.id, stored.bytes)
        url = await client.signed_url(stored.id)
        await client.delete(stored.id)
        after = await client.list_files(purpose="batch")
    assert [f.id for f in listed.files] == [stored.id]
    assert content == b"some bytes"
    assert url.url.startswith("http")
    assert after.files == []
    assert hops == ["_Exchange.run"], hops


async def test_an_answer_that_comes_in_pieces_is_read_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On an open connection, a head cut anywhere and a chunked body are read whole (the
    body by a worker thread, as it comes); a head that stops coming fails within the
    read timeout; each answer reaches the caller as the server sent it."""

    async def whole(stream: trio.SocketStream) -> None:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")

    async def in_pieces(stream: trio.SocketStream) -> None:
        pieces = [b"HTTP/1.1 200 OK\r\nTransfer-En", b"coding: chunked\r", b"\n\r\n5\r\nhel",
                  b"lo\r\n6\r\n world\r\n", b"0\r\n\r\n"]  # fmt: skip
        for piece in pieces:
            await stream.send_all(piece)
            await trio.sleep(0.02)

    async def refusal(stream: trio.SocketStream) -> None:
        body = b'{"detail": "no"}'
        head = f"HTTP/1.1 404 Not Found\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        await stream.send_all(head[:7])
        await trio.sleep(0.02)
        await stream.send_all(head[7:] + body)

    async def stalls(stream: trio.SocketStream) -> None:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-")
        await trio.sleep_forever()

    transport = ThreadedTransport(ssl.create_default_context())
    async with trio.open_nursery() as nursery:
        url = await serve_script(nursery, [whole, in_pieces, refusal, stalls])
        hops = count_transport_hops(monkeypatch)
        async with httpx.AsyncClient(transport=transport, timeout=0.5) as client:
            first = await client.get(url)
            second = await client.get(url)
            third = await client.get(url)
            t0 = trio.current_time()
            with pytest.raises(httpx.ReadTimeout):
                await client.get(url)
            waited = trio.current_time() - t0
        nursery.cancel_scope.cancel()
    assert (first.status_code, first.content) == (200, b"first")
    assert (second.status_code, second.content) == (200, b"hello world")
    assert (third.status_code, third.content) == (404, b'{"detail": "no"}')
    assert 0.5 <= waited < 3, waited
    assert hops == ["_Exchange.run"], hops  # the first request only: it connected


@pytest.mark.parametrize("value", ["a\r\nInjected: yes", "a\nb", "a\rb"])
def test_a_header_value_that_would_break_the_request_is_refused(value: str) -> None:
    """As http.client refuses it: a line break in a header could start a header, or a
    request, of its own."""
    exchange = _Exchange(
        method="GET", target="/", headers=[("X-Name", value)], body=b"",
        connect_timeout=None, timeout=None, prefetch=0, piece_size=1,
    )  # fmt: skip
    with pytest.raises(ValueError, match="Invalid header value"):
        exchange._request_head()


async def test_bytes_past_a_streamed_body_are_not_taken_for_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A lying server sends more than the Content-Length it gave, in the same packets as
    the head: a streamed body read into block memory is the declared bytes, whole, as
    when a worker thread reads the head (the rest of the socket is not the body's)."""
    body = os.urandom(3000)

    async def warm(stream: trio.SocketStream) -> None:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    async def longer(stream: trio.SocketStream) -> None:
        head = f"HTTP/1.1 206 Partial Content\r\nContent-Length: {len(body)}\r\n\r\n"
        await stream.send_all(head.encode() + body + b"and more that was never asked for")

    transport = ThreadedTransport(ssl.create_default_context())
    async with trio.open_nursery() as nursery:
        url = await serve_script(nursery, [warm, longer])
        async with httpx.AsyncClient(transport=transport, timeout=2) as client:
            assert (await client.get(url)).content == b"ok"
            extensions = {PREFETCH: 0, PIECE_SIZE: 1024, BLOCK_BUFFERS: BlockBuffers(1024, 4)}
            request = client.build_request("GET", url, extensions=extensions)
            response = await client.send(request, stream=True)
            pieces = [bytes(piece) async for piece in response.aiter_raw()]
            await response.aclose()
        nursery.cancel_scope.cancel()
    assert b"".join(pieces) == body
    assert [len(piece) for piece in pieces] == [1024, 1024, 952]


async def test_a_refusal_sent_before_the_body_was_read_reaches_the_caller(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server that answers a large body in memory with 413 after its head alone, and
    closes: the trio thread's send fails, and the answer the server sent is what the
    caller gets, with its message, not the broken pipe."""
    message = b'{"detail": "too large"}'

    async def warm(stream: trio.SocketStream) -> None:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    async def refuses(stream: trio.SocketStream) -> None:
        head = f"HTTP/1.1 413 Content Too Large\r\nContent-Length: {len(message)}\r\n"
        await stream.send_all(head.encode() + b"Connection: close\r\n\r\n" + message)
        await stream.aclose()

    transport = ThreadedTransport(ssl.create_default_context())
    sent = []
    real_early = answer_here.early_answer_here

    def early(sock: object, method: str) -> object:
        sent.append(method)
        return real_early(sock, method)  # type: ignore[arg-type]

    monkeypatch.setattr("mistralfs.api.transport.early_answer_here", early)
    async with trio.open_nursery() as nursery:
        url = await serve_script(nursery, [warm, refuses])
        hops = count_transport_hops(monkeypatch)
        async with httpx.AsyncClient(transport=transport, timeout=5) as client:
            assert (await client.get(url)).content == b"ok"
            refused = await client.post(url, content=bytes(64 << 20))
        nursery.cancel_scope.cancel()
    assert (refused.status_code, refused.content) == (413, message)
    assert sent == ["POST"]  # the send broke: the refusal came from what was received
    assert hops == ["_Exchange.run"], hops
