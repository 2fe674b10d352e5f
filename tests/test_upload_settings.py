"""Upload settings: `visibility` and `expiry`, per mount (`--visibility`, `--expiry`,
`-o`) and per file (the xattrs `user.mistral.visibility`, `user.mistral.expiry`), and
the files whose `expires_at` has passed. The filesystem on the in-memory account first
(fast), then real mounts against the emulator, driven by getfattr and setfattr."""

from __future__ import annotations

import errno
import os
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path

import pyfuse3
import pytest
import trio
from conftest import RunningEmulator
from emulator_admin import advance_clock
from fake_api import FakeFilesApi, StoredFile
from fs_driver import ROOT, FsDriver, fast_filesystem
from mistralai.client import Mistral
from mounting import mount, mount_command, remote_files, wait_for

from mistralfs.api import Rejected, RemoteFile
from mistralfs.fs.errors import errno_for
from mistralfs.fs.kept import kept_entries, retry
from mistralfs.fs.upload_settings import UploadSettings, from_note

BLOCK = 64 * 1024
HOUR = 3600
VISIBILITY = b"user.mistral.visibility"
EXPIRY = b"user.mistral.expiry"


@asynccontextmanager
async def stack(
    tmp_path: Path,
    api: FakeFilesApi | None = None,
    defaults: UploadSettings | None = None,
    *,
    read_only: bool = False,
) -> AsyncIterator[tuple[FsDriver, FakeFilesApi]]:
    api = api if api is not None else FakeFilesApi()
    options = {"read_only": read_only, "upload_defaults": defaults or UploadSettings()}
    async with fast_filesystem(api, tmp_path, BLOCK, **options) as ops:
        yield FsDriver(ops, BLOCK), api


def stored(api: FakeFilesApi) -> RemoteFile:
    [one] = [s.remote for s in api.files.values()]
    return one


async def expect_errno(code: int, call: Awaitable[object]) -> None:
    with pytest.raises(pyfuse3.FUSEError) as raised:
        await call
    assert raised.value.errno == code


async def test_the_mounts_settings_go_with_every_new_file(tmp_path: Path) -> None:
    async with stack(tmp_path, defaults=UploadSettings("user", 24)) as (fs, api):
        before = time.time()
        await fs.write_file("batch", "a.jsonl", b"{}\n")
        remote = stored(api)
        assert remote.visibility == "user"
        assert remote.expires_at is not None
        assert before + 24 * HOUR - 5 <= remote.expires_at <= time.time() + 24 * HOUR
        inode = await fs.inode("batch", "a.jsonl")
        assert await fs.ops.getxattr(inode, VISIBILITY, None) == b"user"
        shown = await fs.ops.getxattr(inode, b"user.mistral.expires_at", None)
        assert int(shown) == remote.expires_at
        names = await fs.ops.listxattr(inode, None)
        assert b"user.mistral.expires_at" in names and VISIBILITY in names


async def test_a_setting_given_before_the_first_close_is_the_first_uploads(
    tmp_path: Path,
) -> None:
    async with stack(tmp_path) as (fs, api):
        batch = await fs.folder("batch")
        info, attrs = await fs.ops.create(batch, b"own.jsonl", 0o644, os.O_WRONLY, None)
        await fs.ops.setxattr(attrs.st_ino, VISIBILITY, b"user", None)
        await fs.ops.setxattr(attrs.st_ino, EXPIRY, b"2", None)
        assert await fs.ops.getxattr(attrs.st_ino, VISIBILITY, None) == b"user"
        assert await fs.ops.getxattr(attrs.st_ino, EXPIRY, None) == b"2"
        assert api.calls["upload"] == 0  # nothing to re-upload: not uploaded yet
        await fs.write_and_close(info.fh, b"{}\n")
        remote = stored(api)
        assert api.calls["upload"] == 1
        assert remote.visibility == "user"
        assert remote.expires_at is not None and remote.expires_at - time.time() > HOUR


