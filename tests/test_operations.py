"""`Operations` called directly, against the in-process emulator, without a kernel mount.

This layer checks what each FUSE request does (names, attributes, errors, API calls
made or not made) more precisely and faster than a real mount can.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import re
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pyfuse3
import pytest
import trio
from conftest import RunningEmulator, emulator_config, start_emulator

from mistralfs.api import FilesClient, RetryPolicy
from mistralfs.fs.build import FsOptions, build_filesystem
from mistralfs.fs.operations import Operations
from mistralfs.fs.uploads import GROWING_START_BYTES

ROOT = pyfuse3.ROOT_INODE
BLOCK = 64 * 1024
FAST_RETRY = RetryPolicy(max_attempts=2, base_delay=0.01, max_delay=0.02, total_budget=1.0)


@dataclass
class Stack:
    ops: Operations
    client: FilesClient
    emulator: RunningEmulator
    cache_dir: Path

    async def admin(self, method: str, path: str, **kwargs: Any) -> Any:
        headers = {"Authorization": f"Bearer {self.emulator.api_key}"}
        async with httpx.AsyncClient(base_url=self.emulator.url, headers=headers) as http:
            response = await http.request(method, f"/v1/_emulator/{path}", **kwargs)
            response.raise_for_status()
            return response.json() if response.content else None

    async def api_requests(self) -> list[dict[str, Any]]:
        return (await self.admin("GET", "requests"))["requests"]

    async def clear_requests(self) -> None:
        await self.admin("DELETE", "requests")

    async def folder(self, name: str) -> int:
        return (await self.ops.lookup(ROOT, name.encode())).st_ino

    async def write_file(self, folder: str, name: str, data: bytes) -> int:
        info, attrs = await self.ops.create(
            await self.folder(folder), name.encode(), 0o644, os.O_WRONLY, None
        )
        for offset in range(0, len(data), 128 * 1024):
            await self.ops.write(info.fh, offset, data[offset : offset + 128 * 1024])
        await self.ops.flush(info.fh)
        await self.ops.release(info.fh)
        return attrs.st_ino

    async def read_file(self, inode: int, chunk: int = 128 * 1024) -> bytes:
        info = await self.ops.open(inode, os.O_RDONLY, None)
        size = (await self.ops.getattr(inode)).st_size
        parts = [await self.ops.read(info.fh, off, chunk) for off in range(0, size, chunk)]
        await self.ops.release(info.fh)
        return b"".join(parts)

    async def names(self, folder: str) -> list[str]:
        return [name for name, _ in await self.ops.fs.list_dir(await self.folder(folder))]


async def make_stack(
    emulator: RunningEmulator,
    nursery: trio.Nursery,
    cache_dir: Path,
    *,
    dir_cache_time: float = 60.0,
    read_only: bool = False,
    cache_size: int = 64 * BLOCK,
    max_throughput: float | None = None,
    free_growth_blocks: int = 8,
) -> Stack:
    client = FilesClient(emulator.url, emulator.api_key, retry=FAST_RETRY)
    options = FsOptions(
        spool_dir=cache_dir / "spool",
        recovery_dir=cache_dir / "recovery",
        cache_size=cache_size,
        block_size=BLOCK,
        max_file_size=512 * 1024 * 1024,
        dir_cache_time=dir_cache_time,
        read_only=read_only,
        max_throughput=max_throughput,
        free_growth_blocks=free_growth_blocks,
    )
    fs = build_filesystem(client, nursery, options).fs
    return Stack(Operations(fs), client, emulator, cache_dir)


@pytest.fixture
async def stack(emulator: RunningEmulator, tmp_path: Path) -> AsyncIterator[Stack]:
    async with trio.open_nursery() as nursery:
        s = await make_stack(emulator, nursery, tmp_path / "cache")
        yield s
        await s.client.aclose()
        nursery.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def stack_with(
    emulator: RunningEmulator, cache_dir: Path, **options: Any
) -> AsyncIterator[Stack]:
    """A stack made with `options` (see make_stack), closed on the way out."""
    async with trio.open_nursery() as nursery:
        stack = await make_stack(emulator, nursery, cache_dir, **options)
        yield stack
        await stack.client.aclose()
        nursery.cancel_scope.cancel()


def stack_caching_for(
    emulator: RunningEmulator, cache_dir: Path, dir_cache_time: float
) -> contextlib.AbstractAsyncContextManager[Stack]:
    """A stack whose listings are trusted for `dir_cache_time` seconds."""
    return stack_with(emulator, cache_dir, dir_cache_time=dir_cache_time)


async def upload(stack: Stack, name: str, data: bytes, purpose: str = "batch") -> str:
    """Upload as another client would, with the filename sent byte for byte.

    httpx would percent-encode control characters in a multipart filename; a raw body
    lets tests store the awkward names a real account can hold.
    """
    boundary = "mistralfs-test-boundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n{purpose}\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="'.encode()
        + name.encode("utf-8")
        + b'"\r\nContent-Type: application/octet-stream\r\n\r\n'
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    headers = {
        "Authorization": f"Bearer {stack.emulator.api_key}",
        "Content-Type": f"multipart/form-data; boundary={boundary}",
    }
    async with httpx.AsyncClient(base_url=stack.emulator.url, headers=headers) as http:
        r = await http.post("/v1/files", content=body)
        r.raise_for_status()
        assert r.json()["filename"] == name, r.json()
        return r.json()["id"]


async def posts(stack: Stack) -> int:
    """Upload attempts the mount's client made (retries included)."""
    return stack.client.stats.requests["POST /v1/files"]


async def hold_up(stack: Stack, method: str, seconds: float, times: int = 1) -> None:
    """The next `times` API calls of `method` on /v1/files wait `seconds` in the emulator,
    then go through: a race is then made to happen, not hoped for."""
    fault = {"method": method, "path_prefix": "/v1/files", "status": None, "delay": seconds}
    await stack.admin("POST", "faults", json=[{**fault, "times": times}])


async def uploaded_then_written(
    stack: Stack, name: str, old: bytes, flags: int, written: bytes
) -> tuple[int, pyfuse3.FileInfo, str]:
    """batch/`name` holding `old`, uploaded elsewhere, then opened with `flags` and
    `written` written at its end: (batch, the open file, the old version's id)."""
    file_id = await upload(stack, name, old)
    batch = await stack.folder("batch")
    inode = (await stack.ops.lookup(batch, name.encode())).st_ino
    info = await stack.ops.open(inode, flags, None)
    offset = 0 if flags & os.O_TRUNC else len(old)
    await stack.ops.write(info.fh, offset, written)
    return batch, info, file_id


async def expect_errno(code: int, call: Any) -> None:
    with pytest.raises(pyfuse3.FUSEError) as raised:
        await call
    assert raised.value.errno == code


async def expect_missing(ops: Operations, parent: int, name: bytes) -> None:
    """No such name: ENOENT, or (in a folder) an entry of inode 0, an absence the kernel
    may remember."""
    try:
        entry = await ops.lookup(parent, name)
    except pyfuse3.FUSEError as exc:
        assert exc.errno == errno.ENOENT
    else:
        assert entry.st_ino == 0 and entry.entry_timeout > 0


async def test_root_holds_the_purpose_folders(stack: Stack) -> None:
    names = [name for name, _ in await stack.ops.fs.list_dir(ROOT)]
    assert names == ["fine-tune", "batch", "ocr", "jobs"]
    attrs = await stack.ops.lookup(ROOT, b"batch")
    assert stat.S_ISDIR(attrs.st_mode)
    await expect_missing(stack.ops, ROOT, b"nope")


async def test_other_purposes_get_a_folder_only_while_they_hold_files(stack: Stack) -> None:
    await upload(stack, "voice.mp3", b"ID3" + b"\0" * 100, purpose="audio")
    assert "audio" in [name for name, _ in await stack.ops.fs.list_dir(ROOT)]
    assert await stack.names("audio") == ["voice.mp3"]


async def test_a_folder_is_listed_by_its_purpose_alone(stack: Stack) -> None:
    await upload(stack, "a.txt", b"a")
    await upload(stack, "b.jsonl", b"{}\n", purpose="fine-tune")
    await upload(stack, "voice.mp3", b"ID3", purpose="audio")
    await stack.clear_requests()
    assert await stack.names("batch") == ["a.txt"]
    [listing] = await stack.api_requests()  # one page: a thousand files per request
    assert (listing["path"], listing["query"]) == (
        "/v1/files",
        "page=0&page_size=1000&include_total=true&purpose=batch",
    )
    [(_, a)] = await stack.ops.fs.list_dir(await stack.folder("batch"))
    assert await stack.names("fine-tune") == ["b.jsonl"]
    assert a.attached  # the listing of one folder leaves the others alone
    # Another purpose's folder is found by its name without listing the whole account,
    # and that one listing is also the one its `ls` needs.
    await stack.clear_requests()
    assert await stack.names("audio") == ["voice.mp3"]
    assert [r["query"] for r in await stack.api_requests()] == [
        "page=0&page_size=1000&include_total=true&purpose=audio"
    ]
    # The root lists the whole account, to find every purpose that holds files.
    await stack.clear_requests()
    assert "audio" in [name for name, _ in await stack.ops.fs.list_dir(ROOT)]
    assert [r["query"] for r in await stack.api_requests()] == [
        "page=0&page_size=1000&include_total=true"
    ]


