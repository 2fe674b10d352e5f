"""How far ahead a sequential reader fetches, through `Operations` on the emulator.

On a long link a reader goes as fast as the bytes in flight over the round trip allow,
so the window of blocks fetched ahead grows while growing it makes reads faster. A
delay on every storage request stands in for the round trip here (64 KiB blocks, so
the bounds are 16 blocks: a quarter of the 64-block cache).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import cast

import trio
import trio.testing
from conftest import RunningEmulator
from test_operations import BLOCK, Stack, stack_with, upload

from mistralfs.api import FilesClient
from mistralfs.fs.reader import BlockReader, ReadState

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
    assert state.window == 16, state  # a quarter of the cache
    # Past what it reaches freely (plus the read's own 2 blocks), within a quarter of the
    # cache (plus those 2).
    assert FREE_GROWTH_BLOCKS + 2 < most <= 16 + 2, most


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
    assert state.window == 64 and not state.settled, state  # the bound: 64 blocks


async def test_the_window_settles_when_a_larger_one_reads_no_faster(
    mock_clock: trio.testing.MockClock,
) -> None:
    state = await window_after(mock_clock, faster=False)
    # Measured at 8 blocks, grown to 16, measured no faster there: it stays.
    assert state.window == 2 * FREE_GROWTH_BLOCKS and state.settled, state
