"""Two programs writing one name, through `Operations`: the last close() wins, whole.

Each writer's content is distinct and a whole file; after both close() calls return
the account must hold exactly one file of that name, with exactly one writer's bytes
(never empty, never a mix), and the mount must read the same. The orderings below are
the ones that lost data: an `O_TRUNC` open landing during another descriptor's upload,
before it, and writes that overlap.
"""

from __future__ import annotations

import os

import httpx
import pytest
import trio
from test_operations import Stack, hold_up, remote_state, upload
from test_operations import stack as stack  # the fixture: Operations on the emulator

CHUNK = 128 * 1024
A = b"A" * (3 * CHUNK) + b"end of A"
B = b"B" * (2 * CHUNK) + b"end of B, which is shorter"


class Writer:
    """One program's descriptor on batch/NAME, and when its close() returned."""

    def __init__(self, stack: Stack, content: bytes) -> None:
        self.stack = stack
        self.content = content
        self.fh = 0
        self.closed_at = 0.0

    async def create(self, name: str) -> int:
        info, attrs = await self.stack.ops.create(
            await self.stack.folder("batch"), name.encode(), 0o644, os.O_WRONLY, None
        )
        self.fh = info.fh
        return attrs.st_ino

    async def open_truncating(self, inode: int) -> None:
        self.fh = (await self.stack.ops.open(inode, os.O_WRONLY | os.O_TRUNC, None)).fh

    async def write(self, part: int | None = None) -> None:
        """Write chunk `part` of the content, or all of it."""
        parts = range(0, len(self.content), CHUNK)
        for offset in parts if part is None else [parts[part]]:
            await self.stack.ops.write(self.fh, offset, self.content[offset : offset + CHUNK])

    async def close(self) -> None:
        await self.stack.ops.flush(self.fh)
        self.closed_at = trio.current_time()
        await self.stack.ops.release(self.fh)


async def account_and_mount(stack: Stack, inode: int) -> tuple[bytes, bytes]:
    """What the account holds under batch/n.txt (the only file there), and what the mount reads."""
    state = await remote_state(stack)
    assert list(state) == [("batch", "n.txt")], state
    headers = {"Authorization": f"Bearer {stack.emulator.api_key}"}
    async with httpx.AsyncClient(base_url=stack.emulator.url, headers=headers) as http:
        response = await http.get(f"/v1/files/{state['batch', 'n.txt']}/content")
        response.raise_for_status()
        stored = response.content
    return stored, await stack.read_file(inode)


async def last_close_wins(stack: Stack, inode: int, *writers: Writer) -> None:
    last = max(writers, key=lambda w: w.closed_at)
    stored, shown = await account_and_mount(stack, inode)
    assert stored == last.content, f"the account holds {len(stored)} bytes, not the last close's"
    assert shown == stored, "the mount reads other bytes than the account holds"
    assert (await stack.ops.getattr(inode)).st_size == len(stored)


async def test_a_truncating_open_during_anothers_upload_waits_its_turn(stack: Stack) -> None:
    """A created, wrote and closed; B opened with O_TRUNC while A's upload ran."""
    a, b = Writer(stack, A), Writer(stack, B)
    inode = await a.create("n.txt")
    await a.write()
    await hold_up(stack, "POST", 0.5)  # A's upload takes a while
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.close)
        await trio.sleep(0.1)
        await b.open_truncating(inode)
        await b.write()
        await b.close()
    assert b.closed_at > a.closed_at
    await last_close_wins(stack, inode, a, b)


@pytest.mark.parametrize("b_closes_last", [True, False])
async def test_a_truncating_open_before_anothers_close_starts_a_version_of_its_own(
    stack: Stack, b_closes_last: bool
) -> None:
    """B's O_TRUNC open is handled before A's close: A's bytes are not emptied under it."""
    a, b = Writer(stack, A), Writer(stack, B)
    inode = await a.create("n.txt")
    await a.write()
    await b.open_truncating(inode)
    first, second = (a, b) if b_closes_last else (b, a)
    await b.write()
    await first.close()
    await second.close()
    await last_close_wins(stack, inode, a, b)


@pytest.mark.parametrize("b_closes_last", [True, False])
async def test_overlapping_writes_never_mix(stack: Stack, b_closes_last: bool) -> None:
    """Both copy at once, chunk by chunk, in turns: each close stores its own content."""
    a, b = Writer(stack, A), Writer(stack, B)
    inode = await a.create("n.txt")
    await a.write(0)
    await b.open_truncating(inode)
    for part in range(3):
        await b.write(part)
        await a.write(part + 1)
    first, second = (a, b) if b_closes_last else (b, a)
    await first.close()
    await second.close()
    await last_close_wins(stack, inode, a, b)


