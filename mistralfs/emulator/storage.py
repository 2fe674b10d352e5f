"""Persistent state of the emulator: file metadata in SQLite, content in blobs.

Layout of a data directory::

    DIR/files.sqlite3   metadata, one row per file
    DIR/blobs/<id>      content, named by id only (never by the user's filename)
    DIR/tmp/            uploads in flight; emptied at start-up
    DIR/secret.key      HMAC key for signed URLs, random per data dir, so URLs
                        survive restarts but not a new data dir

A blob is first written to ``tmp/`` and moved into ``blobs/`` with an atomic
rename once it has been validated, so a crash never leaves a half-written blob
behind a metadata row.

SQLite calls are short and local; they run on the calling thread, guarded by a
lock so that the Python API (e.g. :meth:`Storage.add_file`) may also be used
from worker threads.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import secrets
import shutil
import sqlite3
import threading
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from mistralfs.emulator.clock import Clock
from mistralfs.files_api import FILE_FIELDS

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    sample_type TEXT NOT NULL,
    source TEXT NOT NULL,
    num_lines INTEGER,
    mimetype TEXT,
    signature TEXT,
    expires_at INTEGER,
    visibility TEXT
);
CREATE INDEX IF NOT EXISTS files_order ON files (created_at DESC, seq DESC);
CREATE INDEX IF NOT EXISTS files_purpose_order ON files (purpose, created_at DESC, seq DESC);
"""

_SQL_MAX = 2**62  # SQLite integers are 64-bit; larger pages are simply empty

_COLUMNS = FILE_FIELDS
# Columns added since the first data folders were made: added to an older table on open.
_ADDED_COLUMNS = {"expires_at": "INTEGER", "visibility": "TEXT"}


@dataclass(frozen=True)
class FileRecord:
    """One stored file, with exactly the fields of the API's File object."""

    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    sample_type: str
    source: str
    num_lines: int | None
    mimetype: str | None
    signature: str | None
    expires_at: int | None = None
    visibility: str | None = None

    def to_api(self) -> dict[str, Any]:
        """The JSON object the real service returns (``object`` included)."""
        # Not dataclasses.asdict: it deep-copies, which a page of a thousand files pays
        # for a thousand times.
        answer: dict[str, Any] = {"id": self.id, "object": "file"}
        for name in FILE_FIELDS:
            answer[name] = getattr(self, name)
        return answer

    @property
    def etag(self) -> str:
        """Quoted ETag: the MD5 when known, else derived from the id (batch outputs)."""
        if self.signature:
            return f'"{self.signature}"'
        return '"0x' + hashlib.sha256(self.id.encode()).hexdigest()[:16].upper() + '"'


@dataclass(frozen=True)
class ListQuery:
    """Filters and paging of GET /v1/files; empty sequences mean "no filter"."""

    page: int = 0
    page_size: int = 100
    purpose: str | None = None
    search: str | None = None
    sample_types: Sequence[str] = ()
    sources: Sequence[str] = ()
    mimetypes: Sequence[str] = ()
    include_total: bool = True


