"""Reading remote content: signed URLs, a byte-bounded LRU block cache, and prefetch.

Content never changes for a file id, so a block fetched once is good until evicted.
Blocks are fetched with HTTP Range from the signed URL (another host, no API key); a
file no larger than one block is fetched whole from `/content` in a single request.
Concurrent readers of one block share one request; sequential readers get a prefetch
window that doubles up to a bound (or opens at once for a stream read from the start),
fetched as runs of several blocks per request (per-request cost, not bandwidth, is what
limits a Python client on a fast link), each block cached and handed to its readers as
soon as it is in. Blocks on their way count against the cache's bound: room is made for
them when they are asked for. With
`--disk-cache`, a run missing from memory is looked for on disk before the network, and
kept there after (disk_cache.py).
"""

from __future__ import annotations

import collections
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import trio
from cachetools import LRUCache, TLRUCache

from mistralfs.api import RemoteFile, SignedUrl, UrlExpired
from mistralfs.api.buffers import BlockBuffers
from mistralfs.api.protocol import FilesApi
from mistralfs.fs.disk_cache import DiskCache, NoDiskCache
from mistralfs.fs.failures import RecentFailures

# A block's bytes: from the network as bytes, from the disk tier as a memoryview of its
# mapped file. Both are served to FUSE without a copy.
Block = bytes | memoryview

log = logging.getLogger(__name__)

# Signed URLs are asked for a day (the service allows 1 to 168 hours) and kept per file
# id: a read needs no round trip to the API for most of a URL's life. One that has
# lived half its life is renewed in the background when used, and one within an hour
# of its expiry is not used at all.
SIGNED_URL_HOURS = 24
SIGNED_URL_MARGIN = 3600.0
SIGNED_URL_RENEW_AFTER = SIGNED_URL_HOURS * 3600 / 2
MAX_URLS_PER_LISTING = 32  # large files of a listed folder whose URL is fetched ahead
# Blocks fetched ahead of a sequential reader, per open file: the window doubles at each
# read up to FREE_GROWTH_BLOCKS, and past that only while doing so made reads faster, up to
# MAX_PREFETCH_BLOCKS, half of --cache-size, and --max-throughput reached.
# 32 blocks are 8 parts of 4 MiB: about 190 MiB/s over a 100 ms link at 60 MB/s per
# connection, reached within a reader's first few reads.
# A stream read from the start (a first read at offset 0 larger than FIRST_READ_EXACT:
# dd, cp, cat, a whole-file read; not head, whose reads are small) opens the window at
# its bound at once: on a long link each doubling costs a round trip, and the first
# ones a new connection each (3 round trips with TLS).
FREE_GROWTH_BLOCKS = 32
MAX_PREFETCH_BLOCKS = 128
RUN_BLOCKS = 4  # blocks fetched by one request when prefetching, at least: parts of 4 MiB
# Block requests in flight at once, across files: as many connections to storage as the
# client's transport allows per host (32, transport.py). Requests ahead
# start only while one of them stays free besides a read's own: a read's own block never
# waits for a connection behind blocks fetched ahead. A window larger than RUN_BLOCKS
# times the requests left for it goes in longer runs. On a long link each connection
# carries its own share of the rate, and with blocks handed over as they come a run's
# first blocks serve reads while the rest is on its way: 32 connections read a 128-block
# window faster than 16 (R1, 256 MiB at 100 ms over TLS: 232 MiB/s against 204).
STORAGE_CONNECTIONS = 32
MAX_RUNS_AHEAD = STORAGE_CONNECTIONS - 1
FASTER = 1.1  # a window counts as faster than the one before when it reads this much faster
MAX_WHOLE_FILES_AHEAD = 32  # small files fetched ahead at once, across the mount (as
# many as the transport keeps connections to one host: a long link waits on round trips)
MAX_URLS_AHEAD = 4  # signed URLs fetched ahead at once
# Connections to storage opened ahead when a large file is looked up or listed, beside
# its signed URL's request (on a long link each costs two round trips, TCP and TLS): a
# stream's first ranges then start on open connections. Half the requests a stream's
# window opens at once; a lookup that no read follows costs no more handshakes.
CONNECTIONS_AHEAD = 16
FIRST_READ_EXACT = 128 * 1024  # a first read up to this size gets its own exact request
# A sequential reader's blocks leave memory once it has read this many blocks past them
# (the kernel sends a stream's reads a few at a time, not always in order; its page
# cache keeps what was read, for the reads that come back to it), and their memory holds
# the blocks fetched ahead (buffers.py): a cold read of a large file touches no more
# fresh memory than its window.
BEHIND_BLOCKS = 8
BUFFERS_KEPT = 16  # idle block memory kept to be reused, at most (MiB at 1 MiB blocks)

