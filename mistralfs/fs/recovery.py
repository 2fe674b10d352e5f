"""After a crash: upload what was closed completely, keep what was half-written.

Each spool has a `.json` note (written by the writer) saying its folder, name, whether
the file was closed after its last write (`complete`), whether its content is already
in the account (`uploaded`), and when its last upload began. At the next mount:
- an uploaded spool is dropped, and so is a scratch file's (`local`);
- a complete one is uploaded, unless the upload that was in flight at the crash got
  through (a file of that name, size and MD5 created since it began, looked for once
  that upload could no longer be on its way), and the versions it replaced are deleted;
- anything else goes to the recovery folder, its note saying why (see `kept.py`).
Every outcome is logged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

import trio

from mistralfs.api import ApiError, NotFound, RemoteFile
from mistralfs.api.protocol import FilesApi
from mistralfs.fs.errors import reason
from mistralfs.fs.kept import note_reason
from mistralfs.fs.spool import keep, remove
from mistralfs.fs.upload_settings import UploadSettings, from_note

log = logging.getLogger(__name__)

# An upload in flight at the crash may still land on the service after its client died:
# look for it only once that much time has passed since it began.
IN_FLIGHT_GRACE = 10.0


def leftover_spools(spool_dir: Path) -> list[Path]:
    """Spools a previous daemon for this mountpoint left behind, oldest first."""
    if not spool_dir.is_dir():
        return []
    return sorted(spool_dir.glob("*.spool"), key=lambda p: p.stat().st_mtime)


async def recover(
    client: FilesApi,
    spools: list[Path],
    recovery_dir: Path,
    defaults: UploadSettings | None = None,
) -> None:
    """Upload, drop or keep each spool (see above); a file is sent with the upload
    settings its note keeps, over `defaults` (this mount's `--visibility`, `--expiry`)."""
    defaults = defaults or UploadSettings()
    for spool in spools:
        meta_path = spool.with_suffix(".json")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = {}
        where = f"{meta.get('purpose', '?')}/{meta.get('filename', spool.name)}"
        if meta.get("local"):
            log.info("recovery: %s was a scratch file, kept only while mounted; dropped", where)
            remove(spool)
        elif meta.get("uploaded") and meta.get("complete"):
            log.info("recovery: %s was already uploaded; dropping its spool", where)
            remove(spool)
        elif meta.get("complete") and meta.get("purpose") and meta.get("filename"):
            await _upload(client, spool, meta, where, recovery_dir, defaults)
        else:
            kept = keep(spool, recovery_dir)
            with contextlib.suppress(OSError):
                note_reason(kept, "still being written when the mount stopped")
            log.warning("recovery: %s was still being written at the crash; kept at %s",
                        where, kept)  # fmt: skip


async def _upload(
    client: FilesApi,
    spool: Path,
    meta: dict,
    where: str,
    recovery_dir: Path,
    defaults: UploadSettings,
) -> None:
    try:
        remote = await _already_uploaded(client, spool, meta)
        if remote is not None:
            log.info("recovery: %s had been uploaded as %s before the crash", where, remote.id)
        else:
            settings = from_note(meta, defaults, time.time())
            remote = await client.upload(
                spool,
                filename=meta["filename"],
                purpose=meta["purpose"],
                expiry=settings.sent_expiry,
                visibility=settings.visibility,
            )
            log.info("recovery: uploaded %s, closed before the crash, as %s", where, remote.id)
        for old_id in meta.get("replaces") or []:
            if old_id != remote.id:
                try:
                    await client.delete(old_id)
                    log.info("recovery: deleted %s, which %s replaces", old_id, where)
                except NotFound:
                    pass
    except ApiError as exc:
        kept = keep(spool, recovery_dir)
        with contextlib.suppress(OSError):
            note_reason(kept, reason(exc))
        log.error("recovery: could not upload %s (%s); kept at %s", where, exc, kept)
        return
    remove(spool)


async def _already_uploaded(client: FilesApi, spool: Path, meta: dict) -> RemoteFile | None:
    """The file an upload in flight at the crash may have created, if it got through."""
    started = meta.get("upload_started")
    if not started:
        return None
    await trio.sleep(max(0.0, started + IN_FLIGHT_GRACE - time.time()))
    return await client.find_upload(
        spool, filename=meta["filename"], purpose=meta["purpose"], started=started
    )
