"""Changing files: spool to local disk, upload on close, replace only after success.

Remote files cannot be changed in place, so every change is a new upload:
- a new file is written to a spool file under the cache folder, never into memory;
- changing an uploaded file (append, truncate, `O_RDWR`, an editor's save) first
  copies its content into a spool (copy-on-write), and `O_TRUNC` starts an empty one;
- a rename of an uploaded file uploads its content again under the new name and purpose.
In every case the version being replaced is deleted only after the new upload
succeeded, and a spool whose upload did not succeed is moved to the recovery folder
instead of being deleted.

The first `close()` after data was written (FUSE `flush`) uploads and returns the
upload's outcome, because errors from `release` reach nobody. Changes made without
writing (a truncate, an empty new file) are uploaded when the last descriptor closes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import trio

from mistralfs.api import (
    ApiError,
    FilesClient,
    GrowingFile,
    GrowingUpload,
    NotFound,
    RemoteFile,
    StreamAbandoned,
)
from mistralfs.fs.activity import Activity, UploadProgress
from mistralfs.fs.errors import FsError, errno_for
from mistralfs.fs.namespace import FileNode, Folder, Namespace
from mistralfs.fs.reader import BlockReader

log = logging.getLogger(__name__)

TOO_LARGE = "files are limited to 512 MB"
# A new file is uploaded while it is written once it holds this much, written from its
# first byte on; smaller files are sent whole at close, in one piece.
GROWING_START_BYTES = 4 << 20


@dataclass(eq=False)
class Growing:
    """An upload started at a new file's first write, following the spool as it grows.

    Programs that copy a file in write it from start to end and then close it; the
    upload is under way meanwhile, so the close waits only for what is left of it.
    """

    file: GrowingFile
    upload: GrowingUpload
    progress: UploadProgress
    activity_key: int
    done: trio.Event = field(default_factory=trio.Event)
    remote: RemoteFile | None = None  # what it stored, once done; None if it did not


@dataclass(eq=False)
class Spool:
    """The local copy of a file being changed, shared by every handle open on it."""

    node: FileNode
    path: Path
    fd: int
    size: int = 0
    # Changed by the program since the last upload: upload at the next close.
    unflushed: bool = False
    # Differs from the remote version, perhaps only by how it was opened (a new file,
    # O_TRUNC): upload at the last close at the latest.
    changed: bool = False
    oversize: bool = False
    handles: int = 0
    closed_since_write: bool = False  # a descriptor was closed after the last write
    upload_started: float | None = None  # wall clock, for recovery after a crash
    meta_written: tuple[object, ...] = ()
    meta_length: int = 0  # bytes of the note on disk: it is overwritten, never shortened
    # Remote files to delete after the next upload (a rename's replaced target).
    replaces: list[RemoteFile] = field(default_factory=list)
    growing: Growing | None = None  # an upload under way while the file is written
    appended_only: bool = True  # written from its first byte on, each write at the end
    # The upload of the content as it stands failed, and that close reported it: the
    # last release keeps it for recovery rather than sending the same bytes again.
    upload_failed: bool = False

    @property
    def meta_path(self) -> Path:
        return self.path.with_suffix(".json")


class Writer:
    """Owns the spool files and turns them into uploads.

    Everything that uploads, renames, or opens or drops a spool holds the file's lock
    (`FileNode.lock`), so that an upload started by one close is finished before a
    rename or another open of the same file looks at it.
    """

    def __init__(
        self,
        client: FilesClient,
        namespace: Namespace,
        reader: BlockReader,
        activity: Activity,
        *,
        nursery: trio.Nursery,
        spool_dir: Path,
        recovery_dir: Path,
        max_file_size: int,
    ) -> None:
        self._client = client
        self._namespace = namespace
        self._reader = reader
        self._activity = activity
        self._nursery = nursery
        self._spool_dir = spool_dir
        self._recovery_dir = recovery_dir
        self._max_file_size = max_file_size
        self._spools: dict[int, Spool] = {}
        self._uploads_in_flight = 0
        self._idle = trio.Event()
        self._idle.set()
        spool_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    def spool_for(self, node: FileNode) -> Spool | None:
        return self._spools.get(node.inode)

    # -- opening ------------------------------------------------------------------

    def create(self, folder: Folder, name: str) -> Spool:
        """A new, empty file in `folder`, open once; it exists only locally until uploaded."""
        node = self._namespace.add_local(folder, name, now=int(time.time()))
        spool = self._new_spool(node)
        spool.changed = True  # even empty, it is a file to upload
        spool.handles = 1
        return spool

    async def open_handle(self, node: FileNode, *, write: bool, truncate: bool) -> Spool | None:
        """Count a new handle on `node`; the spool it reads and writes, if it needs one.

        A handle that only reads a file with no spool reads the remote content.
        """
        async with node.lock:
            spool = self._spools.get(node.inode)
            if spool is None and write:
                spool = await self._copy_on_write(node, truncate=truncate)
            if spool is None:
                return None
            spool.handles += 1
            if truncate:
                self._truncate(spool, 0)
            return spool

    async def _copy_on_write(self, node: FileNode, *, truncate: bool) -> Spool:
        """A spool holding the remote content (none if it is about to be truncated)."""
        assert node.remote is not None, "a local file always has a spool"
        spool = self._new_spool(node)
        if truncate:
            spool.changed = node.remote.bytes != 0
        else:
            try:
                await self._reader.copy_into(node.remote, spool.fd)
            except BaseException:
                self._discard(spool)
                raise
            spool.size = node.remote.bytes
            spool.appended_only = False  # an edit, not a new file written in order
        node.local_size = spool.size
        return spool

    def _new_spool(self, node: FileNode) -> Spool:
        path = self._spool_dir / f"{uuid.uuid4().hex}.spool"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        spool = Spool(node=node, path=path, fd=fd)
        self._write_meta(spool)
        self._spools[node.inode] = spool
        return spool

    def _write_meta(self, spool: Spool) -> None:
        """What the spool is and how far it got, so that a crash loses nothing.

        At the next mount a spool whose file was closed after its last write (`complete`)
        and not uploaded yet is uploaded; one still being written is kept for recovery.
        """
        node = spool.node
        meta = {
            "purpose": node.folder.purpose,
            "filename": node.filename,
            "complete": spool.closed_since_write,
            "uploaded": not spool.changed,
            "upload_started": spool.upload_started,
            "replaces": [r.id for r in spool.replaces]
            + ([node.remote.id] if node.remote is not None else []),
        }
        state = tuple(meta.values())
        if state != spool.meta_written:
            data = json.dumps(meta).encode()
            _overwrite(spool.meta_path, data.ljust(spool.meta_length))
            spool.meta_written = state
            spool.meta_length = max(spool.meta_length, len(data))

    def _close(self, spool: Spool) -> None:
        """The spool is no longer the file's content: the remote file is, if there is one."""
        self._stop_growing(spool, "the file was closed without being uploaded")
        self._spools.pop(spool.node.inode, None)
        os.close(spool.fd)
        spool.node.local_size = None if spool.node.remote is not None else spool.size

    def _discard(self, spool: Spool) -> None:
        self._close(spool)
        spool.path.unlink(missing_ok=True)
        spool.meta_path.unlink(missing_ok=True)

    # -- changing -----------------------------------------------------------------

    def write(self, spool: Spool, offset: int, data: bytes) -> int:
        if offset + len(data) > self._max_file_size:
            spool.oversize = True
            self._stop_growing(spool, TOO_LARGE)
            raise FsError(errno.EFBIG, f"{spool.node.name}: {TOO_LARGE}")
        appending = offset == spool.size
        written = os.pwrite(spool.fd, data, offset)
        spool.size = max(spool.size, offset + written)
        spool.appended_only = spool.appended_only and appending
        if spool.growing is not None:
            if appending:
                spool.growing.file.grew(spool.size)
                spool.growing.progress.total = spool.size
            else:
                self._stop_growing(spool, "a write before the end of the file")
        elif spool.size >= GROWING_START_BYTES and self._may_grow(spool):
            self._start_growing(spool)
        spool.node.local_size = spool.size
        state_changes = spool.closed_since_write or not spool.changed
        spool.unflushed = spool.changed = True
        spool.closed_since_write = spool.upload_failed = False
        if state_changes:  # the note is rewritten only when what it says changes
            self._write_meta(spool)
        return written

    def read(self, spool: Spool, offset: int, size: int) -> bytes:
        return os.pread(spool.fd, size, offset)

    def truncate(self, spool: Spool, size: int) -> None:
        """`ftruncate` by the program: uploaded at the next close."""
        self._truncate(spool, size)
        spool.unflushed = spool.unflushed or spool.changed

    def _truncate(self, spool: Spool, size: int) -> None:
        if size > self._max_file_size:
            raise FsError(errno.EFBIG, f"{spool.node.name}: {TOO_LARGE}")
        if size != spool.size:
            self._stop_growing(spool, "the file was truncated")
        if size == 0:
            spool.appended_only = True
        os.ftruncate(spool.fd, size)
        if size != spool.size:
            spool.changed = True
            spool.upload_failed = False
        spool.size = spool.node.local_size = size
        self._write_meta(spool)

    def touched(self, spool: Spool) -> None:
        """The program acted on the file after opening it (`futimens`, `fchmod`, ...).

        So a close that follows is not a shell closing a descriptor it just duplicated,
        and a new or truncated file is uploaded by that close rather than afterwards.
        """
        spool.unflushed = spool.unflushed or spool.changed

    async def truncate_closed(self, node: FileNode, size: int) -> None:
        """`truncate PATH` with no descriptor open: copy, truncate and upload now."""
        async with node.lock:
            spool = self._spools.get(node.inode) or await self._copy_on_write(
                node, truncate=size == 0
            )
            spool.handles += 1
            try:
                self._truncate(spool, size)
                if spool.changed:
                    await self._upload(spool)
            finally:
                await self._release(spool)

    async def flush(self, spool: Spool) -> None:
        """Upload what the program changed since the last upload; raise what went wrong.

        A close after nothing but the open itself uploads nothing: shells open, `dup2`
        and close the original descriptor before writing, and that close must neither
        upload an empty new file nor replace a file by its truncated version. Such a
        change is uploaded when the last descriptor closes instead.
        """
        node = spool.node
        spool.closed_since_write = True
        if spool.oversize:
            self._write_meta(spool)
            raise FsError(errno.EFBIG, f"{node.name}: not uploaded, {TOO_LARGE}")
        async with node.lock:
            if not spool.unflushed or not node.attached:
                self._write_meta(spool)
            if not spool.unflushed:
                return
            if node.attached:
                await self._upload(spool)  # which notes that it is complete, as it starts
            elif not node.unlinked:
                gone = "replaced by a rename" if node.replaced else "deleted elsewhere"
                raise FsError(errno.EIO, f"{node.name} was {gone}; not uploaded")

    async def release(self, spool: Spool) -> None:
        """A handle closed; after the last one, upload what changed and drop the spool."""
        async with spool.node.lock:
            await self._release(spool)

    async def _release(self, spool: Spool) -> None:
        spool.handles -= 1
        if spool.handles > 0:
            return
        node = spool.node
        if spool.changed and node.attached and not spool.oversize and not spool.upload_failed:
            with contextlib.suppress(FsError):  # logged by _upload; the spool is kept below
                await self._upload(spool)
        if spool.oversize:
            # The write past the limit failed and nothing was uploaded; the copy the
            # program was making is incomplete, so nothing worth keeping is left.
            log.info("%s/%s: dropping the incomplete copy of a file past 512 MB",
                     node.folder.purpose, node.name)  # fmt: skip
        if spool.changed and not node.unlinked and not spool.oversize:
            self._close(spool)
            self._keep(spool)  # its upload failed: nothing the program wrote is lost
        else:
            self._discard(spool)
        if node.remote is None:
            self._namespace.detach(node)  # never uploaded: the name goes with the spool

    def _keep(self, spool: Spool) -> None:
        self._recovery_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        kept = self._recovery_dir / spool.path.name
        spool.path.rename(kept)
        spool.meta_path.rename(kept.with_suffix(".json"))
        log.warning(
            "%s/%s was not uploaded; its content is kept at %s",
            spool.node.folder.name,
            spool.node.name,
            kept,
        )

    # -- renaming -----------------------------------------------------------------

    async def rename(self, node: FileNode, folder: Folder, name: str) -> None:
        """Give `node` a new name and purpose; an existing target is replaced.

        A file not uploaded yet and still being written is only renamed: its upload will
        carry the new name. Otherwise the content is uploaded again under the new name and
        purpose (from the open spool, else copied from the remote file), and the old
        version and any replaced target are deleted after that succeeded. If it fails,
        nothing has changed. Either way the account is in its final state on return.
        """
        async with node.lock:
            started = time.monotonic()
            source = f"{node.folder.purpose}/{node.name}"
            spool = self._spools.get(node.inode)
            if spool is not None and node.remote is None and not spool.closed_since_write:
                self._stop_growing(spool, "the file was renamed")
                target, replaced = self._target(folder, name)
                self._replace_name(node, target, folder, name)
                spool.replaces.extend(replaced)
                self._write_meta(spool)
                log.info("renamed %s to %s/%s before its upload", source, folder.purpose, name)
                return
            if spool is None:
                spool = await self._copy_on_write(node, truncate=False)
            spool.handles += 1
            try:
                remote = await self._upload_as(spool, filename=name, purpose=folder.purpose)
                if node.removed_here:
                    # Removed through this mount while it was uploaded under its new name:
                    # the removal wins, as if it had come first.
                    why = f"{source} went while it was renamed"
                    await self._delete_replaced(node, [remote], why=why)
                    raise FsError(errno.ENOENT, f"{source} was removed while being renamed")
                # Whatever holds the name now is replaced, not what held it before the
                # upload: its own upload may have ended meanwhile.
                target, replaced = self._target(folder, name)
                self._replace_name(node, target, folder, name)
                old = [node.remote] if node.remote is not None else []
                self._namespace.uploaded(node, remote)
                spool.unflushed = spool.changed = False
                self._write_meta(spool)
                await self._delete_replaced(node, [*old, *spool.replaces, *replaced])
                spool.replaces = []
            finally:
                await self._release(spool)
            log.info(
                "renamed %s to %s/%s: %d bytes, %s -> %s in %.2f s",
                source,
                folder.purpose,
                name,
                remote.bytes,
                old[0].id if old else "-",
                remote.id,
                time.monotonic() - started,
            )

    @staticmethod
    def _target(folder: Folder, name: str) -> tuple[FileNode | None, list[RemoteFile]]:
        """The file a rename to `name` replaces, and its remote version."""
        target = folder.entries.get(name)
        return target, [target.remote] if target is not None and target.remote else []

    def _replace_name(
        self, node: FileNode, target: FileNode | None, folder: Folder, name: str
    ) -> None:
        if target is not None:
            target.replaced = True
            self._namespace.detach(target, deleted=False)  # deleted once replaced remotely
        self._namespace.move(node, folder, name)

    # -- uploading ----------------------------------------------------------------

    async def _upload(self, spool: Spool) -> None:
        node = spool.node
        try:
            remote = await self._upload_as(
                spool, filename=node.filename, purpose=node.folder.purpose
            )
        except FsError:
            spool.upload_failed = True
            raise
        if not node.attached:
            await self._nameless_upload(spool, remote)
            return
        replaced = [node.remote] if node.remote is not None else []
        replaced += spool.replaces
        spool.replaces = []
        spool.unflushed = spool.changed = False
        self._namespace.uploaded(node, remote)
        self._write_meta(spool)
        await self._delete_replaced(node, replaced)

    async def _nameless_upload(self, spool: Spool, remote: RemoteFile) -> None:
        """The file lost its name while its upload was under way.

        Removed through this mount (an editor removes its swap file while the release
        uploads it; a rename takes its name): what was stored goes, with what it was to
        replace. Deleted elsewhere: what was written is kept, and the next listing shows
        it; it is not attached to the node the listing dropped.
        """
        node = spool.node
        spool.unflushed = spool.changed = False
        self._write_meta(spool)
        where = f"{node.folder.purpose}/{node.name}"
        if node.removed_here:
            why = f"{where} went while it was uploaded"
            await self._delete_replaced(node, [remote, *spool.replaces], why=why)
        else:
            log.warning("%s was deleted elsewhere while its new content was uploaded; that "
                        "content is kept as %s", where, remote.id)  # fmt: skip
            await self._delete_replaced(node, spool.replaces)
        spool.replaces = []

    async def _upload_as(self, spool: Spool, *, filename: str, purpose: str) -> RemoteFile:
        node = spool.node
        growing = self._finish_growing(spool, filename, purpose)
        if growing is None:
            spool.upload_started = time.time()
            key = self._activity.start_upload(filename, purpose, spool.size)
            self._upload_began()
        else:
            key = growing.activity_key
        self._write_meta(spool)
        progress = self._activity.progress(key)
        progress.total = spool.size
        error: str | None = "cancelled"
        try:
            remote = None
            if growing is not None:
                # Whatever went wrong with it, the whole file is sent once more: a refusal
                # may be of the chunked body rather than of the content, and the second
                # answer is the one that reaches the program.
                await growing.done.wait()
                remote = growing.remote
            if remote is None:
                with self._namespace.uploading(purpose, filename):
                    remote = await self._client.upload(
                        spool.path,
                        filename=filename,
                        purpose=purpose,
                        progress=progress.update,
                        after=growing.upload if growing is not None else None,
                    )
            error = None
        except ApiError as exc:
            error = str(exc)
            log.error("upload of %s/%s failed: %s", node.folder.name, node.name, exc)
            raise FsError(errno_for(exc), str(exc)) from exc
        except OSError as exc:  # the spool itself could not be read
            error = f"reading {spool.path}: {exc}"
            log.error("upload of %s/%s failed reading %s: %s", node.folder.name, node.name,
                      spool.path, exc)  # fmt: skip
            raise FsError(errno.EIO, str(exc)) from exc
        finally:
            seconds = self._activity.finish_upload(key, error)
            self._upload_ended()
        log.info(
            "uploaded %s/%s: %d bytes as %s in %.2f s",
            purpose,
            filename,
            remote.bytes,
            remote.id,
            seconds,
        )
        return remote

    def _upload_began(self) -> None:
        self._uploads_in_flight += 1
        self._idle = trio.Event()

    def _upload_ended(self) -> None:
        self._uploads_in_flight -= 1
        if self._uploads_in_flight == 0:
            self._idle.set()

    # -- uploading while the file is written -----------------------------------------

    def _may_grow(self, spool: Spool) -> bool:
        """Whether `spool` is a new file being written from start to end, never sent yet."""
        return (
            spool.appended_only
            and spool.upload_started is None
            and spool.node.attached
            and not spool.oversize
            and self._client.sends_growing_uploads
        )

    def _start_growing(self, spool: Spool) -> None:
        """Start uploading a new file while it is written, from its first byte."""
        node = spool.node
        filename, purpose = node.filename, node.folder.purpose
        file = GrowingFile()
        file.grew(spool.size)
        key = self._activity.start_upload(filename, purpose, spool.size)
        progress = self._activity.progress(key)
        upload = self._client.growing_upload(
            spool.path, file, filename=filename, purpose=purpose, progress=progress.update
        )
        spool.growing = Growing(file, upload, progress, key)
        spool.upload_started = time.time()
        self._write_meta(spool)
        self._upload_began()
        self._nursery.start_soon(self._send_growing, spool.growing)

    async def _send_growing(self, growing: Growing) -> None:
        upload = growing.upload
        try:
            with self._namespace.uploading(upload.purpose, upload.filename):
                growing.remote = await upload.run()
        except StreamAbandoned as exc:
            log.debug("%s/%s: upload while writing stopped: %s", upload.purpose,
                      upload.filename, exc)  # fmt: skip
        except Exception as exc:  # the file is uploaded whole once closed instead
            log.info(
                "%s/%s: the upload started while writing failed (%s); uploading the whole "
                "file once it is closed",
                upload.purpose,
                upload.filename,
                exc,
            )
        finally:
            growing.done.set()

    def _stop_growing(self, spool: Spool, reason: str) -> None:
        """The file changed in a way the upload under way cannot follow: stop it.

        Its activity entry and in-flight count are released once it has stopped.
        The file is uploaded whole at the next close, as any other change.
        """
        growing, spool.growing = spool.growing, None
        if growing is None:
            return
        growing.file.abandon(reason)
        self._nursery.start_soon(self._forget_growing, growing)

    async def _forget_growing(self, growing: Growing) -> None:
        await growing.done.wait()
        self._activity.drop_upload(growing.activity_key)
        self._upload_ended()

    def _finish_growing(self, spool: Spool, filename: str, purpose: str) -> Growing | None:
        """The upload under way for `spool`, told that the file is complete, if it fits.

        One started under another name or purpose is stopped instead.
        """
        growing = spool.growing
        if growing is None:
            return None
        if (growing.upload.filename, growing.upload.purpose) != (filename, purpose):
            self._stop_growing(spool, "the file was renamed")
            return None
        spool.growing = None
        growing.file.finish(spool.size)
        return growing

    async def _delete_replaced(
        self, node: FileNode, replaced: list[RemoteFile], *, why: str = ""
    ) -> None:
        """The new upload succeeded, so the versions it replaces can go."""
        why = why or f"replaced {node.folder.purpose}/{node.name}"
        for old in replaced:
            started = time.monotonic()
            self._namespace.forget_id(old.id)
            self._reader.forget(old.id)
            try:
                await self._client.delete(old.id)
            except NotFound:
                continue
            except ApiError as exc:
                log.error("%s: could not delete %s: %s", why, old.id, exc)
                continue
            log.info("%s: deleted %s/%s, %d bytes, %s in %.2f s", why, old.purpose,
                     old.filename, old.bytes, old.id, time.monotonic() - started)  # fmt: skip

    def unlinked(self, node: FileNode) -> None:
        """`node` was deleted while open: an upload under way must not store it."""
        spool = self._spools.get(node.inode)
        if spool is not None:
            self._stop_growing(spool, "the file was deleted")

    def pending(self) -> int:
        """Files changed through an open descriptor and not uploaded yet."""
        return sum(1 for spool in self._spools.values() if spool.changed)

    async def wait_idle(self) -> None:
        """Return once no upload is in flight."""
        while self._uploads_in_flight:
            await self._idle.wait()


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
