"""The disk tier (`--disk-cache`) on its own: small blocks, and a fetch function that
counts what reaches the "network".
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from mistralfs.fs.disk_cache import HEADER, DiskCache, DiskCacheError

BLOCK = 64 * 1024
ENTRY = HEADER.size + BLOCK  # bytes one full block takes on disk
FILE_ID = "3f1c2a9e-7b5d-4c1e-9a0f-2d6b8e4c1a77"
OTHER_ID = "a0b1c2d3-e4f5-4a6b-8c7d-9e0f1a2b3c4d"


class Origin:
    """The network, as the disk tier sees it: content by id, and every block fetched."""

    def __init__(self, contents: dict[str, bytes]) -> None:
        self.contents = contents
        self.fetched: list[tuple[str, int]] = []

    async def read(self, cache: DiskCache, file_id: str, index: int) -> bytes:
        content = self.contents[file_id]

        async def fetch() -> bytes:
            self.fetched.append((file_id, index))
            return content[index * BLOCK : (index + 1) * BLOCK]

        return await cache.read_through(file_id, len(content), index, fetch)

    async def read_all(self, cache: DiskCache, file_id: str) -> bytes:
        blocks = (len(self.contents[file_id]) + BLOCK - 1) // BLOCK
        return b"".join([await self.read(cache, file_id, i) for i in range(blocks)])


@asynccontextmanager
async def running(root: Path, max_bytes: int = 16 * ENTRY) -> AsyncIterator[DiskCache]:
    """A disk cache with its writer task, flushed and closed at the end, as a mount does."""
    cache = await DiskCache.open(root, max_bytes, BLOCK)
    async with cache, trio.open_nursery() as nursery:
        nursery.start_soon(cache.run)
        yield cache
        await cache.flush()
        nursery.cancel_scope.cancel()


def kept(root: Path, file_id: str = FILE_ID) -> list[int]:
    """The block indexes on disk for a file."""
    folder = root / file_id
    return (
        sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []
    )


async def test_blocks_read_once_are_served_from_disk_after_a_restart(tmp_path: Path) -> None:
    root = tmp_path / "disk"
    origin = Origin({FILE_ID: os.urandom(3 * BLOCK + 1000)})
    async with running(root) as cache:
        assert await origin.read_all(cache, FILE_ID) == origin.contents[FILE_ID]
    assert len(origin.fetched) == 4
    assert kept(root) == [0, 1, 2, 3]
    # Private: the folders 0700, the blocks and the lock 0600.
    for path in (root, root / FILE_ID):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
    for path in [*(root / FILE_ID).iterdir(), root / "lock"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    origin.fetched.clear()
    async with running(root) as cache:
        assert await origin.read_all(cache, FILE_ID) == origin.contents[FILE_ID]
        assert cache.stats()["hits"] == 4
    assert origin.fetched == []


async def test_the_size_bound_evicts_the_least_recently_used_block_across_restarts(
    tmp_path: Path,
) -> None:
    root = tmp_path / "disk"
    origin = Origin({FILE_ID: os.urandom(6 * BLOCK)})

    async def read(cache: DiskCache, index: int) -> None:
        await origin.read(cache, FILE_ID, index)
        await cache.flush()
        await trio.sleep(0.02)  # file times are coarse: keep the order unambiguous

    async with running(root, max_bytes=3 * ENTRY) as cache:
        for index in (0, 1, 2):
            await read(cache, index)
        await read(cache, 0)  # a hit makes block 0 the most recent
        await read(cache, 3)  # one too many: block 1, the least recent, goes
        assert kept(root) == [0, 2, 3]
        assert cache.stats()["bytes"] == 3 * ENTRY
    # The order survives a restart: 2 is now the least recent, then 0, then 3.
    async with running(root, max_bytes=3 * ENTRY) as cache:
        assert cache.stats()["blocks"] == 3
        await read(cache, 4)
        assert kept(root) == [0, 3, 4]
    # A smaller bound at the next start evicts down to it, least recent first.
    async with running(root, max_bytes=2 * ENTRY):
        assert kept(root) == [3, 4]


def damage(folder: Path) -> None:
    """Leave each kind of bad block a crash or a failing disk can leave."""
    with open(folder / "0", "r+b") as f:  # short: cut in the middle of the block
        f.truncate(HEADER.size + BLOCK // 2)
    with open(folder / "1", "r+b") as f:  # damaged: one byte of the data changed
        f.seek(HEADER.size + 100)
        byte = f.read(1)
        f.seek(HEADER.size + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    (folder / "2").write_bytes((folder / "3").read_bytes())  # sound, but another block's
    (folder / "3").write_bytes(b"")  # what a crash can leave: a name and no data
    (folder / ".3.tmp").write_bytes(b"half a write")  # a temp file left by a crash


async def test_a_torn_short_or_damaged_block_is_never_served(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "disk"
    origin = Origin({FILE_ID: os.urandom(4 * BLOCK)})
    async with running(root) as cache:
        await origin.read_all(cache, FILE_ID)
    folder = root / FILE_ID
    damage(folder)
    origin.fetched.clear()
    with caplog.at_level(logging.WARNING, logger="mistralfs.fs.disk_cache"):
        async with running(root) as cache:
            assert not (folder / ".3.tmp").exists()
            assert await origin.read_all(cache, FILE_ID) == origin.contents[FILE_ID]
    assert origin.fetched == [(FILE_ID, i) for i in range(4)]
    assert "not the block expected" in caplog.text
    # Each bad block was replaced by the one fetched: a restart now serves all four.
    origin.fetched.clear()
    async with running(root) as cache:
        assert await origin.read_all(cache, FILE_ID) == origin.contents[FILE_ID]
    assert origin.fetched == []


async def test_a_second_user_of_the_folder_is_refused_until_the_first_closes(
    tmp_path: Path,
) -> None:
    root = tmp_path / "disk"
    first = await DiskCache.open(root, 4 * ENTRY, BLOCK)
    with pytest.raises(DiskCacheError, match=rf"in use by another mistralfs \(pid {os.getpid()}\)"):
        await DiskCache.open(root, 4 * ENTRY, BLOCK)
    first.close()
    (await DiskCache.open(root, 4 * ENTRY, BLOCK)).close()


async def test_a_forgotten_file_loses_its_blocks_and_a_late_store_does_not_bring_them_back(
    tmp_path: Path,
) -> None:
    root = tmp_path / "disk"
    origin = Origin({FILE_ID: os.urandom(2 * BLOCK), OTHER_ID: os.urandom(BLOCK)})
    async with running(root) as cache:
        await origin.read(cache, FILE_ID, 0)
        await cache.flush()
        assert kept(root) == [0]
        await origin.read(cache, FILE_ID, 1)  # its store is still queued ...
        await origin.read(cache, OTHER_ID, 0)
        cache.forget(FILE_ID)  # ... when the file is deleted
        await origin.read(cache, FILE_ID, 0)  # a read still in flight at the deletion
        await cache.flush()
        assert not (root / FILE_ID).exists()
        assert kept(root, OTHER_ID) == [0]
        assert cache.stats()["blocks"] == 1


async def test_disk_errors_degrade_to_network_reads_with_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "disk"
    origin = Origin({FILE_ID: os.urandom(BLOCK), OTHER_ID: os.urandom(BLOCK)})
    with caplog.at_level(logging.WARNING, logger="mistralfs.fs.disk_cache"):
        async with running(root) as cache:
            (root / FILE_ID).write_bytes(b"")  # a file where its folder should be: no write
            assert await origin.read(cache, FILE_ID, 0) == origin.contents[FILE_ID]
            await cache.flush()
            assert "writing a block failed" in caplog.text
            await origin.read(cache, OTHER_ID, 0)
            await cache.flush()
            (root / OTHER_ID / "0").unlink()
            (root / OTHER_ID / "0").mkdir()  # a block that cannot be read
            assert await origin.read(cache, OTHER_ID, 0) == origin.contents[OTHER_ID]
            assert "reading a block failed" in caplog.text
            assert cache.stats()["errors"] >= 2
    assert origin.fetched == [(FILE_ID, 0), (OTHER_ID, 0), (OTHER_ID, 0)]


async def test_ids_that_are_not_safe_as_names_are_not_kept(tmp_path: Path) -> None:
    root = tmp_path / "disk"
    origin = Origin({"../escape": b"x" * 10})
    async with running(root) as cache:
        await origin.read(cache, "../escape", 0)
        await origin.read(cache, "../escape", 0)
    assert len(origin.fetched) == 2
    assert sorted(p.name for p in root.iterdir()) == ["lock"]
    assert not (tmp_path / "escape").exists()
