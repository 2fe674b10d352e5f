"""The disk tier (`--disk-cache`): the module on its own, then through real mounts.

The unit tests use small blocks and count what reaches the "network" (a fetch
function); the mount tests check with the emulator's request log that a re-read after
a remount downloads nothing.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from conftest import RunningEmulator
from emulator_admin import clear_requests, requests
from mistralai.client import Mistral
from mounting import Mounted, is_mounted, mount, mount_command, wait_for

from mistralfs.daemon.state import process_alive
from mistralfs.fs.disk_cache import LABEL, MAX_PENDING_STORES, DiskCache, DiskCacheError

BLOCK = 64 * 1024
ENTRY = BLOCK + 2 * LABEL.size  # bytes one full block takes on disk
FILE_ID = "3f1c2a9e-7b5d-4c1e-9a0f-2d6b8e4c1a77"
OTHER_ID = "a0b1c2d3-e4f5-4a6b-8c7d-9e0f1a2b3c4d"


class Origin:
    """The network, as the disk tier sees it: content by id, and every block fetched."""

    def __init__(self, contents: dict[str, bytes]) -> None:
        self.contents = contents
        self.fetched: list[tuple[str, int]] = []

    async def read(self, cache: DiskCache, file_id: str, index: int) -> bytes:
        """What the reader does: the disk first, else the network, kept for next time."""
        content = self.contents[file_id]
        blocks = await cache.load(file_id, len(content), index, 1)
        if blocks is None:
            self.fetched.append((file_id, index))
            blocks = [content[index * BLOCK : (index + 1) * BLOCK]]
            cache.store(file_id, len(content), index, blocks)
        return blocks[0]

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


def drop_from_page_cache(folder: Path) -> None:
    """Make the block files be read from the disk itself, as after a reboot: the tier then
    reads them in a worker thread (unless the disk answers a read that may not wait at
    once, which a fast one can)."""
    paths = [str(path) for path in folder.iterdir()]
    for _ in range(50):  # pages still being written back, or queued on another CPU
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)  # only clean pages can be dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        # fincore (util-linux) asks mincore(); a read would bring the pages back.
        resident = subprocess.run(
            ["fincore", "--bytes", "--noheadings", "--output", "RES", *paths],
            capture_output=True, text=True, check=True,
        ).stdout.split()  # fmt: skip
        if not any(int(size) for size in resident):
            return
        time.sleep(0.01)
    pytest.skip("this file system keeps the block files in memory")


@pytest.mark.parametrize("in_page_cache", [True, False], ids=["in-page-cache", "from-disk"])
async def test_blocks_read_once_are_served_from_disk_after_a_restart(
    tmp_path: Path, in_page_cache: bool
) -> None:
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
    if not in_page_cache:
        drop_from_page_cache(root / FILE_ID)
    async with running(root) as cache:
        content = origin.contents[FILE_ID]
        # At once when the files are in memory; else `load` reads them in a worker thread.
        taken = cache.take(FILE_ID, len(content), 0, 4)
        if in_page_cache:
            assert taken is not None and b"".join(taken) == content
        assert await origin.read_all(cache, FILE_ID) == content
        assert cache.stats()["hits"] == (8 if taken is not None else 4)
    assert origin.fetched == []


async def test_a_run_is_served_only_when_every_block_of_it_is_kept(tmp_path: Path) -> None:
    root = tmp_path / "disk"
    content = os.urandom(4 * BLOCK)
    blocks = [content[i * BLOCK : (i + 1) * BLOCK] for i in range(4)]
    async with running(root) as cache:
        cache.store(FILE_ID, len(content), 0, blocks[:2])  # a run of two, as the reader has it
        cache.store(FILE_ID, len(content), 3, blocks[3:])
        await cache.flush()
        assert await cache.load(FILE_ID, len(content), 0, 2) == blocks[:2]
        assert await cache.load(FILE_ID, len(content), 1, 3) is None  # block 2 is missing
        assert kept(root) == [0, 1, 3]
        assert cache.stats()["blocks"] == 3  # a run not served loses none of its blocks
        assert await cache.load(FILE_ID, len(content), 3, 1) == blocks[3:]
        (root / FILE_ID / "0").unlink()  # gone behind its back: found only when read
        assert await cache.load(FILE_ID, len(content), 0, 2) is None
        assert cache.stats()["blocks"] == 2  # block 0 is forgotten, block 1 still kept


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
    """Leave each kind of bad block a crash, a bug or another version could leave."""
    with open(folder / "0", "r+b") as f:  # short: cut in the middle of the block
        f.truncate(LABEL.size + BLOCK // 2)
    with open(folder / "1", "r+b") as f:  # what a power cut can leave: zeros at the end
        f.seek(-4096, os.SEEK_END)
        f.write(bytes(4096))
    (folder / "2").write_bytes((folder / "3").read_bytes())  # sound, but another block's
    (folder / "3").write_bytes(b"")  # what a crash can leave: a name and no data
    (folder / ".3.tmp").write_bytes(b"half a write")  # a temp file left by a crash


@pytest.mark.logs_expected
@pytest.mark.parametrize("in_page_cache", [True, False], ids=["in-page-cache", "from-disk"])
async def test_a_short_torn_or_misplaced_block_is_never_served(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, in_page_cache: bool
) -> None:
    root = tmp_path / "disk"
    origin = Origin({FILE_ID: os.urandom(4 * BLOCK)})
    async with running(root) as cache:
        await origin.read_all(cache, FILE_ID)
    folder = root / FILE_ID
    damage(folder)
    if not in_page_cache:
        drop_from_page_cache(folder)
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


async def test_the_folder_is_made_private_and_one_others_can_write_to_is_refused(
    tmp_path: Path,
) -> None:
    readable = tmp_path / "readable"
    readable.mkdir(mode=0o755)
    readable.chmod(0o755)
    (await DiskCache.open(readable, 4 * ENTRY, BLOCK)).close()
    assert stat.S_IMODE(readable.stat().st_mode) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    with pytest.raises(DiskCacheError, match="can be written by other users"):
        await DiskCache.open(shared, 4 * ENTRY, BLOCK)
    assert list(shared.iterdir()) == []
    others = tmp_path / "others"
    others.mkdir(mode=0o700)
    os.chown(others, 65534, 65534)  # another user's folder, even a private one
    with pytest.raises(DiskCacheError, match="owner uid 65534"):
        await DiskCache.open(others, 4 * ENTRY, BLOCK)


@pytest.mark.parametrize(
    "drop",
    [
        lambda cache: cache.forget(FILE_ID),  # deleted through the mount, or a listing saw it go
        lambda cache: cache.keep_only({OTHER_ID, "an-id-with-nothing-kept"}),  # a whole listing
    ],
    ids=["forget", "missing-from-a-whole-listing"],
)
async def test_a_forgotten_file_loses_its_blocks_and_a_late_store_does_not_bring_them_back(
    tmp_path: Path, drop: Callable[[DiskCache], None]
) -> None:
    root = tmp_path / "disk"
    origin = Origin({FILE_ID: os.urandom(2 * BLOCK), OTHER_ID: os.urandom(BLOCK)})
    async with running(root) as cache:
        await origin.read(cache, FILE_ID, 0)
        await cache.flush()
        assert kept(root) == [0]
        await origin.read(cache, FILE_ID, 1)  # its store is still queued ...
        await origin.read(cache, OTHER_ID, 0)
        drop(cache)  # ... when the file is deleted
        await origin.read(cache, FILE_ID, 0)  # a read still in flight at the deletion
        await cache.flush()
        assert not (root / FILE_ID).exists()
        assert kept(root, OTHER_ID) == [0]
        assert cache.stats()["blocks"] == 1
        assert cache.stats()["bytes"] == ENTRY


async def test_blocks_the_disk_has_not_caught_up_with_are_not_kept_rather_than_held(
    tmp_path: Path,
) -> None:
    root = tmp_path / "disk"
    blocks = MAX_PENDING_STORES + 8
    origin = Origin({FILE_ID: os.urandom(blocks * BLOCK)})
    async with running(root, max_bytes=blocks * ENTRY) as cache:
        for index in range(blocks):  # no checkpoint in between: the writer cannot keep up
            await origin.read(cache, FILE_ID, index)
        assert cache.stats()["skipped"] == 8
    assert kept(root) == list(range(MAX_PENDING_STORES))


@pytest.mark.logs_expected
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


# --- through real mounts --------------------------------------------------------------------

MiB = 1024 * 1024


def _downloads(emulator: RunningEmulator) -> list[dict]:
    """Requests that fetched content: the storage route or the API's /content."""
    return [
        r
        for r in requests(emulator.url, emulator.api_key)
        if r["path"].startswith("/storage/") or r["path"].endswith("/content")
    ]


