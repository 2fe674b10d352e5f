"""Scratch files (swap files, temp files, lock files, backups) live only in the local
spool: on the account in memory (fake_api.py), as test_fake_tier.py runs the filesystem,
each tool's sequence of calls and the uploads and deletes it costs."""

# ruff: noqa: F811 - `fake`, the fast tier's fixture, is imported and then asked for

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pyfuse3
import pytest
from conftest import RunningEmulator
from fake_api import FakeFilesApi
from fs_driver import FsDriver
from mistralai.client import Mistral
from mounting import mount
from test_fake_tier import FakeStack, fake  # noqa: F401 - the fast tier's fixture

from mistralfs.config import ConfigError, options_to_args, parse_local_names
from mistralfs.fs.names import DEFAULT_LOCAL_NAMES, LocalNames
from mistralfs.fs.recovery import leftover_spools, recover

JSONL = b'{"messages": [{"role": "user", "content": "hi"}]}\n'


async def create_written(fake: FsDriver, folder: str, name: str, data: bytes) -> None:
    """As a tool makes its temp file: O_CREAT|O_EXCL, write, close."""
    parent = await fake.folder(folder)
    info, _ = await fake.ops.create(parent, name.encode(), 0o600, os.O_RDWR | os.O_EXCL, None)
    await fake.write_and_close(info.fh, data)


async def rename(fake: FsDriver, folder: str, old: str, new: str) -> None:
    parent = await fake.folder(folder)
    await fake.ops.rename(parent, old.encode(), parent, new.encode(), 0, None)


async def unlink(fake: FsDriver, folder: str, name: str) -> None:
    await fake.ops.unlink(await fake.folder(folder), name.encode(), None)


# -- the patterns ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [".notes.jsonl.swp", ".notes.jsonl.swx", ".x.swo", "4913", "notes.jsonl~",
     "sedAb3xZ9", "sed000000", ".train.jsonl.Xy12aB", "..env.q1W2e3",
     ".~lock.report.odt#", "#notes.txt#", ".#notes.txt", ".goutputstream-A1b2C3"],
)  # fmt: skip
def test_the_default_patterns_catch_each_tools_scratch_names(name: str) -> None:
    assert name in LocalNames(DEFAULT_LOCAL_NAMES)


@pytest.mark.parametrize(
    "name",
    ["train.jsonl", "notes.txt", ".env", ".hidden.jsonl", "sediment.jsonl", "sed12345",
     "sed1234567", "sed12345.", ".notes.swap", "4913.jsonl", "49130", "backup.tar.gz",
     ".config.yml", ".data.parquet", ".report.pdf", "~notes", "lock.report.odt#",
     "batch_results (a1b2c3d4).jsonl", ".goutputstream-abc"],
)  # fmt: skip
def test_the_default_patterns_leave_real_names_alone(name: str) -> None:
    assert name not in LocalNames(DEFAULT_LOCAL_NAMES)


def test_the_option_replaces_the_list_and_default_brings_it_back() -> None:
    assert parse_local_names("*.tmp/*.part") == ("*.tmp", "*.part")
    assert parse_local_names("") == ()
    assert parse_local_names("default/*.tmp") == (*DEFAULT_LOCAL_NAMES, "*.tmp")
    assert options_to_args("local_names=*.tmp/default,ro") == [
        "--local-names", "*.tmp/default", "--read-only"
    ]  # fmt: skip
    with pytest.raises(ConfigError, match="empty pattern"):
        parse_local_names("*.tmp//x")
    assert "x.tmp" in LocalNames(("*.tmp",)) and ".a.swp" not in LocalNames(("*.tmp",))


# -- living in the spool -----------------------------------------------------------------


async def test_a_scratch_file_is_a_file_that_is_never_uploaded(fake: FakeStack) -> None:
    await create_written(fake, "batch", ".notes.jsonl.swp", b"swap " * 1000)
    assert await fake.names("batch") == [".notes.jsonl.swp"]
    assert await fake.read_file("batch", ".notes.jsonl.swp") == b"swap " * 1000
    await fake.append("batch", ".notes.jsonl.swp", b"more")  # written again, read again
    assert await fake.read_file("batch", ".notes.jsonl.swp") == b"swap " * 1000 + b"more"
    inode = await fake.inode("batch", ".notes.jsonl.swp")
    assert (await fake.ops.getattr(inode)).st_size == 5004
    assert fake.api.calls["upload"] == 0 and fake.api.held() == {}
    await unlink(fake, "batch", ".notes.jsonl.swp")
    assert await fake.names("batch") == []
    assert fake.api.calls["upload"] == fake.api.calls["delete"] == 0
    assert list((fake.cache_dir / "spool").iterdir()) == []  # its spool went with it
    assert not (fake.cache_dir / "recovery").exists()


