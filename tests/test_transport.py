"""The large-read transport: the socket is asked for big reads, and bodies stay whole."""

from __future__ import annotations

import itertools
import os
import pathlib
import typing

import httpcore
import httpx
from hypothesis import given
from hypothesis import strategies as st

from mistralfs.api import FilesClient
from mistralfs.api.client import _cut
from mistralfs.api.transport import READ_BYTES, LargeReadBackend, large_read_transport


class RecordingStream(httpcore.AsyncNetworkStream):
    """An inner stream that records what it was asked for and fills `full` reads."""

    def __init__(self) -> None:
        self.asked: list[int] = []
        self.full = 0

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        self.asked.append(max_bytes)
        if self.full:
            self.full -= 1
            return bytes(max_bytes)
        return b"short"

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        pass

    async def aclose(self) -> None:
        pass


class RecordingBackend(httpcore.AsyncNetworkBackend):
    def __init__(self) -> None:
        self.stream = RecordingStream()

    async def connect_tcp(self, *args: typing.Any, **kwargs: typing.Any) -> RecordingStream:
        return self.stream


async def test_reads_grow_while_they_come_back_full() -> None:
    inner = RecordingBackend()
    stream = await LargeReadBackend(inner).connect_tcp("127.0.0.1", 1)
    inner.stream.full = 6
    for _ in range(8):
        await stream.read(64 * 1024)
    KiB = 1024
    # Doubling while full, up to READ_BYTES; back to httpcore's size after a short read.
    grown = [64 * KiB, 128 * KiB, 256 * KiB, 512 * KiB, READ_BYTES, READ_BYTES]
    assert inner.stream.asked == [*grown, READ_BYTES, 64 * KiB]


async def test_large_read_transport_serves_whole_bodies(emulator: typing.Any) -> None:
    async with httpx.AsyncClient(transport=large_read_transport()) as http:
        response = await http.get(f"{emulator.url}/v1/files", headers={"Authorization": "x"})
    assert response.status_code == 401  # a real answer, parsed through the new backend


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
        data, url = await uploaded_url(client, tmp_path, 5 * READ_BYTES + 12345)
        for start, length in ((0, 4 * READ_BYTES), (READ_BYTES - 7, 3 * READ_BYTES + 99)):
            assert await client.read_range(url, start, length) == data[start : start + length]


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
        data, url = await uploaded_url(client, tmp_path, 3 * READ_BYTES + 500)
        pieces = await client.read_range_pieces(url, 100, 3 * READ_BYTES + 400, READ_BYTES)
    assert [len(p) for p in pieces] == [READ_BYTES, READ_BYTES, READ_BYTES, 400]
    assert b"".join(pieces) == data[100:]
