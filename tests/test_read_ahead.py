"""How far ahead a sequential reader fetches, through `Operations` on the emulator.

On a long link a reader goes as fast as the bytes in flight over the round trip allow,
so the window of blocks fetched ahead grows while growing it makes reads faster. A
delay on every storage request stands in for the round trip here (64 KiB blocks, so
the bounds are 32 blocks: half of the 64-block cache). A stream read from the start
opens the window at its bound at once; what is on its way counts against the cache.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import cast

import pytest
import trio
import trio.testing
from conftest import RunningEmulator
from fake_api import FakeFilesApi
from test_operations import BLOCK, Stack, stack_with, upload

from mistralfs.api import FilesClient, transport
from mistralfs.fs.reader import (
    BEHIND_BLOCKS,
    CONNECTIONS_AHEAD,
    STORAGE_CONNECTIONS,
    BlockReader,
    ReadState,
)

# make_stack lets a window grow freely to 8 blocks, so that 16 is reached by measuring.
FREE_GROWTH_BLOCKS = 8

FILE_BLOCKS = 96


async def most_blocks_in_flight(stack: Stack, data: bytes) -> tuple[int, ReadState]:
    """Read batch/seq.bin sequentially in 128 KiB reads, as the kernel does; the most
    blocks that were on their way at once, and the reader's window at the end."""
    await upload(stack, "seq.bin", data)
    inode = (await stack.ops.lookup(await stack.folder("batch"), b"seq.bin")).st_ino
    info = await stack.ops.open(inode, os.O_RDONLY, None)
    await stack.admin(  # every storage request waits, as over a 40 ms link
        "POST",
        "faults",
        json=[{"path_prefix": "/storage/", "status": None, "delay": 0.04, "times": None}],
    )
    reader = stack.ops.fs._reader
    most = 0

    async def watch() -> None:
        nonlocal most
        while True:
            most = max(most, reader.stats()["fetches_in_flight"])
            await trio.sleep(0.005)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        for offset in range(0, len(data), 2 * BLOCK):
            piece = await stack.ops.read(info.fh, offset, 2 * BLOCK)
            assert piece == data[offset : offset + 2 * BLOCK]
        nursery.cancel_scope.cancel()
    state = stack.ops.fs._handle(info.fh).read_state
    await stack.ops.release(info.fh)
    return most, state


async def test_the_window_grows_past_its_first_size_while_reads_get_faster(
    emulator: RunningEmulator, tmp_path: Path
) -> None:
    async with stack_with(emulator, tmp_path / "cache") as stack:
        most, state = await most_blocks_in_flight(stack, os.urandom(FILE_BLOCKS * BLOCK))
    assert state.window == 32, state  # half of the cache
    # Past what it reaches freely (plus the read's own 2 blocks), within half of the
    # cache (plus those 2).
    assert FREE_GROWTH_BLOCKS + 2 < most <= 32 + 2, most


async def test_the_window_stops_growing_at_the_throughput_asked_for(
    emulator: RunningEmulator, tmp_path: Path
) -> None:
    # Any rate reaches 1 KB/s: the window stays at the size it reaches freely.
    async with stack_with(emulator, tmp_path / "cache", max_throughput=1000) as stack:
        _, state = await most_blocks_in_flight(stack, os.urandom(FILE_BLOCKS * BLOCK))
    assert state.settled and state.window == FREE_GROWTH_BLOCKS, state


