"""The optional persistent block tier under `--disk-cache DIR`, so a remount reads locally.

Content never changes for a file id and ids are never reused, so a block kept under
its id stays right for as long as it is kept. Layout: `DIR/<file id>/<block index>`,
each file the block between two copies of a small label (magic, offset, length). A
block is written to a temp file and renamed into place, so a crash of the daemon never
leaves part of one under a block's name; one whose size or labels are not what the
file's listed size expects is never served, and is removed. The label at both ends
catches what a power cut leaves of a file the kernel had not written out yet (nothing,
or zeros where pages were not written). Neither a checksum checked on every read (a
sixth of a re-read's CPU) nor an fdatasync per block (the writer then falls behind a
fast download and blocks go unkept) paid for itself. The total is bounded by
`--disk-cache-size`, evicting the least recently used block; recency is the block
file's mtime, touched on every hit, so the order survives restarts. One mount at a time
uses a DIR: an flock on `DIR/lock` refuses a second. A block whose file is in the page
cache is mapped on the trio thread (cheap system calls; a worker thread waits for the GIL
at each of them while FUSE replies keep the main thread busy); anything that may wait
for the disk runs in trio's worker threads. Writes, evictions and deletions go through
one task, in the order asked, so a deleted file's blocks never come back. A disk error
never fails a read: the block comes from the network and the error is logged.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import logging
import math
import mmap
import os
import re
import stat
import struct
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection
from pathlib import Path

import trio

log = logging.getLogger(__name__)

MAGIC = b"MFB2"
LABEL = struct.Struct("<4sQQ")  # magic, offset of the block in the file, its length
MAX_PENDING_STORES = 64  # blocks queued for writing, by default; beyond, a block is not kept
COMPLAINT_INTERVAL = 60.0  # seconds between two warnings about the same kind of failure
LOCK_NAME = "lock"
TEMP_SUFFIX = ".tmp"
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")  # anything else is not kept
_BLOCK_NAME = re.compile(r"[0-9]{1,10}")

BlockKey = tuple[str, int]


class DiskCacheError(Exception):
    """The folder cannot serve as a disk cache (in use, not a folder, no permission)."""


class NoDiskCache:
    """The tier when no `--disk-cache` is given: every block comes from the network."""

    def __contains__(self, key: BlockKey) -> bool:
        return False

    def take(self, file_id: str, file_size: int, first: int, count: int) -> None:
        return None

    async def load(self, file_id: str, file_size: int, first: int, count: int) -> None:
        return None

    def store(self, file_id: str, file_size: int, first: int, blocks: list[bytes]) -> None:
        """Nothing is kept."""

    def forget(self, file_id: str) -> None:
        """Nothing is kept, so there is nothing to drop."""

    def keep_only(self, file_ids: Collection[str]) -> None:
        """Nothing is kept, so there is nothing to drop."""

    async def run(self) -> None:
        """No writer task is needed."""

    async def flush(self) -> None:
        """Nothing is queued."""

    def close(self) -> None:
        """Nothing is held."""

    async def __aenter__(self) -> NoDiskCache:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def stats(self) -> dict[str, object] | None:
        return None


class DiskCache:
    """Blocks on local disk by (file id, index), LRU-bounded in bytes, across restarts."""

    def __init__(
        self, root: Path, max_bytes: int, block_size: int, max_pending: int = MAX_PENDING_STORES
    ) -> None:
        self.root = root
        self._root_name = os.fspath(root)  # block paths as strings: pathlib is slow per block
        self.max_pending = max_pending
        self.max_bytes = max_bytes
        self.block_size = block_size
        self._index: OrderedDict[BlockKey, int] = OrderedDict()  # least recent first; bytes
        self._bytes = 0
        self._dropped: set[str] = set()  # ids forgotten: a late store must not bring them back
        self._pending = 0
        self._send, self._receive = trio.open_memory_channel[Callable[[], Awaitable[None]]](
            math.inf
        )
        self._lock_fd: int | None = None
        self._complained: dict[str, float] = {}
        self.hits = self.misses = self.stored = self.skipped = self.errors = 0

    @classmethod
    async def open(
        cls, root: Path, max_bytes: int, block_size: int, max_pending: int = MAX_PENDING_STORES
    ) -> DiskCache:
        """Create or reuse `root` (0700), take its lock, and index what a previous run kept."""
        cache = cls(root, max_bytes, block_size, max_pending)
        started = time.monotonic()
        await trio.to_thread.run_sync(cache._open_sync)
        log.info("disk cache %s: %d blocks, %.1f MiB of %.1f MiB, indexed in %.2f s", root,
                 len(cache._index), cache._bytes / 1024**2, max_bytes / 1024**2,
                 time.monotonic() - started)  # fmt: skip
        return cache

    # -- what the reader calls ------------------------------------------------------

    def __contains__(self, key: BlockKey) -> bool:
        """Whether the block is kept (it may still turn out unsound when read)."""
        return key in self._index

    def take(self, file_id: str, file_size: int, first: int, count: int) -> list[memoryview] | None:
        """The run, right now, when every block of it is kept, sound and in the page cache;
        else None, and `load` says which (it then reads the rest off the trio thread).

        Mapping a block whose file is in the page cache is a few cheap system calls: a
        worker thread would wait for the GIL at each of them while FUSE replies keep the
        main thread busy (it fell behind a re-read), and a task per run costs more than
        the mapping itself.
        """
        run = self._kept_run(file_id, file_size, first, count)
        if run is None:
            return None
        found = self._read_run_sync(*run, False)
        blocks = None if found[-1] is _ON_DISK_ONLY else self._served(run[0], found)
        if blocks is not None:
            self.hits += count
        return blocks

    async def load(
        self, file_id: str, file_size: int, first: int, count: int
    ) -> list[memoryview] | None:
        """Blocks `first` to `first + count - 1`, when every one of them is kept and sound.

        All or nothing, as the reader fetches a run in one request either way. What is in
        the page cache is taken on the trio thread (see `take`); from the first block that
        would wait for the disk on, the run is read in one worker thread.
        """
        run = self._kept_run(file_id, file_size, first, count)
        if run is None:
            self.misses += count
            return None
        keys, lengths = run
        found = self._read_run_sync(keys, lengths, False)
        if found[-1] is _ON_DISK_ONLY:
            at = len(found) - 1
            found[at:] = await trio.to_thread.run_sync(
                self._read_run_sync, keys[at:], lengths[at:], True
            )
        blocks = self._served(keys, found)
        if blocks is None:
            self.misses += count
        else:
            self.hits += count
        return blocks

    def store(self, file_id: str, file_size: int, first: int, blocks: list[bytes]) -> None:
        """Keep blocks fetched from the network, written in the background, in order."""
        if not _SAFE_ID.fullmatch(file_id):
            return
        for index, data in enumerate(blocks, start=first):
            if len(data) == self._length(file_size, index):
                self._queue_store((file_id, index), data)

    def forget(self, file_id: str) -> None:
        """The file is gone: its blocks are no longer served, and are deleted in order."""
        if _SAFE_ID.fullmatch(file_id):
            self._drop_files({file_id})

    def keep_only(self, file_ids: Collection[str]) -> None:
        """`file_ids` is every file of the account (a whole listing): the blocks of any
        other file, deleted since they were read, perhaps while no mount ran, go as
        `forget` drops them. Content the user deleted is not left on the disk."""
        gone = {file_id for file_id, _ in self._index}.difference(file_ids)
        if gone:
            log.info("disk cache: dropping the blocks of %d files no longer in the account",
                     len(gone))  # fmt: skip
            self._drop_files(gone)

    def _drop_files(self, file_ids: set[str]) -> None:
        self._dropped.update(file_ids)
        for key in [k for k in self._index if k[0] in file_ids]:
            self._bytes -= self._index.pop(key)
        for file_id in file_ids:
            self._queue(functools.partial(self._drop, file_id))

    # -- lifetime -------------------------------------------------------------------

    async def run(self) -> None:
        """The one task that writes, evicts and deletes, in the order these were asked."""
        async with self._receive:
            async for operation in self._receive:
                await operation()

    async def flush(self) -> None:
        """Return once everything queued before this call is on disk (or has failed)."""
        done = trio.Event()

        async def mark() -> None:
            done.set()

        if self._queue(mark):
            await done.wait()

    def close(self) -> None:
        """Let another mount use the folder."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def __aenter__(self) -> DiskCache:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def stats(self) -> dict[str, object]:
        return {
            "dir": str(self.root),
            "bytes": self._bytes,
            "max_bytes": self.max_bytes,
            "blocks": len(self._index),
            "hits": self.hits,
            "misses": self.misses,
            "stored": self.stored,
            "skipped": self.skipped,
            "errors": self.errors,
        }

    # -- reading --------------------------------------------------------------------

    def _kept_run(
        self, file_id: str, file_size: int, first: int, count: int
    ) -> tuple[list[BlockKey], list[int]] | None:
        """The run's keys and block lengths, or None unless every block of it is kept."""
        keys = [(file_id, index) for index in range(first, first + count)]
        if not _SAFE_ID.fullmatch(file_id) or any(key not in self._index for key in keys):
            return None
        return keys, [self._length(file_size, index) for index in range(first, first + count)]

    def _served(
        self, keys: list[BlockKey], found: list[memoryview | OSError | _OnDiskOnly | None]
    ) -> list[memoryview] | None:
        """The blocks if all were found; unsound or unreadable ones leave the index."""
        blocks = []
        for key, result in zip(keys, found, strict=False):  # `found` stops at a bad one
            if isinstance(result, memoryview):
                blocks.append(result)
                if key in self._index:
                    self._index.move_to_end(key)
                continue
            if isinstance(result, OSError) and not isinstance(result, FileNotFoundError):
                self._complain("reading a block", result)  # not found: removed behind our back
            if key in self._index:
                self._bytes -= self._index.pop(key)
        return blocks if len(blocks) == len(keys) else None

    def _read_run_sync(
        self, keys: list[BlockKey], lengths: list[int], wait: bool
    ) -> list[memoryview | OSError | _OnDiskOnly | None]:
        """Each block, or None when it is not sound, or the error reading it; stops after
        the first that is not there, since the run then comes from the network anyway.
        Without `wait`, it also stops at the first block not in the page cache."""
        found: list[memoryview | OSError | _OnDiskOnly | None] = []
        for key, length in zip(keys, lengths, strict=True):
            try:
                found.append(self._read_sync(key, length, wait))
            except OSError as exc:
                found.append(exc)
            if not isinstance(found[-1], memoryview):
                break
        return found

    def _read_sync(self, key: BlockKey, length: int, wait: bool) -> memoryview | _OnDiskOnly | None:
        """The block if it is sound (a read-only mapping of its file); else None, and the
        file is removed. Without `wait`, `_ON_DISK_ONLY` when its labels are not in the page
        cache, as its other pages, read after them, most likely are not either.

        A mapping, not a read: the bytes are copied once, from the page cache to FUSE,
        instead of twice. Only the kernel touches the mapping (the labels are read with
        pread), and only after the file's size is checked: the one mount using the folder
        never truncates a block file, only renames and unlinks them. With `wait` (in a
        worker thread) the pages are brought in at once; without, as FUSE copies them.
        """
        path = self._path(key)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if os.fstat(fd).st_size == length + 2 * LABEL.size:
                head = _read_label(fd, 0, wait)
                tail = _read_label(fd, LABEL.size + length, wait)
                if head is None or tail is None:
                    return _ON_DISK_ONLY
                label = LABEL.pack(MAGIC, key[1] * self.block_size, length)
                if head == label and tail == label:
                    flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if wait else 0)
                    mapped = mmap.mmap(fd, 0, flags=flags, prot=mmap.PROT_READ)
                    with contextlib.suppress(OSError):  # recency, for eviction after a restart
                        os.utime(fd)
                    return memoryview(mapped)[LABEL.size : LABEL.size + length]
        finally:
            os.close(fd)
        log.warning("disk cache: %s is not the block expected (torn, short or damaged); "
                    "removed, reading from the network", path)  # fmt: skip
        _unlink_quietly(path)
        return None

    # -- writing, evicting, deleting (only from the `run` task) ---------------------

    def _queue(self, operation: Callable[[], Awaitable[None]]) -> bool:
        try:
            self._send.send_nowait(operation)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False  # the mount is stopping; what is not on disk is simply not kept
        return True

    def _queue_store(self, key: BlockKey, data: bytes) -> None:
        if key[0] in self._dropped:
            return
        if self._pending >= self.max_pending:
            self.skipped += 1  # the disk is slower than the network: keep memory bounded
            return
        self._pending += 1
        if not self._queue(functools.partial(self._store, key, data)):
            self._pending -= 1

    async def _store(self, key: BlockKey, data: bytes) -> None:
        try:
            size = len(data) + 2 * LABEL.size
            if key[0] in self._dropped or key in self._index or size > self.max_bytes:
                return
            victims = self._make_room(size)
            try:
                await trio.to_thread.run_sync(self._write_sync, key, data, victims)
            except OSError as exc:
                self._complain("writing a block", exc)
                return
            if key[0] not in self._dropped:  # else the drop queued after us removes the file
                self._index[key] = size
                self._bytes += size
                self.stored += 1
        finally:
            self._pending -= 1

    def _make_room(self, size: int) -> list[BlockKey]:
        """Take least recently used blocks out of the index until `size` more bytes fit."""
        victims = []
        while self._index and self._bytes + size > self.max_bytes:
            key, victim_size = self._index.popitem(last=False)
            self._bytes -= victim_size
            victims.append(key)
        return victims

    def _write_sync(self, key: BlockKey, data: bytes, victims: list[BlockKey]) -> None:
        """Few system calls: each one lets the busy main thread keep the GIL for a while."""
        for victim in victims:
            self._remove_block_sync(victim)
        file_id, index = key
        folder = self.root / file_id
        temp = folder / f".{index}{TEMP_SUFFIX}"  # one writer per folder: the lock and `run`
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(temp, flags, 0o600)
        except FileNotFoundError:  # the file's first block
            folder.mkdir(mode=0o700, exist_ok=True)
            fd = os.open(temp, flags, 0o600)
        label = LABEL.pack(MAGIC, index * self.block_size, len(data))
        try:
            try:
                written = os.writev(fd, [label, data, label])
            finally:
                os.close(fd)
            if written != len(data) + 2 * LABEL.size:
                raise OSError(errno.ENOSPC, f"wrote {written} bytes of {temp}")
            os.replace(temp, folder / str(index))
        except BaseException:
            _unlink_quietly(temp)
            raise

    def _remove_block_sync(self, key: BlockKey) -> None:
        path = self._path(key)
        _unlink_quietly(path)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(path))  # the file's last block: its folder goes too

    async def _drop(self, file_id: str) -> None:
        try:
            await trio.to_thread.run_sync(self._remove_folder_sync, self.root / file_id)
        except OSError as exc:
            self._complain("deleting a file's blocks", exc)

    @staticmethod
    def _remove_folder_sync(folder: Path) -> None:
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            return
        for entry in entries:
            if _BLOCK_NAME.fullmatch(entry.name) or entry.name.endswith(TEMP_SUFFIX):
                _unlink_quietly(Path(entry.path))
        folder.rmdir()

    # -- opening --------------------------------------------------------------------

    def _open_sync(self) -> None:
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._make_private_sync()
            self._lock_sync()
            self._index_sync()
        except OSError as exc:
            self.close()
            reason = exc.strerror or str(exc)
            raise DiskCacheError(f"cannot use {self.root} as a disk cache: {reason}") from exc

    def _make_private_sync(self) -> None:
        """The account's content is for the user who mounted only.

        A folder others can write to is refused: they could plant links where blocks are
        written. One others can only read is made 0700.
        """
        st = self.root.lstat()
        if not stat.S_ISDIR(st.st_mode):
            raise DiskCacheError(f"the disk cache {self.root} is not a folder")
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise DiskCacheError(
                f"the disk cache {self.root} can be written by other users "
                f"(mode {stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid}): "
                "use a folder of your own"
            )
        if st.st_mode & 0o077:
            log.info("disk cache %s: mode %04o made 0700", self.root, stat.S_IMODE(st.st_mode))
            os.chmod(self.root, 0o700)

    def _lock_sync(self) -> None:
        fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DiskCacheError(
                f"the disk cache {self.root} is in use by another mistralfs (pid {holder}); "
                "give each mount its own --disk-cache folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _index_sync(self) -> None:
        """Index the blocks a previous run kept, oldest mtime first; drop its temp files."""
        found = []
        for folder in os.scandir(self.root):
            if not (folder.is_dir(follow_symlinks=False) and _SAFE_ID.fullmatch(folder.name)):
                continue
            for entry in os.scandir(folder.path):
                if entry.name.endswith(TEMP_SUFFIX):  # a write cut short by a crash
                    _unlink_quietly(Path(entry.path))
                elif _BLOCK_NAME.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    found.append((st.st_mtime_ns, (folder.name, int(entry.name)), st.st_size))
        found.sort()
        for _, key, size in found:
            self._index[key] = size
            self._bytes += size
        for victim in self._make_room(0):  # the size may have been lowered since
            self._remove_block_sync(victim)

    def _length(self, file_size: int, index: int) -> int:
        return min(self.block_size, file_size - index * self.block_size)

    def _path(self, key: BlockKey) -> str:
        return f"{self._root_name}/{key[0]}/{key[1]}"

    def _complain(self, what: str, exc: OSError) -> None:
        """One warning per kind of failure a minute: a full disk must not flood the log."""
        self.errors += 1
        now = time.monotonic()
        if now - self._complained.get(what, -math.inf) >= COMPLAINT_INTERVAL:
            self._complained[what] = now
            log.warning("disk cache %s: %s failed (%s); reading from the network instead",
                        self.root, what, exc)  # fmt: skip
        else:
            log.debug("disk cache %s: %s failed (%s)", self.root, what, exc)


class _OnDiskOnly:
    """Marks a block whose file is not in the page cache: it is read off the trio thread."""


_ON_DISK_ONLY = _OnDiskOnly()


def _read_label(fd: int, offset: int, wait: bool) -> bytes | None:
    """The label at `offset`; without `wait`, None unless all of it is in the page cache
    (RWF_NOWAIT; a label may straddle two pages, and some file systems cannot tell)."""
    if wait:
        return os.pread(fd, LABEL.size, offset)
    label = bytearray(LABEL.size)
    try:
        got = os.preadv(fd, [label], offset, os.RWF_NOWAIT)
    except BlockingIOError:
        return None
    except OSError as exc:
        if exc.errno == errno.EOPNOTSUPP:
            return None
        raise
    return bytes(label) if got == LABEL.size else None


def _unlink_quietly(path: str | Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
