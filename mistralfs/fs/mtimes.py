"""Times that programs set (`touch -d`, `cp -p`, `rsync -a`), kept by remote file id.

The Files API keeps one time per file, `created_at`, and no way to change it. A mount
that dropped what `utimensat` sets made every `rsync -a` upload every file again (its
quick check compares size and mtime). So the times a program sets are kept here, on
local disk, by the id of the remote file whose content they describe:

- set on a file whose content is the remote file's, they are kept under its id at once;
- set on a file still being written (or a scratch file, such as rsync's `.NAME.XXXXXX`),
  they wait with the file and are kept under the id its upload gets, also when a rename
  uploads it under another name;
- a change of content (a write, a truncate, an `O_TRUNC` open) drops what was set
  before it: the new content shows its upload's `created_at` unless set again;
- a rename that uploads unchanged content carries them to the new id.

They are dropped when their file is deleted or replaced through the mount, when a
listing finds it deleted elsewhere, and, at each listing of the whole account, for
every id the account no longer holds (also those deleted while nothing was mounted).
So the store never holds more entries than the account holds files.

The store (`TimesFile`) is an SQLite database in the cache folder, one per mountpoint
(as the spool is): each change is its own transaction, in WAL mode, so a crash at any
moment leaves the store as it was before or after that change, never half written.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from mistralfs.api import RemoteFile
from mistralfs.fs.namespace import FileNode
from mistralfs.fs.spool import Spool

log = logging.getLogger(__name__)

NS = 10**9


@dataclass(frozen=True)
class Times:
    """A file's access and modification times, in nanoseconds since the epoch."""

    atime_ns: int
    mtime_ns: int


class TimesFile:
    """Times by file id: all in memory for `stat`, each change written through to SQLite.

    With no path, nothing is written (a mount's tests that need no remount).
    """

    def __init__(self, path: Path | None, *, timeout: float = 5.0) -> None:
        self._path = path
        self._timeout = timeout  # for a lock another process holds
        self._times: dict[str, Times] = {}
        self._db: sqlite3.Connection | None = None
        if path is not None:
            self._db = self._open(path)

    def _open(self, path: Path) -> sqlite3.Connection | None:
        """The database at `path`, created if missing; a damaged one is set aside.

        One that cannot be opened (no permission, locked) is left as it is: this mount
        then keeps times in memory only."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            return self._unusable(path.parent, exc)
        for attempt in range(2):
            try:
                return self._load(path)
            except sqlite3.OperationalError as exc:
                return self._unusable(path, exc)
            except sqlite3.DatabaseError as exc:  # not a database, or a damaged one
                if attempt:
                    return self._unusable(path, exc)
                aside = path.with_name(path.name + ".damaged")
                log.warning("kept times: %s is damaged (%s); set aside as %s, starting "
                            "afresh", path, exc, aside)  # fmt: skip
                for suffix in ("", "-wal", "-shm"):
                    with contextlib.suppress(OSError):
                        Path(str(path) + suffix).replace(str(aside) + suffix)
        return None

    @staticmethod
    def _unusable(path: Path, exc: Exception) -> None:
        log.warning("kept times: cannot use %s (%s); times set now are kept only until "
                    "this mount ends", path, exc)  # fmt: skip

    def _load(self, path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=self._timeout
        )
        try:
            # WAL, and no fsync per change: a crash of the daemon loses nothing committed,
            # a power cut at most the last changes; neither leaves a damaged database.
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS times (id TEXT PRIMARY KEY, "
                "atime_ns INTEGER NOT NULL, mtime_ns INTEGER NOT NULL) WITHOUT ROWID"
            )
            rows = db.execute("SELECT id, atime_ns, mtime_ns FROM times").fetchall()
        except BaseException:
            db.close()
            raise
        self._times = {row[0]: Times(int(row[1]), int(row[2])) for row in rows}
        return db

    def __len__(self) -> int:
        return len(self._times)

    def __contains__(self, file_id: object) -> bool:
        return file_id in self._times

    def get(self, file_id: str) -> Times | None:
        return self._times.get(file_id)

    def put(self, file_id: str, times: Times) -> None:
        if self._times.get(file_id) == times:
            return
        self._times[file_id] = times
        self._write(
            "INSERT OR REPLACE INTO times VALUES (?, ?, ?)",
            [(file_id, times.atime_ns, times.mtime_ns)],
        )

    def drop(self, file_ids: Collection[str]) -> None:
        gone = [file_id for file_id in file_ids if file_id in self._times]
        for file_id in gone:
            del self._times[file_id]
        if gone:
            self._write("DELETE FROM times WHERE id = ?", [(file_id,) for file_id in gone])

    def keep_only(self, file_ids: Collection[str]) -> None:
        """`file_ids` is every file of the account: the others' times go."""
        gone = set(self._times).difference(file_ids)
        if gone:
            log.info("kept times: dropping those of %d files no longer in the account", len(gone))
            self.drop(gone)

    def _write(self, statement: str, rows: list[tuple[object, ...]]) -> None:
        if self._db is None:
            return
        try:
            with self._db:  # one transaction
                self._db.executemany(statement, rows)
        except sqlite3.Error as exc:  # a full disk, most often: kept in memory still
            log.warning("kept times: writing %s failed (%s); this mount still shows the "
                        "times, the next may not", self._path, exc)  # fmt: skip

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