class Storage:
    """Metadata and blobs of one data directory.

    A file whose ``expires_at`` has passed on ``clock`` is gone: never listed nor
    found again, and removed (row and blob) when next met.
    """

    def __init__(self, data_dir: pathlib.Path, clock: Clock | None = None) -> None:
        self.data_dir = pathlib.Path(data_dir)
        self.clock = clock or Clock()
        self.blobs_dir = self.data_dir / "blobs"
        self.tmp_dir = self.data_dir / "tmp"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.blobs_dir.mkdir(exist_ok=True)
        # Leftovers of uploads interrupted by a crash are never valid files.
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self.tmp_dir.mkdir()
        self.secret = self._load_secret()
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            self.data_dir / "files.sqlite3", check_same_thread=False, isolation_level=None
        )
        self._db.executescript(_SCHEMA)
        present = {row[1] for row in self._db.execute("PRAGMA table_info(files)")}
        for column, kind in _ADDED_COLUMNS.items():
            if column not in present:
                self._db.execute(f"ALTER TABLE files ADD COLUMN {column} {kind}")
        self._db.execute(
            "CREATE INDEX IF NOT EXISTS files_expiry ON files (expires_at) "
            "WHERE expires_at IS NOT NULL"
        )

    def close(self) -> None:
        """Close the database; the object is unusable afterwards."""
        with self._lock:
            self._db.close()

    def _load_secret(self) -> bytes:
        path = self.data_dir / "secret.key"
        try:
            return bytes.fromhex(path.read_text().strip())
        except FileNotFoundError:
            key = secrets.token_bytes(32)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(key.hex())
            return key

    def new_temp_path(self) -> pathlib.Path:
        """A fresh path inside ``tmp/``, on the same filesystem as the blobs."""
        return self.tmp_dir / f"upload-{uuid.uuid4().hex}"

    def blob_path(self, file_id: str) -> pathlib.Path:
        """Where the content of ``file_id`` lives (whether or not it exists)."""
        return self.blobs_dir / str(uuid.UUID(file_id))

    def add_file(
        self,
        content: bytes | os.PathLike[str],
        *,
        filename: str,
        purpose: str,
        sample_type: str,
        source: str = "upload",
        num_lines: int | None = None,
        mimetype: str | None = None,
        signature: str | None = None,
        created_at: int | None = None,
        expires_at: int | None = None,
        visibility: str | None = "workspace",
        move: bool = False,
    ) -> FileRecord:
        """Store a file and return its record.

        ``content`` is bytes, or a path that is copied (or, with ``move=True``,
        renamed: it must then be inside ``tmp/``). No validation happens here;
        callers decide the metadata. Usable directly from tests and tools.
        """
        file_id = str(uuid.uuid4())
        if isinstance(content, bytes | bytearray):
            tmp = self.new_temp_path()
            tmp.write_bytes(content)
        elif move:
            tmp = pathlib.Path(content)
        else:
            tmp = self.new_temp_path()
            shutil.copyfile(content, tmp)
        size = tmp.stat().st_size
        blob = self.blob_path(file_id)
        os.replace(tmp, blob)
        record = FileRecord(
            id=file_id,
            bytes=size,
            created_at=self.clock.now() if created_at is None else created_at,
            filename=filename,
            purpose=purpose,
            sample_type=sample_type,
            source=source,
            num_lines=num_lines,
            mimetype=mimetype,
            signature=signature,
            expires_at=expires_at,
            visibility=visibility,
        )
        try:
            with self._lock:
                self._db.execute(
                    f"INSERT INTO files ({', '.join(_COLUMNS)}) VALUES "
                    f"({', '.join('?' for _ in _COLUMNS)})",
                    tuple(getattr(record, c) for c in _COLUMNS),
                )
        except BaseException:
            blob.unlink(missing_ok=True)
            raise
        return record

    def add_batch_output(
        self,
        content: bytes | os.PathLike[str],
        *,
        filename: str,
        sample_type: str = "batch_result",
        num_lines: int | None = None,
        move: bool = False,
    ) -> FileRecord:
        """Store a batch job output as the service does: source mistral, no signature;
        its lines are counted unless ``num_lines`` says how many (``move`` as add_file)."""
        from mistralfs.emulator.validation import count_jsonl_lines

        record = self.add_file(
            content,
            filename=filename,
            purpose="batch",
            sample_type=sample_type,
            source="mistral",
            num_lines=num_lines,
            mimetype="application/jsonl",
            signature=None,
            move=move,
        )
        if num_lines is not None:
            return record
        lines = count_jsonl_lines(self.blob_path(record.id))
        with self._lock:
            self._db.execute("UPDATE files SET num_lines = ? WHERE id = ?", (lines, record.id))
        return FileRecord(**{**asdict(record), "num_lines": lines})

    def get(self, file_id: str) -> FileRecord | None:
        """The record of ``file_id`` (canonical UUID string), or None (expired included)."""
        with self._lock:
            row = self._db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM files WHERE id = ?", (file_id,)
            ).fetchone()
        record = FileRecord(*row) if row else None
        if record is not None and self._expired(record):
            self.delete(record.id)
            return None
        return record

    def _expired(self, record: FileRecord) -> bool:
        return record.expires_at is not None and record.expires_at <= self.clock.now()

    def purge_expired(self) -> int:
        """Remove every file whose time has passed; how many there were."""
        with self._lock:
            ids = [
                row[0]
                for row in self._db.execute(
                    "SELECT id FROM files WHERE expires_at IS NOT NULL AND expires_at <= ?",
                    (self.clock.now(),),
                )
            ]
        for file_id in ids:
            self.delete(file_id)
        return len(ids)

    def delete(self, file_id: str) -> bool:
        """Remove metadata then blob; False if there was no such file.

        Readers that already opened the blob keep reading it (POSIX unlink).
        """
        with self._lock:
            cur = self._db.execute("DELETE FROM files WHERE id = ?", (file_id,))
        if cur.rowcount == 0:
            return False
        self.blob_path(file_id).unlink(missing_ok=True)
        return True

    def list(self, query: ListQuery) -> tuple[list[FileRecord], int | None]:
        """One page of matching records, newest first, and the total match count (None
        unless ``query.include_total``: counting costs a scan the service spares too)."""
        where: list[str] = ["(expires_at IS NULL OR expires_at > ?)"]
        args: list[Any] = [self.clock.now()]
        if query.purpose is not None:
            where.append("purpose = ?")
            args.append(query.purpose)
        if query.search:
            where.append("instr(lower(filename), lower(?)) > 0")
            args.append(query.search)
        for column, values in (
            ("sample_type", query.sample_types),
            ("source", query.sources),
            ("mimetype", query.mimetypes),
        ):
            if values:
                where.append(f"{column} IN ({', '.join('?' for _ in values)})")
                args.extend(values)
        clause = f"WHERE {' AND '.join(where)}"
        total: int | None = None
        with self._lock:
            if query.include_total:
                total = self._db.execute(f"SELECT count(*) FROM files {clause}", args).fetchone()[0]
            rows = self._db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM files {clause} "
                "ORDER BY created_at DESC, seq DESC LIMIT ? OFFSET ?",
                [
                    *args,
                    min(query.page_size, _SQL_MAX),
                    min(query.page * query.page_size, _SQL_MAX),
                ],
            ).fetchall()
        return [FileRecord(*r) for r in rows], total
