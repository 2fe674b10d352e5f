"""Memory for the blocks read from storage: each in a mapping of its own, and reused.

A block's bytes are written once, by the socket, into memory that is already there: a
fresh page costs a fault, zeroing and accounting when first touched (and on a virtual
machine often a fault on the host too). On this project's 2-core VM, a cold read of
256 MiB over a 30 ms TLS link took 2.44 CPU-seconds per GiB when its blocks went into
memory touched before, against 3.16 into fresh memory (bench/README.md, "CPU per
byte").

So the memory of a block that leaves the cache is given back here (`give`) and handed
out again (`take`) once nothing reads it any more. Whether anything does is asked of
the mapping itself: `mmap.resize` refuses while any view of it exists (a read's reply
being written, the disk cache's writer), and resizing it to its own size changes
nothing otherwise. A mapping still read is kept for later, never handed out.

Pieces are taken in the trio thread and in the transport's worker threads (a range
read whole with its headers), and blocks given back in the trio thread: a lock keeps
the idle mappings whole between them.
"""

from __future__ import annotations

import collections
import mmap
import threading
import weakref

_POPULATED = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)


def fresh_buffer(size: int) -> memoryview:
    """Memory of its own for one piece, its pages there at once (OSError if no mapping
    is to be had: vm.max_map_count reached)."""
    return memoryview(mmap.mmap(-1, size, flags=_POPULATED))


def _unshared(mapping: mmap.mmap) -> bool:
    """Whether no view of `mapping` exists any more (see the module's docstring)."""
    try:
        mapping.resize(len(mapping))
    except (BufferError, OSError, ValueError):
        return False
    return True


class BlockBuffers:
    """Idle mappings of `size` bytes, at most `keep` of them, to hold new blocks."""

    def __init__(self, size: int, keep: int) -> None:
        self.size = size
        self.keep = keep
        self._idle: collections.deque[mmap.mmap] = collections.deque()
        # The mappings this pool made: only those are ever taken back. Another's (the
        # disk cache maps its block files, read-only and shared) is never written into.
        self._ours: weakref.WeakSet[mmap.mmap] = weakref.WeakSet()
        self._lock = threading.Lock()
        self.reused = 0  # pieces put in memory given back (for tests and stats)

    def take(self, size: int) -> memoryview:
        """Memory for a piece of `size` bytes: an idle mapping that nothing reads, or a
        fresh one. Its old content is there until the piece is written over."""
        if size == self.size:
            with self._lock:
                for _ in range(len(self._idle)):
                    mapping = self._idle.popleft()
                    if _unshared(mapping):
                        self.reused += 1
                        return memoryview(mapping)
                    self._idle.append(mapping)  # still read: asked again next time
        block = fresh_buffer(size)
        if size == self.size and self.keep:
            with self._lock:
                self._ours.add(block.obj)  # type: ignore[arg-type]
        return block

    def give(self, block: object) -> None:
        """A block the cache let go of: its mapping is kept to be reused, if this pool
        made it, the block is all of it, and there is room; otherwise it is unmapped when
        its last view goes."""
        if len(self._idle) >= self.keep or not isinstance(block, memoryview):
            return
        mapping = block.obj
        with self._lock:
            ours = mapping in self._ours and block.nbytes == self.size
            if ours and len(self._idle) < self.keep and all(i is not mapping for i in self._idle):
                self._idle.append(mapping)  # type: ignore[arg-type]

    @property
    def idle(self) -> int:
        """Mappings kept to be reused."""
        return len(self._idle)


FRESH = BlockBuffers(0, 0)  # no reuse: every piece in fresh memory