async def test_writes_through_a_shared_descriptor_wait_for_its_upload(stack: Stack) -> None:
    """A write to content being uploaded waits, so the upload is one consistent content
    and the change is not taken for sent: the next close uploads it."""
    a = Writer(stack, A)
    inode = await a.create("n.txt")
    await a.write()
    other = (await stack.ops.open(inode, os.O_RDWR, None)).fh  # shares A's version
    await hold_up(stack, "POST", 0.5)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stack.ops.flush, a.fh)
        await trio.sleep(0.1)
        await stack.ops.write(other, 0, b"changed during the upload")
    stored, _ = await account_and_mount(stack, inode)
    assert stored == A, "the upload sent a mix, or a change made after it began"
    await stack.ops.flush(other)
    await stack.ops.release(other)
    await stack.ops.release(a.fh)
    changed = b"changed during the upload" + A[len(b"changed during the upload") :]
    stored, shown = await account_and_mount(stack, inode)
    assert stored == shown == changed


async def test_a_reader_opened_meanwhile_reads_the_newest_version(stack: Stack) -> None:
    a, b = Writer(stack, A), Writer(stack, B)
    inode = await a.create("n.txt")
    await a.write()
    await b.open_truncating(inode)
    await b.write()
    reader = (await stack.ops.open(inode, os.O_RDONLY, None)).fh
    assert await stack.ops.read(reader, 0, len(B) + 10) == B
    assert (await stack.ops.getattr(inode)).st_size == len(B)
    await stack.ops.release(reader)
    await a.close()  # A's close stores A, but B's version, not sent yet, is what shows
    assert (await stack.ops.getattr(inode)).st_size == len(B)
    await b.close()
    await last_close_wins(stack, inode, a, b)


@pytest.mark.parametrize("empty_closes_last", [True, False])
async def test_an_empty_version_uploaded_at_release_respects_the_order_of_closes(
    stack: Stack, empty_closes_last: bool
) -> None:
    """A version with nothing written is uploaded when its last descriptor is released,
    which may come after a later close() of another version: it must not undo it."""
    empty, b = Writer(stack, b""), Writer(stack, B)
    inode = await empty.create("n.txt")
    await b.open_truncating(inode)
    await b.write()
    if empty_closes_last:
        await b.close()
        await empty.close()
    else:
        await stack.ops.flush(empty.fh)  # its release comes late, as the kernel may send it
        empty.closed_at = trio.current_time()
        await b.close()
        await stack.ops.release(empty.fh)
    await last_close_wins(stack, inode, empty, b)


async def test_an_emptying_open_of_an_empty_file_still_wins_when_it_closes_last(
    stack: Stack,
) -> None:
    """The file is empty already, so emptying it again would store nothing; but a
    writer that stores other bytes meanwhile does not make that emptying open moot."""
    await upload(stack, "n.txt", b"")
    inode = (await stack.ops.lookup(await stack.folder("batch"), b"n.txt")).st_ino
    empty, b = Writer(stack, b""), Writer(stack, B)
    await empty.open_truncating(inode)
    await b.open_truncating(inode)
    await b.write()
    await b.close()
    await empty.close()
    await last_close_wins(stack, inode, empty, b)


async def test_emptying_an_empty_file_uploads_nothing(stack: Stack) -> None:
    file_id = await upload(stack, "n.txt", b"")
    inode = (await stack.ops.lookup(await stack.folder("batch"), b"n.txt")).st_ino
    await stack.clear_requests()
    emptied = Writer(stack, b"")
    await emptied.open_truncating(inode)
    await emptied.close()
    await trio.sleep(0.1)
    assert [r["method"] for r in await stack.api_requests()] == []
    assert await remote_state(stack) == {("batch", "n.txt"): file_id}


async def test_two_emptying_opens_of_a_new_name_store_one_empty_file_once(stack: Stack) -> None:
    first, second = Writer(stack, b""), Writer(stack, b"")
    inode = await first.create("n.txt")
    await second.open_truncating(inode)
    await first.close()
    await second.close()
    await trio.sleep(0.1)
    posts = [r for r in await stack.api_requests() if r["method"] == "POST"]
    assert len(posts) == 1, posts
    await last_close_wins(stack, inode, first, second)