async def test_a_change_after_the_upload_uploads_again_and_the_same_value_does_not(
    tmp_path: Path,
) -> None:
    async with stack(tmp_path) as (fs, api):
        await fs.write_file("batch", "a.jsonl", b"{}\n")
        first = stored(api)
        assert first.visibility == "workspace"
        inode = await fs.inode("batch", "a.jsonl")
        await fs.ops.setxattr(inode, VISIBILITY, b"workspace", None)
        assert api.calls["upload"] == 1  # what it has already
        await fs.ops.setxattr(inode, VISIBILITY, b"user", None)
        second = stored(api)  # one file: the old version was deleted
        assert api.calls["upload"] == 2 and second.id != first.id
        assert (second.visibility, second.filename, second.purpose) == ("user", "a.jsonl", "batch")
        assert api.files[second.id].content == b"{}\n"
        assert await fs.ops.getxattr(inode, b"user.mistral.id", None) == second.id.encode()
        await fs.ops.setxattr(inode, EXPIRY, b"3", None)
        third = stored(api)
        assert third.expires_at is not None and third.visibility == "user"


async def test_a_changed_file_keeps_its_visibility_and_its_expiry(tmp_path: Path) -> None:
    api = FakeFilesApi()
    expires_at = int(time.time()) + 5 * HOUR - 60
    api.add("a.jsonl", "batch", b"{}\n", expires_at=expires_at, visibility="user")
    async with stack(tmp_path, api, defaults=UploadSettings("workspace", 100)) as (fs, _):
        await fs.append("batch", "a.jsonl", b"{}\n")
        remote = stored(api)
        assert api.files[remote.id].content == b"{}\n{}\n"
        assert remote.visibility == "user"
        # The hours left, rounded up: not the mount's 100 hours.
        assert remote.expires_at is not None and 0 <= remote.expires_at - expires_at <= HOUR


async def test_removing_a_setting_goes_back_to_the_mounts_and_none_never_expires(
    tmp_path: Path,
) -> None:
    async with stack(tmp_path, defaults=UploadSettings(expiry=24)) as (fs, api):
        batch = await fs.folder("batch")
        info, attrs = await fs.ops.create(batch, b"keep.jsonl", 0o644, os.O_WRONLY, None)
        assert await fs.ops.getxattr(attrs.st_ino, EXPIRY, None) == b"24"  # the mount's
        await fs.ops.setxattr(attrs.st_ino, EXPIRY, b"none", None)
        await fs.write_and_close(info.fh, b"{}\n")
        assert stored(api).expires_at is None
        await fs.ops.removexattr(attrs.st_ino, EXPIRY, None)  # back to the mount's: again
        assert stored(api).expires_at is not None and api.calls["upload"] == 2


async def test_bad_values_and_other_names_are_refused_with_their_errno(tmp_path: Path) -> None:
    async with stack(tmp_path) as (fs, api):
        await fs.write_file("batch", "a.jsonl", b"{}\n")
        inode = await fs.inode("batch", "a.jsonl")
        for name, value in [(VISIBILITY, b"everyone"), (EXPIRY, b"0"), (EXPIRY, b"soon")]:
            await expect_errno(errno.EINVAL, fs.ops.setxattr(inode, name, value, None))
        await expect_errno(errno.ENOTSUP, fs.ops.setxattr(inode, b"user.mistral.id", b"x", None))
        await expect_errno(errno.ENOTSUP, fs.ops.setxattr(ROOT, VISIBILITY, b"user", None))
        assert api.calls["upload"] == 1 and stored(api).visibility == "workspace"
    async with stack(tmp_path, api, read_only=True) as (fs, _):
        inode = await fs.inode("batch", "a.jsonl")
        await expect_errno(errno.EROFS, fs.ops.setxattr(inode, VISIBILITY, b"user", None))


class SlowToForget(FakeFilesApi):
    """A service that still lists a file for a while after its `expires_at`."""

    def _gone(self, stored: StoredFile) -> bool:
        return False


