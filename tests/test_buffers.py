"""Block memory reused (api/buffers.py): only once nothing reads it, never a stranger's."""

from __future__ import annotations

import mmap
import os
import pathlib

from mistralfs.api.buffers import BlockBuffers, fresh_buffer


def test_memory_given_back_is_reused_only_once_nothing_reads_it() -> None:
    """A block let go of while a view of it is still read (a reply being written, the
    disk cache's writer) is not handed out: that view keeps its bytes. Once the view
    is gone, the same memory holds the next block."""
    buffers = BlockBuffers(4096, keep=4)
    block = buffers.take(4096)
    data = os.urandom(4096)
    block[:] = data
    still_read = block[100:200]
    buffers.give(block)
    del block
    other = buffers.take(4096)
    assert other.obj is not still_read.obj
    other[:] = bytes(4096)
    assert bytes(still_read) == data[100:200]
    assert buffers.reused == 0
    mapping = still_read.obj
    del still_read
    again = buffers.take(4096)
    assert again.obj is mapping and buffers.reused == 1


def test_only_its_own_whole_mappings_are_kept_and_no_more_than_it_keeps(
    tmp_path: pathlib.Path,
) -> None:
    """Nothing but memory this pool made is ever written into again: not a block of the
    disk cache (a read-only mapping of its file), not another pool's memory."""
    buffers = BlockBuffers(4096, keep=2)
    buffers.give(b"x" * 4096)  # not memory of its own
    buffers.give(fresh_buffer(4096))  # a mapping this pool did not make
    buffers.give(buffers.take(4096)[:1000])  # part of a mapping
    buffers.give(memoryview(bytearray(4096)))  # not a mapping
    on_disk = tmp_path / "block"
    on_disk.write_bytes(b"d" * 4096)
    with on_disk.open("rb") as f:
        buffers.give(memoryview(mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)))
    assert buffers.idle == 0
    assert on_disk.read_bytes() == b"d" * 4096
    kept = [buffers.take(4096) for _ in range(3)]
    for block in kept:
        buffers.give(block)
        buffers.give(block)  # given twice, kept once
    assert buffers.idle == 2
    assert isinstance(buffers.take(100), memoryview) and buffers.reused == 0  # other size
    del kept
    assert isinstance(buffers.take(4096).obj, mmap.mmap) and buffers.reused == 1


def test_threads_taking_and_giving_at_once_never_share_a_mapping() -> None:
    """Pieces are taken in worker threads while the trio thread gives blocks back: no
    mapping is ever handed to two holders at once, and the pool stays whole."""
    import threading

    buffers = BlockBuffers(4096, keep=8)
    errors: list[BaseException] = []
    held: set[int] = set()
    held_lock = threading.Lock()

    def churn() -> None:
        try:
            for _ in range(2000):
                block = buffers.take(4096)
                mapping = block.obj
                with held_lock:
                    assert id(mapping) not in held
                    held.add(id(mapping))
                with held_lock:
                    held.discard(id(mapping))
                buffers.give(block)
                del block, mapping
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=churn) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert buffers.idle <= 8 and buffers.reused > 0
