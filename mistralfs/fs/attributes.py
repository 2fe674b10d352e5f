"""The attributes FUSE replies carry, and how long the kernel may keep them.

`ls -l` of a large folder asks for every file's attributes, so a file's
`EntryAttributes` are built once per remote version and reused. The kernel may keep
a name and its attributes as long as the listing they come from is trusted, so that
`ls -l` again, or `stat` of each file, needs no request at all, and the kernel never
shows what this mount would no longer show itself.
"""

from __future__ import annotations

import os
import stat
import time

import pyfuse3

from mistralfs.api import RemoteFile
from mistralfs.fs.jobs import JOB_NODES, JobNode, JobsView
from mistralfs.fs.mtimes import KeptTimes
from mistralfs.fs.namespace import STANDARD_PURPOSES, FileNode, Folder, Namespace, Node

BLOCK = 4096
# The I/O size files advertise (st_blksize): copy tools write in pieces this large, and
# libfuse passes up to 1 MiB in one write request; at 4 KiB, cp writes 128 KiB pieces,
# each a FUSE round trip, which costs more than twice the time and CPU.
IO_BLOCK = 1 << 20
# A file being written changes under the kernel's feet (size, and mtime once uploaded).
LOCAL_TIMEOUT = 1.0


class Attributes:
    """EntryAttributes per node, with kernel cache timeouts that follow the listings."""

    def __init__(
        self,
        namespace: Namespace,
        times: KeptTimes,
        *,
        read_only: bool,
        jobs: JobsView | None = None,
    ) -> None:
        self._namespace = namespace
        self._times = times
        self._jobs = jobs
        self._uid = os.getuid()
        self._gid = os.getgid()
        self._file_mode = stat.S_IFREG | (0o444 if read_only else 0o644)
        self._unchangeable_mode = stat.S_IFREG | 0o444  # the service keeps it as it is
        # Nothing can be created in the root, so it does not claim to be writable: file
        # managers (GLib) then see no way to make a trash folder there and offer to
        # delete for good, instead of failing to move the file to a trash.
        self._root_mode = stat.S_IFDIR | 0o555
        self._folder_mode = stat.S_IFDIR | (0o555 if read_only else 0o755)
        self._mounted_at_ns = time.time_ns()  # folders have no remote timestamp
        # inode -> (the remote file they describe, its attributes), for settled files
        self._files: dict[int, tuple[RemoteFile, pyfuse3.EntryAttributes]] = {}
        self._folders: dict[int, pyfuse3.EntryAttributes] = {}

    def of(self, node: Node | JobNode) -> pyfuse3.EntryAttributes:
        """The node's attributes; valid until the next call (they may be shared)."""
        if isinstance(node, JOB_NODES):
            assert self._jobs is not None, "jobs/ nodes come from a JobsView"
            return self._jobs.attributes(node, self._common(node.inode))
        namespace = self._namespace
        if isinstance(node, FileNode):
            remote = node.remote
            if remote is not None and node.local_size is None:
                built = self._files.get(node.inode)
                if built is None or built[0] is not remote:
                    built = (remote, self._file(node, remote.bytes, remote.created_at))
                    self._files[node.inode] = built
                entry = built[1]
                timeout = namespace.fresh_for(node.folder)
            else:
                seconds = remote.created_at if remote is not None else node.local_time
                entry = self._file(node, node.size, seconds)
                timeout = min(LOCAL_TIMEOUT, namespace.dir_cache_time)
            times = self._times.times_of(node)  # those a program set, else the upload's
            entry.st_atime_ns, entry.st_mtime_ns = times.atime_ns, times.mtime_ns
        else:
            folder_entry = self._folders.get(node.inode)
            entry = folder_entry if folder_entry is not None else self._folder(node.inode)
            if isinstance(node, Folder) and node.purpose not in STANDARD_PURPOSES:
                timeout = namespace.fresh_for(node)  # it goes once it holds no files
            else:
                timeout = namespace.dir_cache_time  # always there, and never changes
        entry.entry_timeout = entry.attr_timeout = timeout
        return entry

    def _file(self, node: FileNode, size: int, seconds: int) -> pyfuse3.EntryAttributes:
        entry = self._common(node.inode)
        unchangeable = node.remote is not None and node.remote.unchangeable
        entry.st_mode = self._unchangeable_mode if unchangeable else self._file_mode
        entry.st_nlink = 1
        entry.st_size = size
        entry.st_blocks = (size + 511) // 512
        entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = seconds * 10**9
        return entry

    def _folder(self, inode: int) -> pyfuse3.EntryAttributes:
        entry = self._common(inode)
        entry.st_mode = self._root_mode if inode == pyfuse3.ROOT_INODE else self._folder_mode
        entry.st_nlink = 2
        entry.st_size = 0
        entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = self._mounted_at_ns
        self._folders[inode] = entry
        return entry

    def _common(self, inode: int) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode
        entry.st_uid = self._uid
        entry.st_gid = self._gid
        entry.st_blksize = IO_BLOCK
        return entry