async def test_content_a_purpose_would_refuse_is_no_failure_in_a_scratch_file(
    fake: FakeStack,
) -> None:
    """vim's swap file in fine-tune/ is not JSON: it was refused, logged 4 ERROR lines and
    kept in recovery/. As a scratch file it is never sent (no log line is expected here)."""
    await create_written(fake, "fine-tune", ".train.jsonl.swp", b"\x00b0VIM 9.0\x00" * 100)
    assert await fake.read_file("fine-tune", ".train.jsonl.swp") == b"\x00b0VIM 9.0\x00" * 100
    await unlink(fake, "fine-tune", ".train.jsonl.swp")
    assert fake.api.calls["upload"] == 0
    assert not (fake.cache_dir / "recovery").exists()


async def test_truncating_a_scratch_file_without_a_descriptor_uploads_nothing(
    fake: FakeStack,
) -> None:
    await create_written(fake, "batch", "draft.txt~", b"0123456789")
    inode = await fake.inode("batch", "draft.txt~")
    await fake.ops.fs.setattr(inode, 4, None)  # `truncate -s 4 PATH`
    assert await fake.read_file("batch", "draft.txt~") == b"0123"
    assert fake.api.calls["upload"] == 0


async def test_an_overwrite_of_a_scratch_file_keeps_only_the_new_content(fake: FakeStack) -> None:
    await create_written(fake, "batch", ".~lock.report.odt#", b"first owner, long")
    await fake.write_file("batch", ".~lock.report.odt#", b"second")
    assert await fake.read_file("batch", ".~lock.report.odt#") == b"second"
    assert len(list((fake.cache_dir / "spool").glob("*.spool"))) == 1  # the old one went
    assert fake.api.calls["upload"] == 0


# -- renames: how tools save -------------------------------------------------------------


async def test_sed_i_uploads_the_new_content_once_and_deletes_the_old(fake: FakeStack) -> None:
    """sed -i: write ./sedXXXXXX, close it, rename it over the file."""
    await fake.write_file("fine-tune", "train.jsonl", JSONL)
    [old_id] = fake.api.files
    uploads = fake.api.calls["upload"]
    edited = JSONL.replace(b"hi", b"ho")
    await create_written(fake, "fine-tune", "sedK3x9Qa", edited)
    assert fake.api.calls["upload"] == uploads  # the temp file is not sent
    await rename(fake, "fine-tune", "sedK3x9Qa", "train.jsonl")
    assert fake.api.calls["upload"] == uploads + 1
    assert fake.api.held() == {("fine-tune", "train.jsonl"): [edited]}
    assert old_id not in fake.api.files and fake.api.calls["delete"] == 1
    assert await fake.names("fine-tune") == ["train.jsonl"]
    assert await fake.read_file("fine-tune", "train.jsonl") == edited
    assert list((fake.cache_dir / "spool").glob("*.spool")) == []


async def test_rsync_copies_each_file_with_one_upload(fake: FakeStack) -> None:
    """rsync: .NAME.XXXXXX written and closed, then renamed to NAME (new or existing)."""
    await fake.write_file("batch", "b.jsonl", b"old b\n")
    uploads = fake.api.calls["upload"]
    for name, temp in [("a.jsonl", ".a.jsonl.Ab12Cd"), ("b.jsonl", ".b.jsonl.Zz99yY"),
                       ("empty.jsonl", ".empty.jsonl.q1w2e3")]:  # fmt: skip
        await create_written(fake, "batch", temp, b"" if "empty" in name else name.encode())
        await rename(fake, "batch", temp, name)
    assert fake.api.calls["upload"] == uploads + 3
    assert fake.api.calls["delete"] == 1  # the old b.jsonl
    assert fake.api.held() == {
        ("batch", "a.jsonl"): [b"a.jsonl"],
        ("batch", "b.jsonl"): [b"b.jsonl"],
        ("batch", "empty.jsonl"): [b""],
    }
    assert await fake.names("batch") == ["a.jsonl", "b.jsonl", "empty.jsonl"]


async def test_a_vim_save_costs_one_upload_and_one_delete(fake: FakeStack) -> None:
    """vim: swap file, probe 4913, rename the file to its backup NAME~, write NAME anew,
    remove the backup and the swap file."""
    await fake.write_file("batch", "notes.jsonl", b'{"n": 1}\n')
    [old_id] = fake.api.files
    uploads, deletes = fake.api.calls["upload"], fake.api.calls["delete"]
    await create_written(fake, "batch", ".notes.jsonl.swp", b"swap")
    await create_written(fake, "batch", ".notes.jsonl.swx", b"")
    await unlink(fake, "batch", ".notes.jsonl.swx")
    await create_written(fake, "batch", "4913", b"")
    await unlink(fake, "batch", "4913")
    await rename(fake, "batch", "notes.jsonl", "notes.jsonl~")
    assert fake.api.calls["upload"] == uploads and fake.api.calls["delete"] == deletes
    assert await fake.read_file("batch", "notes.jsonl~") == b'{"n": 1}\n'
    await create_written(fake, "batch", "notes.jsonl", b'{"n": 2}\n')
    await unlink(fake, "batch", "notes.jsonl~")
    await unlink(fake, "batch", ".notes.jsonl.swp")
    assert fake.api.calls["upload"] == uploads + 1
    assert fake.api.calls["delete"] == deletes + 1 and old_id not in fake.api.files
    assert fake.api.held() == {("batch", "notes.jsonl"): [b'{"n": 2}\n']}
    assert await fake.names("batch") == ["notes.jsonl"]


