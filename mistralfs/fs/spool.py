"""One version of a file being changed: its spool file on disk, its crash note, its state.

A spool holds content the account does not hold yet (or holds already, once uploaded),
on local disk under the cache folder, never all in memory. Its `.json` note says what
the spool is and how far it got, so that the next mount after a crash uploads a file
that was closed completely and keeps one that was still being written (`recovery.py`).

A spool is in exactly one `SpoolState`; `Spool.become` is the only way to change it,
and `TRANSITIONS` lists every move it allows:

    CLEAN  ──write/truncate──▶ DIRTY ──close──▶ UPLOADING ──ok──▶ CLEAN
    OPENED ──write──▶ DIRTY          OPENED ──last release──▶ UPLOADING
    UPLOADING ──failed──▶ FAILED ──write──▶ DIRTY
    any but UPLOADING ──a write refused (too large, disk full)──▶ INCOMPLETE
    OPENED, DIRTY ──another version closed later was stored──▶ SUPERSEDED

While a spool is UPLOADING, writes and truncates wait for the upload to end, so an
upload always sends one consistent content, and a change made during it is never
marked as sent.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from mistralfs.api import RemoteFile
from mistralfs.fs.errors import FsError
from mistralfs.fs.upload_settings import noted

if TYPE_CHECKING:
    from mistralfs.fs.namespace import FileNode
    from mistralfs.fs.uploads import Growing


class SpoolState(enum.Enum):
    CLEAN = "clean"  # holds what the account holds: nothing to upload
    # New, or emptied by the open that made it, and not written since: uploaded when
    # the last descriptor closes (a shell's redirect closes a first descriptor at once).
    OPENED = "opened"
    DIRTY = "dirty"  # changed by the program: its next close() uploads it
    UPLOADING = "uploading"  # being uploaded; changes wait until the upload ends
    # Its upload failed and a close() reported it: kept for recovery at the last
    # release rather than sent again, unless the program changes it.
    FAILED = "failed"
    # A write was refused (past the size limit, disk full): the content is not what
    # the program meant, so it is never uploaded.
    INCOMPLETE = "incomplete"
    # A later close() of another version of the file stored its content: this one,
    # closed before it, has nothing left to upload or keep.
    SUPERSEDED = "superseded"


S = SpoolState
TRANSITIONS: dict[SpoolState, frozenset[SpoolState]] = {
    S.CLEAN: frozenset({S.DIRTY, S.UPLOADING, S.INCOMPLETE}),
    # To CLEAN: emptied, with nothing written, and the account holds an empty file.
    S.OPENED: frozenset({S.CLEAN, S.DIRTY, S.UPLOADING, S.INCOMPLETE, S.SUPERSEDED}),
    S.DIRTY: frozenset({S.UPLOADING, S.INCOMPLETE, S.SUPERSEDED}),
    # Back to the state it came from when a rename's upload fails: nothing changed.
    S.UPLOADING: frozenset({S.CLEAN, S.FAILED, S.DIRTY, S.OPENED}),
    S.FAILED: frozenset({S.DIRTY, S.UPLOADING, S.INCOMPLETE}),
    S.INCOMPLETE: frozenset(),
    S.SUPERSEDED: frozenset(),
}


@dataclass(eq=False)
class Spool:
    """One version of a file's content, shared by the handles opened on it."""

    node: FileNode
    path: Path
    fd: int
    state: SpoolState
    size: int = 0
    handles: int = 0
    # A descriptor was closed after the last write: a crash then uploads it rather
    # than keeping it for recovery.
    closed_since_write: bool = False
    # When a close() of it last came, in the order of every close() of the mount: of
    # two versions of one file, the one closed last is what the account keeps.
    closed_at: int = 0
    upload_started: float | None = None  # wall clock, for recovery after a crash
    # Remote files to delete after the next upload (a rename's replaced target).
    replaces: list[RemoteFile] = field(default_factory=list)
    appended_only: bool = True  # written from its first byte on, each write at the end
    refused: FsError | None = None  # why it is INCOMPLETE
    # Another version of the file was open at the same time: the kernel's page cache
    # may hold a mix of both programs' writes once either is uploaded.
    overlapped: bool = False
    growing: Growing | None = None  # an upload under way while the file is written
    _upload_ended: trio.Event = field(default_factory=trio.Event, repr=False)
    _note_written: tuple[object, ...] = ()
    _note_length: int = 0  # bytes of the note on disk: it is overwritten, never shortened

    @property
    def note_path(self) -> Path:
        return self.path.with_suffix(".json")

    @property
    def changed(self) -> bool:
        """Whether it holds something to upload or keep."""
        return self.state not in (SpoolState.CLEAN, SpoolState.SUPERSEDED)

    def become(self, state: SpoolState) -> None:
        if state is self.state:
            return
        if state not in TRANSITIONS[self.state]:
            raise AssertionError(f"spool of {self.node.name}: {self.state} -> {state}")
        if state is SpoolState.UPLOADING:
            self._upload_ended = trio.Event()
        elif self.state is SpoolState.UPLOADING:
            self._upload_ended.set()
        self.state = state

    @contextlib.contextmanager
    def uploading(self, *, on_failure: SpoolState | None = None) -> Iterator[None]:
        """UPLOADING for the block; CLEAN after it, `on_failure` (else as before) if it raised."""
        before = self.state
        self.become(SpoolState.UPLOADING)
        try:
            yield
        except BaseException:
            self.become(on_failure or before)
            raise
        self.become(SpoolState.CLEAN)

    async def settled(self) -> None:
        """Return once no upload of this spool is under way.

        Every upload runs under the file's lock; only what does not take it (writes,
        `ftruncate`) needs to wait here."""
        while self.state is SpoolState.UPLOADING:
            await self._upload_ended.wait()

    def refuse(self, error: FsError) -> FsError:
        """A write was refused: the spool is no longer the program's content."""
        self.refused = self.refused or error
        self.become(SpoolState.INCOMPLETE)
        return error

    @property
    def worth_keeping(self) -> bool:
        """Whether its content, not uploaded, is worth keeping for recovery."""
        if self.state is SpoolState.INCOMPLETE:
            # What was accepted before the disk filled up (or failed) is the program's
            # data; a copy cut at the size limit is not worth a place in recovery.
            return self.refused is not None and self.refused.errno != errno.EFBIG
        return self.changed

    def write_note(self) -> None:
        """Write the crash note if what it says changed.

        At the next mount a spool whose file was closed after its last write
        (`complete`) and not uploaded yet is uploaded; one still being written is kept.
        """
        node = self.node
        note = {
            "purpose": node.folder.purpose,
            "filename": node.filename,
            "complete": self.closed_since_write and self.state is not SpoolState.INCOMPLETE,
            "uploaded": not self.changed,
            "upload_started": self.upload_started,
            "local": node.local,  # a scratch file's: dropped after a crash, never uploaded
            "replaces": [r.id for r in self.replaces]
            + ([node.remote.id] if node.remote is not None else []),
            **noted(node),  # its own upload settings, which the next mount sends it with
        }
        state = tuple(note.values())
        if state != self._note_written:
            data = json.dumps(note).encode()
            _overwrite(self.note_path, data.ljust(self._note_length))
            self._note_written = state
            self._note_length = max(self._note_length, len(data))