async def test_an_emptied_purpose_folder_goes(emulator: RunningEmulator, tmp_path: Path) -> None:
    async with stack_caching_for(emulator, tmp_path / "c", 0.3) as stack:
        file_id = await upload(stack, "voice.mp3", b"ID3", purpose="audio")
        assert "audio" in [name for name, _ in await stack.ops.fs.list_dir(ROOT)]
        await stack.client.delete(file_id)
        await trio.sleep(0.35)
        await expect_missing(stack.ops, ROOT, b"audio")
        assert "audio" not in [name for name, _ in await stack.ops.fs.list_dir(ROOT)]


async def test_names_stay_the_same_whichever_listing_brings_them(
    emulator: RunningEmulator, tmp_path: Path
) -> None:
    async with stack_caching_for(emulator, tmp_path / "c", 0.3) as stack:
        first = await upload(stack, "data.jsonl", b"{}\n")
        assert await stack.names("batch") == ["data.jsonl"]
        await trio.sleep(1.1)  # created_at has one-second resolution
        second = await upload(stack, "data.jsonl", b"{}\n")
        tagged = f"data ({second[:8]}).jsonl"

        async def ids() -> dict[str, str]:
            listing = await stack.ops.fs.list_dir(await stack.folder("batch"))
            return {name: node.remote.id for name, node in listing}

        await stack.ops.fs.list_dir(ROOT)  # the account's listing brings the newer file
        assert await ids() == {"data.jsonl": first, tagged: second}
        await trio.sleep(0.35)
        assert await ids() == {"data.jsonl": first, tagged: second}  # and so does the folder's
        await stack.client.delete(first)
        await trio.sleep(0.35)
        assert await ids() == {tagged: second}  # a name does not change while its file exists


async def test_create_write_flush_uploads_with_the_folder_purpose(stack: Stack) -> None:
    data = b'{"messages": []}\n' * 1000
    inode = await stack.write_file("fine-tune", "train.jsonl", data)
    [remote] = await stack.client.list_all()
    assert (remote.filename, remote.purpose, remote.bytes) == (
        "train.jsonl",
        "fine-tune",
        len(data),
    )
    attrs = await stack.ops.getattr(inode)
    assert attrs.st_size == len(data)
    assert attrs.st_mtime_ns == remote.created_at * 10**9
    assert await stack.read_file(inode) == data


async def test_reads_are_cached_and_concurrent_reads_share_requests(stack: Stack) -> None:
    data = os.urandom(5 * BLOCK + 123)
    await upload(stack, "blob.bin", data)
    inode = (await stack.ops.lookup(await stack.folder("batch"), b"blob.bin")).st_ino
    info = await stack.ops.open(inode, os.O_RDONLY, None)
    await stack.clear_requests()
    results: dict[int, bytes] = {}

    async def read(i: int) -> None:
        results[i] = bytes(await stack.ops.read(info.fh, BLOCK + 10, 100))  # may be a view

    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(read, i)
    assert set(results.values()) == {data[BLOCK + 10 : BLOCK + 110]}
    storage = [r for r in await stack.api_requests() if r["path"].startswith("/storage/")]
    block_1 = [r for r in storage if r["range"].startswith(f"bytes={BLOCK}-")]
    assert len(block_1) == 1, storage  # (reads near each other may also prefetch block 2)
    # The whole file now, then again: the second pass makes no request at all.
    assert await stack.read_file(inode) == data
    await stack.clear_requests()
    assert await stack.read_file(inode) == data
    assert await stack.api_requests() == []
    await stack.ops.release(info.fh)


async def open_uploaded(stack: Stack, name: str, data: bytes) -> pyfuse3.FileInfo:
    """Upload `data` as batch/`name` and open it for reading, with no requests recorded."""
    await upload(stack, name, data)
    inode = (await stack.ops.lookup(await stack.folder("batch"), name.encode())).st_ino
    info = await stack.ops.open(inode, os.O_RDONLY, None)
    await stack.clear_requests()
    return info


async def storage_ranges(stack: Stack) -> list[str]:
    await trio.sleep(0.3)  # let prefetches land
    return [r["range"] for r in await stack.api_requests() if r["path"].startswith("/storage/")]


