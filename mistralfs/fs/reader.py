"""Reading remote content: signed URLs, a byte-bounded LRU block cache, and prefetch.

Content never changes for a file id, so a block fetched once is good until evicted.
Blocks are fetched with HTTP Range from the signed URL (another host, no API key); a
file no larger than one block is fetched whole from `/content` in a single request.
Concurrent readers of one block share one request; sequential readers get a prefetch
window that doubles up to a bound. With `--disk-cache`, a block missing from memory is
looked for on disk before the network, and kept there after (disk_cache.py).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import trio
from cachetools import LRUCache, TLRUCache

from mistralfs.api import FilesClient, RemoteFile, SignedUrl, UrlExpired
from mistralfs.fs.disk_cache import DiskCache, NoDiskCache

log = logging.getLogger(__name__)

SIGNED_URL_HOURS = 1
SIGNED_URL_MARGIN = 300.0  # seconds before expiry at which a cached URL is no longer used
MAX_PREFETCH_BLOCKS = 8

BlockKey = tuple[str, int]


@dataclass
class _Fetch:
    """One block request in flight; later readers of the block wait on it."""

    done: trio.Event = field(default_factory=trio.Event)
    data: bytes | None = None
    error: BaseException | None = None


@dataclass
class ReadState:
    """Per open file: where the last read ended and how far ahead to prefetch."""

    next_offset: int = 0
    window: int = 1


class BlockReader:
    """Serves `read()` for remote files from the block cache, fetching what is missing."""

    def __init__(
        self,
        client: FilesClient,
        nursery: trio.Nursery,
        *,
        cache_size: int,
        block_size: int,
        disk: DiskCache | NoDiskCache | None = None,
    ) -> None:
        self._client = client
        self._disk = disk or NoDiskCache()
        self._nursery = nursery
        self.block_size = block_size
        self._blocks: LRUCache[BlockKey, bytes] = LRUCache(maxsize=cache_size, getsizeof=len)
        self._inflight: dict[BlockKey, _Fetch] = {}
        self._urls: TLRUCache[str, SignedUrl] = TLRUCache(
            maxsize=4096,
            ttu=lambda _key, url, _now: url.expires_at - SIGNED_URL_MARGIN,
            timer=time.time,
        )
        self._max_prefetch = max(1, min(MAX_PREFETCH_BLOCKS, cache_size // (4 * block_size)))
        self.hits = 0
        self.misses = 0
        self._prefetching = 0

    async def read(self, remote: RemoteFile, offset: int, size: int, state: ReadState) -> bytes:
        end = min(offset + size, remote.bytes)
        if offset >= end:
            return b""
        first, last = offset // self.block_size, (end - 1) // self.block_size
        parts = []
        for index in range(first, last + 1):
            block = await self._block(remote, index)
            start = index * self.block_size
            parts.append(block[max(offset - start, 0) : end - start])
        self._maybe_prefetch(remote, offset, end, state)
        return b"".join(parts)

    async def copy_into(self, remote: RemoteFile, fd: int) -> None:
        """Write the whole content to `fd`, one block at a time, for copy-on-write."""
        for index in range((remote.bytes + self.block_size - 1) // self.block_size):
            os.pwrite(fd, await self._block(remote, index), index * self.block_size)

    async def prepare(self, remote: RemoteFile) -> None:
        """Fetch what the first read will need, so that a deleted file fails at open.

        A small file's whole content (one request); a larger file's signed URL.
        """
        if 0 < remote.bytes <= self.block_size:
            await self._block(remote, 0)
        else:
            await self.signed_url(remote.id)

    async def signed_url(self, file_id: str) -> SignedUrl:
        url = self._urls.get(file_id)
        if url is None:
            url = await self._client.signed_url(file_id, expiry_hours=SIGNED_URL_HOURS)
            self._urls[file_id] = url
        return url

    def forget(self, file_id: str) -> None:
        """Drop what is cached for a file that no longer exists."""
        self._urls.pop(file_id, None)
        self._disk.forget(file_id)
        for key in [k for k in self._blocks if k[0] == file_id]:
            self._blocks.pop(key, None)

    def _maybe_prefetch(self, remote: RemoteFile, offset: int, end: int, state: ReadState) -> None:
        if offset != state.next_offset:
            state.window = 1  # random access: no prefetch until reads are sequential again
            state.next_offset = end
            return
        state.next_offset = end
        last_block = (remote.bytes - 1) // self.block_size
        first = (end - 1) // self.block_size + 1
        for index in range(first, min(first + state.window, last_block + 1)):
            key = (remote.id, index)
            if key not in self._blocks and key not in self._inflight:
                self._nursery.start_soon(self._prefetch, remote, index)
        state.window = min(state.window * 2, self._max_prefetch)

    async def _prefetch(self, remote: RemoteFile, index: int) -> None:
        self._prefetching += 1
        try:
            await self._block(remote, index)
        except Exception as exc:  # a reader that needs the block will see the error itself
            log.debug("prefetch of %s block %d failed: %s", remote.id, index, exc)
        finally:
            self._prefetching -= 1

    def stats(self) -> dict[str, object]:
        looked_up = self.hits + self.misses
        return {
            "bytes": self._blocks.currsize,
            "max_bytes": self._blocks.maxsize,
            "blocks": len(self._blocks),
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": self.hits / looked_up if looked_up else None,
            "prefetch_in_flight": self._prefetching,
            "signed_urls": len(self._urls),
        }

    async def _block(self, remote: RemoteFile, index: int) -> bytes:
        key = (remote.id, index)
        while True:
            cached = self._blocks.get(key)
            if cached is not None:
                self.hits += 1
                return cached
            fetch = self._inflight.get(key)
            if fetch is None:
                self.misses += 1
                return await self._fetch_shared(remote, index)
            await fetch.done.wait()
            if fetch.data is not None:
                return fetch.data
            if isinstance(fetch.error, Exception):
                raise fetch.error
            # The fetching task was cancelled: try again as the fetcher.

    async def _fetch_shared(self, remote: RemoteFile, index: int) -> bytes:
        key = (remote.id, index)
        fetch = self._inflight[key] = _Fetch()
        try:
            blocks = await self._disk.load(remote.id, remote.bytes, index, 1)
            if blocks is None:
                blocks = [await self._fetch(remote, index)]
                self._disk.store(remote.id, remote.bytes, index, blocks)
            fetch.data = blocks[0]
            self._blocks[key] = fetch.data
            return fetch.data
        except BaseException as exc:
            fetch.error = exc
            raise
        finally:
            del self._inflight[key]
            fetch.done.set()

    async def _fetch(self, remote: RemoteFile, index: int) -> bytes:
        if remote.bytes <= self.block_size:
            # One block in all: one request to /content beats a signed URL and a GET.
            return await self._client.content(remote.id, remote.bytes)
        start = index * self.block_size
        length = min(self.block_size, remote.bytes - start)
        url = await self.signed_url(remote.id)
        try:
            data = await self._client.read_range(url.url, start, length)
        except UrlExpired:
            log.info("signed URL for %s refused; fetching a fresh one", remote.id)
            self._urls.pop(remote.id, None)
            url = await self.signed_url(remote.id)
            data = await self._client.read_range(url.url, start, length)
        if len(data) != length:
            raise ShortRead(remote.id, start, length, len(data))
        return data


class ShortRead(Exception):
    """The storage answered fewer bytes than the file's listed size promises."""

    def __init__(self, file_id: str, start: int, wanted: int, got: int) -> None:
        super().__init__(f"{file_id}: asked for {wanted} bytes at {start}, got {got}")