BlockKey = tuple[str, int]


@dataclass
class _Fetch:
    """One block request in flight; later readers of the block wait on it."""

    done: trio.Event = field(default_factory=trio.Event)
    data: Block | None = None
    error: BaseException | None = None
    reserved: int = 0  # bytes of the cache's bound held for it until it lands


@dataclass
class ReadState:
    """Per open file: where the last read ended and how far ahead to prefetch."""

    next_offset: int = 0
    window: int = 1
    started: bool = False  # a first read has been answered
    # How fast the reads went at the window's present size, and at the one before; the
    # first window's worth of reads after it grew is not counted, as the parts it added
    # are still on their way.
    probe_skip: int = 0
    probe_started: float = 0.0
    probe_bytes: int = 0
    last_rate: float = 0.0
    settled: bool = False  # the window stopped growing: a larger one was no faster

    def restart(self, offset: int) -> None:
        """A seek: the window closes, and is measured again as it grows."""
        self.next_offset, self.window = offset, 1
        self.probe_skip, self.probe_bytes, self.last_rate, self.settled = 0, 0, 0.0, False


class BlockReader:
    """Serves `read()` for remote files from the block cache, fetching what is missing."""

    def __init__(
        self,
        client: FilesApi,
        nursery: trio.Nursery,
        *,
        cache_size: int,
        block_size: int,
        disk: DiskCache | NoDiskCache | None = None,
        max_throughput: float | None = None,
        free_growth_blocks: int = FREE_GROWTH_BLOCKS,
    ) -> None:
        self._client = client
        self._disk = disk or NoDiskCache()
        self._nursery = nursery
        self.block_size = block_size
        self._buffers = BlockBuffers(block_size, keep=BUFFERS_KEPT)
        self._blocks: _BlockCache = _BlockCache(cache_size, self._buffers)
        self._inflight: dict[BlockKey, _Fetch] = {}
        self._urls: TLRUCache[str, SignedUrl] = TLRUCache(
            maxsize=4096,
            ttu=lambda _key, url, _now: url.expires_at - SIGNED_URL_MARGIN,
            timer=time.time,
        )
        self._max_prefetch = max(1, min(MAX_PREFETCH_BLOCKS, cache_size // (2 * block_size)))
        self._max_throughput = max_throughput  # bytes/s one reader need not go past
        self._free_growth = free_growth_blocks
        # Blocks on their way at once, across files (a read's own blocks always go), and
        # the requests fetching them.
        self._max_in_flight = max(RUN_BLOCKS, cache_size // (2 * block_size))
        self._requests = 0
        # Bytes of blocks on their way: the cache holds at most its bound less these, so
        # that what is cached and what is coming stay within --cache-size together.
        self._reserved = 0
        # Small files fetched ahead (see readahead.py): a bounded number at a time.
        self._whole_files_limit = trio.CapacityLimiter(MAX_WHOLE_FILES_AHEAD)
        self._url_fetches: dict[str, trio.Event] = {}  # signed URLs being fetched, by id
        self._renewing: set[str] = set()  # ids whose URL is renewed in the background
        # A file whose fetch just gave up fails at once for a moment: the kernel's next
        # request for the same read must not wait the retry time again.
        self._failures = RecentFailures()
        self._urls_ahead_limit = trio.CapacityLimiter(MAX_URLS_AHEAD)
        self.hits = 0
        self.misses = 0
        # Bytes by where they came from: network and disk into memory, memory to reads.
        self.bytes_from: collections.Counter[str] = collections.Counter()

    async def read(
        self, remote: RemoteFile, offset: int, size: int, state: ReadState
    ) -> bytes | memoryview:
        end = min(offset + size, remote.bytes)
        if offset >= end:
            return b""
        first, last = offset // self.block_size, (end - 1) // self.block_size
        exact = not state.started and self._first_read_exact(remote, offset, end)
        state.started = True
        if exact:
            # Time to first byte: the first read waits for its own bytes only, then the
            # blocks are fetched for the reads that follow.
            [data] = await self._read_range(remote, offset, end - offset, end - offset)
            self.bytes_from["network"] += len(data)
            self._schedule(remote, first, last, self._ahead(offset, end, state), waited=False)
            return data
        ahead = self._ahead(offset, end, state)
        self._schedule(remote, first, last, ahead)
        if ahead:
            self._leave_behind(remote.id, first - BEHIND_BLOCKS, last - first + 1)
        parts = []
        for index in range(first, last + 1):
            in_memory = (remote.id, index) in self._blocks
            block = await self._block(remote, index)
            start = index * self.block_size
            # A view, not a copy: pyfuse3 takes any buffer.
            parts.append(memoryview(block)[max(offset - start, 0) : end - start])
            self.bytes_from["memory"] += len(parts[-1]) if in_memory else 0
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _leave_behind(self, file_id: str, before: int, span: int) -> None:
        """A sequential reader's blocks just before `before` leave memory, for their
        memory to hold the blocks ahead (see BEHIND_BLOCKS): as many as the read spans
        and a few more, so that a stream's reads, a little out of order, leave none
        behind. A block left all the same stays, as any block does, until the cache
        needs its room."""
        for index in range(max(0, before - span - 4), before):
            self._blocks.drop((file_id, index))

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
        """The cached URL, or a fresh one; callers asking at once share one request.

        A cached URL past half its life is still used, and renewed in the background.
        """
        url = self._urls.get(file_id)
        if url is not None:
            lived = SIGNED_URL_HOURS * 3600 - (url.expires_at - time.time())
            if lived > SIGNED_URL_RENEW_AFTER and file_id not in self._renewing:
                self._renewing.add(file_id)
                self._nursery.start_soon(self._renew_url, file_id)
            return url
        while (url := self._urls.get(file_id)) is None:
            pending = self._url_fetches.get(file_id)
            if pending is None:
                fetch = self._url_fetches[file_id] = trio.Event()
                try:
                    url = await self._failures.run(
                        file_id,
                        lambda: self._client.signed_url(file_id, expiry_hours=SIGNED_URL_HOURS),
                    )
                    self._urls[file_id] = url
                    return url
                finally:
                    del self._url_fetches[file_id]
                    fetch.set()
            await pending.wait()  # then use its URL, or ask again if it failed
        return url

    async def _renew_url(self, file_id: str) -> None:
        """Replace a cached URL past half its life; the old one serves meanwhile."""
        try:
            url = await self._client.signed_url(file_id, expiry_hours=SIGNED_URL_HOURS)
        except Exception as exc:  # the old URL serves until it is refused or expires
            log.debug("signed URL for %s not renewed: %s", file_id, exc)
        else:
            self._urls[file_id] = url
        finally:
            self._renewing.discard(file_id)

    def prefetch_urls(self, remotes: list[RemoteFile]) -> None:
        """A folder was listed: fetch the signed URLs of its first large files ahead, so
        that opening one of them next costs one round trip to its first byte."""
        large = [r for r in remotes if r.bytes > self.block_size]
        for remote in large[:MAX_URLS_PER_LISTING]:
            self.prefetch_url(remote)

    def prefetch_url(self, remote: RemoteFile) -> None:
        """Fetch a large file's signed URL in the background, as an open is likely next,
        and open connections to storage beside it (CONNECTIONS_AHEAD), to the host of
        the URLs seen before, or once this one tells where it is."""
        if remote.bytes <= self.block_size:
            return
        storage = self._client.storage_url
        if storage is not None:
            self._nursery.start_soon(self._client.connect_ahead, storage, CONNECTIONS_AHEAD)
        if remote.id not in self._urls and remote.id not in self._url_fetches:
            self._nursery.start_soon(self._fetch_url_in_background, remote.id)

    async def _fetch_url_in_background(self, file_id: str) -> None:
        async with self._urls_ahead_limit:
            try:
                url = await self.signed_url(file_id)
            except Exception as exc:  # the open that needs it will ask again and see the error
                log.debug("signed URL for %s not fetched ahead: %s", file_id, exc)
                return
            await self._client.connect_ahead(url.url, CONNECTIONS_AHEAD)

    def prefetch_whole(self, remote: RemoteFile) -> bool:
        """Start fetching a small file (at most one block) in the background; False when
        it is not small, or already cached or on its way."""
        key = (remote.id, 0)
        if not 0 < remote.bytes <= self.block_size or key in self._blocks or key in self._inflight:
            return False
        fetches = self._register(remote, 0, 1)
        self._nursery.start_soon(self._fetch_whole_in_background, remote, fetches)
        return True

    async def _fetch_whole_in_background(self, remote: RemoteFile, fetches: list[_Fetch]) -> None:
        async with self._whole_files_limit:
            await self._fetch_in_background(remote, 0, fetches)

    def forget(self, file_id: str) -> None:
        """Drop what is cached for a file that no longer exists."""
        self._urls.pop(file_id, None)
        self._disk.forget(file_id)
        for key in [k for k in self._blocks if k[0] == file_id]:
            self._blocks.drop(key)

    def _first_read_exact(self, remote: RemoteFile, offset: int, end: int) -> bool:
        if remote.bytes <= self.block_size or end - offset > FIRST_READ_EXACT:
            return False
        key = (remote.id, offset // self.block_size)
        return key not in self._blocks and key not in self._inflight and key not in self._disk

    def _ahead(self, offset: int, end: int, state: ReadState) -> int:
        """How many blocks past this read to prefetch; the window grows while reads are
        sequential and closes on a seek.

        The kernel's readahead sends several reads at once and they may arrive out of
        order, so "sequential" means near where the reads have got to, not exactly there.
        """
        if abs(offset - state.next_offset) <= state.window * self.block_size:
            if offset == state.next_offset == 0 and end > FIRST_READ_EXACT:
                self._open_stream(state)
            state.next_offset = max(state.next_offset, end)
            ahead = state.window
            self._grow(state, end - offset)
            return ahead
        state.restart(end)
        return 0

    def _open_stream(self, state: ReadState) -> None:
        """A large first read from the start of the file: the window opens at its bound
        (with --max-throughput, at the size it reaches freely, then grows by measure)."""
        if self._max_throughput is None:
            state.window, state.settled = self._max_prefetch, True
        else:
            state.window = max(state.window, min(self._free_growth, self._max_prefetch))
            state.probe_skip, state.probe_bytes = state.window * self.block_size, 0

    def _grow(self, state: ReadState, read: int) -> None:
        """Double the window while a larger one reads faster, within the bounds.

        On a long link a reader's speed is what is in flight over the round trip, so
        the window grows until doubling it no longer speeds reads up (the link, the
        program or the CPU is then the limit), or reads reach --max-throughput.
        """
        if state.settled or state.window >= self._max_prefetch:
            return
        now = trio.current_time()
        if state.window < self._free_growth:
            state.window = min(state.window * 2, self._max_prefetch)
            state.probe_skip, state.probe_bytes = state.window * self.block_size, 0
            return
        if state.probe_skip > 0:
            state.probe_skip -= read
            state.probe_started = now
            return
        state.probe_bytes += read
        if state.probe_bytes < state.window * self.block_size:
            return  # not a whole window read at this size yet
        rate = state.probe_bytes / max(now - state.probe_started, 1e-6)
        reached = self._max_throughput is not None and rate >= self._max_throughput
        if reached or (state.last_rate and rate < state.last_rate * FASTER):
            state.settled = True
            return
        state.last_rate = rate
        state.window = min(state.window * 2, self._max_prefetch)
        state.probe_skip, state.probe_bytes = state.window * self.block_size, 0

    def _schedule(
        self, remote: RemoteFile, first: int, last: int, ahead: int, *, waited: bool = True
    ) -> None:
        """Start fetching the missing blocks of a read, and `ahead` blocks past it.

        The read's own blocks are fetched one per request, so that it waits for no
        more than it needs, and first, so that they take the connection left idle; the
        blocks ahead go in runs of several per request, only while a connection stays
        free for the next read's own block. A run that starts right after the last
        block that a read waits for (`waited`) is asked for in that block's request:
        blocks are handed over as they come, so the read waits no longer for it, and a
        new connection is not waited for (on a long link, several round trips).
        """
        last_block = (remote.bytes - 1) // self.block_size
        wanted = [
            index
            for index in range(first, min(last + ahead, last_block) + 1)
            if (remote.id, index) not in self._blocks and (remote.id, index) not in self._inflight
        ]
        now = [[index, 1] for index in wanted if index <= last]
        self.misses += len(now)
        ahead_missing = [index for index in wanted if index > last]
        if len(ahead_missing) < RUN_BLOCKS and (last + 1) not in ahead_missing:
            ahead_missing = []  # refill in whole runs, not one block per read
        # Bounded in total too, however many files are being read at once.
        room = self._max_in_flight - len(self._inflight) - len(now)
        runs_room = MAX_RUNS_AHEAD - self._requests - len(now)
        longest = max(RUN_BLOCKS, -(-ahead // MAX_RUNS_AHEAD))
        runs = list(_runs(ahead_missing, longest))
        if longest > RUN_BLOCKS and runs and runs[-1][1] < longest:
            run_first, count = runs[-1]
            if run_first != last + 1 and run_first + count - 1 != last_block:
                # A window wider than the runs allow is refilled at its end in runs as
                # long as those that opened it, not a few blocks per read: the
                # connections then hold the whole window between them.
                runs.pop()
        later = []
        for run_first, count in runs:
            if count > room:
                break
            if waited and now and now[-1][0] == last == run_first - 1:
                now[-1][1] += count  # the read's last block heads the run
            elif runs_room <= 0:
                break
            else:
                later.append((run_first, count))
                runs_room -= 1
            room -= count
        for run_first, count in [*now, *later]:
            taken = self._disk.take(remote.id, remote.bytes, run_first, count)
            if taken is not None:  # in the page cache: mapped at once, no task needed
                for index, block in enumerate(taken, start=run_first):
                    self._blocks[(remote.id, index)] = block
                continue
            # Registered now, not when the task starts, so that no other read fetches them.
            fetches = self._register(remote, run_first, count)
            own = run_first <= last
            self._nursery.start_soon(self._fetch_in_background, remote, run_first, fetches, own)

    async def _fetch_in_background(
        self, remote: RemoteFile, first: int, fetches: list[_Fetch], own: bool = True
    ) -> None:
        try:
            await self._fetch_run(remote, first, fetches, after_own=not own)
        except Exception as exc:  # a reader that needs the block will see the error itself
            log.debug("fetch of %s blocks %d+%d failed: %s", remote.id, first, len(fetches), exc)

    def stats(self) -> dict[str, object]:
        looked_up = self.hits + self.misses
        return {
            "bytes": self._blocks.currsize,
            "max_bytes": self._blocks.maxsize,
            "blocks": len(self._blocks),
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": self.hits / looked_up if looked_up else None,
            "bytes_from": dict(self.bytes_from),
            "fetches_in_flight": len(self._inflight),
            "bytes_in_flight": self._reserved,
            "requests_in_flight": self._requests,
            "signed_urls": len(self._urls),
            "buffers_reused": self._buffers.reused,
        }

    async def _block(self, remote: RemoteFile, index: int) -> Block:
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

    async def _fetch_shared(self, remote: RemoteFile, index: int) -> Block:
        return (await self._fetch_run(remote, index, self._register(remote, index, 1)))[0]

    def _register(self, remote: RemoteFile, first: int, count: int) -> list[_Fetch]:
        """Blocks about to be fetched in one request: shared with later readers, and room
        made for them in the cache (the least recently used blocks go)."""
        self._requests += 1
        fetches = [_Fetch() for _ in range(count)]
        for index, fetch in enumerate(fetches, start=first):
            self._inflight[(remote.id, index)] = fetch
            fetch.reserved = max(0, min(self.block_size, remote.bytes - index * self.block_size))
            self._reserved += fetch.reserved
        while self._blocks and self._blocks.currsize + self._reserved > self._blocks.maxsize:
            self._blocks.popitem()
        return fetches

    def _release(self, fetch: _Fetch) -> None:
        self._reserved -= fetch.reserved
        fetch.reserved = 0

    async def _fetch_run(
        self, remote: RemoteFile, first: int, fetches: list[_Fetch], *, after_own: bool = False
    ) -> Sequence[Block]:
        """The registered blocks from `first` on, in one request; each shared with its
        waiters, and cached, as soon as it is in.

        `after_own`: a run ahead, sent after the requests of the read's own blocks that
        were started with it. Tasks started together run before any of them yields, in
        no set order; a task that yields once runs after them all, and by then each of
        them has taken its connection (a request takes one before it first yields).
        """
        keys = [(remote.id, index) for index in range(first, first + len(fetches))]

        def land(offset: int, block: Block) -> None:
            fetch = fetches[offset]
            if fetch.done.is_set():
                return  # handed over already (a retried request hands its blocks again)
            self._release(fetch)  # its room is now the block's own
            self._blocks[keys[offset]] = fetch.data = block
            if self._inflight.get(keys[offset]) is fetch:
                del self._inflight[keys[offset]]
            fetch.done.set()

        try:
            if after_own:
                await trio.lowlevel.checkpoint()
            loaded = await self._disk.load(remote.id, remote.bytes, first, len(fetches))
            blocks: list[Block]
            if loaded is None:
                fetched = await self._failures.run(
                    remote.id, lambda: self._fetch(remote, first, len(fetches), land)
                )
                self._disk.store(remote.id, remote.bytes, first, fetched)
                blocks = [*fetched]
                self.bytes_from["network"] += sum(map(len, blocks))
            else:
                blocks = [*loaded]
                self.bytes_from["disk"] += sum(map(len, blocks))
            for offset, block in zip(range(len(fetches)), blocks, strict=True):
                land(offset, block)
            return blocks
        except BaseException as exc:
            for fetch in fetches:
                if not fetch.done.is_set():
                    fetch.error = exc
            raise
        finally:
            self._requests -= 1
            for key, fetch in zip(keys, fetches, strict=True):
                if fetch.done.is_set():
                    continue
                self._release(fetch)
                if self._inflight.get(key) is fetch:
                    del self._inflight[key]
                fetch.done.set()

    async def _fetch(
        self, remote: RemoteFile, first: int, count: int, on_block: Callable[[int, bytes], None]
    ) -> list[bytes]:
        if remote.bytes <= self.block_size:
            # One block in all: one request to /content beats a signed URL and a GET.
            return [await self._client.content(remote.id, remote.bytes)]
        start = first * self.block_size
        length = min(count * self.block_size, remote.bytes - start)
        return await self._read_range(remote, start, length, self.block_size, on_block)

    async def _read_range(
        self,
        remote: RemoteFile,
        start: int,
        length: int,
        piece_size: int,
        on_piece: Callable[[int, bytes], None] | None = None,
    ) -> list[bytes]:
        """The range in pieces of `piece_size`, each handed to `on_piece` as it comes if
        given, with a fresh URL if the old one is refused."""
        url = await self.signed_url(remote.id)
        key = start // piece_size  # the nearest range is received first (receive_order.py)
        try:
            pieces = await self._client.read_range_pieces(
                url.url, start, length, piece_size, on_piece, self._buffers, key
            )
        except UrlExpired:
            log.info("signed URL for %s refused; fetching a fresh one", remote.id)
            if self._urls.get(remote.id) is url:
                del self._urls[remote.id]
            url = await self.signed_url(remote.id)
            pieces = await self._client.read_range_pieces(
                url.url, start, length, piece_size, on_piece, self._buffers, key
            )
        got = sum(len(piece) for piece in pieces)
        if got != length:
            raise ShortRead(remote.id, start, length, got)
        return pieces


class _BlockCache(LRUCache[BlockKey, Block]):
    """The blocks in memory, bounded in bytes; the memory of those it lets go of, to
    make room (`popitem`) or when told to (`drop`), goes back to `buffers`, to hold new
    blocks."""

    def __init__(self, max_bytes: int, buffers: BlockBuffers) -> None:
        super().__init__(maxsize=max_bytes, getsizeof=len)
        self._buffers = buffers

    def popitem(self) -> tuple[BlockKey, Block]:
        key, block = super().popitem()
        self._buffers.give(block)
        return key, block

    def drop(self, key: BlockKey) -> None:
        """Let the block go, if it is here."""
        block = self.pop(key, None)
        if block is not None:
            self._buffers.give(block)


def _runs(indexes: list[int], longest: int) -> Iterator[tuple[int, int]]:
    """Consecutive indexes grouped as (first, count), no run longer than `longest`."""
    run_first, count = None, 0
    for index in indexes:
        if run_first is not None and index == run_first + count and count < longest:
            count += 1
            continue
        if run_first is not None:
            yield run_first, count
        run_first, count = index, 1
    if run_first is not None:
        yield run_first, count


class ShortRead(Exception):
    """The storage answered fewer bytes than the file's listed size promises."""

    def __init__(self, file_id: str, start: int, wanted: int, got: int) -> None:
        super().__init__(f"{file_id}: asked for {wanted} bytes at {start}, got {got}")
