"""A server that lies: well-formed HTTP whose content is wrong (issue 14, items 3 to 7).

The client and real mounts are pointed at the emulator with one lie switched on at a
time (tests/lying_server.py): nothing is lost, nothing unsafe follows, and every
operation ends.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import pathlib
import subprocess
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import trio
from conftest import RunningEmulator
from emulator_admin import requests, set_faults
from lying_server import LyingServer
from mistralai.client import Mistral
from mounting import Mounted, mount

from mistralfs.api import (
    ApiError,
    FilesClient,
    GrowingFile,
    ProtocolError,
    RetryPolicy,
    Unavailable,
    UploadMismatch,
)
from mistralfs.fs.errors import errno_for

FAST = RetryPolicy(max_attempts=4, base_delay=0.01, max_delay=0.05, total_budget=3.0)
JSONL = b'{"custom_id": "0", "body": {}}\n'
MINE = b'{"mine": 1}\n' * 100
RETRY_TIME = 3.0
MARGIN = 2.0  # a loaded machine's slack; a fault that restarts the budget misses it


@pytest.fixture
async def client(emulator: RunningEmulator) -> AsyncIterator[FilesClient]:
    async with FilesClient(emulator.url, emulator.api_key, retry=FAST) as c:
        yield c


@pytest.fixture
def lies(emulator: RunningEmulator) -> LyingServer:
    return LyingServer(emulator)


async def switch(call: Any, *args: Any, **kwargs: Any) -> None:
    """Throw a switch of the lying server from a trio test (its helpers block)."""
    await trio.to_thread.run_sync(functools.partial(call, *args, **kwargs))


def spool(tmp_path: pathlib.Path, name: str, data: bytes) -> pathlib.Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.fixture
def lying_mount(emulator_process: RunningEmulator, tmp_path: pathlib.Path) -> Iterator[Mounted]:
    """A real mount of the emulator process, retrying for RETRY_TIME seconds."""
    with mount(emulator_process, tmp_path, "--retry-time", str(RETRY_TIME)) as m:
        yield m


# -- 3. an upload answer that does not match what was sent --------------------------------


async def test_an_upload_answer_with_another_files_id_is_a_failed_upload(
    client: FilesClient, lies: LyingServer, tmp_path: pathlib.Path
) -> None:
    other = await client.upload(spool(tmp_path, "o", JSONL), filename="other.jsonl",
                                purpose="batch")  # fmt: skip
    await switch(lies.upload_answers, id=other.id, times=1)
    with pytest.raises(UploadMismatch) as raised:
        await client.upload(spool(tmp_path, "m", MINE), filename="mine.jsonl", purpose="batch")
    assert other.id in str(raised.value)
    assert errno_for(raised.value) == errno.EIO
    assert await client.retrieve(other.id) == other


async def test_an_upload_answer_with_another_size_is_a_failed_upload(
    client: FilesClient, lies: LyingServer, tmp_path: pathlib.Path
) -> None:
    await switch(lies.upload_answers, bytes=12345, times=1)
    with pytest.raises(UploadMismatch, match="12345"):
        await client.upload(spool(tmp_path, "m", MINE), filename="mine.jsonl", purpose="batch")
    await switch(lies.upload_answers, filename="yours.jsonl", times=1)
    with pytest.raises(UploadMismatch, match=r"yours\.jsonl"):
        await client.upload(spool(tmp_path, "m", MINE), filename="mine.jsonl", purpose="batch")
    # Not taken for a lost answer: no second copy was sent.
    posts = client.stats.requests["POST /v1/files"]
    assert posts == 2


async def test_a_growing_upload_answered_with_another_size_fails(
    client: FilesClient, lies: LyingServer, tmp_path: pathlib.Path
) -> None:
    path = spool(tmp_path, "g", b"")
    growing = GrowingFile()
    await switch(lies.upload_answers, bytes=12345, times=1)
    upload = client.growing_upload(path, growing, filename="grow.jsonl", purpose="batch")
    if not client.sends_growing_uploads:
        pytest.skip("this client sends no growing uploads")
    refused: list[UploadMismatch] = []

    async def run() -> None:
        try:
            await upload.run()
        except UploadMismatch as exc:
            refused.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        path.write_bytes(MINE)
        growing.finish(len(MINE))
    assert len(refused) == 1 and "12345" in str(refused[0])


@pytest.mark.logs_expected
def test_a_lying_upload_answer_fails_close_and_rm_spares_the_other_file(
    lying_mount: Mounted, sdk: Mistral, emulator_process: RunningEmulator
) -> None:
    (lying_mount / "batch" / "other.jsonl").write_bytes(JSONL)
    [other] = sdk.files.list(page_size=100).data
    LyingServer(emulator_process).upload_answers(id=other.id, times=1)
    with pytest.raises(OSError) as raised, open(lying_mount / "batch" / "mine.jsonl", "wb") as f:
        f.write(MINE)
    assert raised.value.errno == errno.EIO
    with pytest.raises(FileNotFoundError):  # the name was never bound to the other file
        os.unlink(lying_mount / "batch" / "mine.jsonl")
    assert sdk.files.download(file_id=other.id).read() == JSONL
    kept = [p.read_bytes() for p in (lying_mount.cache_dir / "recovery").glob("*.spool")]
    assert kept == [MINE]
    assert other.id in lying_mount.log()


# -- 4. listings must end -----------------------------------------------------------------


async def test_a_listing_whose_total_runs_ahead_stops_at_the_total(
    client: FilesClient, lies: LyingServer
) -> None:
    await switch(lies.listings_never_end, with_total=True)
    with trio.fail_after(FAST.total_budget + MARGIN):
        files = await client.list_all(page_size=100)
    # Page 0 said 200 files: its two pages, and one more for files added meanwhile.
    assert len(files) == 300


async def test_a_listing_that_never_ends_gives_up_within_the_retry_time(
    client: FilesClient, lies: LyingServer
) -> None:
    await switch(lies.listings_never_end, with_total=False)
    tracemalloc.start()
    started = trio.current_time()
    try:
        with pytest.raises(ApiError):
            await client.list_all(page_size=1000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert trio.current_time() - started < FAST.total_budget + MARGIN
    assert peak < 400 * 2**20, peak


@pytest.mark.logs_expected
def test_ls_of_a_listing_that_never_ends_fails_in_time_and_its_fetch_stops(
    lying_mount: Mounted, emulator_process: RunningEmulator
) -> None:
    LyingServer(emulator_process).listings_never_end(with_total=False)
    started = time.monotonic()
    ls = subprocess.run(["ls", lying_mount / "batch"], capture_output=True, text=True,
                        timeout=60)  # fmt: skip
    assert ls.returncode != 0 and "Input/output error" in ls.stderr, ls
    assert time.monotonic() - started < RETRY_TIME + MARGIN
    # Killed while it waits: the fetch stops too, within the retry time.
    ls2 = subprocess.Popen(["ls", lying_mount / "fine-tune"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)  # fmt: skip
    time.sleep(0.5)
    ls2.kill()
    ls2.wait()
    time.sleep(RETRY_TIME + MARGIN)
    before = _listing_requests(emulator_process)
    time.sleep(1.0)
    assert _listing_requests(emulator_process) == before


def _listing_requests(emulator: RunningEmulator) -> int:
    listed = requests(emulator.url, emulator.api_key)
    return sum(1 for r in listed if r["path"] == "/v1/files")


# -- 5. reads bounded by what was asked ---------------------------------------------------


@pytest.mark.parametrize("with_length", [True, False])
@pytest.mark.parametrize("through", ["http.client", "httpx"])
async def test_a_range_answer_longer_than_asked_is_a_failed_read_and_not_read(
    emulator: RunningEmulator,
    lies: LyingServer,
    tmp_path: pathlib.Path,
    with_length: bool,
    through: str,
) -> None:
    # A transport of its own makes the client read storage through httpx.
    transport = httpx.AsyncHTTPTransport() if through == "httpx" else None
    async with FilesClient(emulator.url, emulator.api_key, retry=FAST,
                           transport=transport) as client:  # fmt: skip
        await _range_answer_longer_than_asked(client, lies, tmp_path, with_length)


async def _range_answer_longer_than_asked(
    client: FilesClient, lies: LyingServer, tmp_path: pathlib.Path, with_length: bool
) -> None:
    data = os.urandom(3 << 20)
    stored = await client.upload(spool(tmp_path, "d", data), filename="d.bin", purpose="batch")
    url = (await client.signed_url(stored.id)).url
    await switch(lies.bodies_longer_by, 256 << 20, with_length=with_length)
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError):
            await client.read_range(url, 1 << 20, 1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, peak
    await switch(lies.tell_the_truth)
    assert await client.read_range(url, 1 << 20, 1 << 20) == data[1 << 20 : 2 << 20]


async def test_content_longer_than_listed_is_a_failed_read(
    client: FilesClient, lies: LyingServer, tmp_path: pathlib.Path
) -> None:
    stored = await client.upload(spool(tmp_path, "s", JSONL), filename="s.jsonl", purpose="batch")
    await switch(lies.bodies_longer_by, 64 << 20)
    with pytest.raises(ProtocolError):
        await client.content(stored.id, stored.bytes)


@pytest.mark.logs_expected
def test_a_read_of_a_lying_range_is_eio_and_the_daemon_stays_small(
    lying_mount: Mounted, sdk: Mistral, emulator_process: RunningEmulator
) -> None:
    sdk.files.upload(file={"file_name": "big.bin", "content": os.urandom(8 << 20)},
                     purpose="batch")  # fmt: skip
    LyingServer(emulator_process).bodies_longer_by(1 << 30)
    with pytest.raises(OSError) as raised:
        (lying_mount / "batch" / "big.bin").read_bytes()
    assert raised.value.errno == errno.EIO
    pid = lying_mount.daemon_pid()
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
    peak_kib = int(
        next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]
    )
    assert peak_kib < 400 * 1024, status


# -- 6. one bad record does not blank the folder -------------------------------------------

BAD = {
    "object": "file",
    "created_at": 1_700_000_000,
    "purpose": "batch",
    "sample_type": "batch_result",
    "source": "mistral",
    "num_lines": 1,
    "mimetype": "application/jsonl",
    "signature": None,
}
BAD_RECORDS = [
    {**BAD, "id": "0000000a-0000-4000-8000-000000000001", "filename": "minus.jsonl", "bytes": -5},
    {**BAD, "id": "0000000a-0000-4000-8000-000000000002", "filename": "huge.jsonl",
     "bytes": 2**64},
    {**BAD, "id": "0000000a-0000-4000-8000-000000000003", "filename": "late.jsonl", "bytes": 3,
     "created_at": 1e300},
]  # fmt: skip
NULL_SIZE = {**BAD, "id": "0000000a-0000-4000-8000-000000000004", "filename": "null.jsonl",
             "bytes": None}  # fmt: skip


@pytest.mark.logs_expected
async def test_bad_records_are_skipped_or_clamped_with_one_warning_each(
    client: FilesClient, lies: LyingServer, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    real = await client.upload(spool(tmp_path, "r", JSONL), filename="real.jsonl", purpose="batch")
    await switch(lies.listings_add, *BAD_RECORDS, NULL_SIZE)
    caplog.set_level(logging.WARNING, logger="mistralfs")
    for _ in range(2):
        files = {f.id: f for f in await client.list_all(purpose="batch")}
    assert real.id in files and NULL_SIZE["id"] in files
    for record in BAD_RECORDS:
        warnings = [r for r in caplog.records if record["id"] in r.getMessage()]
        assert len(warnings) == 1, (record, caplog.text)
        assert warnings[0].levelno == logging.WARNING
        if record["id"] in files:  # clamped, then: a size and time a stat can carry
            kept = files[record["id"]]
            assert 0 <= kept.bytes < 2**63 and 0 <= kept.created_at * 10**9 < 2**63


@pytest.mark.logs_expected
def test_ls_lists_the_rest_of_a_folder_with_bad_records(
    lying_mount: Mounted, sdk: Mistral, emulator_process: RunningEmulator
) -> None:
    sdk.files.upload(file={"file_name": "real.jsonl", "content": JSONL}, purpose="batch")
    LyingServer(emulator_process).listings_add(*BAD_RECORDS, NULL_SIZE)
    for folder in (lying_mount.path, lying_mount / "batch"):
        ls = subprocess.run(["ls", "-l", folder], capture_output=True, text=True, timeout=30)
        assert ls.returncode == 0, ls
    names = os.listdir(lying_mount / "batch")
    assert "real.jsonl" in names and "null.jsonl" in names
    assert os.stat(lying_mount / "batch" / "real.jsonl").st_size == len(JSONL)


# -- 7. a server that accepts and never answers ---------------------------------------------


@pytest.mark.logs_expected
async def test_a_call_never_answered_ends_in_its_retry_time_and_says_so(
    client: FilesClient, lies: LyingServer, emulator: RunningEmulator
) -> None:
    await switch(lies.never_answers, "/v1/files")
    started = trio.current_time()
    with pytest.raises(Unavailable) as raised:
        await client.list_files()
    assert trio.current_time() - started < FAST.total_budget + MARGIN
    assert raised.value.timed_out  # so that the same fetch is not waited for again at once
    await switch(lies.tell_the_truth)
    # Errors the service answers are no such thing: asking again may work at once.
    await switch(set_faults, emulator.url, emulator.api_key,
                 {"path_prefix": "/v1/files", "status": 503, "times": None})  # fmt: skip
    with pytest.raises(Unavailable) as raised:
        await client.list_files()
    assert not raised.value.timed_out


def _fails_with_eio_in_time(call: Any) -> None:
    started = time.monotonic()
    with pytest.raises(OSError) as raised:
        call()
    elapsed = time.monotonic() - started
    assert raised.value.errno == errno.EIO
    assert elapsed < RETRY_TIME + MARGIN, elapsed


def _dd(path: pathlib.Path) -> None:
    dd = ["dd", f"if={path}", "of=/dev/null", "bs=1M", "skip=6"]
    result = subprocess.run(dd, capture_output=True, text=True, timeout=120)
    if result.returncode:
        raise OSError(errno.EIO if "Input/output error" in result.stderr else 0, result.stderr)


def test_every_operation_on_a_server_that_never_answers_ends_within_the_retry_time(
    emulator_process: RunningEmulator, sdk: Mistral, tmp_path: pathlib.Path
) -> None:
    """The kernel may send several requests for one call (readahead, then the page;
    a revalidation, then a lookup): together they wait one retry time, not one each."""
    for name, content in (("big.bin", os.urandom(8 << 20)), ("small.jsonl", JSONL)):
        sdk.files.upload(file={"file_name": name, "content": content}, purpose="batch")
    options = ("--retry-time", str(RETRY_TIME), "--dir-cache-time", "2")
    with mount(emulator_process, tmp_path, *options) as m:
        assert sorted(os.listdir(m / "batch")) == ["big.bin", "small.jsonl"]
        fd = os.open(m / "batch" / "big.bin", os.O_RDONLY)
        try:
            assert len(os.pread(fd, 4096, 0)) == 4096  # its signed URL is known
            LyingServer(emulator_process).never_answers()
            _fails_with_eio_in_time(lambda: os.pread(fd, 1 << 20, 4 << 20))
        finally:
            os.close(fd)
        _fails_with_eio_in_time(lambda: os.listdir(m / "ocr"))
        time.sleep(2.5)  # the listing of batch/ is no longer trusted
        _fails_with_eio_in_time(lambda: (m / "batch" / "small.jsonl").read_bytes())
        time.sleep(2.5)
        _fails_with_eio_in_time(lambda: _dd(m / "batch" / "big.bin"))
