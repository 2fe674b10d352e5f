"""The large-read transport: the socket is asked for big reads, and bodies stay whole."""

from __future__ import annotations

import os
import pathlib
import typing

import httpcore
import httpx

from mistralfs.api import FilesClient
from mistralfs.api.transport import READ_BYTES, LargeReadBackend, large_read_transport


class RecordingStream(httpcore.AsyncNetworkStream):
    """An inner stream that answers nothing, only records what it was asked for."""

    def __init__(self) -> None:
        self.asked: list[int] = []

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        self.asked.append(max_bytes)
        return b""

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        pass

    async def aclose(self) -> None:
        pass


class RecordingBackend(httpcore.AsyncNetworkBackend):
    def __init__(self) -> None:
        self.stream = RecordingStream()

    async def connect_tcp(self, *args: typing.Any, **kwargs: typing.Any) -> RecordingStream:
        return self.stream


async def test_reads_ask_the_socket_for_at_least_a_mebibyte() -> None:
    inner = RecordingBackend()
    stream = await LargeReadBackend(inner).connect_tcp("127.0.0.1", 1)
    await stream.read(64 * 1024)
    await stream.read(4 * READ_BYTES)
    assert inner.stream.asked == [READ_BYTES, 4 * READ_BYTES]


async def test_large_read_transport_serves_whole_bodies(emulator: typing.Any) -> None:
    async with httpx.AsyncClient(transport=large_read_transport()) as http:
        response = await http.get(f"{emulator.url}/v1/files", headers={"Authorization": "x"})
    assert response.status_code == 401  # a real answer, parsed through the new backend


async def test_client_reads_multi_mebibyte_ranges_intact(
    emulator: typing.Any, tmp_path: pathlib.Path
) -> None:
    data = os.urandom(5 * READ_BYTES + 12345)
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    async with FilesClient(emulator.url, emulator.api_key) as client:
        remote = await client.upload(path, filename="big.bin", purpose="batch")
        signed = await client.signed_url(remote.id)
        for start, length in ((0, 4 * READ_BYTES), (READ_BYTES - 7, 3 * READ_BYTES + 99)):
            assert (
                await client.read_range(signed.url, start, length) == data[start : start + length]
            )
