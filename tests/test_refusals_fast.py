"""Refused uploads on the fast tier (an account in memory, no kernel): the name that
keeps the refused content, what replaces or removes it, and the events the daemon
hears (`on_refused`). The same is checked with real tools in test_refusals.py."""

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
from fs_driver import FsDriver, fast_options

from mistralfs.fs.build import build_filesystem
from mistralfs.fs.kept import discard, kept_entries
from mistralfs.fs.operations import Operations
from mistralfs.fs.refusals import UploadRefused

pytestmark = pytest.mark.logs_expected

BLOCK = 64 * 1024
BROKEN = b"not json\n"
GOOD = b'{"a": 1}\n'  # as long as BROKEN


@dataclass
class Stack(FsDriver):
    api: FakeFilesApi = field(default_factory=FakeFilesApi)
    recovery: Path = Path()
    events: list[UploadRefused] = field(default_factory=list)

    async def refused_write(self, folder: str, name: str, data: bytes) -> None:
        with pytest.raises(pyfuse3.FUSEError) as raised:
            await self.write_file(folder, name, data)
        assert raised.value.errno == errno.EBADMSG

    async def error_xattr(self, folder: str, name: str) -> bytes:
        return await self.ops.getxattr(await self.inode(folder, name), b"user.mistral.error", None)


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    api = FakeFilesApi()
    api.refusals["ocr"] = lambda data: None if data.startswith(b"%PDF") else "Not a document"
    options = fast_options(tmp_path, BLOCK)
    events: list[UploadRefused] = []
    async with trio.open_nursery() as nursery:
        parts = build_filesystem(api, nursery, options, on_refused=events.append)
        yield Stack(Operations(parts.fs), BLOCK, api, tmp_path / "recovery", events)
        nursery.cancel_scope.cancel()


async def test_the_refused_name_stays_reads_back_and_is_heard(stack: Stack) -> None:
    await stack.refused_write("fine-tune", "t.jsonl", BROKEN)
    assert await stack.names("fine-tune") == ["t.jsonl"]
    assert await stack.read_file("fine-tune", "t.jsonl") == BROKEN
    [entry] = kept_entries(stack.recovery)
    assert (entry.purpose, entry.filename) == ("fine-tune", "t.jsonl")
    assert entry.error is not None and entry.error.startswith("400 ")
    assert await stack.error_xattr("fine-tune", "t.jsonl") == entry.error.encode()
    assert stack.events == [UploadRefused("fine-tune/t.jsonl", entry.error, kept=entry.id)]
    assert stack.api.held() == {}


async def test_an_accepted_overwrite_replaces_what_was_kept(stack: Stack) -> None:
    await stack.refused_write("fine-tune", "t.jsonl", BROKEN)
    await stack.refused_write("fine-tune", "t.jsonl", BROKEN + BROKEN)
    [entry] = kept_entries(stack.recovery)  # the name keeps its last refused version
    assert entry.size == 2 * len(BROKEN)
    await stack.write_file("fine-tune", "t.jsonl", GOOD)
    assert kept_entries(stack.recovery) == []
    assert stack.api.held() == {("fine-tune", "t.jsonl"): [GOOD]}
    with pytest.raises(pyfuse3.FUSEError) as raised:
        await stack.error_xattr("fine-tune", "t.jsonl")
    assert raised.value.errno == errno.ENODATA


async def test_an_edit_in_place_starts_from_what_was_kept(stack: Stack) -> None:
    await stack.refused_write("fine-tune", "t.jsonl", BROKEN)
    info = await stack.ops.open(await stack.inode("fine-tune", "t.jsonl"), os.O_RDWR, None)
    assert await stack.ops.read(info.fh, 0, 100) == BROKEN
    await stack.write_and_close(info.fh, GOOD)
    assert stack.api.held() == {("fine-tune", "t.jsonl"): [GOOD]}
    assert kept_entries(stack.recovery) == []


async def test_an_entry_discarded_elsewhere_takes_the_name_with_it(stack: Stack) -> None:
    await stack.refused_write("ocr", "a.txt", b"text\n")
    [entry] = kept_entries(stack.recovery)
    discard(entry)  # as `mistralfs recovery discard` does, with the mount running
    assert await stack.names("ocr") == []


async def test_a_refused_rename_is_heard_with_its_source_and_target(stack: Stack) -> None:
    await stack.write_file("batch", "a.txt", b"text\n")
    batch, ocr = await stack.folder("batch"), await stack.folder("ocr")
    with pytest.raises(pyfuse3.FUSEError) as raised:
        await stack.ops.rename(batch, b"a.txt", ocr, b"a.txt", 0, None)
    assert raised.value.errno == errno.EBADMSG
    [event] = stack.events
    assert (event.where, event.renamed_from, event.kept) == ("ocr/a.txt", "batch/a.txt", None)
    assert kept_entries(stack.recovery) == []
    assert stack.api.calls["upload"] == 2  # the write, and one attempt of the rename