_CHANGED = None  # the content changed since the times were set: the upload's time shows


class KeptTimes:
    """Which times each file shows, and where they are kept while its content moves.

    A file that shows content the account does not hold yet (a new file, a spool with
    changes, an upload under way) keeps the times set on it by inode, waiting for the
    id its upload gets.
    """

    def __init__(self, store: TimesFile, spool_for: Callable[[FileNode], Spool | None]) -> None:
        self.store = store
        self._spool_for = spool_for
        # inode -> times set on content not uploaded yet (or _CHANGED: none since it changed)
        self._waiting: dict[int, Times | None] = {}

    def _changed(self, node: FileNode) -> bool:
        """Whether `node` shows content the account does not hold (yet)."""
        spool = self._spool_for(node)
        return node.remote is None or (spool is not None and spool.changed)

    def times_of(self, node: FileNode) -> Times:
        """What `stat` shows: the times kept, else those of the upload (or the creation)."""
        if node.inode in self._waiting and self._changed(node):
            kept = self._waiting[node.inode]
        else:
            kept = self.store.get(node.remote.id) if node.remote is not None else None
        if kept is not None:
            return kept
        seconds = node.remote.created_at if node.remote is not None else node.local_time
        return Times(seconds * NS, seconds * NS)

    def set(self, node: FileNode, atime_ns: int | None, mtime_ns: int | None) -> None:
        """A program set the times (`utimensat`); either may be left as it is."""
        shown = self.times_of(node)
        times = Times(
            shown.atime_ns if atime_ns is None else atime_ns,
            shown.mtime_ns if mtime_ns is None else mtime_ns,
        )
        if node.remote is not None and not self._changed(node):
            self._waiting.pop(node.inode, None)
            self.store.put(node.remote.id, times)
        else:
            self._waiting[node.inode] = times

    def content_changed(self, node: FileNode) -> None:
        """Written or truncated: what was set before describes content that is gone."""
        self._waiting[node.inode] = _CHANGED

    def bound(self, node: FileNode, previous: RemoteFile | None) -> None:
        """An upload made `node` the remote file `node.remote`, replacing `previous`.

        Times set while it was written go to the new id. With none set and no change
        noted, the content is the previous file's (a rename): its times come along.
        """
        assert node.remote is not None
        carried = self.store.get(previous.id) if previous is not None else None
        times = self._waiting.pop(node.inode, carried)
        if previous is not None:
            self.store.drop([previous.id])
        if times is not None:
            self.store.put(node.remote.id, times)

    def node_gone(self, node: FileNode) -> None:
        """Removed: times waiting for its upload go with it."""
        self._waiting.pop(node.inode, None)

    def forget(self, file_id: str) -> None:
        """The file is deleted: its times go."""
        self.store.drop([file_id])

    def keep_only(self, file_ids: Collection[str]) -> None:
        self.store.keep_only(file_ids)
