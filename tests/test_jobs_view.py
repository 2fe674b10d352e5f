"""jobs/: the account's batch jobs, read-only, one folder per job (fs/jobs.py).

The filesystem on the in-memory account first (fast), then real mounts against the
emulator, whose batch jobs run on a fake model, with ls, cat, cp and find."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import stat
import subprocess
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace

import pyfuse3
import pytest
import trio
import trio.testing
from conftest import RunningEmulator
from fake_api import FakeFilesApi
from fs_driver import ROOT, FsDriver, fast_filesystem
from mistralai.client import Mistral
from mounting import mount, remote_files, wait_for

from mistralfs.api import BatchJob, RemoteFile
from mistralfs.fs.operations import Operations

BLOCK = 64 * 1024
REQUESTS = b'{"custom_id": "0", "body": {"messages": []}}\n'
RESULTS = b'{"custom_id": "0", "response": {"status_code": 200}}\n'
ERRORS = b'{"custom_id": "1", "error": {"message": "too long"}}\n'


def start_job(
    api: FakeFilesApi, inputs: list[str], metadata: dict[str, object] | None = None
) -> BatchJob:
    """A job the service is running over `inputs`."""
    return api.add_job(status="RUNNING", input_files=tuple(inputs), metadata=metadata or {})


def finish_job(
    api: FakeFilesApi, job: BatchJob, results: bytes, errors: bytes | None
) -> tuple[RemoteFile, RemoteFile | None]:
    """The job done: its output (and error) file written, as the service names them."""
    output = api.add(f"{job.id}.jsonl", "batch", results, source="mistral")
    error = api.add(f"{job.id}_error.jsonl", "batch", errors, source="mistral") if errors else None
    done = dataclasses.replace(
        job, status="SUCCESS", output_file=output.id, error_file=error.id if error else None
    )
    api.add_job(done)
    return output, error


@asynccontextmanager
async def stack(tmp_path: Path, api: FakeFilesApi, **options: object) -> AsyncIterator[FsDriver]:
    async with fast_filesystem(api, tmp_path, BLOCK, **options) as ops:
        yield FsDriver(ops, BLOCK)


async def walk(ops: Operations, *names: str) -> int:
    """The inode at jobs/NAME/..., as the kernel's lookups find it."""
    inode = ROOT
    for name in names:
        inode = (await ops.lookup(inode, name.encode(), None)).st_ino
    return inode


async def listing(ops: Operations, *names: str) -> list[str]:
    return [name for name, _ in await ops.fs.list_dir(await walk(ops, *names))]


async def read_all(ops: Operations, inode: int) -> bytes:
    info = await ops.open(inode, os.O_RDONLY, None)
    size = (await ops.getattr(inode, None)).st_size
    try:
        return bytes(await ops.read(info.fh, 0, size + 1))
    finally:
        await ops.release(info.fh)


async def expect_errno(code: int, call: Awaitable[object]) -> None:
    with pytest.raises(pyfuse3.FUSEError) as raised:
        await call
    assert raised.value.errno == code


async def test_each_job_is_a_folder_named_by_its_id_or_its_metadata_name(
    tmp_path: Path,
) -> None:
    api = FakeFilesApi()
    requests = api.add("requests.jsonl", "batch", REQUESTS)
    named = start_job(api, [requests.id], {"name": "nightly/eval"})
    plain = start_job(api, [requests.id])
    async with stack(tmp_path, api) as fs:
        assert "jobs" in [name for name, _ in await fs.ops.fs.list_dir(ROOT)]
        assert sorted(await listing(fs.ops, "jobs")) == sorted(
            [f"nightly\u2215eval ({named.id[:8]})", plain.id]
        )
        folder = await fs.ops.getattr(await walk(fs.ops, "jobs", plain.id), None)
        assert stat.S_ISDIR(folder.st_mode) and stat.S_IMODE(folder.st_mode) == 0o555


async def test_a_jobs_files_read_as_the_files_in_batch_do(tmp_path: Path) -> None:
    api = FakeFilesApi()
    requests = api.add("requests.jsonl", "batch", REQUESTS)
    job = start_job(api, [requests.id])
    output, error = finish_job(api, job, RESULTS, ERRORS)
    async with stack(tmp_path, api) as fs:
        names = await listing(fs.ops, "jobs", job.id)
        assert names == ["error.jsonl", "input.jsonl", "job.json", "output.jsonl"]
        for name, content in [("input.jsonl", REQUESTS), ("output.jsonl", RESULTS)]:
            inode = await walk(fs.ops, "jobs", job.id, name)
            assert await read_all(fs.ops, inode) == content
            attrs = await fs.ops.getattr(inode, None)
            assert stat.S_IMODE(attrs.st_mode) == 0o444 and attrs.st_size == len(content)
        assert error is not None
        inode = await walk(fs.ops, "jobs", job.id, "error.jsonl")
        assert await read_all(fs.ops, inode) == ERRORS
        assert await fs.ops.getxattr(inode, b"user.mistral.id", None) == error.id.encode()
        status = json.loads(await read_all(fs.ops, await walk(fs.ops, "jobs", job.id, "job.json")))
        assert status["id"] == job.id and status["status"] == "SUCCESS"
        assert status["output_file"] == output.id
        # The same remote files as in batch/, where they stay.
        assert sorted(await fs.names("batch")) == sorted(
            ["requests.jsonl", output.filename, error.filename]
        )