async def test_a_file_past_its_expiry_drops_at_the_next_listing(tmp_path: Path) -> None:
    api = SlowToForget()
    soon = api.add("soon.jsonl", "batch", b"{}\n", expires_at=int(time.time()) + 1)
    api.add("kept.jsonl", "batch", b"{}\n")
    async with stack(tmp_path, api) as (fs, _):
        assert await fs.names("batch") == ["kept.jsonl", "soon.jsonl"]
        assert soon.expires_at is not None
        await trio.sleep(max(0.0, soon.expires_at - time.time()) + 0.05)
        assert await fs.names("batch") == ["kept.jsonl"]


# -- real mounts --------------------------------------------------------------------


def setfattr(path: Path, name: str, value: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setfattr", "-n", name, "-v", value, str(path)], capture_output=True, text=True
    )


def getfattr(path: Path, name: str) -> str:
    out = subprocess.run(
        ["getfattr", "--only-values", "-n", name, str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout


@pytest.mark.fuse
def test_mount_options_set_what_uploads_ask_for(
    emulator_process: RunningEmulator, tmp_path: Path, sdk: Mistral
) -> None:
    with mount(emulator_process, tmp_path, "--visibility", "user", "-o", "expiry=5") as m:
        (m / "batch" / "a.jsonl").write_bytes(b"{}\n")
        [remote] = remote_files(sdk)
        assert remote.visibility == "user"
        assert remote.expires_at is not None
        assert remote.expires_at - remote.created_at == 5 * HOUR
        assert getfattr(m / "batch" / "a.jsonl", "user.mistral.visibility") == "user"
        shown = getfattr(m / "batch" / "a.jsonl", "user.mistral.expires_at")
        assert int(shown) == remote.expires_at


@pytest.mark.fuse
def test_bad_option_values_are_said_clearly(
    emulator_process: RunningEmulator, tmp_path: Path
) -> None:
    command, env, _ = mount_command(emulator_process, tmp_path)
    for extra, said in [
        (["--visibility", "everyone"], "invalid visibility 'everyone': use workspace or user"),
        (["-o", "expiry=soon"], "invalid expiry 'soon'"),
        (["--expiry", "0"], "invalid expiry '0'"),
    ]:
        result = subprocess.run([*command, *extra], env=env, capture_output=True, text=True)
        assert result.returncode == 2 and said in result.stderr, result.stderr


@pytest.mark.fuse
def test_setfattr_on_a_new_file_then_after_its_upload(
    emulator_process: RunningEmulator, tmp_path: Path, sdk: Mistral
) -> None:
    with mount(emulator_process, tmp_path) as m:
        path = m / "batch" / "own.jsonl"
        # A new file, open: the setting goes with its first upload.
        script = f'exec 3>"{path}"; setfattr -n user.mistral.visibility -v user "{path}"'
        script += f' && setfattr -n user.mistral.expiry -v 2 "{path}"; echo "{{}}" >&3; exec 3>&-'
        subprocess.run(["bash", "-c", script], check=True, timeout=30)
        [first] = remote_files(sdk)
        assert (first.visibility, first.filename) == ("user", "own.jsonl")
        assert first.expires_at is not None and first.expires_at - first.created_at == 2 * HOUR
        assert getfattr(path, "user.mistral.expiry") == "2"
        # After the upload: a change is a re-upload, the old version deleted.
        assert setfattr(path, "user.mistral.visibility", "workspace").returncode == 0
        [second] = remote_files(sdk)
        assert second.id != first.id and second.visibility == "workspace"
        assert sdk.files.download(file_id=second.id).read() == b"{}\n"
        bad = setfattr(path, "user.mistral.visibility", "everyone")
        assert bad.returncode != 0 and "Invalid argument" in bad.stderr
        [same] = remote_files(sdk)
        assert same.id == second.id


@pytest.mark.fuse
def test_an_expired_file_leaves_the_mount_at_the_next_listing(
    emulator_process: RunningEmulator, tmp_path: Path, sdk: Mistral
) -> None:
    with mount(emulator_process, tmp_path, "--dir-cache-time", "0.5") as m:
        (m / "batch" / "brief.jsonl").write_bytes(b"{}\n")
        assert setfattr(m / "batch" / "brief.jsonl", "user.mistral.expiry", "1").returncode == 0
        (m / "batch" / "kept.jsonl").write_bytes(b"{}\n")
        assert sorted(os.listdir(m / "batch")) == ["brief.jsonl", "kept.jsonl"]
        advance_clock(emulator_process.url, emulator_process.api_key, 2 * HOUR)
        wait_for(lambda: os.listdir(m / "batch") == ["kept.jsonl"], timeout=5)
        assert [f.filename for f in remote_files(sdk)] == ["kept.jsonl"]


@pytest.mark.fuse
def test_a_setting_given_while_a_large_file_is_written_goes_with_it(
    emulator_process: RunningEmulator, tmp_path: Path, sdk: Mistral
) -> None:
    """A new file of more than 4 MiB starts uploading while it is written: a setting given
    then stops that upload, and the file is sent whole, with it, at close."""
    data = tmp_path / "big.bin"
    data.write_bytes(os.urandom(6 * 1024 * 1024))
    with mount(emulator_process, tmp_path) as m:
        path = m / "batch" / "big.bin"
        script = f'exec 3>"{path}"; cat "{data}" >&3; '
        script += f'setfattr -n user.mistral.visibility -v user "{path}"; exec 3>&-'
        subprocess.run(["bash", "-c", script], check=True, timeout=60)
        [remote] = remote_files(sdk)
        assert (remote.filename, remote.visibility, remote.size_bytes) == (
            "big.bin",
            "user",
            6 * 1024 * 1024,
        )
        assert sdk.files.download(file_id=remote.id).read() == data.read_bytes()


@pytest.mark.logs_expected
async def test_a_re_upload_that_fails_leaves_the_file_as_the_account_has_it(
    tmp_path: Path,
) -> None:
    async with stack(tmp_path) as (fs, api):
        await fs.write_file("batch", "a.jsonl", b"{}\n")
        inode = await fs.inode("batch", "a.jsonl")
        refusal = Rejected("Invalid file", status=400, method="POST", url="/")
        api.fail_next("upload", refusal)
        await expect_errno(errno_for(refusal), fs.ops.setxattr(inode, VISIBILITY, b"user", None))
        assert stored(api).visibility == "workspace"
        assert await fs.ops.getxattr(inode, VISIBILITY, None) == b"workspace"
        assert await fs.read_file("batch", "a.jsonl") == b"{}\n"


@pytest.mark.logs_expected
async def test_a_files_own_settings_go_with_its_kept_content_and_its_retry(
    tmp_path: Path,
) -> None:
    """A failed upload keeps the content and its note; the note keeps the file's own
    settings, so `mistralfs recovery retry` (and the next mount after a crash) send
    them, not the service's defaults."""
    async with stack(tmp_path, defaults=UploadSettings("workspace", 24)) as (fs, api):
        batch = await fs.folder("batch")
        info, attrs = await fs.ops.create(batch, b"own.jsonl", 0o644, os.O_WRONLY, None)
        await fs.ops.setxattr(attrs.st_ino, VISIBILITY, b"user", None)
        await fs.ops.setxattr(attrs.st_ino, EXPIRY, b"2", None)
        api.fail_next("upload", Rejected("the service is refusing today", status=400))
        with pytest.raises(pyfuse3.FUSEError):
            await fs.write_and_close(info.fh, b"{}\n")
    [entry] = kept_entries(tmp_path / "recovery")
    assert entry.settings == UploadSettings("user", 2)
    retried = FakeFilesApi()  # the account, later
    before = time.time()
    remote = await retry(retried, entry)
    assert remote.visibility == "user"
    assert remote.expires_at is not None
    assert before + 2 * HOUR - 5 <= remote.expires_at <= time.time() + 2 * HOUR


def test_a_note_from_another_version_or_a_damaged_one_leaves_the_defaults() -> None:
    defaults = UploadSettings("workspace", 24)
    assert from_note({}, defaults, 0.0) == defaults
    odd = {"visibility": "everyone", "expiry": True, "expires_at": "soon"}
    assert from_note(odd, defaults, 0.0) == defaults
    kept = {"visibility": "user", "expiry": None, "expires_at": 3 * HOUR + 1}
    assert from_note(kept, defaults, 0.0) == UploadSettings("user", 4)  # hours left, up
