"""Kept times (fs/mtimes.py): what `touch -d`, `cp -p` and `rsync -a` set is what `stat`
shows, until the content changes, across remounts.

The fast tier drives `Operations` as each tool does, on an account in memory; the
store is checked by reopening it, as a remount does. The real tools on real mounts are
in test_mtimes_tools.py.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import pyfuse3
import pytest
import trio
from fake_api import FakeFilesApi
from fs_driver import fast_options
from test_fake_tier import BLOCK, FakeStack
from test_local_names import create_written, rename, unlink

from mistralfs.fs.build import build_filesystem
from mistralfs.fs.mtimes import Times, TimesFile
from mistralfs.fs.operations import Operations

NS = 10**9
MTIME = 1_000_000_000 * NS + 123  # 2001-09-09, to the nanosecond
ATIME = 1_100_000_000 * NS


@pytest.fixture
async def kept(tmp_path: Path) -> AsyncIterator[FakeStack]:
    """The fast tier with its times kept on disk, as a mount keeps them."""
    async with mounted(tmp_path, FakeFilesApi()) as stack:
        yield stack


@contextlib.asynccontextmanager
async def mounted(root: Path, api: FakeFilesApi, **extra: bool) -> AsyncIterator[FakeStack]:
    """A mount of `api` (in memory) whose times file is under `root`; again with the
    same account and root, a remount."""
    options = fast_options(root, BLOCK, times_file=root / "times" / "mount.sqlite3", **extra)
    async with trio.open_nursery() as nursery:
        parts = build_filesystem(api, nursery, options)
        try:
            yield FakeStack(Operations(parts.fs), BLOCK, api, root)
        finally:
            parts.times.store.close()
            nursery.cancel_scope.cancel()


async def set_times(
    stack: FakeStack,
    inode: int,
    *,
    mtime_ns: int | None = None,
    atime_ns: int | None = None,
    fh: int | None = None,
) -> pyfuse3.EntryAttributes:
    """utimensat: either time, or both; UTIME_OMIT for the other."""
    attr = pyfuse3.EntryAttributes()
    attr.st_mtime_ns = mtime_ns or 0
    attr.st_atime_ns = atime_ns or 0
    fields = SimpleNamespace(
        update_size=False, update_atime=atime_ns is not None, update_mtime=mtime_ns is not None
    )
    return await stack.ops.setattr(inode, attr, fields, fh, None)  # type: ignore[arg-type]


async def stat(stack: FakeStack, folder: str, name: str) -> pyfuse3.EntryAttributes:
    return await stack.ops.getattr(await stack.inode(folder, name))


def remote_id(stack: FakeStack, name: str) -> str:
    [file_id] = [i for i, f in stack.api.files.items() if f.remote.filename == name]
    return file_id


def created(stack: FakeStack, name: str) -> int:
    return stack.api.files[remote_id(stack, name)].remote.created_at * NS


def stored(stack: FakeStack) -> dict[str, Times]:
    """What a remount would find: the times file as SQLite reads it."""
    with contextlib.closing(sqlite3.connect(stack.cache_dir / "times" / "mount.sqlite3")) as db:
        rows = db.execute("SELECT id, atime_ns, mtime_ns FROM times").fetchall()
    return {file_id: Times(atime, mtime) for file_id, atime, mtime in rows}


# -- each tool's calls -------------------------------------------------------------------


async def test_touch_d_on_an_uploaded_file_keeps_its_times_under_its_id(
    kept: FakeStack,
) -> None:
    await kept.write_file("batch", "a.jsonl", b"{}\n")
    uploads = kept.api.calls["upload"]
    created = (await stat(kept, "batch", "a.jsonl")).st_mtime_ns
    inode = await kept.inode("batch", "a.jsonl")
    # touch -d: open O_WRONLY|O_CREAT (no truncation), futimens, close.
    info = await kept.ops.open(inode, os.O_WRONLY, None)
    shown = await set_times(kept, inode, mtime_ns=MTIME, atime_ns=ATIME, fh=info.fh)
    await kept.ops.flush(info.fh)
    await kept.ops.release(info.fh)
    assert (shown.st_mtime_ns, shown.st_atime_ns) == (MTIME, ATIME)
    after = await stat(kept, "batch", "a.jsonl")
    assert (after.st_mtime_ns, after.st_atime_ns) == (MTIME, ATIME) != (created, created)
    assert kept.api.calls["upload"] == uploads  # times change no content
    assert stored(kept) == {remote_id(kept, "a.jsonl"): Times(ATIME, MTIME)}


async def test_touch_d_downloads_nothing_and_a_later_write_still_edits_the_content(
    kept: FakeStack,
) -> None:
    """A write-only open copies the file in at its first change, not at open: touch -d
    of a large file cost a download of all of it."""
    data = bytes(range(256)) * (3 * BLOCK // 256)
    await kept.write_file("batch", "big.bin", data)
    kept.api.calls.clear()
    inode = await kept.inode("batch", "big.bin")
    info = await kept.ops.open(inode, os.O_WRONLY, None)
    await set_times(kept, inode, mtime_ns=MTIME, atime_ns=ATIME, fh=info.fh)
    await kept.ops.flush(info.fh)
    await kept.ops.release(info.fh)
    fetched = {k: n for k, n in kept.api.calls.items() if k in ("content", "read_range", "upload")}
    assert fetched == {}, fetched
    assert (await stat(kept, "batch", "big.bin")).st_mtime_ns == MTIME
    # The same kind of open, then a write: the rest of the file is still there.
    info = await kept.ops.open(inode, os.O_WRONLY, None)
    await kept.write_and_close(info.fh, b"XY", offset=BLOCK)
    assert kept.api.calls["upload"] == 1
    assert await kept.read_file("batch", "big.bin") == data[:BLOCK] + b"XY" + data[BLOCK + 2 :]


async def test_cp_p_sets_the_times_on_the_open_file_before_its_upload(kept: FakeStack) -> None:
    fh = await kept.open_truncated("batch", "copy.jsonl")
    for offset in range(0, 3 * BLOCK, BLOCK):
        await kept.ops.write(fh, offset, b"x" * BLOCK)
    inode = await kept.inode("batch", "copy.jsonl")
    await set_times(kept, inode, mtime_ns=MTIME, atime_ns=ATIME, fh=fh)
    assert (await stat(kept, "batch", "copy.jsonl")).st_mtime_ns == MTIME  # while unsent
    await kept.ops.flush(fh)
    await kept.ops.release(fh)
    assert kept.api.calls["upload"] == 1
    assert (await stat(kept, "batch", "copy.jsonl")).st_mtime_ns == MTIME
    assert stored(kept) == {remote_id(kept, "copy.jsonl"): Times(ATIME, MTIME)}


async def test_rsync_sets_the_temp_files_mtime_and_the_rename_keeps_it(kept: FakeStack) -> None:
    # rsync: write .NAME.XXXXXX (a scratch name, never uploaded), close, utimensat
    # (mtime only), rename into place: one upload, under the final name.
    await create_written(kept, "batch", ".a.jsonl.Xy12aB", b"{}\n")
    await set_times(kept, await kept.inode("batch", ".a.jsonl.Xy12aB"), mtime_ns=MTIME)
    await rename(kept, "batch", ".a.jsonl.Xy12aB", "a.jsonl")
    assert kept.api.calls["upload"] == 1
    shown = await stat(kept, "batch", "a.jsonl")
    assert shown.st_mtime_ns == MTIME
    assert abs(shown.st_atime_ns - time.time_ns()) < 10 * NS  # left: when rsync made it
    assert stored(kept) == {remote_id(kept, "a.jsonl"): Times(shown.st_atime_ns, MTIME)}


async def test_a_rename_carries_the_times_to_the_new_id(kept: FakeStack) -> None:
    await kept.write_file("batch", "a.jsonl", b"{}\n")
    await set_times(kept, await kept.inode("batch", "a.jsonl"), mtime_ns=MTIME, atime_ns=ATIME)
    old = remote_id(kept, "a.jsonl")
    await rename(kept, "batch", "a.jsonl", "b.jsonl")
    assert (await stat(kept, "batch", "b.jsonl")).st_mtime_ns == MTIME
    assert stored(kept) == {remote_id(kept, "b.jsonl"): Times(ATIME, MTIME)}
    assert old not in kept.api.files


# -- until the content changes -------------------------------------------------------------


async def test_new_content_drops_the_times_set_before_it(kept: FakeStack) -> None:
    await kept.write_file("batch", "a.jsonl", b"{}\n")
    await set_times(kept, await kept.inode("batch", "a.jsonl"), mtime_ns=MTIME)
    await kept.write_file("batch", "a.jsonl", b'{"new": 1}\n')  # cp without -p
    assert (await stat(kept, "batch", "a.jsonl")).st_mtime_ns == created(kept, "a.jsonl")
    assert stored(kept) == {}  # the replaced file's entry went with it


async def test_a_write_after_the_times_were_set_drops_them(kept: FakeStack) -> None:
    fh = await kept.open_truncated("batch", "a.jsonl")
    inode = await kept.inode("batch", "a.jsonl")
    await kept.ops.write(fh, 0, b"{}\n")
    await set_times(kept, inode, mtime_ns=MTIME, fh=fh)
    await kept.ops.write(fh, 3, b"{}\n")  # written after: its mtime is its upload's
    await kept.ops.flush(fh)
    await kept.ops.release(fh)
    assert (await stat(kept, "batch", "a.jsonl")).st_mtime_ns == created(kept, "a.jsonl")
    assert stored(kept) == {}


async def test_setting_the_atime_alone_leaves_the_mtime(kept: FakeStack) -> None:
    await kept.write_file("batch", "a.jsonl", b"{}\n")
    inode = await kept.inode("batch", "a.jsonl")
    await set_times(kept, inode, mtime_ns=MTIME)
    shown = await set_times(kept, inode, atime_ns=ATIME)  # touch -a
    assert (shown.st_mtime_ns, shown.st_atime_ns) == (MTIME, ATIME)


async def test_a_folders_times_are_not_kept(kept: FakeStack) -> None:
    batch = await kept.folder("batch")
    before = (await kept.ops.getattr(batch)).st_mtime_ns
    assert (await set_times(kept, batch, mtime_ns=MTIME)).st_mtime_ns == before


async def test_a_read_only_mount_keeps_no_times(tmp_path: Path) -> None:
    api = FakeFilesApi()
    remote = api.add("a.jsonl", "batch", b"{}\n")
    async with mounted(tmp_path, api, read_only=True) as stack:
        inode = await stack.inode("batch", "a.jsonl")
        assert (await set_times(stack, inode, mtime_ns=MTIME)).st_mtime_ns == remote.created_at * NS
        assert stored(stack) == {}


# -- what the store holds, and for how long ------------------------------------------------


async def test_the_times_survive_a_remount(tmp_path: Path) -> None:
    api = FakeFilesApi()
    async with mounted(tmp_path, api) as stack:
        await stack.write_file("batch", "a.jsonl", b"{}\n")
        await set_times(stack, await stack.inode("batch", "a.jsonl"), mtime_ns=MTIME)
    async with mounted(tmp_path, api) as stack:
        assert (await stat(stack, "batch", "a.jsonl")).st_mtime_ns == MTIME


async def test_deleted_files_lose_their_entries_here_and_elsewhere(tmp_path: Path) -> None:
    api = FakeFilesApi()
    async with mounted(tmp_path, api) as stack:
        for name in ("rm.jsonl", "elsewhere.jsonl", "offline.jsonl", "stays.jsonl"):
            await stack.write_file("batch", name, b"{}\n")
            await set_times(stack, await stack.inode("batch", name), mtime_ns=MTIME)
        offline = remote_id(stack, "offline.jsonl")
        await unlink(stack, "batch", "rm.jsonl")  # rm through the mount
        await stack.api.delete(remote_id(stack, "elsewhere.jsonl"))
        assert await stack.names("batch") == ["offline.jsonl", "stays.jsonl"]  # a listing
        assert len(stored(stack)) == 2
    await api.delete(offline)  # while nothing is mounted
    async with mounted(tmp_path, api) as stack:
        await stack.ops.opendir(pyfuse3.ROOT_INODE, None)  # `ls` of the root lists it all
        stays = remote_id(stack, "stays.jsonl")
        assert stored(stack) == {stays: Times(created(stack, "stays.jsonl"), MTIME)}


@pytest.mark.logs_expected
async def test_a_damaged_store_is_set_aside_and_the_mount_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "times" / "mount.sqlite3"
    path.parent.mkdir()
    path.write_bytes(b"not a database, half written" * 100)
    store = TimesFile(path)
    store.put("file-1", Times(ATIME, MTIME))
    store.close()
    assert TimesFile(path).get("file-1") == Times(ATIME, MTIME)
    assert path.with_name("mount.sqlite3.damaged").read_bytes().startswith(b"not a database")


@pytest.mark.logs_expected
def test_a_store_that_cannot_be_opened_is_left_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Locked by another process (or not readable): not taken for a damaged one."""
    path = tmp_path / "times.sqlite3"
    TimesFile(path).close()
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as other:
        other.execute("PRAGMA locking_mode=EXCLUSIVE")
        other.execute("BEGIN EXCLUSIVE")
        store = TimesFile(path, timeout=0.1)
        store.put("file-1", Times(ATIME, MTIME))  # kept in memory
        assert store.get("file-1") == Times(ATIME, MTIME)
        other.execute("ROLLBACK")
    assert "times set now are kept only until this mount ends" in caplog.text
    assert not list(tmp_path.glob("*.damaged*"))


async def test_each_change_is_committed_at_once(tmp_path: Path) -> None:
    """A crash loses nothing set before it: another connection sees every change as
    soon as it is made, with no close (WAL, one transaction per change)."""
    path = tmp_path / "times.sqlite3"
    store = TimesFile(path)
    store.put("file-1", Times(ATIME, MTIME))
    store.put("file-2", Times(ATIME, MTIME))
    store.drop(["file-1"])
    with sqlite3.connect(path) as other:
        assert other.execute("SELECT id, mtime_ns FROM times").fetchall() == [("file-2", MTIME)]
    store.close()
