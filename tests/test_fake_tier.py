"""The fast tier: the whole filesystem (`Operations` over `Filesystem`, as the mount
wires them with `build_filesystem`) on an account in memory (fake_api.py), no HTTP and
no kernel. The same behaviours are checked against the emulator and through real
mounts elsewhere; here they run in milliseconds, so that a change to `fs/` is tried
against many cases at once."""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import pytest
import trio
from fake_api import FakeFilesApi
from fs_driver import FsDriver, fast_filesystem

from mistralfs.api import ServerError

BLOCK = 64 * 1024


@dataclass
class FakeStack(FsDriver):
    api: FakeFilesApi = field(default_factory=FakeFilesApi)
    cache_dir: Path = Path()


@pytest.fixture
async def fake(tmp_path: Path) -> AsyncIterator[FakeStack]:
    api = FakeFilesApi()
    async with fast_filesystem(api, tmp_path, BLOCK) as ops:
        yield FakeStack(ops, BLOCK, api, tmp_path)


async def test_a_written_file_is_stored_once_and_reads_back(fake: FakeStack) -> None:
    data = os.urandom(5 * BLOCK + 17)  # read back through ranges, block by block
    await fake.write_file("batch", "data.bin", data)
    assert fake.api.held() == {("batch", "data.bin"): [data]}
    assert fake.api.calls["upload"] == 1
    assert await fake.read_file("batch", "data.bin") == data


async def test_an_overwrite_replaces_the_stored_file(fake: FakeStack) -> None:
    await fake.write_file("batch", "a.txt", b"first")
    await fake.write_file("batch", "a.txt", b"second, longer")
    assert fake.api.held() == {("batch", "a.txt"): [b"second, longer"]}
    assert await fake.read_file("batch", "a.txt") == b"second, longer"


async def test_a_rename_across_folders_stores_it_under_the_new_purpose(fake: FakeStack) -> None:
    await fake.write_file("batch", "t.jsonl", b'{"a": 1}\n')
    batch, fine_tune = await fake.folder("batch"), await fake.folder("fine-tune")
    await fake.ops.rename(batch, b"t.jsonl", fine_tune, b"u.jsonl", 0, None)
    assert fake.api.held() == {("fine-tune", "u.jsonl"): [b'{"a": 1}\n']}
    assert await fake.names("batch") == [] and await fake.names("fine-tune") == ["u.jsonl"]


@pytest.mark.logs_expected
async def test_refused_content_fails_the_close_and_is_kept(fake: FakeStack) -> None:
    with pytest.raises(pyfuse3.FUSEError) as raised:
        await fake.write_file("fine-tune", "bad.jsonl", b"not json\n")
    assert raised.value.errno == errno.EBADMSG
    assert fake.api.held() == {}
    kept = list((fake.cache_dir / "recovery").glob("*.spool"))
    assert [path.read_bytes() for path in kept] == [b"not json\n"]


async def test_a_file_added_elsewhere_is_listed_and_read(fake: FakeStack) -> None:
    fake.api.add("results.jsonl", "batch", b'{"ok": true}\n')
    assert await fake.names("batch") == ["results.jsonl"]
    assert await fake.read_file("batch", "results.jsonl") == b'{"ok": true}\n'
    assert fake.api.calls["content"] == 1  # a small file: one request


@pytest.mark.logs_expected
async def test_unlink_deletes_the_remote_file_and_a_failure_keeps_the_name(
    fake: FakeStack,
) -> None:
    await fake.write_file("batch", "x.bin", b"x")
    batch = await fake.folder("batch")
    fake.api.fail_next("delete", ServerError("down", status=503))
    with pytest.raises(pyfuse3.FUSEError) as raised:
        await fake.ops.unlink(batch, b"x.bin", None)
    assert raised.value.errno == errno.EIO
    assert await fake.names("batch") == ["x.bin"]  # the file is still there, and shown
    await fake.ops.unlink(batch, b"x.bin", None)
    assert fake.api.held() == {} and await fake.names("batch") == []


async def test_small_files_read_in_name_order_are_fetched_many_at_once(fake: FakeStack) -> None:
    """`cat *` on a long link waits on round trips, not bytes: the files that follow are
    fetched ahead, up to 32 at once (as many as the transport's connections to a host)."""
    fake.api.latency = 0.05
    for index in range(150):
        fake.api.add(f"f{index:03}.txt", "batch", b"file %d" % index)
    with trio.fail_after(3):  # one by one: 7.5 s; 8 at a time: about 1 s
        for index in range(150):
            assert await fake.read_file("batch", f"f{index:03}.txt") == b"file %d" % index
    assert fake.api.calls["content"] == 150  # each file fetched once
    assert 8 < fake.api.peak_in_flight["content"] <= 32
