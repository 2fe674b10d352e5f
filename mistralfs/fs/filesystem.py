"""What each filesystem operation means for the account, independent of FUSE's types.

`operations.py` translates pyfuse3 calls into calls here; this module decides what
they do with the namespace, the reader and the writer.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from mistralfs.api import ApiError, NotFound, RemoteFile
from mistralfs.api.protocol import FilesApi
from mistralfs.files_api import FILE_FIELDS, SHOWN_BY_STAT
from mistralfs.fs.activity import Activity
from mistralfs.fs.errors import (
    NO_CUSTOM_METADATA,
    READ_ONLY_VIEW,
    UNCHANGEABLE,
    FsError,
    errno_for,
    refused,
)
from mistralfs.fs.jobs import JOB_NODES, JobNode, JobsView
from mistralfs.fs.mtimes import KeptTimes
from mistralfs.fs.names import JOBS_FOLDER
from mistralfs.fs.namespace import FileNode, Folder, Namespace, Node, Presence, Root
from mistralfs.fs.readahead import FolderReadahead
from mistralfs.fs.reader import BlockReader, ReadState
from mistralfs.fs.spool import Spool
from mistralfs.fs.upload_settings import SETTABLE_XATTRS, with_xattr, xattr_value
from mistralfs.fs.writer import Writer

log = logging.getLogger(__name__)

T = TypeVar("T")

USER_NAMESPACE = "user."
XATTR_PREFIX = "user.mistral."
XATTR_FIELDS = tuple(name for name in FILE_FIELDS if name not in SHOWN_BY_STAT)
XATTR_SIGNED_URL = XATTR_PREFIX + "signed_url"
XATTR_MIME = "user.mime_type"
XATTR_ERROR = XATTR_PREFIX + "error"  # why the content its name shows is not uploaded


@dataclass(eq=False)
class Handle:
    """An open file: a remote file being read, or a spool being written."""

    node: FileNode
    spool: Spool | None = None
    read_state: ReadState = field(default_factory=ReadState)
    # Opened for writing: its close uploads. A reader of a file another program is
    # changing reads the spool, but its close neither uploads those changes nor hears
    # their errors; the writer's close does.
    writes: bool = False


class Filesystem:
    """The mount's behaviour, operation by operation (see docs/SEMANTICS.md)."""

    def __init__(
        self,
        client: FilesApi,
        namespace: Namespace,
        reader: BlockReader,
        writer: Writer,
        *,
        read_only: bool,
        times: KeptTimes,
        activity: Activity | None = None,
    ) -> None:
        self._client = client
        self.activity = activity or Activity()  # reads report their durations here
        self.namespace = namespace
        self._reader = reader
        self._readahead = FolderReadahead(reader)
        self._writer = writer
        self.read_only = read_only
        self.times = times
        self._handles: dict[int, Handle] = {}
        self._fh_counter = itertools.count(1)
        self.jobs = JobsView(client, namespace)  # jobs/, read-only (see jobs.py)
        self._snapshots: dict[int, bytes] = {}  # open job.json files: what they read

    # -- names ------------------------------------------------------------------

    def node(self, inode: int) -> Node | JobNode:
        node: Node | JobNode | None = self.namespace.node(inode)
        if node is None:
            node = self.jobs.node(inode)
        if node is None:
            raise FsError(errno.ENOENT)
        return node

    def _file(self, inode: int) -> FileNode:
        node = self.node(inode)
        if not isinstance(node, FileNode):
            raise FsError(errno.EISDIR)
        return node

    async def lookup(self, parent_inode: int, name: str) -> Node | JobNode:
        parent = self.node(parent_inode)
        if isinstance(parent, JOB_NODES):
            return await self.jobs.lookup(parent, name)
        found: Node | None
        if isinstance(parent, Root) and name == JOBS_FOLDER:
            return self.jobs.root
        if isinstance(parent, Root):
            found = await self._listed(self.namespace.find_folder(name))
        elif isinstance(parent, Folder):
            await self._listed(self.namespace.ensure_folder_fresh(parent))
            found = parent.entries.get(name)
        else:
            raise FsError(errno.ENOTDIR)
        if isinstance(found, FileNode) and found.remote is None:
            self._writer.kept_for(found)  # an entry retried or discarded elsewhere: no name
            found = found if found.attached else None
        if found is None:
            raise FsError(errno.ENOENT)
        if isinstance(found, FileNode) and found.remote is not None:
            self._reader.prefetch_url(found.remote)
        return found

    def tell_absent(self, parent_inode: int) -> float:
        """Seconds for which the kernel may remember a name missing from this folder.

        As long as the folder's listing is trusted: a new remote name shows up only with
        a later listing, which then has the kernel forget the absence; one the mount
        adds goes through the kernel.
        """
        parent = self.node(parent_inode)
        if not isinstance(parent, Folder):
            return 0.0
        parent.absences_told = True
        return self.namespace.fresh_for(parent)

    async def list_dir(self, inode: int) -> Sequence[tuple[str, Node | JobNode]]:
        """A folder's entries at this moment; readdir pages through this snapshot."""
        node = self.node(inode)
        if isinstance(node, JOB_NODES):
            return await self.jobs.entries(node)
        if isinstance(node, Root):
            folders = await self._listed(self.namespace.folders())
            return [*((f.name, f) for f in folders), (JOBS_FOLDER, self.jobs.root)]
        if isinstance(node, Folder):
            await self._listed(self.namespace.ensure_folder_fresh(node))
            self._writer.forget_gone_kept()
            entries = sorted(node.entries.items())
            self._reader.prefetch_urls(
                [f.remote for _, f in entries if f.remote is not None and f.local_size is None]
            )
            return entries
        raise FsError(errno.ENOTDIR)

    async def usage(self) -> tuple[int, int]:
        """The bytes and the number of files the account holds, for `statfs` (df).

        From the account's listing, fetched as for `ls` of the root: only when it is
        older than the folder cache time, so every purpose counts, and a df after another
        makes no request. Files being written count at their size so far.
        """
        folders = await self._listed(self.namespace.folders())
        files = [node for folder in folders for node in folder.entries.values()]
        return sum(node.size for node in files), len(files)

    async def _listed(self, listing: Awaitable[T]) -> T:
        """Await a namespace call that may fetch a listing; its API errors become errnos."""
        try:
            return await listing
        except ApiError as exc:
            log.error("listing the account failed: %s", exc)
            raise FsError(errno_for(exc), str(exc)) from exc

    # -- reading and writing ------------------------------------------------------

    async def open(self, inode: int, flags: int) -> tuple[int, bool]:
        """A handle on the file, and whether the kernel may keep its cached pages."""
        write = (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & os.O_TRUNC)
        if isinstance(job_node := self.node(inode), JOB_NODES):
            return await self._open_in_jobs(job_node, write, flags)
        node = self._file(inode)
        if write:
            self._refuse_if_read_only()
            self._refuse_if_unchangeable(node)
            if self._copied_at_first_change(node, flags):
                return self._new_handle(Handle(node=node, writes=True)), False
        elif self._writer.spool_for(node) is None and node.remote is not None:
            await self._check_still_there(node)
        try:
            spool = await self._writer.open_handle(
                node, write=write, truncate=bool(flags & os.O_TRUNC)
            )
        except ApiError as exc:
            raise self._fetch_error(node, exc) from exc
        if write and flags & os.O_TRUNC:
            self.times.content_changed(node)
        keep_pages = spool is None and self._writer.kernel_may_keep_pages(node)
        return self._new_handle(Handle(node=node, spool=spool, writes=write)), keep_pages

    def _copied_at_first_change(self, node: FileNode, flags: int) -> bool:
        """A write-only open of an uploaded file that no one is changing gets its copy of
        the content at its first write or truncation, not at open: `touch -d` opens for
        writing and changes nothing, and copying in a large file cost all of it."""
        return (
            (flags & os.O_ACCMODE) == os.O_WRONLY
            and not flags & os.O_TRUNC
            and node.remote is not None
            and self._writer.spool_for(node) is None
        )

    async def _spool_to_change(self, handle: Handle) -> Spool:
        """The version `handle` changes; made now for a handle opened without one."""
        if handle.spool is None:
            if not handle.writes:
                raise FsError(errno.EBADF)
            try:
                spool = await self._writer.open_handle(handle.node, write=True, truncate=False)
            except ApiError as exc:
                raise self._fetch_error(handle.node, exc) from exc
            assert spool is not None, "a handle that writes always gets a version"
            handle.spool = spool
        return handle.spool

    async def _open_in_jobs(self, node: JobNode, write: bool, flags: int) -> tuple[int, bool]:
        """job.json reads what the listing showed; a job's file, its file in batch/."""
        if write:
            raise FsError(READ_ONLY_VIEW, "jobs/ is read-only")
        opened = self.jobs.opened(node)
        if isinstance(opened, FileNode):
            return await self.open(opened.inode, flags)
        fh = next(self._fh_counter)
        self._snapshots[fh] = opened
        return fh, False

    async def _check_still_there(self, node: FileNode) -> None:
        """Opening a file deleted elsewhere fails with ENOENT, not later with EIO.

        What is fetched for that (a small file's content, or a signed URL) is what the
        first read needs anyway.
        """
        assert node.remote is not None
        self._readahead.opening(node)
        try:
            await self._reader.prepare(node.remote)
        except ApiError as exc:
            raise self._fetch_error(node, exc) from exc

    def create(self, parent_inode: int, name: str) -> tuple[int, FileNode]:
        self.jobs.refuse(self.node(parent_inode))
        self._refuse_if_read_only()
        parent = self.node(parent_inode)
        if not isinstance(parent, Folder):
            raise FsError(errno.EACCES, "files can only be created inside a purpose folder")
        if name in parent.entries:
            raise FsError(errno.EEXIST)
        spool = self._writer.create(parent, name)
        return self._new_handle(Handle(node=spool.node, spool=spool, writes=True)), spool.node

    async def read(self, fh: int, offset: int, size: int) -> bytes | memoryview:
        if (snapshot := self._snapshots.get(fh)) is not None:
            return snapshot[offset : offset + size]
        handle = self._handle(fh)
        if handle.spool is not None:
            return self._writer.read(handle.spool, offset, size)
        remote = handle.node.remote
        if remote is None:  # a local file whose upload failed and was given up
            raise FsError(errno.EIO, f"{handle.node.name}: content is no longer available")
        started, ok = time.perf_counter(), False
        try:
            data = await self._reader.read(remote, offset, size, handle.read_state)
            ok = True
            return data
        except ApiError as exc:
            raise self._fetch_error(handle.node, exc) from exc
        finally:
            self.activity.read_done(started, ok)

    def _fetch_error(self, node: FileNode, exc: ApiError) -> FsError:
        """Fetching content failed: a file found deleted loses its name; else EIO or EACCES."""
        log.error("reading %s/%s failed: %s", node.folder.name, node.name, exc)
        if isinstance(exc, NotFound):
            if node.remote is not None:
                self._reader.forget(node.remote.id)
            self.namespace.detach(node)
            return FsError(errno.ENOENT, str(exc))
        return FsError(errno_for(exc, reading=True), str(exc))

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        handle = self._handle(fh)
        spool = await self._spool_to_change(handle)
        self.times.content_changed(handle.node)
        return await self._writer.write(spool, offset, data)

    async def setattr(
        self,
        inode: int,
        size: int | None,
        fh: int | None,
        *,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
    ) -> None:
        """A new size, then a file's times (kept locally: see mtimes.py)."""
        await self._set_size(inode, size, fh)
        node = self.node(inode)
        # Read-only: accepted with no effect, as mode and owner are.
        if (
            (atime_ns, mtime_ns) != (None, None)
            and isinstance(node, FileNode)
            and not self.read_only
        ):
            self.times.set(node, atime_ns, mtime_ns)

    async def _set_size(self, inode: int, size: int | None, fh: int | None) -> None:
        """Only the size can change; mode, owner and a folder's times are accepted with
        no effect."""
        if size is not None:
            self.jobs.refuse(self.node(inode))
        node = self._file(inode) if size is not None else self.node(inode)
        spool = self._handle(fh).spool if fh is not None else None
        if size is None:
            if spool is not None:
                self._writer.touched(spool)
            return
        self._refuse_if_read_only()
        assert isinstance(node, FileNode)
        self._refuse_if_unchangeable(node)
        self.times.content_changed(node)
        if fh is not None and spool is None and self._handle(fh).writes:
            spool = await self._spool_to_change(self._handle(fh))  # ftruncate, first change
        if spool is not None:
            await self._writer.truncate(spool, size)
            return
        try:
            await self._writer.truncate_closed(node, size)
        except ApiError as exc:
            raise self._fetch_error(node, exc) from exc

    async def flush(self, fh: int) -> None:
        if fh in self._snapshots:
            return
        handle = self._handle(fh)
        if handle.spool is not None and handle.writes:
            await self._writer.flush(handle.spool)

    async def release(self, fh: int) -> None:
        self._snapshots.pop(fh, None)
        handle = self._handles.pop(fh, None)
        if handle is not None and handle.spool is not None:
            await self._writer.release(handle.spool)

    async def wait_for_uploads(self) -> None:
        await self._writer.wait_idle()

    # -- renaming and deleting -----------------------------------------------------

    async def rename(
        self, old_parent: int, old_name: str, new_parent: int, new_name: str, *, replace: bool
    ) -> None:
        self.jobs.refuse(self.node(old_parent), self.node(new_parent))
        self._refuse_if_read_only()
        node = await self.lookup(old_parent, old_name)
        if not isinstance(node, FileNode):
            raise FsError(errno.EPERM, "folders cannot be renamed")
        folder = self.node(new_parent)
        if not isinstance(folder, Folder):
            raise FsError(errno.EACCES, "files can only be moved into a purpose folder")
        target = folder.entries.get(new_name)
        if target is node:
            return
        if target is not None and not replace:
            raise FsError(errno.EEXIST)
        self._refuse_if_unchangeable(node)
        if isinstance(target, FileNode):
            self._refuse_if_unchangeable(target)  # replacing it would delete it
        try:
            await self._writer.rename(node, folder, new_name)
        except ApiError as exc:
            raise self._fetch_error(node, exc) from exc

    async def unlink(self, parent_inode: int, name: str) -> None:
        self.jobs.refuse(self.node(parent_inode))
        self._refuse_if_read_only()
        node = await self.lookup(parent_inode, name)
        if not isinstance(node, FileNode):
            raise FsError(errno.EISDIR)
        self._refuse_if_unchangeable(node)
        # An upload of the file may end while a deletion waits (a close, or the release of
        # a new file): the version it stored is deleted too, not left nameless.
        deleted: set[str] = set()
        while node.remote is not None and node.remote.id not in deleted:
            remote = node.remote
            await self._delete_remote(node, remote, name)
            deleted.add(remote.id)
        self.namespace.detach(node, why=Presence.REMOVED)
        self._writer.unlinked(node)
        self.times.node_gone(node)
        for file_id in deleted:  # no listing fetched before the deletions brings one back
            self.namespace.forget_id(file_id)

    async def _delete_remote(self, node: FileNode, remote: RemoteFile, name: str) -> None:
        started = time.monotonic()
        try:
            await self._client.delete(remote.id)
            log.info("deleted %s/%s: %d bytes, %s in %.2f s", node.folder.purpose, name,
                     remote.bytes, remote.id, time.monotonic() - started)  # fmt: skip
        except NotFound:
            log.info("%s/%s was already deleted elsewhere", node.folder.name, name)
        except ApiError as exc:
            log.error("deleting %s/%s failed: %s", node.folder.name, name, exc)
            raise FsError(errno_for(exc), str(exc)) from exc
        self._reader.forget(remote.id)

    # -- extended attributes -------------------------------------------------------

    def xattr_names(self, inode: int) -> list[str]:
        node = self.node(inode)
        node = self.jobs.target(node) or node  # a job's file: its file in batch/
        if not isinstance(node, FileNode):
            return []
        kept = self._error_of(node) is not None
        settings = [n for n in SETTABLE_XATTRS if self._setting(node, n) is not None]
        if node.remote is None:
            return settings + ([XATTR_ERROR] if kept else [])
        names = [XATTR_PREFIX + f for f in XATTR_FIELDS if self._xattr_field(node, f) is not None]
        names += [n for n in settings if n not in names]
        # Not user.mistral.signed_url: it is read by name. Listed, every tool that copies
        # metadata (cp -a, rsync -X, tar --xattrs, file managers) would cost an API call
        # per file and keep a link that reads the file without the key in the copy.
        if node.remote.mimetype:
            names.append(XATTR_MIME)
        return names + ([XATTR_ERROR] if kept else [])

    async def xattr(self, inode: int, name: str) -> bytes:
        node = self.node(inode)
        node = self.jobs.target(node) or node  # a job's file: its file in batch/
        if not name.startswith(USER_NAMESPACE):
            # No security labels, ACLs or trusted attributes here. ENOTSUP (not ENODATA)
            # lets `ls -l` stop asking for them after the first file of the mount.
            raise FsError(errno.ENOTSUP)
        if name == XATTR_ERROR and isinstance(node, FileNode):
            error = self._error_of(node)
            if error is not None:
                return error.encode("utf-8")
        value: object = None
        if isinstance(node, FileNode) and name in SETTABLE_XATTRS:
            value = self._setting(node, name)
        elif not isinstance(node, FileNode) or node.remote is None:
            raise FsError(errno.ENODATA)
        elif name == XATTR_SIGNED_URL:
            try:
                value = (await self._reader.signed_url(node.remote.id)).url
            except ApiError as exc:
                raise FsError(errno_for(exc), str(exc)) from exc
        elif name == XATTR_MIME:
            value = node.remote.mimetype
        elif name.startswith(XATTR_PREFIX) and name[len(XATTR_PREFIX) :] in XATTR_FIELDS:
            value = self._xattr_field(node, name[len(XATTR_PREFIX) :])
        if value is None:
            raise FsError(errno.ENODATA)
        return str(value).encode("utf-8")

    @staticmethod
    def _xattr_field(node: FileNode, name: str) -> object:
        return getattr(node.remote, name, None)

    def _setting(self, node: FileNode, name: str) -> str | None:
        return xattr_value(node, name, self._writer.upload_defaults, time.time())

    async def set_xattr(self, inode: int, name: str, value: bytes | None) -> None:
        """Set (or with None, remove) a file's upload setting; other names are refused.

        A change of what the file's next upload would send is uploaded as any change
        is (see `Writer.settings_changed`); the same value again changes nothing. If
        that upload fails, the file keeps the settings it had, as the account does.
        """
        node = self.node(inode)
        self.jobs.refuse(node)
        if self.read_only or not isinstance(node, FileNode) or name not in SETTABLE_XATTRS:
            raise refused(self.read_only, NO_CUSTOM_METADATA)
        self._refuse_if_unchangeable(node)  # a new setting would mean a new upload
        before, had = self._writer.upload_settings(node), node.upload_settings
        node.upload_settings = with_xattr(had, name, value)
        if self._writer.upload_settings(node) == before:
            return
        log.info("%s/%s: %s set to %s", node.folder.name, node.name, name,
                 value.decode("utf-8") if value is not None else "the default")  # fmt: skip
        try:
            await self._writer.settings_changed(node)
        except ApiError as exc:
            node.upload_settings = had
            raise self._fetch_error(node, exc) from exc
        except FsError:
            node.upload_settings = had
            raise

    # -- helpers -------------------------------------------------------------------

    def _refuse_if_read_only(self) -> None:
        if self.read_only:
            raise FsError(errno.EROFS)

    def _error_of(self, node: FileNode) -> str | None:
        """Why the name shows what it shows (user.mistral.error): the service refused the
        content kept under it, or the move away from it."""
        kept = self._writer.kept_for(node)
        return kept.error if kept is not None and kept.error is not None else node.refused_move

    @staticmethod
    def _refuse_if_unchangeable(node: FileNode) -> None:
        """What the service lets no one delete or replace is refused here, before any
        request, as for an immutable file."""
        if node.remote is not None and node.remote.unchangeable:
            source = node.remote.source
            raise FsError(UNCHANGEABLE, f"{node.folder.name}/{node.name}: a {source} file")

    def _new_handle(self, handle: Handle) -> int:
        fh = next(self._fh_counter)
        self._handles[fh] = handle
        return fh

    def _handle(self, fh: int) -> Handle:
        handle = self._handles.get(fh)
        if handle is None:
            raise FsError(errno.EBADF)
        return handle
