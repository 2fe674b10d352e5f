"""Changing files: spool to local disk, upload on close, replace only after success.

Remote files cannot be changed in place, so every change is a new upload:
- a new file is written to a spool file under the cache folder, never into memory;
- changing an uploaded file (append, truncate, `O_RDWR`, an editor's save) first
  copies its content into a spool (copy-on-write), and `O_TRUNC` starts an empty one;
- a rename of an uploaded file uploads its content again under the new name and purpose.
Each `O_TRUNC` open starts a version of the file of its own (`spool.Spool`), so that
two programs writing one name never mix their bytes: the version closed last wins.
In every case the version being replaced is deleted only after the new upload
succeeded, and a spool whose upload did not succeed is moved to the recovery folder
instead of being deleted.

The first `close()` after data was written (FUSE `flush`) uploads and returns the
upload's outcome, because errors from `release` reach nobody. Changes made without
writing (a truncate, an empty new file) are uploaded when the last descriptor closes.
The sending itself, whole or while a new file is written, is `uploads.Uploader`'s.

A scratch file (`FileNode.local`: vim's swap file, sed's and rsync's temp files, a
backup `NAME~`) is never uploaded: its current version stays open in its spool, with no
descriptor, until its name goes or the mount ends. Renamed to a real name, it is
uploaded once under that name, as any rename uploads.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import time
from pathlib import Path

import trio

from mistralfs.api import RemoteFile
from mistralfs.api.protocol import FilesApi
from mistralfs.fs.activity import Activity
from mistralfs.fs.errors import REFUSED, FsError, reason
from mistralfs.fs.kept import KeptEntry, discard, note_reason, read_entry
from mistralfs.fs.namespace import FileNode, Folder, Namespace, Presence
from mistralfs.fs.reader import BlockReader
from mistralfs.fs.refusals import RefusalListener, UploadRefused, ignore
from mistralfs.fs.spool import Spool, SpoolState, keep, new_spool, remove, spool_error
from mistralfs.fs.upload_settings import UploadSettings
from mistralfs.fs.uploads import GROWING_START_BYTES, Uploader

log = logging.getLogger(__name__)

TOO_LARGE = "files are limited to 512 MB"


class Writer:
    """Owns the spool files and turns them into uploads.

    Everything that uploads, renames, or opens or drops a spool holds the file's lock
    (`FileNode.lock`), so that an upload started by one close is finished before a
    rename or another open of the same file looks at it.
    """

    def __init__(
        self,
        client: FilesApi,
        namespace: Namespace,
        reader: BlockReader,
        activity: Activity,
        *,
        nursery: trio.Nursery,
        spool_dir: Path,
        recovery_dir: Path,
        max_file_size: int,
        upload_defaults: UploadSettings | None = None,
        on_refused: RefusalListener = ignore,
    ) -> None:
        self._namespace = namespace
        self._reader = reader
        self._spool_dir = spool_dir
        self._recovery_dir = recovery_dir
        self._max_file_size = max_file_size
        # Per file, every version with a handle on it, and the one its name shows.
        self._open: dict[int, list[Spool]] = {}
        self._current: dict[int, Spool] = {}
        # Per file, the `closed_at` of the version whose content the account holds.
        self._closes = itertools.count(1)
        self._stored_close: dict[int, int] = {}
        # Files whose kernel page cache may hold bytes that are not their content.
        self._stale_pages: set[int] = set()
        # Why a version's last upload failed, until it is kept or dropped.
        self._upload_errors: dict[Spool, FsError] = {}
        # Per file, the content its last refused version left in the recovery folder:
        # a file never uploaded keeps its name for it (see `_keep`).
        self._kept: dict[int, KeptEntry] = {}
        self._on_refused = on_refused
        self._uploads = Uploader(client, namespace, reader, activity, nursery, upload_defaults)
        spool_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    def spool_for(self, node: FileNode) -> Spool | None:
        """The version of `node` that its name shows and new opens share, if any."""
        return self._current.get(node.inode)

    def kernel_may_keep_pages(self, node: FileNode) -> bool:
        """Whether an open of `node` may keep the kernel's cached pages; once per upload.

        Two versions written at once leave the kernel's pages a mix of both programs'
        writes, whichever upload won: the next open then has the kernel drop them.
        """
        if node.inode in self._stale_pages:
            self._stale_pages.discard(node.inode)
            return False
        return True

    def _versions(self, node: FileNode) -> list[Spool]:
        return self._open.get(node.inode, [])

    # -- opening ------------------------------------------------------------------

    def create(self, folder: Folder, name: str) -> Spool:
        """A new, empty file in `folder`, open once; it exists only locally until uploaded."""
        node = self._namespace.add_local(folder, name, now=int(time.time()))
        try:
            spool = self._new_version(node, SpoolState.OPENED)  # even empty, it is a file
        except FsError:
            self._namespace.detach(node)
            raise
        spool.handles = 1
        return spool

    async def open_handle(self, node: FileNode, *, write: bool, truncate: bool) -> Spool | None:
        """Count a new handle on `node`; the spool it reads and writes, if it needs one.

        A handle that only reads a file with no spool reads the remote content. An open
        that truncates starts a new version of the file, its own: another program
        still writing the version before (two `cp` to one name) neither loses what it
        wrote nor mixes it with this one, and whichever closes last is what the
        account keeps.
        """
        async with node.lock:
            spool = self._current.get(node.inode)
            if write and truncate:
                spool = self._new_version(node, SpoolState.OPENED)
            elif spool is None and (write or node.remote is None):
                spool = await self._copy_on_write(node)  # a refused file reads what was kept
            if spool is None:
                return None
            spool.handles += 1
            return spool

    async def _copy_on_write(self, node: FileNode) -> Spool:
        """A new current version holding the remote content (or the kept content, for a
        file whose upload was refused)."""
        entry = self.kept_for(node) if node.remote is None else None
        if node.remote is None and entry is None:
            raise FsError(errno.ENOENT, f"{node.name}: its kept content is gone")
        spool = self._new_version(node, SpoolState.CLEAN)
        try:
            if entry is not None:
                await trio.to_thread.run_sync(_copy_file, entry.path, spool.fd)
            else:
                assert node.remote is not None
                await self._reader.copy_into(node.remote, spool.fd)
        except BaseException as exc:
            self._discard(spool)
            if isinstance(exc, OSError):
                raise spool_error(node, exc) from exc
            raise
        size = entry.size if entry is not None else node.remote.bytes if node.remote else 0
        spool.size = node.local_size = size
        spool.appended_only = False  # an edit, not a new file written in order
        return spool

    def _new_version(self, node: FileNode, state: SpoolState) -> Spool:
        """An empty spool that becomes what `node`'s name shows; older ones keep their handles."""
        spool = new_spool(self._spool_dir, node, state)
        previous = self._current.get(node.inode)
        if previous is not None and previous.handles == 0 and node.local:
            self._discard(previous)  # a scratch file's content, which this one replaces
        versions = self._open.setdefault(node.inode, [])
        versions.append(spool)
        if len(versions) > 1:
            for version in versions:
                version.overlapped = True
        self._current[node.inode] = spool
        node.local_size = 0
        return spool

    def _retire(self, spool: Spool) -> None:
        """`spool` is no longer what the name shows: the remote file is, if there is one."""
        if self._current.get(spool.node.inode) is spool:
            del self._current[spool.node.inode]
            spool.node.local_size = None if spool.node.remote is not None else spool.size

    def _close(self, spool: Spool) -> None:
        """The last handle on `spool` is gone."""
        self._uploads.stop_growing(spool, "the file was closed without being uploaded")
        self._retire(spool)
        versions = self._open[spool.node.inode]
        versions.remove(spool)
        if not versions:
            del self._open[spool.node.inode]
        self._upload_errors.pop(spool, None)
        os.close(spool.fd)

    def _discard(self, spool: Spool) -> None:
        self._close(spool)
        remove(spool.path)

    # -- changing -----------------------------------------------------------------

    async def write(self, spool: Spool, offset: int, data: bytes) -> int:
        await spool.settled()
        if spool.refused is not None:
            raise spool.refused
        if offset + len(data) > self._max_file_size:
            self._uploads.stop_growing(spool, TOO_LARGE)
            raise spool.refuse(FsError(errno.EFBIG, f"{spool.node.name}: {TOO_LARGE}"))
        appending = offset == spool.size
        try:
            written = os.pwrite(spool.fd, data, offset)
        except OSError as exc:
            # Most often a full disk. What was written before is kept, never uploaded
            # as if it were the whole file, and the version it replaces stays.
            self._uploads.stop_growing(spool, "the spool could not be written")
            error = spool.refuse(spool_error(spool.node, exc))
            log.error("%s (after %d bytes)", error, spool.size)
            with contextlib.suppress(OSError):  # the note says it is not complete
                spool.write_note()
            raise error from exc
        spool.size = max(spool.size, offset + written)
        spool.appended_only = spool.appended_only and appending
        if spool.growing is not None:
            if appending:
                spool.growing.file.grew(spool.size)
                spool.growing.progress.total = spool.size
            else:
                self._uploads.stop_growing(spool, "a write before the end of the file")
        elif (
            spool.size >= GROWING_START_BYTES
            and not spool.node.local
            and self._uploads.may_grow(spool)
        ):
            self._uploads.start_growing(spool)
        self._shown_size(spool)
        note_changes = spool.closed_since_write or spool.state is not SpoolState.DIRTY
        spool.become(SpoolState.DIRTY)
        spool.closed_since_write = False
        if note_changes:  # the note is rewritten only when what it says changes
            spool.write_note()
        return written

    def _shown_size(self, spool: Spool) -> None:
        if self._current.get(spool.node.inode) is spool:
            spool.node.local_size = spool.size

    def read(self, spool: Spool, offset: int, size: int) -> bytes:
        return os.pread(spool.fd, size, offset)

    async def truncate(self, spool: Spool, size: int) -> None:
        """`ftruncate` by the program: uploaded at the next close."""
        await spool.settled()
        self._truncate(spool, size)
        if spool.state is SpoolState.OPENED:
            spool.become(SpoolState.DIRTY)

    def _truncate(self, spool: Spool, size: int) -> None:
        if spool.refused is not None:
            raise spool.refused
        if size > self._max_file_size:
            raise FsError(errno.EFBIG, f"{spool.node.name}: {TOO_LARGE}")
        if size != spool.size:
            self._uploads.stop_growing(spool, "the file was truncated")
        if size == 0:
            spool.appended_only = True
        try:
            os.ftruncate(spool.fd, size)
        except OSError as exc:
            raise spool_error(spool.node, exc) from exc
        if size != spool.size:
            spool.become(SpoolState.DIRTY)
        spool.size = size
        self._shown_size(spool)
        spool.write_note()

    def touched(self, spool: Spool) -> None:
        """The program acted on the file after opening it (`futimens`, `fchmod`, ...).

        So a close that follows is not a shell closing a descriptor it just duplicated,
        and a new or truncated file is uploaded by that close rather than afterwards.
        """
        if spool.state is SpoolState.OPENED:
            spool.become(SpoolState.DIRTY)

    async def truncate_closed(self, node: FileNode, size: int) -> None:
        """`truncate PATH` with no descriptor open: copy, truncate and upload now."""
        async with node.lock:
            spool = self._current.get(node.inode)
            if spool is None and size == 0:
                spool = self._new_version(node, SpoolState.OPENED)
            elif spool is None:
                spool = await self._copy_on_write(node)
            spool.handles += 1
            try:
                self._truncate(spool, size)
                self._clean_if_already_stored(spool)
                if spool.changed and not node.local:
                    await self._upload(spool)
            finally:
                await self._release(spool)

    def upload_settings(self, node: FileNode) -> UploadSettings:
        """What `node`'s next upload asks for besides its content."""
        return self._uploads.settings(node)

    @property
    def upload_defaults(self) -> UploadSettings:
        return self._uploads.defaults

    async def settings_changed(self, node: FileNode) -> None:
        """`node`'s upload settings changed: a change like any other.

        A file open for writing sends them with its next upload (an upload under way
        while it is written is stopped, to be sent whole at close); a file not uploaded
        yet, with its first; an uploaded file with no descriptor open is uploaded again
        now, and its old version deleted, as `truncate PATH` does.
        """
        async with node.lock:
            spool = self._current.get(node.inode)
            if spool is not None:
                self._uploads.stop_growing(spool, "its upload settings changed")
                if spool.state in (SpoolState.CLEAN, SpoolState.FAILED):
                    spool.become(SpoolState.DIRTY)
                return
            if node.remote is None or node.local:
                return
            spool = await self._copy_on_write(node)
            spool.handles += 1
            try:
                spool.become(SpoolState.DIRTY)
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
        spool.closed_at = next(self._closes)
        if spool.refused is not None:
            spool.write_note()
            raise FsError(spool.refused.errno, f"not uploaded: {spool.refused}")
        async with node.lock:
            dirty = spool.state is SpoolState.DIRTY
            if not dirty or not node.attached or node.local:
                spool.write_note()
            if not dirty or node.local:
                return
            if node.attached:
                await self._upload(spool)  # which notes that it is complete, as it starts
            elif not node.unlinked:
                gone = "replaced by a rename" if node.replaced else "deleted elsewhere"
                error = FsError(errno.EIO, f"{node.name} was {gone}; not uploaded")
                self._upload_errors[spool] = error
                raise error

    async def release(self, spool: Spool) -> None:
        """A handle closed; after the last one, upload what changed and drop the spool."""
        async with spool.node.lock:
            await self._release(spool)

    async def _release(self, spool: Spool) -> None:
        spool.handles -= 1
        if spool.handles > 0:
            return
        node = spool.node
        if node.local:
            self._release_local(spool)
            return
        unsent = spool.state in (SpoolState.OPENED, SpoolState.DIRTY)
        if unsent and spool.closed_at < self._stored_close.get(node.inode, 0):
            log.debug("%s/%s: a version closed later is stored; dropping this one",
                      node.folder.purpose, node.name)  # fmt: skip
            spool.become(SpoolState.SUPERSEDED)
        self._clean_if_already_stored(spool)
        if spool.state in (SpoolState.OPENED, SpoolState.DIRTY) and node.attached:
            with contextlib.suppress(FsError):  # logged by _upload; the spool is kept below
                await self._upload(spool)
        if spool.refused is not None and not spool.worth_keeping:
            # The write past the limit failed and nothing was uploaded; the copy the
            # program was making is incomplete, so nothing worth keeping is left.
            log.info("%s/%s: dropping the incomplete copy (%s)", node.folder.purpose,
                     node.name, spool.refused)  # fmt: skip
        if spool.worth_keeping and not node.unlinked:
            error = self._upload_errors.get(spool) or spool.refused
            self._close(spool)
            self._keep(spool, error)  # its upload failed: nothing the program wrote is lost
        else:
            self._discard(spool)
        if node.remote is None and not self._versions(node) and node.inode not in self._kept:
            self._namespace.detach(node)  # never uploaded: the name goes with the spool

    def _release_local(self, spool: Spool) -> None:
        """The last handle on a scratch file's version closed: nothing is uploaded or kept.

        The version its name shows stays open, as the file's content, while it holds
        something the account does not; any other goes.
        """
        node = spool.node
        if (
            node.attached
            and self._current.get(node.inode) is spool
            and (spool.changed or node.remote is None)
            and spool.refused is None
        ):
            spool.write_note()
            return
        self._discard(spool)
        if node.remote is None and not self._versions(node):
            self._namespace.detach(node)

    def _drop_idle(self, node: FileNode) -> None:
        """A scratch file lost its name: its content, which no descriptor holds, goes.

        (Another file's version with no descriptor may be uploading at its release.)"""
        if not node.local:
            return
        for spool in list(self._versions(node)):
            if spool.handles == 0:
                self._discard(spool)

    def drop_local(self) -> None:
        """The mount ends: scratch files, which live as long as it, go."""
        for versions in list(self._open.values()):
            for spool in list(versions):
                if spool.node.local:
                    self._discard(spool)

    @staticmethod
    def _clean_if_already_stored(spool: Spool) -> None:
        """An emptied version with nothing written is what the account holds when that
        is an empty file too: `: > f` of an empty f uploads nothing. One that another
        version's content replaced meanwhile makes it a change again (the last close
        wins); one that another emptied version stored does not."""
        remote = spool.node.remote
        if (
            spool.state is SpoolState.OPENED
            and spool.size == 0
            and remote is not None
            and remote.bytes == 0
        ):
            spool.become(SpoolState.CLEAN)

    def _keep(self, spool: Spool, error: FsError | None) -> None:
        """Move a version whose upload failed to the recovery folder, with the reason.

        Content the service refused keeps its name, which shows it (a file that was
        never uploaded reads what was kept; `user.mistral.error` says why) until it is
        uploaded, removed, or the entry is retried or discarded (`mistralfs recovery`).
        Content that failed otherwise (a full disk, a service that did not answer or
        lied) may be incomplete or may even be stored: it is only kept.
        """
        node = spool.node
        kept = keep(spool.path, self._recovery_dir)
        why = reason(error) if error is not None else "not uploaded"
        try:
            note_reason(kept, why)
        except OSError as exc:
            log.debug("could not note the reason beside %s: %s", kept, exc)
        where = f"{node.folder.purpose}/{node.name}"
        log.warning("%s was not uploaded (%s); its content (%d bytes) is kept at %s",
                    where, why, spool.size, kept)  # fmt: skip
        if node.attached and error is not None and error.errno == REFUSED:
            self._drop_kept(node, "a newer version of it was kept")
            self._kept[node.inode] = read_entry(kept)
        self._on_refused(UploadRefused(where, why, kept=kept.name.removesuffix(".spool")))

    def kept_for(self, node: FileNode) -> KeptEntry | None:
        """What the recovery folder keeps for `node`'s name, if its entry is still there.

        An entry retried or discarded elsewhere (`mistralfs recovery`) is forgotten
        here, and a name that showed nothing else goes with it.
        """
        entry = self._kept.get(node.inode)
        if entry is None or entry.exists():
            return entry
        del self._kept[node.inode]
        log.info("%s/%s: the content kept as %s is gone from the recovery folder",
                 node.folder.purpose, node.name, entry.id)  # fmt: skip
        if node.remote is None and not self._versions(node) and node.attached:
            self._namespace.detach(node)
        self._namespace.invalidate()  # a retry may have stored it: the next look lists anew
        return None

    def forget_gone_kept(self) -> None:
        """Notice entries retried or discarded outside the mount (a stat each)."""
        for inode in list(self._kept):
            node = self._namespace.node(inode)
            if isinstance(node, FileNode):
                self.kept_for(node)

    def _drop_kept(self, node: FileNode, why: str) -> None:
        """`node`'s kept content is no longer wanted: a newer version took its place."""
        entry = self._kept.pop(node.inode, None)
        if entry is None or not entry.exists():
            return
        discard(entry)
        log.info("%s/%s: dropped the content kept as %s: %s", node.folder.purpose, node.name,
                 entry.id, why)  # fmt: skip

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
            spool = self._current.get(node.inode)
            if name in self._namespace.local_names or self._back_to_remote_name(
                node, spool, folder, name
            ):
                await self._rename_locally(node, spool, folder, name)
                return
            if spool is not None and node.remote is None and not spool.closed_since_write:
                self._uploads.stop_growing(spool, "the file was renamed")
                target, replaced = self._target(folder, name)
                self._replace_name(node, target, folder, name)
                spool.replaces.extend(replaced)
                spool.write_note()
                log.info("renamed %s to %s/%s before its upload", source, folder.purpose, name)
                return
            from_kept = spool is None and node.remote is None
            if spool is None:
                spool = await self._copy_on_write(node)
            spool.handles += 1
            try:
                try:
                    with spool.uploading():
                        remote = await self._uploads.send(
                            spool, filename=name, purpose=folder.purpose
                        )
                except FsError as exc:
                    wanted = f"{folder.purpose}/{name}"
                    log.info("%s not renamed to %s: it stays as it was", source, wanted)
                    node.refused_move = f"not moved to {wanted}: {reason(exc)}"
                    self._on_refused(UploadRefused(wanted, reason(exc), renamed_from=source))
                    raise
                if node.removed_here:
                    # Removed through this mount while it was uploaded under its new name:
                    # the removal wins, as if it had come first.
                    why = f"{source} went while it was renamed"
                    await self._uploads.delete(node, [remote], why=why)
                    raise FsError(errno.ENOENT, f"{source} was removed while being renamed")
                # Whatever holds the name now is replaced, not what held it before the
                # upload: its own upload may have ended meanwhile.
                target, replaced = self._target(folder, name)
                self._replace_name(node, target, folder, name)
                old = [node.remote] if node.remote is not None else []
                self._namespace.uploaded(node, remote)
                if from_kept:
                    self._drop_kept(node, "uploaded under its new name")
                spool.write_note()
                await self._uploads.delete(node, [*old, *spool.replaces, *replaced])
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
    def _back_to_remote_name(
        node: FileNode, spool: Spool | None, folder: Folder, name: str
    ) -> bool:
        """A remote file renamed to a scratch name, unchanged, going back to the name the
        account holds it under (a failed save putting its backup back)."""
        remote = node.remote
        return (
            node.local
            and (spool is None or not spool.changed)
            and remote is not None
            and (remote.purpose, remote.filename) == (folder.purpose, name)
        )

    async def _rename_locally(
        self, node: FileNode, spool: Spool | None, folder: Folder, name: str
    ) -> None:
        """A rename that uploads nothing: to a scratch name, or back from one.

        A remote file keeps its remote file (removing it deletes that); changes not
        uploaded stay in the spool. What the rename replaces goes.
        """
        source = f"{node.folder.purpose}/{node.name}"
        if spool is not None:
            self._uploads.stop_growing(spool, "the file was renamed")
        target, replaced = self._target(folder, name)
        self._replace_name(node, target, folder, name)
        pending = spool.replaces if spool is not None else []
        if spool is not None:
            spool.replaces = []
        for version in self._versions(node):
            version.write_note()
        log.info("renamed %s to %s/%s; nothing uploaded", source, folder.purpose, name)
        await self._uploads.delete(node, [*pending, *replaced])

    @staticmethod
    def _target(folder: Folder, name: str) -> tuple[FileNode | None, list[RemoteFile]]:
        """The file a rename to `name` replaces, and its remote version."""
        target = folder.entries.get(name)
        return target, [target.remote] if target is not None and target.remote else []

    def _replace_name(
        self, node: FileNode, target: FileNode | None, folder: Folder, name: str
    ) -> None:
        if target is not None:
            # Its remote file is deleted once the rename's upload replaced it.
            self._namespace.detach(target, deleted=False, why=Presence.REPLACED)
            self._drop_idle(target)
        self._namespace.move(node, folder, name)

    # -- uploading ----------------------------------------------------------------

    async def _upload(self, spool: Spool) -> None:
        node = spool.node
        try:
            with spool.uploading(on_failure=SpoolState.FAILED):
                remote = await self._uploads.send(
                    spool, filename=node.filename, purpose=node.folder.purpose
                )
        except FsError as exc:
            self._upload_errors[spool] = exc
            raise
        self._drop_kept(node, "a newer version of it was uploaded")
        if not node.attached:
            await self._nameless_upload(spool, remote)
            return
        replaced = [node.remote] if node.remote is not None else []
        replaced += spool.replaces
        spool.replaces = []
        self._namespace.uploaded(node, remote)
        if spool.overlapped:
            self._stale_pages.add(node.inode)
        stored = self._stored_close.get(node.inode, 0)
        self._stored_close[node.inode] = max(stored, spool.closed_at)
        current = self._current.get(node.inode)
        if current is not None and current is not spool and not current.changed:
            # An older version, now older than what this close stored: the name shows
            # this upload. One with changes not sent yet stays: its close comes later.
            self._retire(current)
        spool.write_note()
        await self._uploads.delete(node, replaced)

    async def _nameless_upload(self, spool: Spool, remote: RemoteFile) -> None:
        """The file lost its name while its upload was under way.

        Removed through this mount (an editor removes its swap file while the release
        uploads it; a rename takes its name): what was stored goes, with what it was to
        replace. Deleted elsewhere: what was written is kept, and the next listing shows
        it; it is not attached to the node the listing dropped.
        """
        node = spool.node
        spool.write_note()
        where = f"{node.folder.purpose}/{node.name}"
        if node.removed_here:
            why = f"{where} went while it was uploaded"
            await self._uploads.delete(node, [remote, *spool.replaces], why=why)
        else:
            log.warning("%s was deleted elsewhere while its new content was uploaded; that "
                        "content is kept as %s", where, remote.id)  # fmt: skip
            await self._uploads.delete(node, spool.replaces)
        spool.replaces = []

    def unlinked(self, node: FileNode) -> None:
        """`node` was deleted while open: an upload under way must not store it."""
        for spool in self._versions(node):
            self._uploads.stop_growing(spool, "the file was deleted")
        self._drop_idle(node)
        self._drop_kept(node, "the name was removed")

    def pending(self) -> int:
        """Files changed through an open descriptor and not uploaded yet."""
        return sum(
            spool.changed and not spool.node.local
            for versions in self._open.values()
            for spool in versions
        )

    async def wait_idle(self) -> None:
        """Return once no upload is in flight."""
        await self._uploads.wait_idle()


def _copy_file(source: Path, fd: int) -> None:
    """Copy `source` into the open file `fd` (in a worker thread: it may be large)."""
    with open(source, "rb") as f:
        offset = 0
        while chunk := f.read(1 << 20):
            offset += os.pwrite(fd, chunk, offset)