async def test_a_backup_renamed_back_costs_nothing(fake: FakeStack) -> None:
    """A failed save puts the backup back: the account held it under that name all along."""
    await fake.write_file("batch", "notes.jsonl", b'{"n": 1}\n')
    uploads = fake.api.calls["upload"]
    await rename(fake, "batch", "notes.jsonl", "notes.jsonl~")
    await rename(fake, "batch", "notes.jsonl~", "notes.jsonl")
    assert fake.api.calls["upload"] == uploads and fake.api.calls["delete"] == 0
    assert await fake.read_file("batch", "notes.jsonl") == b'{"n": 1}\n'


async def test_a_scratch_file_renamed_while_open_is_uploaded_once_at_close(
    fake: FakeStack,
) -> None:
    batch = await fake.folder("batch")
    info, _ = await fake.ops.create(batch, b".goutputstream-Q1w2E3", 0o644, os.O_WRONLY, None)
    await fake.ops.write(info.fh, 0, b"saved")
    await rename(fake, "batch", ".goutputstream-Q1w2E3", "notes.txt")
    assert fake.api.calls["upload"] == 0  # still being written: uploaded when closed
    await fake.ops.flush(info.fh)
    await fake.ops.release(info.fh)
    assert fake.api.calls["upload"] == 1
    assert fake.api.held() == {("batch", "notes.txt"): [b"saved"]}


async def test_a_rename_onto_a_scratch_name_drops_the_scratch_file(fake: FakeStack) -> None:
    await create_written(fake, "batch", "a.txt~", b"scratch")
    await create_written(fake, "batch", "b.txt~", b"other scratch")
    await rename(fake, "batch", "b.txt~", "a.txt~")
    assert await fake.names("batch") == ["a.txt~"]
    assert await fake.read_file("batch", "a.txt~") == b"other scratch"
    assert len(list((fake.cache_dir / "spool").glob("*.spool"))) == 1
    assert fake.api.calls["upload"] == 0


@pytest.mark.logs_expected
async def test_a_scratch_file_refused_under_its_real_name_fails_the_rename(
    fake: FakeStack,
) -> None:
    await create_written(fake, "fine-tune", "sedAAAAAA", b"not json\n")
    with pytest.raises(pyfuse3.FUSEError) as raised:
        await rename(fake, "fine-tune", "sedAAAAAA", "train.jsonl")
    assert raised.value.errno == errno.EBADMSG
    assert await fake.names("fine-tune") == ["sedAAAAAA"]  # nothing changed
    assert fake.api.held() == {}


# -- the end of the mount ------------------------------------------------------------------


async def test_after_a_crash_scratch_files_are_dropped_not_uploaded(
    fake: FakeStack, tmp_path: Path
) -> None:
    await create_written(fake, "batch", ".notes.jsonl.swp", b"swap")
    [note] = (tmp_path / "spool").glob("*.json")
    assert json.loads(note.read_text())["local"] is True
    api = FakeFilesApi()  # the next mount's
    await recover(api, leftover_spools(tmp_path / "spool"), tmp_path / "recovery")
    assert api.calls["upload"] == 0
    assert list((tmp_path / "spool").iterdir()) == []
    assert not (tmp_path / "recovery").exists()


# -- the option on a real mount --------------------------------------------------------


@pytest.mark.fuse
def test_the_option_reaches_a_background_daemon(
    emulator_process: RunningEmulator, sdk: Mistral, tmp_path: Path
) -> None:
    """`mistralfs mount` starts its daemon in the background by default: the list given
    on its command line is the one that daemon uses (the default list no longer holds
    `.swp` once `--local-names '*.tmp'` replaces it)."""
    with mount(emulator_process, tmp_path, "--local-names", "*.tmp") as mounted:
        (mounted / "batch" / "draft.tmp").write_bytes(b"scratch\n")
        (mounted / "batch" / ".notes.swp").write_bytes(b"not scratch now\n")
        names = {entry.name for entry in (mounted / "batch").iterdir()}
        assert {"draft.tmp", ".notes.swp"} <= names
        stored = {f.filename for f in sdk.files.list(page_size=100).data}
    assert ".notes.swp" in stored
    assert "draft.tmp" not in stored