async def window_after(mock_clock: trio.testing.MockClock, faster: bool) -> ReadState:
    """Read 256 blocks sequentially, 2 at a time, each read taking 10 ms, or, with
    `faster`, 10 ms divided by how many times the window doubled past its free size:
    the reader's window at the end."""
    async with trio.open_nursery() as nursery:
        reader = BlockReader(
            cast(FilesClient, None),
            nursery,
            cache_size=1024 * BLOCK,
            block_size=BLOCK,
            free_growth_blocks=FREE_GROWTH_BLOCKS,
        )
        state = ReadState()
        for offset in range(0, 256 * BLOCK, 2 * BLOCK):
            reader._ahead(offset, offset + 2 * BLOCK, state)
            speedup = max(1, state.window // FREE_GROWTH_BLOCKS) if faster else 1
            mock_clock.jump(0.01 / speedup)
    return state


async def test_the_window_grows_while_doubling_it_makes_reads_faster(
    mock_clock: trio.testing.MockClock,
) -> None:
    state = await window_after(mock_clock, faster=True)
    assert state.window == 128 and not state.settled, state  # the bound: 128 blocks


async def test_the_window_settles_when_a_larger_one_reads_no_faster(
    mock_clock: trio.testing.MockClock,
) -> None:
    state = await window_after(mock_clock, faster=False)
    # Measured at 8 blocks, grown to 16, measured no faster there: it stays.
    assert state.window == 2 * FREE_GROWTH_BLOCKS and state.settled, state


async def first_window(offset: int, size: int, max_throughput: float | None = None) -> ReadState:
    """The window after one read of `size` bytes at `offset`, on a 1024-block cache."""
    reader = BlockReader(
        cast(FilesClient, None),
        cast(trio.Nursery, None),
        cache_size=1024 * BLOCK,
        block_size=BLOCK,
        max_throughput=max_throughput,
        free_growth_blocks=FREE_GROWTH_BLOCKS,
    )
    state = ReadState()
    reader._ahead(offset, offset + size, state)
    return state


async def test_a_stream_read_from_the_start_opens_the_window_at_its_bound() -> None:
    # dd bs=1M, cat, cp: a first read at 0 larger than 128 KiB (the kernel's readahead).
    assert (await first_window(0, 4 * BLOCK)).window == 128  # the bound, not 2
    # head: a small first read; or a first read elsewhere in the file: doubling from 1.
    assert (await first_window(0, 2 * BLOCK)).window == 2
    assert (await first_window(8 * BLOCK, 4 * BLOCK)).window == 1  # a seek: closed
    # With --max-throughput, it opens at the size reached freely, and is measured on.
    state = await first_window(0, 4 * BLOCK, max_throughput=1e9)
    assert state.window == FREE_GROWTH_BLOCKS and not state.settled, state


async def read_watching(
    stack: Stack, data: bytes, read_size: int, delay: float
) -> tuple[int, int, ReadState]:
    """Read batch/stream.bin sequentially in reads of `read_size` with every storage
    request delayed by `delay`: the most bytes cached and on their way at once, the
    most requests ahead at once, and the window at the end."""
    await upload(stack, "stream.bin", data)
    inode = (await stack.ops.lookup(await stack.folder("batch"), b"stream.bin")).st_ino
    info = await stack.ops.open(inode, os.O_RDONLY, None)
    await stack.admin(
        "POST",
        "faults",
        json=[{"path_prefix": "/storage/", "status": None, "delay": delay, "times": None}],
    )
    reader = stack.ops.fs._reader
    most_bytes = most_requests = 0

    async def watch() -> None:
        nonlocal most_bytes, most_requests
        while True:
            stats = reader.stats()
            held = cast(int, stats["bytes"]) + BLOCK * cast(int, stats["fetches_in_flight"])
            most_bytes = max(most_bytes, held)
            most_requests = max(most_requests, cast(int, stats["requests_in_flight"]))
            await trio.sleep(0.002)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        for offset in range(0, len(data), read_size):
            piece = await stack.ops.read(info.fh, offset, read_size)
            assert piece == data[offset : offset + read_size]
        nursery.cancel_scope.cancel()
    state = stack.ops.fs._handle(info.fh).read_state
    await stack.ops.release(info.fh)
    return most_bytes, most_requests, state


async def test_blocks_on_their_way_count_against_the_cache(
    emulator: RunningEmulator, tmp_path: Path
) -> None:
    """A file larger than the cache, streamed: what is cached and what is on its way
    together stay within --cache-size (memory is the cache, not the cache and a window)."""
    async with stack_with(emulator, tmp_path / "cache") as stack:  # 64 blocks
        most, requests, state = await read_watching(stack, os.urandom(160 * BLOCK), 4 * BLOCK, 0.02)
    assert state.window == 32, state  # opened at its bound at the first read
    assert most <= 64 * BLOCK, most / BLOCK
    assert 4 < requests < STORAGE_CONNECTIONS, requests


@pytest.mark.parametrize("read_blocks", [1, 4, 16])
async def test_a_streams_blocks_leave_memory_behind_it_and_their_memory_holds_new_ones(
    emulator: RunningEmulator, tmp_path: Path, read_blocks: int
) -> None:
    """A sequential reader's blocks leave the cache a few blocks behind it (the
    kernel's page cache keeps what was read), and the memory of those blocks holds the
    blocks fetched ahead: a cold read of a large file touches no more fresh memory
    than its window. Every byte still reads back as written."""
    data = os.urandom(160 * BLOCK)
    async with stack_with(emulator, tmp_path / "cache") as stack:  # 64 blocks
        await read_watching(stack, data, read_blocks * BLOCK, 0.0)
        stats = stack.ops.fs._reader.stats()
    assert cast(int, stats["blocks"]) <= BEHIND_BLOCKS + read_blocks + 4, stats
    # Blocks whose memory is still held when they leave (by the request that fetched
    # them, until its last block is in) are not reused; most of the others are.
    assert cast(int, stats["buffers_reused"]) >= 160 // 3, stats


async def test_a_streams_first_read_waits_for_its_own_block_only(
    emulator: RunningEmulator, tmp_path: Path
) -> None:
    """The window opens at 128 blocks, in runs of 5: the first read's own blocks (3)
    still get connections (32 to storage), not ones freed by requests ahead, and one
    stays free; more than 16 requests are on their way at once."""
    async with stack_with(emulator, tmp_path / "cache", cache_size=256 * BLOCK) as stack:
        data = os.urandom(192 * BLOCK)
        await upload(stack, "wide.bin", data)
        inode = (await stack.ops.lookup(await stack.folder("batch"), b"wide.bin")).st_ino
        info = await stack.ops.open(inode, os.O_RDONLY, None)
        await stack.admin(
            "POST",
            "faults",
            json=[{"path_prefix": "/storage/", "status": None, "delay": 0.5, "times": None}],
        )
        reader = stack.ops.fs._reader
        most = 0

        async def watch() -> None:
            nonlocal most
            while True:
                most = max(most, cast(int, reader.stats()["requests_in_flight"]))
                await trio.sleep(0.005)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            for _ in range(4):  # trio starts the tasks of one batch in either order
                started = trio.current_time()
                assert await stack.ops.read(info.fh, 0, 3 * BLOCK) == data[: 3 * BLOCK]
                assert trio.current_time() - started < 0.9  # one delay, not two
                await trio.sleep(1.5)  # all landed: start again, cold
                assert reader.stats()["requests_in_flight"] == 0
                reader._blocks.clear()
                stack.ops.fs._handle(info.fh).read_state = ReadState()
            nursery.cancel_scope.cancel()
        assert 16 < most <= STORAGE_CONNECTIONS - 1, most
        await stack.ops.release(info.fh)


async def test_a_lookup_opens_connections_to_storage_beside_its_url_request(
    emulator: RunningEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ls -l` then `cat`: a large file's lookup opens connections to the storage host
    that served the URLs before (CONNECTIONS_AHEAD of them) at once, beside the request
    for its own signed URL, not after it: on a long link the read's first ranges then
    find them open. Once the URL is in, nothing more is opened: they are there."""
    monkeypatch.setattr(transport, "CHEAP_CONNECT_SECONDS", 0)  # as on a long link
    async with stack_with(emulator, tmp_path / "cache") as stack:
        file_id = await upload(stack, "soon.bin", os.urandom(3 * BLOCK))
        batch = await stack.folder("batch")
        await stack.names("batch")
        await trio.sleep(0.3)  # the listing's URLs fetched ahead: forget them
        storage = stack.client.storage_url
        assert storage is not None  # learnt from the listing's URL
        stack.ops.fs._reader._urls.clear()
        connected: list[tuple[str, int]] = []
        connect_ahead = stack.client.connect_ahead

        async def counted(url: str, count: int = 1) -> None:
            connected.append((url, count))
            await connect_ahead(url, count)

        stack.client.connect_ahead = counted  # type: ignore[method-assign]
        await stack.admin(
            "POST",
            "faults",
            json=[{"path_prefix": f"/v1/files/{file_id}/url", "status": None, "delay": 0.3}],
        )
        await stack.ops.lookup(batch, b"soon.bin")  # fetches the URL ahead
        await trio.sleep(0.1)  # the URL's answer is 0.2 s away
        assert connected == [(storage, CONNECTIONS_AHEAD)]
        # The emulator serves content on the API's host: the URL's request holds one.
        assert stack.client.idle_connections(storage) >= CONNECTIONS_AHEAD - 1
        opened = stack.client.idle_connections(storage)
        info = await stack.ops.open(
            (await stack.ops.lookup(batch, b"soon.bin")).st_ino, os.O_RDONLY, None
        )  # waits for that URL
        assert len(await stack.ops.read(info.fh, 0, 4096)) == 4096
        await stack.ops.release(info.fh)
        # The read used connections opened ahead, and the second lookup opened none: the
        # host has as many as then (the URL's request gave its own back).
        assert stack.client.idle_connections(storage) == opened + 1


STREAM_BLOCK = 256 * 1024  # larger than a first read answered exactly (128 KiB)


async def test_a_streams_first_block_heads_the_first_run_and_is_asked_for_first(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A stream's first read asks for its block before any block ahead (so that it takes
    the connection left idle, not a new one: several round trips on a long link), in one
    request with the run that follows it. Window: 64 blocks, in runs of 4."""
    api = FakeFilesApi(latency=0.1)
    data = os.urandom(96 * STREAM_BLOCK)
    for _ in range(8):  # trio starts the tasks of one batch in either order
        remote = api.add("big.bin", "batch", data)
        api.ranges.clear()
        async with trio.open_nursery() as nursery:
            reader = BlockReader(
                api, nursery, cache_size=128 * STREAM_BLOCK, block_size=STREAM_BLOCK
            )
            read = await reader.read(remote, 0, STREAM_BLOCK, ReadState())
            assert read == data[:STREAM_BLOCK]
            nursery.cancel_scope.cancel()
        assert api.ranges[0] == (0, 5 * STREAM_BLOCK), api.ranges[:3]


async def test_a_block_serves_reads_as_soon_as_it_is_in(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Blocks are handed over as their request's body comes, not once it has all come:
    the read of the second block of a run waits for two blocks' time, not six."""
    api = FakeFilesApi(latency=0.1, piece_time=0.01)
    data = os.urandom(96 * STREAM_BLOCK)
    remote = api.add("big.bin", "batch", data)
    async with trio.open_nursery() as nursery:
        reader = BlockReader(api, nursery, cache_size=128 * STREAM_BLOCK, block_size=STREAM_BLOCK)
        state = ReadState()
        started = trio.current_time()
        assert await reader.read(remote, 0, STREAM_BLOCK, state) == data[:STREAM_BLOCK]
        read = await reader.read(remote, STREAM_BLOCK, STREAM_BLOCK, state)
        assert read == data[STREAM_BLOCK : 2 * STREAM_BLOCK]
        assert trio.current_time() - started == pytest.approx(0.12)  # latency, 2 pieces
        nursery.cancel_scope.cancel()


async def test_each_range_of_a_stream_is_received_in_the_order_its_blocks_are_read(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A stream's ranges carry their first block's index as their key: when the
    transport cannot take in every range at once, the nearest comes first
    (receive_order.py, test_receive_order.py)."""
    api = FakeFilesApi(latency=0.1, piece_time=0.01)
    data = os.urandom(48 * STREAM_BLOCK)
    remote = api.add("big.bin", "batch", data)
    async with trio.open_nursery() as nursery:
        reader = BlockReader(api, nursery, cache_size=128 * STREAM_BLOCK, block_size=STREAM_BLOCK)
        state = ReadState()
        for offset in range(0, 4 * STREAM_BLOCK, STREAM_BLOCK):
            assert await reader.read(remote, offset, STREAM_BLOCK, state)
        nursery.cancel_scope.cancel()
    assert len(api.ranges) > 2
    assert api.receive_keys == [start // STREAM_BLOCK for start, _ in api.ranges], (
        api.ranges,
        api.receive_keys,
    )


async def test_the_window_is_refilled_in_whole_runs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """As a stream reads on, the end of its window is fetched in runs as long as those
    that opened it (the window over the connections), not a few blocks per read: so
    that the requests hold the whole window between them. Window: 128 blocks, runs of 5
    (over 31 requests)."""
    api = FakeFilesApi(latency=0.05, piece_time=0.001)
    data = os.urandom(512 * BLOCK)
    remote = api.add("big.bin", "batch", data)
    async with trio.open_nursery() as nursery:
        reader = BlockReader(api, nursery, cache_size=512 * BLOCK, block_size=BLOCK)
        state = ReadState()
        for offset in range(0, len(data), 4 * BLOCK):
            read = await reader.read(remote, offset, 4 * BLOCK, state)
            assert read == data[offset : offset + 4 * BLOCK]
        nursery.cancel_scope.cancel()
    own, runs = sorted(api.ranges[:4]), api.ranges[4:]
    # The first read's blocks, the last heading a run.
    assert own == [(0, BLOCK), (BLOCK, BLOCK), (2 * BLOCK, BLOCK), (3 * BLOCK, 6 * BLOCK)], own
    assert runs and all(
        length >= 5 * BLOCK or start + length == len(data) for start, length in runs
    ), runs
