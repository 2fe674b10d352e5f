"""Files whose `source` is `repository`: the service serves them but does not let anyone
delete or replace them, so the mount shows them read-only and refuses every change
before asking the service. The filesystem on the in-memory account first, then a real
mount against the emulator, with the real tools."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pyfuse3
import pytest
from conftest import RunningEmulator
from emulator_admin import add_file
from fake_api import FakeFilesApi
from fs_driver import FsDriver, fast_filesystem
from mistralai.client import Mistral
from mounting import mount

BLOCK = 64 * 1024
CONTENT = b'{"messages": [{"role": "user", "content": "from a repository"}]}\n'


async def test_a_repository_file_reads_but_every_change_is_refused_before_any_request(
    tmp_path: Path,
) -> None:
    api = FakeFilesApi()
    api.add("repo.jsonl", "fine-tune", CONTENT, source="repository")
    async with fast_filesystem(api, tmp_path, BLOCK) as ops:
        fs = FsDriver(ops, BLOCK)
        folder = await fs.folder("fine-tune")
        inode = await fs.inode("fine-tune", "repo.jsonl")
        attrs = await ops.getattr(inode, None)
        assert stat.S_IMODE(attrs.st_mode) == 0o444
        info = await ops.open(inode, os.O_RDONLY, None)
        assert await ops.read(info.fh, 0, len(CONTENT)) == CONTENT
        await ops.release(info.fh)

        before = len(api.calls)
        refusals = [
            ops.open(inode, os.O_WRONLY, None),
            ops.open(inode, os.O_RDONLY | os.O_TRUNC, None),
            ops.unlink(folder, b"repo.jsonl", None),
            ops.rename(folder, b"repo.jsonl", folder, b"renamed.jsonl", 0, None),
            ops.setxattr(inode, b"user.mistral.visibility", b"user", None),
        ]
        for call in refusals:
            with pytest.raises(pyfuse3.FUSEError) as raised:
                await call
            assert raised.value.errno == errno.EPERM
        entry = pyfuse3.EntryAttributes()
        entry.st_size = 0
        # pyfuse3's SetattrFields is read-only
        fields = SimpleNamespace(update_size=True, update_atime=False, update_mtime=False)
        with pytest.raises(pyfuse3.FUSEError) as raised:
            await ops.setattr(inode, entry, fields, None, None)
        assert raised.value.errno == errno.EPERM
        assert len(api.calls) == before  # refused here, not by the service
        assert [s.remote.filename for s in api.files.values()] == ["repo.jsonl"]


async def test_nothing_replaces_a_repository_file_by_renaming_onto_it(tmp_path: Path) -> None:
    api = FakeFilesApi()
    api.add("repo.jsonl", "fine-tune", CONTENT, source="repository")
    async with fast_filesystem(api, tmp_path, BLOCK) as ops:
        fs = FsDriver(ops, BLOCK)
        await fs.write_file("fine-tune", "mine.jsonl", CONTENT)
        folder = await fs.folder("fine-tune")
        with pytest.raises(pyfuse3.FUSEError) as raised:
            await ops.rename(folder, b"mine.jsonl", folder, b"repo.jsonl", 0, None)
        assert raised.value.errno == errno.EPERM
        assert sorted(s.remote.filename for s in api.files.values()) == [
            "mine.jsonl",
            "repo.jsonl",
        ]


@pytest.mark.fuse
def test_tools_see_a_repository_file_read_only(
    emulator_process: RunningEmulator, sdk: Mistral, tmp_path: Path
) -> None:
    url, key = emulator_process.url, emulator_process.api_key
    add_file(url, key, CONTENT, "repo.jsonl", purpose="fine-tune", source="repository")
    with mount(emulator_process, tmp_path) as mounted:
        path = mounted / "fine-tune" / "repo.jsonl"
        listing = subprocess.run(["ls", "-l", str(path)], capture_output=True, text=True)
        assert listing.stdout.startswith("-r--r--r--"), listing.stdout
        assert path.read_bytes() == CONTENT
        removed = subprocess.run(["rm", "-f", str(path)], capture_output=True, text=True)
        assert removed.returncode != 0
        assert "Operation not permitted" in removed.stderr
        moved = subprocess.run(
            ["mv", str(path), str(mounted / "batch" / "repo.jsonl")], capture_output=True, text=True
        )
        assert moved.returncode != 0
        assert "Operation not permitted" in moved.stderr
        with pytest.raises(PermissionError):
            path.write_bytes(b"{}\n")
        assert path.read_bytes() == CONTENT
    [kept] = [f for f in sdk.files.list(page_size=100).data if f.filename == "repo.jsonl"]
    assert kept.source == "repository"
