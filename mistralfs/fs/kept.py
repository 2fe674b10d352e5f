"""What the recovery folder keeps: content that was not uploaded, and why.

A spool whose upload was refused or failed, or that a crash left half-written, is
moved to `CACHE_DIR/recovery/` with its `.json` note (`spool.keep`). The note says the
purpose and name it was written to; this module adds the reason (`error`: the
service's own message) and reads the folder back as `KeptEntry` records, for the
mount (the name that shows it, `user.mistral.error`), `mistralfs status` and
`mistralfs recovery`, which lists, retries, saves elsewhere or discards them.

An entry's id is its spool's file name without `.spool`; a unique prefix of it names
it too. Everything here works on the folder alone, so a mount that is running and the
command line see the same entries: an entry retried or discarded by one is gone for
the other at its next look.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from mistralfs.api import ApiError, NotFound, RemoteFile
from mistralfs.api.protocol import FilesApi
from mistralfs.fs.errors import reason
from mistralfs.fs.spool import remove
from mistralfs.fs.upload_settings import UploadSettings, from_note

log = logging.getLogger(__name__)

SPOOL_SUFFIX = ".spool"


class EntryNotFound(LookupError):
    """No entry, or more than one, answers to an id; the message says which."""


@dataclass(frozen=True)
class KeptEntry:
    """One kept content, as its note describes it."""

    id: str
    path: Path  # the content
    purpose: str | None  # where it was written; None if the note is lost
    filename: str | None
    size: int
    kept_at: float  # when it was kept (the file's mtime)
    error: str | None  # why it was not uploaded, if known
    replaces: tuple[str, ...] = ()  # remote versions its upload was to replace
    # What its upload asks for besides the content, as the note keeps it.
    settings: UploadSettings = field(default_factory=UploadSettings)

    @property
    def where(self) -> str:
        return f"{self.purpose or '?'}/{self.filename or self.id}"

    def exists(self) -> bool:
        return self.path.exists()

    def as_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "purpose": self.purpose,
            "filename": self.filename,
            "bytes": self.size,
            "kept_at": self.kept_at,
            "error": self.error,
            "path": str(self.path),
        }


def read_entry(path: Path) -> KeptEntry:
    """The entry of a kept spool file (its note may be missing or unreadable)."""
    try:
        note = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        note = {}
    if not isinstance(note, dict):
        note = {}
    stat = path.stat()
    return KeptEntry(
        id=path.name.removesuffix(SPOOL_SUFFIX),
        path=path,
        purpose=note.get("purpose"),
        filename=note.get("filename"),
        size=stat.st_size,
        kept_at=stat.st_mtime,
        error=note.get("error"),
        replaces=tuple(note.get("replaces") or ()),
        settings=from_note(note, UploadSettings(), time.time()),
    )


def kept_entries(recovery_dir: Path) -> list[KeptEntry]:
    """Every entry of the folder, oldest first."""
    entries = []
    for path in recovery_dir.glob("*" + SPOOL_SUFFIX) if recovery_dir.is_dir() else []:
        with contextlib.suppress(FileNotFoundError):  # discarded meanwhile
            entries.append(read_entry(path))
    return sorted(entries, key=lambda e: (e.kept_at, e.id))


def find_entry(recovery_dir: Path, prefix: str) -> KeptEntry:
    """The one entry whose id starts with `prefix`."""
    found = [e for e in kept_entries(recovery_dir) if prefix and e.id.startswith(prefix)]
    if len(found) != 1:
        what = "no entry" if not found else f"{len(found)} entries"
        raise EntryNotFound(f"{what} in {recovery_dir} with the id {prefix!r}")
    return found[0]


def note_reason(kept: Path, why: str) -> None:
    """Write why `kept` was not uploaded into its note (kept beside it)."""
    note_path = kept.with_suffix(".json")
    try:
        note = json.loads(note_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        note = {}
    if not isinstance(note, dict):
        note = {}
    note["error"] = why
    tmp = note_path.with_suffix(".json.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(note, f)
    os.replace(tmp, note_path)


def discard(entry: KeptEntry) -> None:
    remove(entry.path)


def save(entry: KeptEntry, dest: Path) -> Path:
    """Move the content out to `dest` (a folder: under its name there); the entry goes."""
    if dest.is_dir():
        dest = dest / (entry.filename or entry.id)
    if dest.exists():
        raise FileExistsError(f"{dest} exists already")
    shutil.copyfile(entry.path, dest)
    discard(entry)
    return dest


async def retry(
    client: FilesApi, entry: KeptEntry, *, purpose: str | None = None, filename: str | None = None
) -> RemoteFile:
    """Upload the content again (into `purpose`, as `filename` if given); the entry goes.

    Retried where it was written, the versions its upload was to replace are deleted
    after it succeeded. Refused again, the entry stays with the new reason, and the
    `ApiError` is raised.
    """
    purpose = purpose or entry.purpose
    filename = filename or entry.filename
    if not purpose or not filename:
        raise ValueError(f"{entry.id}: its note is lost: say --purpose and --name")
    try:
        remote = await client.upload(
            entry.path,
            filename=filename,
            purpose=purpose,
            expiry=entry.settings.sent_expiry,
            visibility=entry.settings.visibility,
        )
    except ApiError as exc:
        note_reason(entry.path, reason(exc))
        raise
    if (purpose, filename) == (entry.purpose, entry.filename):
        for old_id in entry.replaces:
            with contextlib.suppress(NotFound):
                await client.delete(old_id)
    discard(entry)
    log.info("recovery: uploaded %s as %s/%s (%s)", entry.id, purpose, filename, remote.id)
    return remote