def _status(m: Mounted) -> dict:
    env = dict(os.environ, XDG_RUNTIME_DIR=str(m.run_dir))
    result = subprocess.run(
        [sys.executable, "-m", "mistralfs", "status", str(m.path), "--json"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return json.loads(result.stdout)


@pytest.mark.fuse
def test_a_re_read_after_remount_downloads_nothing(
    emulator_process: RunningEmulator, sdk: Mistral, tmp_path: Path
) -> None:
    big, small = os.urandom(3 * MiB + 12345), os.urandom(10_000)
    big_id = sdk.files.upload(file={"file_name": "big.bin", "content": big}, purpose="batch").id
    sdk.files.upload(file={"file_name": "small.bin", "content": small}, purpose="batch")
    disk = tmp_path / "disk"
    with mount(emulator_process, tmp_path / "first", "--disk-cache", str(disk)) as m:
        assert (m / "batch" / "big.bin").read_bytes() == big
        assert (m / "batch" / "small.bin").read_bytes() == small
        assert _downloads(emulator_process), "the first read comes from the network"
    assert stat.S_IMODE(disk.stat().st_mode) == 0o700
    assert kept(disk, big_id) == [0, 1, 2, 3]  # all on disk once unmount returned
    with mount(emulator_process, tmp_path / "second", "--disk-cache", str(disk)) as m:
        clear_requests(emulator_process.url, emulator_process.api_key)
        with open(m / "batch" / "big.bin", "rb") as f:  # a small first read, as `head` does
            assert f.read(4096) == big[:4096]
        assert (m / "batch" / "big.bin").read_bytes() == big
        assert (m / "batch" / "small.bin").read_bytes() == small
        assert _downloads(emulator_process) == []
        assert _status(m)["disk_cache"]["hits"] == 5


@pytest.mark.fuse
def test_after_a_crash_the_next_mount_uses_the_disk_cache(
    emulator_process: RunningEmulator, sdk: Mistral, tmp_path: Path
) -> None:
    content = os.urandom(3 * MiB)
    upload = {"file_name": "kept.bin", "content": content}
    file_id = sdk.files.upload(file=upload, purpose="batch").id
    disk = tmp_path / "disk"
    with mount(emulator_process, tmp_path / "first", "--disk-cache", str(disk)) as m:
        assert (m / "batch" / "kept.bin").read_bytes() == content
        wait_for(lambda: kept(disk, file_id) == [0, 1, 2])
        pid = m.daemon_pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)  # the kernel drops the lock with the process
        wait_for(lambda: not process_alive(pid))
    (disk / file_id / ".1.tmp").write_bytes(b"a write cut short")
    with mount(emulator_process, tmp_path / "second", "--disk-cache", str(disk)) as m:
        clear_requests(emulator_process.url, emulator_process.api_key)
        assert (m / "batch" / "kept.bin").read_bytes() == content
        assert _downloads(emulator_process) == []
        assert not (disk / file_id / ".1.tmp").exists()


@pytest.mark.fuse
def test_rm_or_overwrite_through_the_mount_drops_the_files_disk_blocks(
    emulator_process: RunningEmulator, sdk: Mistral, tmp_path: Path
) -> None:
    contents = {name: os.urandom(2 * MiB) for name in ("gone.bin", "replaced.bin")}
    ids = {
        name: sdk.files.upload(file={"file_name": name, "content": data}, purpose="batch").id
        for name, data in contents.items()
    }
    disk = tmp_path / "disk"
    with mount(emulator_process, tmp_path, "--disk-cache", str(disk)) as m:
        for name, data in contents.items():
            assert (m / "batch" / name).read_bytes() == data
            wait_for(lambda name=name: kept(disk, ids[name]) == [0, 1])
        (m / "batch" / "gone.bin").unlink()
        (m / "batch" / "replaced.bin").write_bytes(b"new content")  # new upload, old deleted
        wait_for(lambda: not (disk / ids["gone.bin"]).exists())
        wait_for(lambda: not (disk / ids["replaced.bin"]).exists())


@pytest.mark.fuse
def test_files_deleted_elsewhere_lose_their_disk_blocks(
    emulator_process: RunningEmulator, sdk: Mistral, tmp_path: Path
) -> None:
    names = ("stays.bin", "deleted-while-mounted.bin", "deleted-while-unmounted.bin")
    contents = {name: os.urandom(2 * MiB) for name in names}
    ids = {
        name: sdk.files.upload(file={"file_name": name, "content": data}, purpose="batch").id
        for name, data in contents.items()
    }
    disk = tmp_path / "disk"
    options = ("--disk-cache", str(disk), "--dir-cache-time", "1")
    with mount(emulator_process, tmp_path / "first", *options) as m:
        for name, data in contents.items():
            assert (m / "batch" / name).read_bytes() == data
    assert all(kept(disk, file_id) == [0, 1] for file_id in ids.values())
    sdk.files.delete(file_id=ids["deleted-while-unmounted.bin"])
    with mount(emulator_process, tmp_path / "second", *options) as m:
        assert (m / "batch" / "stays.bin").read_bytes() == contents["stays.bin"]
        assert (disk / ids["deleted-while-unmounted.bin"]).exists()  # no whole listing yet
        assert "batch" in os.listdir(m.path)  # the root's listing is the whole account's
        wait_for(lambda: not (disk / ids["deleted-while-unmounted.bin"]).exists())
        sdk.files.delete(file_id=ids["deleted-while-mounted.bin"])
        time.sleep(1.2)  # the folder cache time
        assert "deleted-while-mounted.bin" not in os.listdir(m.path / "batch")
        wait_for(lambda: not (disk / ids["deleted-while-mounted.bin"]).exists())
        assert kept(disk, ids["stays.bin"]) == [0, 1]
        assert _status(m)["disk_cache"]["blocks"] == 2


@pytest.mark.fuse
def test_disk_cache_options_are_checked_and_one_folder_serves_one_mount(
    emulator_process: RunningEmulator, tmp_path: Path
) -> None:
    command, env, mounted = mount_command(emulator_process, tmp_path / "a")

    def refused(*extra: str) -> str:
        result = subprocess.run([*command, *extra], env=env, capture_output=True, text=True)
        assert result.returncode == 2, result.stderr
        assert not is_mounted(mounted.path)
        return result.stderr

    disk = tmp_path / "disk"
    assert "--disk-cache-size needs --disk-cache DIR" in refused("--disk-cache-size", "1G")
    assert "invalid size 'lots'" in refused("--disk-cache", str(disk), "--disk-cache-size", "lots")
    assert "at least 2M" in refused("--disk-cache", str(disk), "--disk-cache-size", "1K")
    inside = str(mounted.path / "cache")
    assert "is inside the mountpoint" in refused("--disk-cache", inside)
    (tmp_path / "file").write_text("x")
    assert "is not a folder" in refused("--disk-cache", str(tmp_path / "file"))
    assert "is not a folder" in refused("-o", f"disk_cache={tmp_path / 'file'}")
    options = f"disk_cache={disk},disk_cache_size=64M"
    with mount(emulator_process, tmp_path / "a", "-o", options) as m:
        snapshot = _status(m)["disk_cache"]
        assert snapshot["dir"] == str(disk) and snapshot["max_bytes"] == 64 * MiB
        shown = subprocess.run(
            [sys.executable, "-m", "mistralfs", "status", str(m.path)],
            env=env, capture_output=True, text=True, timeout=60,
        ).stdout  # fmt: skip
        assert f"disk cache 0.0 MiB of 64.0 MiB, 0 hits, 0 misses, 0 errors · {disk}" in shown
        second, env2, other = mount_command(emulator_process, tmp_path / "b")
        started = time.monotonic()
        result = subprocess.run(
            [*second, "--disk-cache", str(disk)], env=env2, capture_output=True, text=True
        )
        assert result.returncode == 1
        assert f"the disk cache {disk} is in use by another mistralfs" in result.stderr
        assert not is_mounted(other.path)
        assert time.monotonic() - started < 30
