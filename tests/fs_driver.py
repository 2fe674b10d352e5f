"""Driving `Operations` as the kernel would for common tools, without a kernel: the
calls `cp`, `cat`, `ls` and `>>` make, for the tests that run the filesystem directly."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio

from mistralfs.api.protocol import FilesApi
from mistralfs.fs.build import FsOptions, build_filesystem
from mistralfs.fs.operations import Operations

ROOT = pyfuse3.ROOT_INODE


def fast_options(tmp_path: Path, block: int, **options: object) -> FsOptions:
    """The fast tier's options (blocks of `block` bytes, listings never trusted), its
    folders under `tmp_path`, and `options` besides."""
    settings = FsOptions(
        spool_dir=tmp_path / "spool",
        recovery_dir=tmp_path / "recovery",
        cache_size=64 * block,
        block_size=block,
        max_file_size=64 * 1024 * 1024,
        dir_cache_time=0,
    )
    return dataclasses.replace(settings, **options)


@asynccontextmanager
async def fast_filesystem(
    api: FilesApi, tmp_path: Path, block: int, **options: object
) -> AsyncIterator[Operations]:
    """The filesystem as the mount wires it, over `api`, with `fast_options`."""
    settings = fast_options(tmp_path, block, **options)
    async with trio.open_nursery() as nursery:
        yield Operations(build_filesystem(api, nursery, settings).fs)
        nursery.cancel_scope.cancel()


@dataclass
class FsDriver:
    ops: Operations
    chunk: int = 64 * 1024  # the size of each write and read

    async def folder(self, name: str) -> int:
        return (await self.ops.lookup(ROOT, name.encode())).st_ino

    async def inode(self, folder: str, name: str) -> int:
        return (await self.ops.lookup(await self.folder(folder), name.encode())).st_ino

    async def open_truncated(self, folder: str, name: str) -> int:
        """As `cp` opens its target: a new name is created, an existing one truncated."""
        parent = await self.folder(folder)
        try:
            inode = (await self.ops.lookup(parent, name.encode())).st_ino
        except pyfuse3.FUSEError:
            info, _ = await self.ops.create(parent, name.encode(), 0o644, os.O_WRONLY, None)
        else:
            info = await self.ops.open(inode, os.O_WRONLY | os.O_TRUNC, None)
        return info.fh

    async def write_and_close(self, fh: int, data: bytes, offset: int = 0) -> None:
        try:
            for start in range(0, len(data), self.chunk):
                await self.ops.write(fh, offset + start, data[start : start + self.chunk])
            await self.ops.flush(fh)
        finally:
            await self.ops.release(fh)

    async def write_file(self, folder: str, name: str, data: bytes) -> None:
        await self.write_and_close(await self.open_truncated(folder, name), data)

    async def append(self, folder: str, name: str, data: bytes) -> None:
        inode = await self.inode(folder, name)
        size = (await self.ops.getattr(inode)).st_size
        info = await self.ops.open(inode, os.O_WRONLY, None)
        await self.write_and_close(info.fh, data, size)

    async def read_file(self, folder: str, name: str) -> bytes:
        inode = await self.inode(folder, name)
        info = await self.ops.open(inode, os.O_RDONLY, None)
        size = (await self.ops.getattr(inode)).st_size
        parts = [
            await self.ops.read(info.fh, offset, self.chunk)
            for offset in range(0, size, self.chunk)
        ]
        await self.ops.release(info.fh)
        return b"".join(parts)

    async def names(self, folder: str) -> list[str]:
        return sorted(name for name, _ in await self.ops.fs.list_dir(await self.folder(folder)))