def new_spool(spool_dir: Path, node: FileNode, state: SpoolState) -> Spool:
    """An empty spool file, and its note, for a version of `node`.

    A disk that cannot hold them gives the errno of that failure (`ENOSPC`, ...).
    """
    path = spool_dir / f"{uuid.uuid4().hex}.spool"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise spool_error(node, exc) from exc
    spool = Spool(node=node, path=path, fd=fd, state=state)
    try:
        spool.write_note()
    except OSError as exc:
        os.close(fd)
        remove(path)
        raise spool_error(node, exc) from exc
    return spool


def spool_error(node: FileNode, exc: OSError) -> FsError:
    """A failure of the spool's own disk, with its errno and where it happened."""
    code = exc.errno or errno.EIO
    return FsError(code, f"{node.folder.purpose}/{node.name}: the spool under the cache "
                         f"folder failed: {os.strerror(code)}")  # fmt: skip


def keep(spool_path: Path, recovery_dir: Path) -> Path:
    """Move a spool and its note into the recovery folder; where the spool now is."""
    recovery_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    kept = recovery_dir / spool_path.name
    shutil.move(spool_path, kept)
    note = spool_path.with_suffix(".json")
    if note.exists():
        shutil.move(note, kept.with_suffix(".json"))
    return kept


def remove(spool_path: Path) -> None:
    spool_path.unlink(missing_ok=True)
    spool_path.with_suffix(".json").unlink(missing_ok=True)


def _overwrite(path: Path, data: bytes) -> None:
    """Write `data` over the start of `path` in one `pwrite`, without truncating it.

    Truncating a file that holds data makes ext4 write it out when it is closed
    (`auto_da_alloc`), which made each rewrite of a spool's note cost as much as a
    fifth of a small file's upload. Callers pad `data` (JSON allows trailing spaces)
    to at least the length already there, so no stale bytes remain; and a daemon
    killed mid-way leaves the old note or the new one, never a mix.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.pwrite(fd, data, 0)
    finally:
        os.close(fd)