async def test_a_jobs_outputs_appear_once_the_service_has_them(tmp_path: Path) -> None:
    api = FakeFilesApi()
    requests = api.add("requests.jsonl", "batch", REQUESTS)
    job = start_job(api, [requests.id])
    async with stack(tmp_path, api) as fs:
        assert await listing(fs.ops, "jobs", job.id) == ["input.jsonl", "job.json"]
        await expect_errno(errno.ENOENT, walk(fs.ops, "jobs", job.id, "output.jsonl"))
        finish_job(api, job, RESULTS, None)
        # The batch/ listing of the mount is older than the job: fetched again for it.
        inode = await walk(fs.ops, "jobs", job.id, "output.jsonl")
        assert await read_all(fs.ops, inode) == RESULTS
        status = await read_all(fs.ops, await walk(fs.ops, "jobs", job.id, "job.json"))
        assert json.loads(status)["status"] == "SUCCESS"


async def test_a_jobs_output_is_looked_for_in_batch_while_its_listing_is_trusted(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    api = FakeFilesApi()
    requests = api.add("requests.jsonl", "batch", REQUESTS)
    job = start_job(api, [requests.id])
    async with stack(tmp_path, api, dir_cache_time=60) as fs:
        assert await listing(fs.ops, "jobs") == [job.id]  # the job as of t=0
        mock_clock.jump(30)
        assert await fs.names("batch") == ["requests.jsonl"]  # trusted until t=90
        output, _ = finish_job(api, job, RESULTS, None)
        mock_clock.jump(31)
        # The job, fetched again, names a file that batch/'s listing cannot hold: that
        # listing is fetched again now rather than at t=90.
        inode = await walk(fs.ops, "jobs", job.id, "output.jsonl")
        assert await read_all(fs.ops, inode) == RESULTS
        assert output.filename in await fs.names("batch")


async def test_jobs_are_trusted_for_the_folder_cache_time(tmp_path: Path) -> None:
    api = FakeFilesApi()
    requests = api.add("requests.jsonl", "batch", REQUESTS)
    job = start_job(api, [requests.id])
    async with stack(tmp_path, api, dir_cache_time=60) as fs:
        await listing(fs.ops, "jobs", job.id)
        calls = dict(api.calls)
        finish_job(api, job, RESULTS, None)
        assert await listing(fs.ops, "jobs", job.id) == ["input.jsonl", "job.json"]
        assert await listing(fs.ops, "jobs") == [job.id]
        assert dict(api.calls) == calls  # nothing asked again
        attrs = await fs.ops.lookup(await walk(fs.ops, "jobs"), job.id.encode(), None)
        assert 0 < attrs.entry_timeout <= 60


async def test_nothing_in_jobs_can_be_changed(tmp_path: Path) -> None:
    api = FakeFilesApi()
    requests = api.add("requests.jsonl", "batch", REQUESTS)
    job = start_job(api, [requests.id])
    async with stack(tmp_path, api) as fs:
        ops = fs.ops
        jobs, folder = await walk(ops, "jobs"), await walk(ops, "jobs", job.id)
        batch = await fs.folder("batch")
        for parent in (jobs, folder):
            await expect_errno(errno.EROFS, ops.create(parent, b"new", 0o644, os.O_WRONLY, None))
        for name in ("input.jsonl", "job.json"):
            inode = await walk(ops, "jobs", job.id, name)
            for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
                await expect_errno(errno.EROFS, ops.open(inode, flags, None))
            await expect_errno(errno.EROFS, ops.unlink(folder, name.encode(), None))
            await expect_errno(errno.EROFS, ops.rename(folder, name.encode(), batch, b"x", 0, None))
            await expect_errno(
                errno.EROFS, ops.setxattr(inode, b"user.mistral.visibility", b"user", None)
            )
            attrs = pyfuse3.EntryAttributes()
            attrs.st_size = 0
            # pyfuse3's SetattrFields is read-only
            truncate = SimpleNamespace(update_size=True, update_atime=False, update_mtime=False)
            await expect_errno(errno.EROFS, ops.setattr(inode, attrs, truncate, None, None))
        await expect_errno(
            errno.EROFS, ops.rename(batch, b"requests.jsonl", folder, b"input.jsonl", 0, None)
        )
        await expect_errno(errno.EROFS, ops.unlink(jobs, job.id.encode(), None))
        await expect_errno(errno.EPERM, ops.mkdir(folder, b"sub", 0o755, None))
        await expect_errno(errno.EPERM, ops.rmdir(jobs, job.id.encode(), None))
        assert await fs.read_file("batch", "requests.jsonl") == REQUESTS  # untouched
        assert api.calls["upload"] == 0 and api.calls["delete"] == 0


async def test_a_purpose_named_jobs_leaves_the_name_to_the_jobs_view(tmp_path: Path) -> None:
    api = FakeFilesApi()
    api.add("x.jsonl", "jobs", b"{}\n")
    async with stack(tmp_path, api) as fs:
        names = [name for name, _ in await fs.ops.fs.list_dir(ROOT)]
        assert names.count("jobs") == 1 and "purpose-jobs" in names
        assert await listing(fs.ops, "purpose-jobs") == ["x.jsonl"]
        assert await listing(fs.ops, "jobs") == []


# -- real mounts, the emulator's batch jobs ---------------------------------------------


def sh(*command: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in command], capture_output=True, text=True, timeout=60, cwd=cwd
    )