async def test_sequential_reads_prefetch_ahead(stack: Stack) -> None:
    data = os.urandom(16 * BLOCK)
    info = await open_uploaded(stack, "seq.bin", data)
    for offset in range(0, 4 * BLOCK, BLOCK // 2):
        assert (
            await stack.ops.read(info.fh, offset, BLOCK // 2) == data[offset : offset + BLOCK // 2]
        )
    ranges = await storage_ranges(stack)
    fetched = set()
    for header in ranges:
        first, last = (int(x) for x in header.removeprefix("bytes=").split("-"))
        fetched.update(range(first // BLOCK, last // BLOCK + 1))
    # Blocks past the last one read were fetched ahead, several to a request.
    assert {4, 5, 6} <= fetched, ranges
    assert len(ranges) < len(fetched), ranges
    await stack.ops.release(info.fh)


async def test_prefetch_stops_on_a_seek(stack: Stack) -> None:
    data = os.urandom(16 * BLOCK)
    info = await open_uploaded(stack, "seek.bin", data)
    for offset in (10 * BLOCK, 2 * BLOCK, 14 * BLOCK):
        assert await stack.ops.read(info.fh, offset, 100) == data[offset : offset + 100]
    ranges = await storage_ranges(stack)
    # Each read after a seek fetches its own block only (the first read of the handle
    # also gets its exact bytes in a request of their own, for time to first byte).
    blocks = [f"bytes={b * BLOCK}-{(b + 1) * BLOCK - 1}" for b in (2, 10, 14)]
    assert sorted(ranges) == sorted([*blocks, f"bytes={10 * BLOCK}-{10 * BLOCK + 99}"])


async def test_prefetch_is_bounded_across_files(emulator: RunningEmulator, tmp_path: Path) -> None:
    """Four files read at once with a 16-block cache: at most 8 blocks (half of it) on
    their way in all, besides each file's own block."""
    async with trio.open_nursery() as nursery:
        stack = await make_stack(emulator, nursery, tmp_path / "cache", cache_size=16 * BLOCK)
        contents = [os.urandom(16 * BLOCK) for _ in range(4)]
        for i, content in enumerate(contents):
            await upload(stack, f"b{i}.bin", content)
        batch = await stack.folder("batch")
        infos = []
        for i in range(4):
            inode = (await stack.ops.lookup(batch, b"b%d.bin" % i)).st_ino
            infos.append(await stack.ops.open(inode, os.O_RDONLY, None))
        await stack.admin(
            "POST",
            "faults",
            json=[{"path_prefix": "/storage/", "status": None, "delay": 0.3, "times": None}],
        )
        reader = stack.ops.fs._reader
        most = 0

        async def read_sequentially(info: pyfuse3.FileInfo, data: bytes) -> None:
            for offset in range(0, 4 * BLOCK, BLOCK // 2):
                assert (
                    await stack.ops.read(info.fh, offset, BLOCK // 2)
                    == data[offset : offset + BLOCK // 2]
                )

        async def watch() -> None:
            nonlocal most
            while True:
                most = max(most, reader.stats()["fetches_in_flight"])
                await trio.sleep(0.01)

        async with trio.open_nursery() as readers:
            readers.start_soon(watch)
            async with trio.open_nursery() as files:
                for info, data in zip(infos, contents, strict=True):
                    files.start_soon(read_sequentially, info, data)
            readers.cancel_scope.cancel()
        # Without the bound: each file's own block and its whole window.
        assert 4 < most <= 8 + 4, most  # 8 in flight at most, plus each file's own block
        await stack.client.aclose()
        nursery.cancel_scope.cancel()


async def test_first_read_of_a_large_file_waits_for_its_own_bytes_only(stack: Stack) -> None:
    data = os.urandom(4 * BLOCK)
    info = await open_uploaded(stack, "first.bin", data)
    assert await stack.ops.read(info.fh, 0, 4096) == data[:4096]
    ranges = await storage_ranges(stack)
    assert ranges[0] == "bytes=0-4095", ranges  # answered by a request of its own...
    assert f"bytes=0-{BLOCK - 1}" in ranges, ranges  # ...then its block is fetched
    await stack.clear_requests()
    assert await stack.ops.read(info.fh, 4096, 4096) == data[4096:8192]
    assert await storage_ranges(stack) == []  # from the block fetched after the first read
    await stack.ops.release(info.fh)


async def test_looking_up_a_large_file_fetches_its_signed_url_ahead(stack: Stack) -> None:
    large_id = await upload(stack, "large.bin", os.urandom(2 * BLOCK))
    await upload(stack, "small.bin", b"small")
    batch = await stack.folder("batch")
    await stack.ops.lookup(batch, b"small.bin")  # the folder is listed: no calls below
    await stack.clear_requests()
    await stack.ops.lookup(batch, b"large.bin")
    await stack.ops.lookup(batch, b"small.bin")
    await trio.sleep(0.3)
    calls = [r["path"] for r in await stack.api_requests()]
    assert calls == [f"/v1/files/{large_id}/url"], calls
    # and a connection to its storage (the emulator's own route: no API call left one;
    # one only, as connecting is cheap here: transport.CHEAP_CONNECT_SECONDS)
    assert stack.client.idle_connections() == 1
    await stack.clear_requests()
    info = await stack.ops.open((await stack.ops.lookup(batch, b"large.bin")).st_ino, 0, None)
    assert not [r for r in await stack.api_requests() if r["path"].endswith("/url")]
    await stack.ops.release(info.fh)
    await stack.ops.release(info.fh)


async def test_listing_a_folder_fetches_its_large_files_urls_ahead(stack: Stack) -> None:
    """`ls -l` then `head`: the open and the first read make one request, to storage."""
    data = os.urandom(3 * BLOCK)
    large_ids = {await upload(stack, f"large{i}.bin", data) for i in range(3)}
    await upload(stack, "small.bin", b"small")
    await stack.names("batch")
    await trio.sleep(0.3)
    urls = [r for r in await stack.api_requests() if r["path"].endswith("/url")]
    assert {r["path"].split("/")[3] for r in urls} == large_ids
    assert all("expiry=24" in r["query"] for r in urls), urls  # a day's URL, kept
    await stack.clear_requests()
    batch = await stack.folder("batch")
    info = await stack.ops.open((await stack.ops.lookup(batch, b"large1.bin")).st_ino, 0, None)
    assert await stack.ops.read(info.fh, 0, 4096) == data[:4096]
    await stack.ops.release(info.fh)
    calls = [r["path"] for r in await stack.api_requests()]
    assert [c for c in calls if not c.startswith("/storage/")] == [], calls


async def test_a_signed_url_past_half_its_life_is_used_and_renewed_behind(stack: Stack) -> None:
    file_id = await upload(stack, "old-url.bin", os.urandom(3 * BLOCK))
    reader = stack.ops.fs._reader
    first = await reader.signed_url(file_id)
    aged = dataclasses.replace(first, expires_at=first.expires_at - 13 * 3600)
    reader._urls[file_id] = aged  # asked for 13 hours ago
    await stack.clear_requests()
    assert await reader.signed_url(file_id) is aged  # no wait for a new one
    await trio.sleep(0.3)
    assert [r["path"] for r in await stack.api_requests()] == [f"/v1/files/{file_id}/url"]
    renewed = await reader.signed_url(file_id)
    assert renewed.expires_at > aged.expires_at + 12 * 3600


async def test_probed_names_make_no_api_call(stack: Stack) -> None:
    batch = await stack.folder("batch")
    await stack.names("batch")  # a file manager lists a folder, then probes it
    await stack.ops.fs.list_dir(ROOT)
    await stack.clear_requests()
    for probe in (b".hidden", b".directory", b".Trash-1000", b"autorun.inf", b".git", b".DS_Store"):
        await expect_missing(stack.ops, batch, probe)
        await expect_missing(stack.ops, ROOT, probe)
    assert await stack.api_requests() == []


async def test_duplicate_names_oldest_plain_newer_tagged(stack: Stack, emulator) -> None:
    first = await upload(stack, "data.jsonl", b"{}\n")
    await trio.sleep(1.1)  # created_at has one-second resolution
    second = await upload(stack, "data.jsonl", b'{"a": 1}\n')
    names = await stack.names("batch")
    assert names == sorted(["data.jsonl", f"data ({second[:8]}).jsonl"])
    plain = await stack.ops.lookup(await stack.folder("batch"), b"data.jsonl")
    assert await stack.ops.getxattr(plain.st_ino, b"user.mistral.id", None) == first.encode()


async def test_unsafe_remote_names_are_shown_safely(stack: Stack) -> None:
    contents = {
        "a/b.txt": b"slash",
        "..": b"dots",
        "bell\x07.txt": b"control",
        "x" * 300 + ".txt": b"long",
        "a\u2215b.txt": b"lookalike",  # cleans to the same name as "a/b.txt"
    }
    ids = {}
    for filename, data in contents.items():
        ids[filename] = await upload(stack, filename, data)
    listing = await stack.ops.fs.list_dir(await stack.folder("batch"))
    names = [name for name, _ in listing]
    assert len(set(names)) == len(contents), names
    for name in names:
        encoded = name.encode("utf-8")
        assert b"/" not in encoded and b"\0" not in encoded and name not in ("", ".", "..")
        assert len(encoded) <= 255 and all(ord(c) >= 32 for c in name)
    assert "a\u2215b.txt" in names and ids[".."] in names
    assert "bell\ufffd.txt" in names
    [long_name] = [n for n in names if n.startswith("xxx")]
    assert f"({ids['x' * 300 + '.txt'][:8]})" in long_name
    # Every one of them stays readable, and reads its own content.
    by_id = {node.remote.id: node for _, node in listing}
    for filename, data in contents.items():
        assert await stack.read_file(by_id[ids[filename]].inode) == data


async def test_xattrs_show_remote_metadata_and_system_names_cost_nothing(stack: Stack) -> None:
    file_id = await upload(stack, "doc.jsonl", b'{"x": 1}\n{"y": 2}\n')
    inode = (await stack.ops.lookup(await stack.folder("batch"), b"doc.jsonl")).st_ino
    await stack.clear_requests()
    names = await stack.ops.listxattr(inode, None)
    for field in (b"id", b"purpose", b"sample_type", b"source", b"num_lines", b"signature"):
        assert b"user.mistral." + field in names
    assert b"user.mistral.signed_url" not in names  # read by name only
    assert await stack.api_requests() == []
    assert await stack.ops.getxattr(inode, b"user.mistral.id", None) == file_id.encode()
    assert await stack.ops.getxattr(inode, b"user.mistral.num_lines", None) == b"2"
    url = (await stack.ops.getxattr(inode, b"user.mistral.signed_url", None)).decode()
    async with httpx.AsyncClient() as http:
        assert (await http.get(url)).content == b'{"x": 1}\n{"y": 2}\n'
    await stack.clear_requests()
    await expect_errno(errno.ENODATA, stack.ops.getxattr(inode, b"user.other", None))
    for name in (b"security.selinux", b"system.posix_acl_access", b"trusted.x"):
        await expect_errno(errno.ENOTSUP, stack.ops.getxattr(inode, name, None))
    assert await stack.api_requests() == []


async def test_statfs_and_refused_operations(stack: Stack) -> None:
    stats = await stack.ops.statfs(None)
    assert stats.f_namemax == 255
    assert stats.f_bavail * stats.f_frsize >= 2**40
    batch = await stack.folder("batch")
    await expect_errno(errno.EPERM, stack.ops.mkdir(batch, b"sub", 0o755, None))
    await expect_errno(errno.EPERM, stack.ops.mkdir(ROOT, b"new", 0o755, None))
    await expect_errno(errno.EPERM, stack.ops.rmdir(ROOT, b"batch", None))
    await expect_errno(errno.EPERM, stack.ops.symlink(batch, b"l", b"t", None))
    await expect_errno(errno.EPERM, stack.ops.mknod(batch, b"n", 0o644, 0, None))
    await expect_errno(errno.EPERM, stack.ops.link(batch, batch, b"hard", None))
    await expect_errno(errno.EACCES, stack.ops.create(ROOT, b"x.txt", 0o644, os.O_WRONLY, None))


async def test_write_past_the_limit_is_efbig_and_nothing_is_uploaded(stack: Stack) -> None:
    info, _ = await stack.ops.create(await stack.folder("batch"), b"big", 0o644, os.O_WRONLY, None)
    await stack.ops.write(info.fh, 0, b"start")
    await expect_errno(errno.EFBIG, stack.ops.write(info.fh, 512 * 1024 * 1024, b"x"))
    await expect_errno(errno.EFBIG, stack.ops.flush(info.fh))
    await stack.ops.release(info.fh)
    assert await stack.client.list_all() == []


@pytest.mark.logs_expected
async def test_refused_content_fails_flush_and_is_kept(stack: Stack) -> None:
    folder = await stack.folder("fine-tune")
    info, _ = await stack.ops.create(folder, b"bad.jsonl", 0o644, os.O_WRONLY, None)
    await stack.ops.write(info.fh, 0, b"not json\n")
    await expect_errno(errno.EBADMSG, stack.ops.flush(info.fh))
    assert await posts(stack) == 1
    await stack.ops.release(info.fh)
    kept = list((stack.cache_dir / "recovery").glob("*.spool"))
    assert [p.read_bytes() for p in kept] == [b"not json\n"]
    assert await stack.client.list_all() == []
    # The release keeps the refused bytes; it does not send them a second time.
    assert await posts(stack) == 1
    # The name stays while its content is kept: it reads what was written, and says why.
    inode = (await stack.ops.lookup(folder, b"bad.jsonl")).st_ino
    assert await stack.read_file(inode) == b"not json\n"
    assert b"user.mistral.error" in await stack.ops.listxattr(inode, None)
    why = await stack.ops.getxattr(inode, b"user.mistral.error", None)
    assert why.startswith(b"400 Invalid file format") and b"line 1" in why
    assert await posts(stack) == 1


@pytest.mark.logs_expected
async def test_content_changed_after_a_refused_close_is_uploaded_at_release(
    stack: Stack,
) -> None:
    folder = await stack.folder("fine-tune")
    info, _ = await stack.ops.create(folder, b"fixed.jsonl", 0o644, os.O_RDWR, None)
    await stack.ops.write(info.fh, 0, b"not json\n")
    await expect_errno(errno.EBADMSG, stack.ops.flush(info.fh))
    # Another descriptor of the same open file goes on and mends the content.
    await stack.ops.write(info.fh, 0, b'{"a": 1}\n')
    await stack.ops.release(info.fh)
    assert [f.filename for f in await stack.client.list_all()] == ["fixed.jsonl"]
    assert list((stack.cache_dir / "recovery").glob("*.spool")) == []


@pytest.mark.parametrize("how", ["unlink", "rename-over-it"])
async def test_a_file_removed_while_its_upload_is_under_way_leaves_nothing_behind(
    stack: Stack, how: str
) -> None:
    """A program creates a file, closes it and removes it at once (as vim did with its
    swap file before scratch names stayed local), while the release uploads it: the
    account must not keep a file no name shows."""
    batch = await stack.folder("batch")
    await upload(stack, "other.txt", b"other")
    await hold_up(stack, "POST", 0.6)
    info, _ = await stack.ops.create(batch, b"f.tmp", 0o600, os.O_RDWR, None)
    await stack.ops.flush(info.fh)  # nothing done: the file is uploaded at release
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stack.ops.release, info.fh)
        await trio.sleep(0.2)  # the release's upload is held up in the emulator
        if how == "unlink":
            await stack.ops.unlink(batch, b"f.tmp", None)
        else:
            await stack.ops.rename(batch, b"other.txt", batch, b"f.tmp", 0, None)
    stored = [(f.filename, f.bytes) for f in await stack.client.list_all()]
    if how == "unlink":
        assert stored == [("other.txt", 5)]
        await expect_missing(stack.ops, batch, b"f.tmp")
    else:
        assert stored == [("f.tmp", 5)]
        assert await stack.read_file((await stack.ops.lookup(batch, b"f.tmp")).st_ino) == b"other"
    assert list((stack.cache_dir / "recovery").glob("*")) == []


@pytest.mark.logs_expected
async def test_new_content_of_a_file_deleted_elsewhere_while_uploaded_is_kept(
    emulator: RunningEmulator, tmp_path: Path
) -> None:
    async with trio.open_nursery() as nursery:
        stack = await make_stack(emulator, nursery, tmp_path / "c", dir_cache_time=0)
        overwrite = os.O_WRONLY | os.O_TRUNC
        batch, info, old_id = await uploaded_then_written(
            stack, "doc.txt", b"old", overwrite, b"new content"
        )
        await hold_up(stack, "POST", 0.6)
        async with trio.open_nursery() as closing:
            closing.start_soon(stack.ops.flush, info.fh)
            await trio.sleep(0.2)  # the upload is held up in the emulator
            await stack.client.delete(old_id)  # elsewhere
            await stack.ops.opendir(batch, None)  # a listing that finds it gone
            await expect_missing(stack.ops, batch, b"doc.txt")
        await stack.ops.release(info.fh)
        # What the program wrote, and close() reported stored, is in the account...
        [stored] = await stack.client.list_all()
        assert (stored.filename, stored.bytes) == ("doc.txt", len(b"new content"))
        # ...and shows under its name with the next listing.
        inode = (await stack.ops.lookup(batch, b"doc.txt")).st_ino
        assert await stack.read_file(inode) == b"new content"
        await stack.client.aclose()
        nursery.cancel_scope.cancel()


async def test_a_file_removed_while_it_is_renamed_is_gone_under_both_names(
    stack: Stack,
) -> None:
    batch = await stack.folder("batch")
    await upload(stack, "a.txt", b"content")
    await hold_up(stack, "POST", 0.6)

    async def rename() -> None:  # uploads the content again as b.txt, held up
        await expect_errno(
            errno.ENOENT, stack.ops.rename(batch, b"a.txt", batch, b"b.txt", 0, None)
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(rename)
        await trio.sleep(0.2)
        await stack.ops.unlink(batch, b"a.txt", None)
    assert await stack.client.list_all() == []
    for name in (b"a.txt", b"b.txt"):
        await expect_missing(stack.ops, batch, name)


async def test_a_file_deleted_elsewhere_while_it_is_renamed_lives_on_under_its_new_name(
    emulator: RunningEmulator, tmp_path: Path
) -> None:
    async with trio.open_nursery() as nursery:
        stack = await make_stack(emulator, nursery, tmp_path / "c", dir_cache_time=0)
        old_id = await upload(stack, "a.txt", b"content")
        batch = await stack.folder("batch")
        await hold_up(stack, "POST", 0.6)
        async with trio.open_nursery() as renaming:
            renaming.start_soon(stack.ops.rename, batch, b"a.txt", batch, b"b.txt", 0, None)
            await trio.sleep(0.2)  # the copy under the new name is held up
            await stack.client.delete(old_id)  # elsewhere
            await stack.ops.opendir(batch, None)  # a listing that finds it gone
        # The rename had the content: the file has its new name, and is a file like any
        # other there, which a program can overwrite.
        assert [f.filename for f in await stack.client.list_all()] == ["b.txt"]
        inode = (await stack.ops.lookup(batch, b"b.txt")).st_ino
        info = await stack.ops.open(inode, os.O_WRONLY | os.O_TRUNC, None)
        await stack.ops.write(info.fh, 0, b"rewritten")
        await stack.ops.flush(info.fh)
        await stack.ops.release(info.fh)
        assert [(f.filename, f.bytes) for f in await stack.client.list_all()] == [("b.txt", 9)]
        await stack.client.aclose()
        nursery.cancel_scope.cancel()


async def source_and_target_being_written(
    stack: Stack, written: bytes
) -> tuple[int, pyfuse3.FileInfo]:
    """batch/s.txt ("source") and batch/t.txt, open with O_TRUNC and `written` written."""
    await upload(stack, "s.txt", b"source")
    overwrite = os.O_WRONLY | os.O_TRUNC
    batch, info, _ = await uploaded_then_written(stack, "t.txt", b"old target", overwrite, written)
    return batch, info


async def test_a_rename_replaces_the_target_as_it_is_when_the_rename_ends(
    stack: Stack,
) -> None:
    batch, info = await source_and_target_being_written(stack, b"new target")
    await hold_up(stack, "POST", 0.5, times=2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stack.ops.flush, info.fh)  # the target's new version, held up
        await trio.sleep(0.1)
        # Starts while the target's upload is under way, and ends after it.
        nursery.start_soon(stack.ops.rename, batch, b"s.txt", batch, b"t.txt", 0, None)
    await stack.ops.release(info.fh)
    stored = [(f.filename, f.bytes) for f in await stack.client.list_all()]
    assert stored == [("t.txt", len(b"source"))]


async def test_rm_while_a_new_version_is_uploaded_deletes_both_versions(stack: Stack) -> None:
    overwrite = os.O_WRONLY | os.O_TRUNC
    batch, info, _ = await uploaded_then_written(stack, "f.txt", b"old", overwrite, b"new version")
    await hold_up(stack, "POST", 0.3)
    await hold_up(stack, "DELETE", 0.6)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stack.ops.flush, info.fh)  # the new version, held up
        await trio.sleep(0.1)
        # The deletion of the old version is held up longer: the upload ends meanwhile.
        await stack.ops.unlink(batch, b"f.txt", None)
    await stack.ops.release(info.fh)
    assert await stack.client.list_all() == []
    await expect_missing(stack.ops, batch, b"f.txt")


@pytest.mark.logs_expected
async def test_changes_to_a_file_a_rename_replaced_are_kept(stack: Stack) -> None:
    batch, info = await source_and_target_being_written(stack, b"written meanwhile")
    await stack.ops.rename(batch, b"s.txt", batch, b"t.txt", 0, None)
    await expect_errno(errno.EIO, stack.ops.flush(info.fh))
    await stack.ops.release(info.fh)
    stored = [(f.filename, f.bytes) for f in await stack.client.list_all()]
    assert stored == [("t.txt", len(b"source"))]
    kept = list((stack.cache_dir / "recovery").glob("*.spool"))
    assert [p.read_bytes() for p in kept] == [b"written meanwhile"]


@pytest.mark.logs_expected
async def test_a_readers_close_neither_uploads_nor_hears_a_writers_changes(
    stack: Stack,
) -> None:
    folder = await stack.folder("fine-tune")
    writer, _ = await stack.ops.create(folder, b"draft.jsonl", 0o644, os.O_WRONLY, None)
    await stack.ops.write(writer.fh, 0, b"not json yet\n")
    inode = (await stack.ops.lookup(folder, b"draft.jsonl")).st_ino
    reader = await stack.ops.open(inode, os.O_RDONLY, None)
    assert await stack.ops.read(reader.fh, 0, 100) == b"not json yet\n"  # the local copy
    await stack.ops.flush(reader.fh)  # no EBADMSG: the refusal is the writer's to hear
    await stack.ops.release(reader.fh)
    assert await posts(stack) == 0
    await expect_errno(errno.EBADMSG, stack.ops.flush(writer.fh))
    await stack.ops.release(writer.fh)
    assert await posts(stack) == 1


@pytest.mark.logs_expected
async def test_server_failure_becomes_eio(stack: Stack) -> None:
    data = os.urandom(2 * BLOCK)  # more than a block: read through the signed URL
    inode = await stack.write_file("batch", "a.bin", data)
    await stack.admin(
        "POST", "faults", json=[{"path_prefix": "/storage/", "status": 503, "times": 10}]
    )
    info = await stack.ops.open(inode, os.O_RDONLY, None)
    await expect_errno(errno.EIO, stack.ops.read(info.fh, 0, 5))
    await stack.admin("DELETE", "faults")
    assert await stack.ops.read(info.fh, 0, 5) == data[:5]


async def test_a_small_file_is_read_in_one_request(stack: Stack) -> None:
    """Up to one block, /content in one request beats a signed URL plus a ranged GET."""
    await upload(stack, "small.txt", b"small content")
    batch = await stack.folder("batch")
    inode = (await stack.ops.lookup(batch, b"small.txt")).st_ino
    await stack.clear_requests()
    assert await stack.read_file(inode) == b"small content"
    assert await stack.read_file(inode) == b"small content"
    calls = [(r["method"], r["path"].rsplit("/", 1)[-1]) for r in await stack.api_requests()]
    assert calls == [("GET", "content")], calls


async def small_files(stack: Stack, count: int) -> tuple[dict[str, bytes], list[int]]:
    """`count` small files f00.txt.. in batch/, their ids' contents, and their inodes."""
    contents = {}
    for i in range(count):
        file_id = await upload(stack, f"f{i:02d}.txt", b"file %d" % i)
        contents[file_id] = b"file %d" % i
    batch = await stack.folder("batch")
    inodes = [(await stack.ops.lookup(batch, b"f%02d.txt" % i)).st_ino for i in range(count)]
    await stack.clear_requests()
    return contents, inodes


async def read_whole(stack: Stack, inode: int) -> bytes:
    info = await stack.ops.open(inode, os.O_RDONLY, None)
    data = await stack.ops.read(info.fh, 0, 4096)
    await stack.ops.release(info.fh)
    return bytes(data)


async def contents_fetched(stack: Stack) -> list[str]:
    await trio.sleep(0.3)  # let background fetches land
    calls = await stack.api_requests()
    return [r["path"].split("/")[3] for r in calls if r["path"].endswith("/content")]


async def test_files_read_in_name_order_are_fetched_ahead(stack: Stack) -> None:
    contents, inodes = await small_files(stack, 12)
    ids = list(contents)
    for i in range(3):
        assert await read_whole(stack, inodes[i]) == b"file %d" % i
    fetched = await contents_fetched(stack)
    assert len(fetched) == len(set(fetched)), fetched  # each file fetched once
    assert set(ids[:3]) < set(fetched), fetched
    assert ids[3] in fetched and ids[4] in fetched, fetched  # ahead, never opened
    # What was fetched ahead is read without another request.
    await stack.clear_requests()
    assert await read_whole(stack, inodes[3]) == b"file 3"
    assert ids[3] not in await contents_fetched(stack)


async def test_files_read_out_of_order_fetch_nothing_ahead(stack: Stack) -> None:
    contents, inodes = await small_files(stack, 8)
    ids = list(contents)
    for i in (5, 1, 7, 3):
        assert await read_whole(stack, inodes[i]) == b"file %d" % i
    assert sorted(await contents_fetched(stack)) == sorted(ids[i] for i in (5, 1, 7, 3))


async def test_shell_redirect_close_before_write_uploads_once(stack: Stack) -> None:
    """`echo x > f`: open, dup2, close the original (a flush), write, close (a flush)."""
    info, _ = await stack.ops.create(
        await stack.folder("batch"), b"f.txt", 0o644, os.O_WRONLY, None
    )
    await stack.ops.flush(info.fh)
    await stack.ops.write(info.fh, 0, b"x\n")
    await stack.ops.flush(info.fh)
    await stack.ops.release(info.fh)
    [remote] = await stack.client.list_all()
    assert remote.bytes == 2
    posts = [r for r in await stack.api_requests() if r["method"] == "POST"]
    assert len(posts) == 1


async def test_empty_new_file_is_uploaded_on_release(stack: Stack) -> None:
    info, _ = await stack.ops.create(
        await stack.folder("batch"), b"empty", 0o644, os.O_WRONLY, None
    )
    await stack.ops.flush(info.fh)
    assert await stack.client.list_all() == []
    await stack.ops.release(info.fh)
    [remote] = await stack.client.list_all()
    assert (remote.filename, remote.bytes) == ("empty", 0)


async def test_remote_changes_show_up_after_the_folder_cache_time(
    emulator: RunningEmulator, tmp_path: Path
) -> None:
    async with trio.open_nursery() as nursery:
        # 1 s: long enough that an upload under load still lands within it.
        stack = await make_stack(emulator, nursery, tmp_path / "c", dir_cache_time=1.0)
        assert await stack.names("batch") == []
        file_id = await upload(stack, "late.txt", b"late")
        assert await stack.names("batch") == []  # still the cached listing
        await trio.sleep(1.05)
        assert await stack.names("batch") == ["late.txt"]
        async with httpx.AsyncClient(
            base_url=emulator.url, headers={"Authorization": f"Bearer {emulator.api_key}"}
        ) as http:
            (await http.delete(f"/v1/files/{file_id}")).raise_for_status()
        await trio.sleep(1.05)
        assert await stack.names("batch") == []
        await expect_missing(stack.ops, await stack.folder("batch"), b"late.txt")
        await stack.client.aclose()
        nursery.cancel_scope.cancel()


async def test_unlink_deletes_remotely_and_at_once(stack: Stack) -> None:
    await stack.write_file("batch", "x.txt", b"x")
    batch = await stack.folder("batch")
    await stack.ops.unlink(batch, b"x.txt", None)
    await expect_missing(stack.ops, batch, b"x.txt")
    assert await stack.client.list_all() == []


async def test_read_only_refuses_changes(emulator: RunningEmulator, tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        stack = await make_stack(emulator, nursery, tmp_path / "c", read_only=True)
        await upload(stack, "r.txt", b"r")
        batch = await stack.folder("batch")
        attrs = await stack.ops.lookup(batch, b"r.txt")
        assert stat.S_IMODE(attrs.st_mode) == 0o444
        assert stat.S_IMODE((await stack.ops.getattr(batch)).st_mode) == 0o555
        assert stat.S_IMODE((await stack.ops.getattr(ROOT)).st_mode) == 0o555
        await expect_errno(errno.EROFS, stack.ops.create(batch, b"n", 0o644, os.O_WRONLY, None))
        await expect_errno(errno.EROFS, stack.ops.unlink(batch, b"r.txt", None))
        await expect_errno(errno.EROFS, stack.ops.mkdir(batch, b"d", 0o755, None))
        await stack.client.aclose()
        nursery.cancel_scope.cancel()


async def test_refused_signed_url_is_replaced(stack: Stack) -> None:
    data = os.urandom(2 * BLOCK)  # more than a block: read through the signed URL
    inode = await stack.write_file("batch", "u.bin", data)
    info = await stack.ops.open(inode, os.O_RDONLY, None)  # caches a signed URL
    await stack.clear_requests()
    await stack.admin(
        "POST", "faults", json=[{"path_prefix": "/storage/", "status": 403, "times": 1}]
    )
    assert await stack.ops.read(info.fh, 0, 6) == data[:6]
    calls = [
        (r["method"], r["path"].split("/")[1], r["status"]) for r in await stack.api_requests()
    ]
    # The refused read fetched one fresh URL and got its range with it (the read may
    # also have started a prefetch of the next block, with the old URL or the new one).
    assert calls[0] == ("GET", "storage", 403), calls
    assert calls.count(("GET", "v1", 200)) == 1, calls
    assert calls.count(("GET", "storage", 403)) == 1, calls
    assert calls[calls.index(("GET", "v1", 200)) + 1 :].count(("GET", "storage", 206)) >= 1, calls
    await stack.ops.release(info.fh)


# -- changing uploaded files ---------------------------------------------------------------


async def remote_state(stack: Stack) -> dict[tuple[str, str], str]:
    """(purpose, filename) -> id of every remote file; fails on duplicate names."""
    files = await stack.client.list_all()
    state = {(f.purpose, f.filename): f.id for f in files}
    assert len(state) == len(files), f"duplicate remote names: {files}"
    return state


async def rewrite(stack: Stack, inode: int, flags: int, data: bytes, offset: int = 0) -> None:
    info = await stack.ops.open(inode, flags, None)
    await stack.ops.write(info.fh, offset, data)
    await stack.ops.flush(info.fh)
    await stack.ops.release(info.fh)


async def test_overwrite_uploads_new_then_deletes_old(stack: Stack) -> None:
    inode = await stack.write_file("batch", "o.txt", b"old content")
    [old_id] = (await remote_state(stack)).values()
    changed: list[int] = []
    stack.ops.fs.namespace.on_attrs_changed = changed.append  # the mount tells the kernel
    await rewrite(stack, inode, os.O_WRONLY | os.O_TRUNC, b"new")
    assert changed == [inode]
    state = await remote_state(stack)
    assert list(state) == [("batch", "o.txt")] and state["batch", "o.txt"] != old_id
    assert (await stack.ops.lookup(await stack.folder("batch"), b"o.txt")).st_ino == inode
    assert await stack.read_file(inode) == b"new"


@pytest.mark.logs_expected
async def test_failed_overwrite_keeps_the_old_file(stack: Stack) -> None:
    inode = await stack.write_file("fine-tune", "t.jsonl", b'{"ok": 1}\n')
    before = await remote_state(stack)
    info = await stack.ops.open(inode, os.O_WRONLY | os.O_TRUNC, None)
    await stack.ops.write(info.fh, 0, b"broken\n")
    await expect_errno(errno.EBADMSG, stack.ops.flush(info.fh))
    await stack.ops.release(info.fh)
    assert await remote_state(stack) == before
    assert (await stack.ops.getattr(inode)).st_size == len(b'{"ok": 1}\n')
    assert await stack.read_file(inode) == b'{"ok": 1}\n'
    kept = list((stack.cache_dir / "recovery").glob("*.spool"))
    assert [p.read_bytes() for p in kept] == [b"broken\n"]


async def test_append_and_read_write_edit_copy_on_write(stack: Stack) -> None:
    data = os.urandom(3 * BLOCK + 7)
    inode = await stack.write_file("batch", "a.bin", data)
    await rewrite(stack, inode, os.O_WRONLY | os.O_APPEND, b"tail", offset=len(data))
    assert await stack.read_file(inode) == data + b"tail"
    await rewrite(stack, inode, os.O_RDWR, b"HEAD")
    assert await stack.read_file(inode) == b"HEAD" + data[4:] + b"tail"
    assert len(await remote_state(stack)) == 1


async def test_open_read_write_without_writing_uploads_nothing(stack: Stack) -> None:
    inode = await stack.write_file("batch", "rw.txt", b"same")
    await stack.clear_requests()
    info = await stack.ops.open(inode, os.O_RDWR, None)
    assert await stack.ops.read(info.fh, 0, 10) == b"same"
    await stack.ops.flush(info.fh)
    await stack.ops.release(info.fh)
    assert [r for r in await stack.api_requests() if r["method"] != "GET"] == []


async def test_truncate_without_an_open_file_uploads_at_once(stack: Stack) -> None:
    inode = await stack.write_file("batch", "t.txt", b"0123456789")
    attr = pyfuse3.EntryAttributes()
    attr.st_size = 4
    # pyfuse3's SetattrFields is read-only
    fields = SimpleNamespace(update_size=True, update_atime=False, update_mtime=False)
    assert (await stack.ops.setattr(inode, attr, fields, None, None)).st_size == 4
    assert await stack.read_file(inode) == b"0123"
    [file_id] = (await remote_state(stack)).values()
    assert (await stack.client.retrieve(file_id)).bytes == 4


async def test_rename_of_an_uploaded_file_uploads_again_then_deletes(stack: Stack) -> None:
    inode = await stack.write_file("batch", "r.jsonl", b'{"r": 1}\n')
    batch, fine_tune = await stack.folder("batch"), await stack.folder("fine-tune")
    await stack.ops.rename(batch, b"r.jsonl", batch, b"s.jsonl", 0, None)
    assert list(await remote_state(stack)) == [("batch", "s.jsonl")]
    await stack.ops.rename(batch, b"s.jsonl", fine_tune, b"s.jsonl", 0, None)
    assert list(await remote_state(stack)) == [("fine-tune", "s.jsonl")]
    assert (await stack.ops.lookup(fine_tune, b"s.jsonl")).st_ino == inode
    await expect_missing(stack.ops, batch, b"s.jsonl")
    assert await stack.read_file(inode) == b'{"r": 1}\n'


async def test_rename_onto_an_existing_name_replaces_it(stack: Stack) -> None:
    await stack.write_file("batch", "src.txt", b"src")
    await stack.write_file("batch", "dst.txt", b"dst")
    batch = await stack.folder("batch")
    await expect_errno(
        errno.EEXIST,
        stack.ops.rename(batch, b"src.txt", batch, b"dst.txt", pyfuse3.RENAME_NOREPLACE, None),
    )
    await stack.ops.rename(batch, b"src.txt", batch, b"dst.txt", 0, None)
    assert list(await remote_state(stack)) == [("batch", "dst.txt")]
    inode = (await stack.ops.lookup(batch, b"dst.txt")).st_ino
    assert await stack.read_file(inode) == b"src"


@pytest.mark.logs_expected
async def test_rename_refused_by_the_target_purpose_changes_nothing(stack: Stack) -> None:
    await stack.write_file("batch", "notes.txt", b"not json")
    before = await remote_state(stack)
    batch, fine_tune = await stack.folder("batch"), await stack.folder("fine-tune")
    await expect_errno(
        errno.EBADMSG, stack.ops.rename(batch, b"notes.txt", fine_tune, b"notes.jsonl", 0, None)
    )
    assert await remote_state(stack) == before
    assert await stack.names("batch") == ["notes.txt"]
    assert await stack.names("fine-tune") == []


async def test_rename_of_a_file_being_written_needs_no_extra_upload(stack: Stack) -> None:
    batch = await stack.folder("batch")
    info, _ = await stack.ops.create(batch, b".tmp123", 0o644, os.O_WRONLY, None)
    await stack.ops.write(info.fh, 0, b"data")
    await stack.ops.rename(batch, b".tmp123", batch, b"final.txt", 0, None)
    await stack.ops.flush(info.fh)
    await stack.ops.release(info.fh)
    assert list(await remote_state(stack)) == [("batch", "final.txt")]
    posts = [r for r in await stack.api_requests() if r["method"] == "POST"]
    assert len(posts) == 1


async def test_folders_cannot_be_renamed_nor_files_moved_to_the_root(stack: Stack) -> None:
    await stack.write_file("batch", "f.txt", b"f")
    batch = await stack.folder("batch")
    await expect_errno(errno.EPERM, stack.ops.rename(ROOT, b"batch", ROOT, b"other", 0, None))
    await expect_errno(errno.EACCES, stack.ops.rename(batch, b"f.txt", ROOT, b"f.txt", 0, None))
    await expect_errno(
        errno.EINVAL,
        stack.ops.rename(batch, b"f.txt", batch, b"g.txt", pyfuse3.RENAME_EXCHANGE, None),
    )


async def test_edit_of_a_duplicate_keeps_its_remote_filename(stack: Stack) -> None:
    await upload(stack, "dup.txt", b"first")
    await trio.sleep(1.1)
    second = await upload(stack, "dup.txt", b"second")
    tagged = f"dup ({second[:8]}).txt"
    inode = (await stack.ops.lookup(await stack.folder("batch"), tagged.encode())).st_ino
    await rewrite(stack, inode, os.O_WRONLY | os.O_APPEND, b"!", offset=6)
    files = sorted((f.filename, f.bytes) for f in await stack.client.list_all())
    assert files == [("dup.txt", 5), ("dup.txt", 7)]
    assert sorted(await stack.names("batch")) == sorted(["dup.txt", tagged])


@pytest.mark.logs_expected
async def test_file_deleted_elsewhere_gives_enoent_on_open_and_mid_read(stack: Stack) -> None:
    # A small file is fetched whole at open; a larger one's signed URL was fetched when
    # it was looked up, so the first read is where its deletion shows.
    small = await upload(stack, "gone1.txt", b"x" * 100)
    large = await upload(stack, "gone2.txt", b"y" * 2 * BLOCK)
    batch = await stack.folder("batch")
    inode1 = (await stack.ops.lookup(batch, b"gone1.txt")).st_ino
    inode2 = (await stack.ops.lookup(batch, b"gone2.txt")).st_ino
    await trio.sleep(0.3)  # the signed URL fetched on lookup lands
    for file_id in (small, large):
        async with httpx.AsyncClient(
            base_url=stack.emulator.url,
            headers={"Authorization": f"Bearer {stack.emulator.api_key}"},
        ) as http:
            (await http.delete(f"/v1/files/{file_id}")).raise_for_status()
    await expect_errno(errno.ENOENT, stack.ops.open(inode1, os.O_RDONLY, None))
    info2 = await stack.ops.open(inode2, os.O_RDONLY, None)
    with trio.fail_after(10):
        await expect_errno(errno.ENOENT, stack.ops.read(info2.fh, 0, 10))
    await stack.ops.release(info2.fh)
    assert await stack.names("batch") == []


# -- the error table -----------------------------------------------------------------------


async def test_names_that_are_not_utf8_are_refused(stack: Stack) -> None:
    batch = await stack.folder("batch")
    await expect_errno(errno.EINVAL, stack.ops.create(batch, b"\xff.txt", 0o644, os.O_WRONLY, None))


@pytest.mark.logs_expected
async def test_unavailable_service_fails_close_with_eio_and_keeps_the_data(stack: Stack) -> None:
    batch = await stack.folder("batch")
    await stack.admin("POST", "faults", json=[{"method": "POST", "status": 503, "times": None}])
    info, _ = await stack.ops.create(batch, b"later.txt", 0o644, os.O_WRONLY, None)
    await stack.ops.write(info.fh, 0, b"precious")
    await expect_errno(errno.EIO, stack.ops.flush(info.fh))
    attempts = await posts(stack)
    assert attempts > 1  # retried before close gave up
    await stack.ops.release(info.fh)
    kept = list((stack.cache_dir / "recovery").glob("*.spool"))
    assert [p.read_bytes() for p in kept] == [b"precious"]
    # close() reported the failure: the release does not try all over again.
    assert await posts(stack) == attempts


@pytest.mark.logs_expected
async def test_a_body_that_is_not_json_is_eio_and_the_next_call_works(
    emulator: RunningEmulator, tmp_path: Path
) -> None:
    async with trio.open_nursery() as nursery:
        stack = await make_stack(emulator, nursery, tmp_path / "c", dir_cache_time=0)
        fault = {"method": "GET", "path_prefix": "/v1/files", "status": 200, "body": "<html>"}
        await stack.admin("POST", "faults", json=[fault])  # once: retried, not seen
        batch = await stack.folder("batch")
        assert await stack.ops.opendir(batch, None) > 0  # a listing call
        await stack.admin("POST", "faults", json=[{**fault, "times": None}])  # for good
        await expect_errno(errno.EIO, stack.ops.opendir(batch, None))
        await stack.admin("DELETE", "faults")
        assert await stack.ops.opendir(batch, None) > 0
        await stack.client.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.logs_expected
async def test_a_refused_key_is_eacces(emulator: RunningEmulator, tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        wrong = RunningEmulator(emulator.url, "wrong-key", emulator.data_dir, emulator.config)
        stack = await make_stack(wrong, nursery, tmp_path / "c")
        await expect_errno(errno.EACCES, stack.ops.opendir(ROOT, None))
        await expect_errno(errno.EACCES, stack.ops.lookup(await stack.folder("batch"), b"x"))
        await stack.client.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.logs_expected
async def test_an_upload_the_service_finds_too_large_is_efbig(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        small = await start_emulator(nursery, emulator_config(tmp_path, max_file_size=1000))
        stack = await make_stack(small, nursery, tmp_path / "c")
        info, _ = await stack.ops.create(
            await stack.folder("batch"), b"big.bin", 0o644, os.O_WRONLY, None
        )
        await stack.ops.write(info.fh, 0, b"x" * 2000)
        await expect_errno(errno.EFBIG, stack.ops.flush(info.fh))
        await stack.ops.release(info.fh)
        assert await stack.client.list_all() == []
        await stack.client.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.logs_expected
async def test_changes_to_a_file_deleted_elsewhere_are_kept(
    emulator: RunningEmulator, tmp_path: Path
) -> None:
    async with trio.open_nursery() as nursery:
        stack = await make_stack(emulator, nursery, tmp_path / "c", dir_cache_time=0)
        append = os.O_WRONLY | os.O_APPEND
        batch, info, file_id = await uploaded_then_written(
            stack, "shared.txt", b"base", append, b"+mine"
        )
        await stack.admin("DELETE", "requests")
        async with httpx.AsyncClient(
            base_url=emulator.url, headers={"Authorization": f"Bearer {emulator.api_key}"}
        ) as http:
            (await http.delete(f"/v1/files/{file_id}")).raise_for_status()
        await expect_missing(stack.ops, batch, b"shared.txt")
        await expect_errno(errno.EIO, stack.ops.flush(info.fh))
        await stack.ops.release(info.fh)
        kept = list((tmp_path / "c" / "recovery").glob("*.spool"))
        assert [p.read_bytes() for p in kept] == [b"base+mine"]
        await stack.client.aclose()
        nursery.cancel_scope.cancel()


# -- what a close uploads, and when ----------------------------------------------------------


async def test_touch_uploads_the_new_empty_file_at_close(stack: Stack) -> None:
    """`touch`: create, futimens on the descriptor, close: uploaded before close returns."""
    info, attrs = await stack.ops.create(
        await stack.folder("batch"), b"touched", 0o644, os.O_WRONLY, None
    )
    await stack.ops.setattr(
        attrs.st_ino,
        attrs,
        SimpleNamespace(update_size=False, update_atime=False, update_mtime=False),
        info.fh,
        None,
    )
    await stack.ops.flush(info.fh)
    assert [(f.filename, f.bytes) for f in await stack.client.list_all()] == [("touched", 0)]
    await stack.clear_requests()
    await stack.ops.release(info.fh)
    assert [r for r in await stack.api_requests() if r["method"] == "POST"] == []


async def test_rename_of_a_closed_temp_file_is_final_on_return(stack: Stack) -> None:
    """rsync: write a temp file, close it, rename it; the release may come later."""
    batch = await stack.folder("batch")
    for name, data in ((b".f.XXXX", b"data"), (b".e.XXXX", b"")):
        info, _ = await stack.ops.create(batch, name, 0o644, os.O_RDWR | os.O_EXCL, None)
        if data:
            await stack.ops.write(info.fh, 0, data)
        await stack.ops.flush(info.fh)
        await stack.ops.rename(batch, name, batch, name[1:2] + b".dat", 0, None)
        names = [f.filename for f in await stack.client.list_all()]
        assert name[1:2].decode() + ".dat" in names and name.decode() not in names
        await stack.ops.release(info.fh)
    assert sorted((f.filename, f.bytes) for f in await stack.client.list_all()) == [
        ("e.dat", 0),
        ("f.dat", 4),
    ]


async def test_rename_onto_a_file_while_both_are_open_like_gio_save(stack: Stack) -> None:
    """GLib: open the target, write and fsync a temp file, rename it over the target, close."""
    target_inode = await stack.write_file("batch", "notes.txt", b"first draft")
    batch = await stack.folder("batch")
    target = await stack.ops.open(target_inode, os.O_WRONLY, None)
    temp, _ = await stack.ops.create(batch, b".goutputstream-X", 0o644, os.O_WRONLY, None)
    await stack.ops.write(temp.fh, 0, b"second draft")
    await stack.ops.fsync(temp.fh, False)
    await stack.ops.rename(batch, b".goutputstream-X", batch, b"notes.txt", 0, None)
    files = [(f.filename, f.bytes) for f in await stack.client.list_all()]
    assert files == [("notes.txt", len(b"second draft"))]
    await stack.ops.release(temp.fh)
    await stack.ops.release(target.fh)
    inode = (await stack.ops.lookup(batch, b"notes.txt")).st_ino
    assert await stack.read_file(inode) == b"second draft"
    assert [(f.filename, f.bytes) for f in await stack.client.list_all()] == files


async def test_changes_are_logged_with_name_purpose_size_id_and_duration(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mistralfs")
    inode = await stack.write_file("batch", "log.txt", b"12345")
    [first] = await stack.client.list_all()
    await rewrite(stack, inode, os.O_WRONLY | os.O_TRUNC, b"123")
    [second] = await stack.client.list_all()
    batch = await stack.folder("batch")
    await stack.ops.rename(batch, b"log.txt", batch, b"moved.txt", 0, None)
    [third] = await stack.client.list_all()
    await stack.ops.unlink(batch, b"moved.txt", None)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    timed = re.compile(r" in \d+\.\d\d s$")

    def line(start: str, *parts: str) -> None:
        found = [m for m in lines if m.startswith(start) and all(p in m for p in parts)]
        assert found and timed.search(found[0]), (start, parts, lines)

    line("uploaded batch/log.txt", "5 bytes", first.id)
    line("uploaded batch/log.txt", "3 bytes", second.id)
    line("replaced batch/log.txt", "5 bytes", first.id)
    line("renamed batch/log.txt to batch/moved.txt", "3 bytes", second.id, third.id)
    line("deleted batch/moved.txt", "3 bytes", third.id)


async def test_setting_xattrs_is_not_supported(stack: Stack) -> None:
    inode = await stack.write_file("batch", "x.txt", b"x")
    await expect_errno(errno.ENOTSUP, stack.ops.setxattr(inode, b"user.tag", b"v", None))
    await expect_errno(errno.ENOTSUP, stack.ops.removexattr(inode, b"user.mistral.id", None))


async def test_kernel_caches_last_while_the_listing_is_trusted(
    emulator: RunningEmulator, tmp_path: Path
) -> None:
    def timeouts(attrs: pyfuse3.EntryAttributes) -> float:
        assert attrs.entry_timeout == attrs.attr_timeout
        return attrs.entry_timeout

    async with stack_caching_for(emulator, tmp_path / "a", 30.0) as stack:
        await upload(stack, "x.txt", b"x")
        batch = await stack.folder("batch")
        assert timeouts(await stack.ops.lookup(ROOT, b"batch")) == 30.0
        x = await stack.ops.lookup(batch, b"x.txt")  # lists batch/
        assert 29.0 < timeouts(x) <= 30.0
        await trio.sleep(0.2)  # what is left of the listing's time, not a new 30 s
        assert 29.0 < timeouts(await stack.ops.getattr(x.st_ino, None)) <= 29.8
        # A file being written changes under the kernel: one second at most.
        info, attrs = await stack.ops.create(batch, b"new.txt", 0o644, os.O_WRONLY, None)
        assert timeouts(attrs) == 1.0
        await stack.ops.release(info.fh)
    async with stack_caching_for(emulator, tmp_path / "b", 0.25) as stack:
        batch = await stack.folder("batch")
        x = await stack.ops.lookup(batch, b"x.txt")
        assert 0.0 < timeouts(x) <= 0.25
        await trio.sleep(0.3)  # the listing is stale: the kernel must ask again
        assert timeouts(await stack.ops.getattr(x.st_ino, None)) == 0.0
    async with stack_caching_for(emulator, tmp_path / "c", 0.0) as stack:
        batch = await stack.folder("batch")
        assert timeouts(await stack.ops.lookup(ROOT, b"batch")) == 0.0
        assert timeouts(await stack.ops.lookup(batch, b"x.txt")) == 0.0


async def test_data_being_written_is_in_a_spool_file_on_disk(stack: Stack) -> None:
    info, _ = await stack.ops.create(
        await stack.folder("batch"), b"s.bin", 0o644, os.O_WRONLY, None
    )
    await stack.ops.write(info.fh, 0, b"on disk, not in memory")
    [spool] = (stack.cache_dir / "spool").rglob("*.spool")
    assert spool.read_bytes() == b"on disk, not in memory"
    await stack.ops.flush(info.fh)
    await stack.ops.release(info.fh)
    assert list((stack.cache_dir / "spool").rglob("*.spool")) == []


async def test_a_spools_note_is_rewritten_in_place_as_its_state_changes(stack: Stack) -> None:
    """The crash-recovery note is overwritten, never truncated (ext4 flushes truncated files)."""
    info, _ = await stack.ops.create(
        await stack.folder("batch"), b"n.bin", 0o644, os.O_WRONLY, None
    )
    await stack.ops.write(info.fh, 0, b"x")
    [note] = (stack.cache_dir / "spool").rglob("*.json")
    before = note.stat()
    assert json.loads(note.read_bytes())["complete"] is False
    await stack.ops.flush(info.fh)
    meta = json.loads(note.read_bytes())  # trailing padding is valid JSON
    assert meta["complete"] is True and meta["uploaded"] is True and meta["upload_started"]
    after = note.stat()
    assert after.st_ino == before.st_ino and after.st_size >= before.st_size
    await stack.ops.release(info.fh)
    assert list((stack.cache_dir / "spool").rglob("*")) == []


# -------------------------------------------- large new files: uploaded while written

MiB = 1024 * 1024
GROWING = GROWING_START_BYTES + 2 * MiB  # past the size at which the upload starts


async def write_in_order(stack: Stack, fh: int, data: bytes, start: int = 0) -> None:
    for offset in range(0, len(data), MiB):
        await stack.ops.write(fh, start + offset, data[offset : offset + MiB])
    await trio.sleep(0.05)  # let the upload task take what was written


async def test_a_large_new_file_is_uploaded_while_it_is_written(stack: Stack) -> None:
    data = os.urandom(GROWING)
    info, attrs = await stack.ops.create(
        await stack.folder("batch"), b"big.bin", 0o644, os.O_WRONLY, None
    )
    first = GROWING_START_BYTES - MiB
    await write_in_order(stack, info.fh, data[:first])
    assert await posts(stack) == 0  # not yet: small files are sent whole at close
    await write_in_order(stack, info.fh, data[first:], first)
    for _ in range(1000):  # the upload's task starts when the scheduler gets to it
        if await posts(stack) != 0:
            break
        await trio.sleep(0.01)
    assert await posts(stack) == 1  # under way before the close
    await stack.ops.flush(info.fh)
    await stack.ops.release(info.fh)
    assert await posts(stack) == 1
    assert list(await remote_state(stack)) == [("batch", "big.bin")]
    assert await stack.read_file(attrs.st_ino) == data


async def test_a_write_before_the_end_stops_the_upload_and_the_file_goes_whole(
    stack: Stack,
) -> None:
    data = bytearray(os.urandom(GROWING))
    info, attrs = await stack.ops.create(
        await stack.folder("batch"), b"edit.bin", 0o644, os.O_WRONLY, None
    )
    await write_in_order(stack, info.fh, bytes(data))
    await stack.ops.write(info.fh, 10, b"changed")  # like a tool writing a header last
    data[10:17] = b"changed"
    await stack.ops.flush(info.fh)
    await stack.ops.release(info.fh)
    assert await posts(stack) == 2  # the stopped one, then the whole file
    assert list(await remote_state(stack)) == [("batch", "edit.bin")]
    assert await stack.read_file(attrs.st_ino) == data


async def test_a_truncate_while_written_stops_the_upload_and_the_file_goes_whole(
    stack: Stack,
) -> None:
    data = os.urandom(GROWING)
    info, attrs = await stack.ops.create(
        await stack.folder("batch"), b"cut.bin", 0o644, os.O_WRONLY, None
    )
    await write_in_order(stack, info.fh, data)
    assert await posts(stack) == 1  # under way
    size = pyfuse3.EntryAttributes()
    size.st_size = MiB
    # pyfuse3's SetattrFields is read-only
    fields = SimpleNamespace(update_size=True, update_atime=False, update_mtime=False)
    assert (await stack.ops.setattr(attrs.st_ino, size, fields, info.fh, None)).st_size == MiB
    await stack.ops.flush(info.fh)
    await stack.ops.release(info.fh)
    assert await posts(stack) == 2  # the stopped one, then the whole file
    assert list(await remote_state(stack)) == [("batch", "cut.bin")]
    assert await stack.read_file(attrs.st_ino) == data[:MiB]


async def test_a_file_deleted_while_written_is_never_stored(stack: Stack) -> None:
    batch = await stack.folder("batch")
    info, _ = await stack.ops.create(batch, b"gone.bin", 0o644, os.O_WRONLY, None)
    await write_in_order(stack, info.fh, os.urandom(GROWING))
    assert await posts(stack) == 1
    await stack.ops.unlink(batch, b"gone.bin", None)
    await stack.ops.write(info.fh, GROWING, b"more")
    await stack.ops.flush(info.fh)
    await stack.ops.release(info.fh)
    await trio.sleep(0.1)
    assert await stack.client.list_all() == []


async def test_a_file_renamed_while_written_is_stored_once_under_its_new_name(
    stack: Stack,
) -> None:
    batch = await stack.folder("batch")
    data = os.urandom(GROWING)
    info, attrs = await stack.ops.create(batch, b".part", 0o644, os.O_WRONLY, None)
    await write_in_order(stack, info.fh, data[: GROWING - MiB])
    await stack.ops.rename(batch, b".part", batch, b"done.bin", 0, None)
    await write_in_order(stack, info.fh, data[GROWING - MiB :], GROWING - MiB)
    await stack.ops.flush(info.fh)
    await stack.ops.release(info.fh)
    assert list(await remote_state(stack)) == [("batch", "done.bin")]
    assert await stack.read_file(attrs.st_ino) == data


@pytest.mark.logs_expected
async def test_content_refused_as_it_was_written_is_refused_whole_too(stack: Stack) -> None:
    """A refusal of a growing upload may be of its chunked body: the whole file gets its say."""
    folder = await stack.folder("fine-tune")
    info, _ = await stack.ops.create(folder, b"bad.jsonl", 0o644, os.O_WRONLY, None)
    await write_in_order(stack, info.fh, b"not json\n" * (GROWING // 9))
    await expect_errno(errno.EBADMSG, stack.ops.flush(info.fh))
    assert await posts(stack) == 2  # as it was written, then whole
    assert stack.client.sends_growing_uploads  # refused whole too: the content, not the form
    await stack.ops.release(info.fh)
    assert len(list((stack.cache_dir / "recovery").glob("*.spool"))) == 1
    assert await stack.client.list_all() == []


async def test_a_missing_name_in_a_listed_folder_is_an_absence_the_kernel_may_keep(
    emulator: RunningEmulator, tmp_path: Path
) -> None:
    async with stack_caching_for(emulator, tmp_path / "cache", dir_cache_time=30.0) as stack:
        added: list[tuple[int, str]] = []
        stack.ops.fs.namespace.on_name_added = lambda inode, name: added.append((inode, name))
        await stack.client.upload(
            write_tmp(tmp_path, "first.txt", b"1"), filename="first.txt", purpose="batch"
        )
        batch = await stack.folder("batch")
        assert await stack.names("batch") == ["first.txt"]
        assert added == []  # no absence was told yet: a listing tells the kernel nothing
        missing = await stack.ops.lookup(batch, b"nope.txt")
        assert missing.st_ino == 0 and 29 < missing.entry_timeout <= 30  # the listing's time
        await expect_errno(errno.ENOENT, stack.ops.lookup(ROOT, b"nope"))  # not at the root
        await stack.client.upload(
            write_tmp(tmp_path, "nope.txt", b"x"), filename="nope.txt", purpose="batch"
        )
        stack.ops.fs.namespace.invalidate()  # as when the listing's time is up
        assert (await stack.ops.lookup(batch, b"nope.txt")).st_ino != 0
        assert added == [(batch, "nope.txt")]  # so the kernel drops the absence it kept


def write_tmp(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path
