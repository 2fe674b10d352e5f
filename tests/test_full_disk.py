"""A cache folder that fills up: `ENOSPC`, nothing cut short uploaded, nothing lost.

The spools live on a small tmpfs (tests run as root). A copy that does not fit must
fail at the write that does not fit, store nothing of itself in the account, leave the
version it was to replace as it was, and keep what was written in `recovery/`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pyfuse3
import pytest
import trio
from conftest import RunningEmulator
from mistralai.client import Mistral
from mounting import mount, remote_files
from test_operations import Stack, expect_missing, make_stack, remote_state, upload

from mistralfs.fs.uploads import GROWING_START_BYTES

MiB = 1 << 20


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` at `path`, unmounted however the test ends."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
async def stack(emulator: RunningEmulator, tmp_path: Path) -> AsyncIterator[Stack]:
    """Operations whose cache folder is an 8 MiB tmpfs: a growing upload starts in it."""
    with small_tmpfs(tmp_path / "cache", "8m") as cache:
        async with trio.open_nursery() as nursery:
            s = await make_stack(emulator, nursery, cache)
            yield s
            await s.client.aclose()
            nursery.cancel_scope.cancel()


async def write_until_refused(stack: Stack, fh: int, total: int) -> int:
    """Write `total` bytes in 1 MiB pieces; the errno of the write that failed."""
    for offset in range(0, total, MiB):
        try:
            await stack.ops.write(fh, offset, os.urandom(MiB))
        except pyfuse3.FUSEError as exc:
            return exc.errno
    raise AssertionError(f"{total} bytes fit in the cache folder")


def kept(stack: Stack) -> list[int]:
    return [p.stat().st_size for p in (stack.cache_dir / "recovery").glob("*.spool")]


@pytest.mark.logs_expected
async def test_a_new_file_that_does_not_fit_fails_with_enospc_and_stores_nothing(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="mistralfs")
    batch = await stack.folder("batch")
    info, _ = await stack.ops.create(batch, b"big.bin", 0o644, os.O_WRONLY, None)
    assert await write_until_refused(stack, info.fh, 16 * MiB) == errno.ENOSPC
    with pytest.raises(pyfuse3.FUSEError) as closed:
        await stack.ops.flush(info.fh)
    assert closed.value.errno == errno.ENOSPC
    await stack.ops.release(info.fh)
    await trio.sleep(0.2)  # the upload begun while it was written has stopped
    assert await remote_state(stack) == {}, "a prefix was stored"
    [size] = kept(stack)
    assert GROWING_START_BYTES <= size < 8 * MiB  # what was accepted before the disk filled
    assert any("big.bin" in r.getMessage() and "kept" in r.getMessage() for r in caplog.records)
    await expect_missing(stack.ops, batch, b"big.bin")


@pytest.mark.logs_expected
async def test_an_overwrite_that_does_not_fit_leaves_the_old_version(stack: Stack) -> None:
    old = os.urandom(300 * 1024)
    old_id = await upload(stack, "o.bin", old)
    batch = await stack.folder("batch")
    inode = (await stack.ops.lookup(batch, b"o.bin")).st_ino
    info = await stack.ops.open(inode, os.O_WRONLY | os.O_TRUNC, None)
    assert await write_until_refused(stack, info.fh, 16 * MiB) == errno.ENOSPC
    with pytest.raises(pyfuse3.FUSEError) as closed:
        await stack.ops.flush(info.fh)
    assert closed.value.errno == errno.ENOSPC
    await stack.ops.release(info.fh)
    assert await remote_state(stack) == {("batch", "o.bin"): old_id}
    assert (await stack.ops.getattr(inode)).st_size == len(old)
    assert await stack.read_file(inode) == old
    assert len(kept(stack)) == 1


async def test_an_edit_whose_copy_does_not_fit_fails_to_open_with_enospc(stack: Stack) -> None:
    data = os.urandom(9 * MiB)
    old_id = await upload(stack, "e.bin", data)
    inode = (await stack.ops.lookup(await stack.folder("batch"), b"e.bin")).st_ino
    with pytest.raises(pyfuse3.FUSEError) as opened:
        await stack.ops.open(inode, os.O_RDWR, None)
    assert opened.value.errno == errno.ENOSPC
    assert await remote_state(stack) == {("batch", "e.bin"): old_id}
    assert list((stack.cache_dir / "spool").glob("*.spool")) == []


def test_cp_into_a_mount_whose_cache_folder_is_full(
    emulator_process: RunningEmulator, sdk: Mistral, tmp_path: Path
) -> None:
    """The issue's case: a 20 MB cache folder, 100 MB copied in, new and over a file."""
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(100 * 1000 * 1000))
    sdk.files.upload(file={"file_name": "old.bin", "content": b"o" * 300_000}, purpose="batch")
    with small_tmpfs(tmp_path / "m" / "cache", "20m"), mount(emulator_process, tmp_path / "m") as m:
        for name in ("new.bin", "old.bin"):
            copy = subprocess.run(["cp", str(source), str(m / "batch" / name)],
                                  capture_output=True, text=True, timeout=120)  # fmt: skip
            assert copy.returncode == 1 and "No space left on device" in copy.stderr, copy
        stored = {f.filename: f.size_bytes for f in remote_files(sdk, purpose="batch")}
        assert stored == {"old.bin": 300_000}, "a cut copy was stored, or the old one deleted"
        assert (m / "batch" / "old.bin").read_bytes() == b"o" * 300_000
        assert sorted(os.listdir(m / "batch")) == ["old.bin"]
        recovered = list((m.cache_dir / "recovery").glob("*.spool"))
        assert recovered, "what was written before the disk filled is not kept"