@pytest.mark.fuse
def test_jobs_with_ls_cat_cp_and_find(
    emulator_process: RunningEmulator, tmp_path: Path, sdk: Mistral
) -> None:
    with mount(emulator_process, tmp_path, "--dir-cache-time", "0.5") as m:
        (m / "batch" / "requests.jsonl").write_bytes(REQUESTS)
        [requests] = remote_files(sdk)
        job = sdk.batch.jobs.create(
            input_files=[requests.id],
            endpoint="/v1/chat/completions",
            model="mistral-small-latest",
            metadata={"name": "nightly"},
        )
        folder = m / "jobs" / f"nightly ({job.id[:8]})"
        assert os.listdir(m / "jobs") == [folder.name]
        running = json.loads((folder / "job.json").read_bytes())
        assert running["id"] == job.id and running["status"] in ("QUEUED", "RUNNING")
        assert sorted(os.listdir(folder)) == ["input.jsonl", "job.json"]
        assert sh("cat", folder / "input.jsonl").stdout.encode() == REQUESTS
        # Running to done: the output shows up within the folder cache time of the service
        # having it.
        wait_for(lambda: (folder / "output.jsonl").exists(), timeout=20)
        done = json.loads((folder / "job.json").read_bytes())
        assert done["status"] == "SUCCESS"
        output = next(f for f in remote_files(sdk) if f.id == done["output_file"])
        listed = sh("ls", "-l", folder).stdout
        assert f" {output.size_bytes} " in listed and "-r--r--r--" in listed, listed
        copied = tmp_path / "copy"
        assert sh("cp", "-r", folder, copied).returncode == 0
        content = sdk.files.download(file_id=output.id).read()
        assert (copied / "output.jsonl").read_bytes() == content
        assert not (copied / "output.jsonl").is_symlink()
        found = sh("find", "-L", m / "jobs", "-type", "f").stdout.split("\n")
        assert str(folder / "output.jsonl") in found
        assert os.getxattr(folder / "output.jsonl", "user.mistral.id") == output.id.encode()
        assert output.filename in os.listdir(m / "batch")  # where it stays


@pytest.mark.fuse
def test_changes_in_jobs_are_refused_by_tools(
    emulator_process: RunningEmulator, tmp_path: Path, sdk: Mistral
) -> None:
    with mount(emulator_process, tmp_path) as m:
        (m / "batch" / "requests.jsonl").write_bytes(REQUESTS)
        [requests] = remote_files(sdk)
        job = sdk.batch.jobs.create(
            input_files=[requests.id], endpoint="/v1/chat/completions", model="m"
        )
        folder = m / "jobs" / job.id
        source = tmp_path / "x.jsonl"
        source.write_bytes(b"{}\n")
        for command in (
            ["cp", source, folder / "x.jsonl"],
            ["rm", "-f", folder / "input.jsonl"],
            ["mv", folder / "input.jsonl", m / "batch" / "moved.jsonl"],
            ["mv", m / "batch" / "requests.jsonl", folder / "in.jsonl"],
            ["truncate", "-s", "0", folder / "job.json"],
            ["setfattr", "-n", "user.mistral.visibility", "-v", "user", folder / "input.jsonl"],
        ):
            result = sh(*command)
            assert result.returncode != 0, command
            assert "Read-only file system" in result.stderr, (command, result.stderr)
        result = sh("mkdir", folder / "sub")
        assert "Operation not permitted" in result.stderr
        assert [f.filename for f in remote_files(sdk)] == ["requests.jsonl"]
