"""pyfuse3.Operations: a thin translation between FUSE requests and `Filesystem`.

Nothing here decides behaviour. It converts names and attributes, and turns every
failure into a FUSEError: an exception of any other type would end pyfuse3's main loop.
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

import pyfuse3
from pyfuse3 import (
    EntryAttributes,
    FileHandleT,
    FileInfo,
    FileNameT,
    FlagT,
    InodeT,
    ModeT,
    RequestContext,
    XAttrNameT,
)

from mistralfs.fs.attributes import BLOCK, Attributes
from mistralfs.fs.errors import NOT_SUPPORTED, FsError, refused
from mistralfs.fs.filesystem import Filesystem
from mistralfs.fs.jobs import JobNode
from mistralfs.fs.names import NAME_MAX, storable
from mistralfs.fs.namespace import Node

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

STATFS_BLOCKS = 2**40 // BLOCK  # 1 TiB shown free: uploads are limited per file, not in total
STATFS_FILES = 2**32  # file slots shown free


def _fuse_errors(
    func: Callable[P, Coroutine[Any, Any, T]],
) -> Callable[P, Coroutine[Any, Any, T]]:
    """Report FsError as its errno and anything unexpected as EIO, logged with its trace."""

    @functools.wraps(func)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await func(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except FsError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENODATA):
                log.debug("%s: %s", func.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        except Exception:
            log.exception("unexpected error in %s", func.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def _name(raw: bytes) -> str:
    if len(raw) > NAME_MAX:  # the kernel lets FUSE names reach 1024 bytes
        raise FsError(errno.ENAMETOOLONG, "names are limited to 255 bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FsError(errno.EINVAL, "file names must be valid UTF-8") from None


def _new_name(raw: bytes) -> str:
    """A name to create or rename to: only one the service keeps, so a remount shows it."""
    name = _name(raw)
    if not storable(name):
        raise FsError(errno.EINVAL, f"{name!r}: remote file names cannot hold control characters")
    return name


class Operations(pyfuse3.Operations):
    """Translates each FUSE request into a `Filesystem` call."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, fs: Filesystem) -> None:
        super().__init__()
        self.fs = fs
        self._attributes = Attributes(fs.namespace, fs.times, read_only=fs.read_only, jobs=fs.jobs)
        self._dir_snapshots: dict[int, list[tuple[bytes, Node | JobNode]]] = {}
        self._next_dir_fh = 1

    # -- attributes ---------------------------------------------------------------

    def _attrs(self, node: Node | JobNode) -> pyfuse3.EntryAttributes:
        return self._attributes.of(node)

    @_fuse_errors
    async def lookup(
        self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext | None = None
    ) -> EntryAttributes:
        try:
            return self._attrs(await self.fs.lookup(parent_inode, _name(name)))
        except FsError as exc:
            if exc.errno != errno.ENOENT or (timeout := self.fs.tell_absent(parent_inode)) <= 0:
                raise
        # The kernel remembers the absence (inode 0): cp's stat, lstat and create of a
        # new name then cost one request, not three.
        missing = EntryAttributes()
        missing.st_ino = InodeT(0)
        missing.entry_timeout = timeout
        return missing

    @_fuse_errors
    async def getattr(self, inode: InodeT, ctx: RequestContext | None = None) -> EntryAttributes:
        return self._attrs(self.fs.node(inode))

    @_fuse_errors
    async def setattr(
        self,
        inode: InodeT,
        attr: EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: FileHandleT | None,
        ctx: RequestContext | None,
    ) -> EntryAttributes:
        await self.fs.setattr(
            inode,
            attr.st_size if fields.update_size else None,
            fh,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        )
        return self._attrs(self.fs.node(inode))

    async def forget(self, inode_list: Sequence[tuple[InodeT, int]]) -> None:
        """Inodes stay allocated for the life of the mount: a file id keeps its inode."""

    # -- folders ------------------------------------------------------------------

    @_fuse_errors
    async def opendir(self, inode: InodeT, ctx: RequestContext | None) -> FileHandleT:
        listed = await self.fs.list_dir(inode)
        # `.` and `..` first, as `ls -a` expects; `..` of a folder is the root, and the
        # kernel answers for `..` of the root itself.
        entries = [(b".", self.fs.node(inode)), (b"..", self.fs.node(pyfuse3.ROOT_INODE))]
        entries += [(name.encode("utf-8"), node) for name, node in listed]
        fh = self._next_dir_fh
        self._next_dir_fh += 1
        self._dir_snapshots[fh] = entries
        return FileHandleT(fh)

    @_fuse_errors
    async def readdir(self, fh: FileHandleT, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self._dir_snapshots.get(fh, [])
        attrs, reply = self._attributes.of, pyfuse3.readdir_reply
        for index in range(start_id, len(entries)):
            name, node = entries[index]
            if not reply(token, name, attrs(node), index + 1):
                break

    async def releasedir(self, fh: FileHandleT) -> None:
        self._dir_snapshots.pop(fh, None)

    # -- files --------------------------------------------------------------------

    @_fuse_errors
    async def open(self, inode: InodeT, flags: FlagT, ctx: RequestContext | None) -> FileInfo:
        fh, keep_cache = await self.fs.open(inode, flags)
        # Remote content never changes for an id, so the kernel may keep its page cache.
        return FileInfo(fh=FileHandleT(fh), keep_cache=keep_cache)

    @_fuse_errors
    async def create(
        self,
        parent_inode: InodeT,
        name: FileNameT,
        mode: ModeT,
        flags: FlagT,
        ctx: RequestContext | None,
    ) -> tuple[FileInfo, EntryAttributes]:
        fh, node = self.fs.create(parent_inode, _new_name(name))
        return FileInfo(fh=FileHandleT(fh)), self._attrs(node)

    # pyfuse3 replies with any buffer (a memoryview of a cached block is not copied);
    # its type stub says bytes.
    @_fuse_errors
    async def read(  # type: ignore[override]
        self, fh: FileHandleT, off: int, size: int
    ) -> bytes | memoryview:
        return await self.fs.read(fh, off, size)

    @_fuse_errors
    async def write(self, fh: FileHandleT, off: int, buf: bytes) -> int:
        return await self.fs.write(fh, off, buf)

    @_fuse_errors
    async def flush(self, fh: FileHandleT) -> None:
        await self.fs.flush(fh)

    @_fuse_errors
    async def release(self, fh: FileHandleT) -> None:
        await self.fs.release(fh)

    @_fuse_errors
    async def fsync(self, fh: FileHandleT, datasync: bool) -> None:
        await self.fs.flush(fh)

    @_fuse_errors
    async def unlink(
        self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext | None
    ) -> None:
        await self.fs.unlink(parent_inode, _name(name))

    # -- refused --------------------------------------------------------------------

    @_fuse_errors
    async def mkdir(
        self, parent_inode: InodeT, name: FileNameT, mode: ModeT, ctx: RequestContext | None
    ) -> EntryAttributes:
        raise refused(self.fs.read_only, NOT_SUPPORTED)

    @_fuse_errors
    async def rmdir(
        self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext | None
    ) -> None:
        raise refused(self.fs.read_only, NOT_SUPPORTED)

    @_fuse_errors
    async def symlink(
        self,
        parent_inode: InodeT,
        name: FileNameT,
        target: FileNameT,
        ctx: RequestContext | None,
    ) -> EntryAttributes:
        raise refused(self.fs.read_only, NOT_SUPPORTED)

    @_fuse_errors
    async def link(
        self,
        inode: InodeT,
        new_parent_inode: InodeT,
        new_name: FileNameT,
        ctx: RequestContext | None,
    ) -> EntryAttributes:
        raise refused(self.fs.read_only, NOT_SUPPORTED)

    @_fuse_errors
    async def mknod(
        self,
        parent_inode: InodeT,
        name: FileNameT,
        mode: ModeT,
        rdev: int,
        ctx: RequestContext | None,
    ) -> EntryAttributes:
        raise refused(self.fs.read_only, NOT_SUPPORTED)

    @_fuse_errors
    async def rename(
        self,
        parent_inode_old: InodeT,
        name_old: FileNameT,
        parent_inode_new: InodeT,
        name_new: FileNameT,
        flags: FlagT,
        ctx: RequestContext | None,
    ) -> None:
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise FsError(errno.EINVAL, "exchanging two names is not supported")
        await self.fs.rename(
            parent_inode_old,
            _name(name_old),
            parent_inode_new,
            _new_name(name_new),
            replace=not flags & pyfuse3.RENAME_NOREPLACE,
        )

    # -- metadata -------------------------------------------------------------------

    @_fuse_errors
    async def statfs(self, ctx: RequestContext | None) -> pyfuse3.StatvfsData:
        used_bytes, used_files = await self.fs.usage()
        stats = pyfuse3.StatvfsData()
        stats.f_bsize = stats.f_frsize = BLOCK
        stats.f_bfree = stats.f_bavail = STATFS_BLOCKS
        stats.f_blocks = STATFS_BLOCKS + -(-used_bytes // BLOCK)
        stats.f_ffree = stats.f_favail = STATFS_FILES
        stats.f_files = STATFS_FILES + used_files
        stats.f_namemax = NAME_MAX
        return stats

    @_fuse_errors
    async def getxattr(self, inode: InodeT, name: XAttrNameT, ctx: RequestContext | None) -> bytes:
        return await self.fs.xattr(inode, name.decode("utf-8", errors="replace"))

    @_fuse_errors
    async def listxattr(self, inode: InodeT, ctx: RequestContext | None) -> list[XAttrNameT]:
        return [XAttrNameT(name.encode("utf-8")) for name in self.fs.xattr_names(inode)]

    @_fuse_errors
    async def setxattr(
        self, inode: InodeT, name: XAttrNameT, value: bytes, ctx: RequestContext | None
    ) -> None:
        await self.fs.set_xattr(inode, name.decode("utf-8", errors="replace"), value)

    @_fuse_errors
    async def removexattr(
        self, inode: InodeT, name: XAttrNameT, ctx: RequestContext | None
    ) -> None:
        await self.fs.set_xattr(inode, name.decode("utf-8", errors="replace"), None)

    async def access(self, inode: InodeT, mode: ModeT, ctx: RequestContext | None) -> bool:
        return True
