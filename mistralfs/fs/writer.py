"""Writing files: spool to local disk, upload on flush, never lose what was written.

Data written through the mount goes to a spool file under the cache folder, never
into memory. The first `close()` (FUSE `flush`) uploads the spool and returns the
upload's outcome, because errors from `release` reach nobody. A spool whose upload
did not succeed is moved to the recovery folder instead of being deleted.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import trio

from mistralfs.api import ApiError, FilesClient, NotFound
from mistralfs.fs.errors import FsError, errno_for
from mistralfs.fs.namespace import FileNode, Folder, Namespace

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Spool:
    """The local copy of a file being written, shared by every handle open on it."""

    node: FileNode
    path: Path
    fd: int
    size: int = 0
    dirty: bool = False  # written since the last upload
    oversize: bool = False
    handles: int = 0

    @property
    def meta_path(self) -> Path:
        return self.path.with_suffix(".json")


class Writer:
    """Owns the spool files and turns them into uploads."""

    def __init__(
        self,
        client: FilesClient,
        namespace: Namespace,
        *,
        spool_dir: Path,
        recovery_dir: Path,
        max_file_size: int,
    ) -> None:
        self._client = client
        self._namespace = namespace
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

    def create(self, folder: Folder, name: str) -> Spool:
        """A new, empty file in `folder`; it exists only locally until flushed."""
        node = self._namespace.add_local(folder, name, now=int(time.time()))
        path = self._spool_dir / f"{uuid.uuid4().hex}.spool"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        spool = Spool(node=node, path=path, fd=fd)
        spool.meta_path.write_text(
            json.dumps({"purpose": folder.purpose, "filename": name}), encoding="utf-8"
        )
        self._spools[node.inode] = spool
        return spool

    def open(self, spool: Spool) -> None:
        spool.handles += 1

    def write(self, spool: Spool, offset: int, data: bytes) -> int:
        if offset + len(data) > self._max_file_size:
            spool.oversize = True
            raise FsError(errno.EFBIG, f"{spool.node.name}: files are limited to 512 MB")
        written = os.pwrite(spool.fd, data, offset)
        spool.size = max(spool.size, offset + written)
        spool.node.local_size = spool.size
        spool.dirty = True
        return written

    def read(self, spool: Spool, offset: int, size: int) -> bytes:
        return os.pread(spool.fd, size, offset)

    def truncate(self, spool: Spool, size: int) -> None:
        if size > self._max_file_size:
            raise FsError(errno.EFBIG, f"{spool.node.name}: files are limited to 512 MB")
        os.ftruncate(spool.fd, size)
        spool.size = spool.node.local_size = size
        spool.dirty = True

    async def flush(self, spool: Spool) -> None:
        """Upload the spool if it was written since the last upload; raise what went wrong.

        A close with nothing written uploads nothing: shells open, `dup2` and close the
        original descriptor before writing, and that first close must not upload an empty
        file. An empty new file is uploaded when its last descriptor closes instead.
        """
        if spool.oversize:
            raise FsError(errno.EFBIG, f"{spool.node.name}: not uploaded, it grew past 512 MB")
        if spool.dirty and spool.node.attached:
            await self._upload(spool)

    async def _upload(self, spool: Spool) -> None:
        node = spool.node
        replaced = node.remote
        self._uploads_in_flight += 1
        self._idle = trio.Event()
        try:
            remote = await self._client.upload(
                spool.path, filename=node.name, purpose=node.folder.purpose
            )
        except ApiError as exc:
            log.error("upload of %s/%s failed: %s", node.folder.name, node.name, exc)
            raise FsError(errno_for(exc), str(exc)) from exc
        except OSError as exc:  # the spool itself could not be read
            log.error(
                "upload of %s/%s failed reading %s: %s",
                node.folder.name,
                node.name,
                spool.path,
                exc,
            )
            raise FsError(errno.EIO, str(exc)) from exc
        finally:
            self._uploads_in_flight -= 1
            if self._uploads_in_flight == 0:
                self._idle.set()
        spool.dirty = False
        self._namespace.uploaded(node, remote)
        if replaced is not None:
            await self._delete_replaced(node, replaced.id)
        log.info(
            "uploaded %s/%s as %s (%d bytes)", node.folder.name, node.name, remote.id, remote.bytes
        )

    async def _delete_replaced(self, node: FileNode, old_id: str) -> None:
        """The new upload succeeded, so the version it replaces can go."""
        try:
            await self._client.delete(old_id)
        except NotFound:
            pass
        except ApiError as exc:
            log.error(
                "%s/%s: could not delete the replaced %s: %s",
                node.folder.name,
                node.name,
                old_id,
                exc,
            )

    async def release(self, spool: Spool) -> None:
        """Last handle closed: drop the spool if its content is safe remotely, else keep it."""
        spool.handles -= 1
        if spool.handles > 0:
            return
        node = spool.node
        if node.remote is None and node.attached and not spool.dirty and not spool.oversize:
            # Created and closed with nothing written (`touch`): upload the empty file now.
            spool.dirty = True
            with contextlib.suppress(FsError):
                await self._upload(spool)
        del self._spools[spool.node.inode]
        os.close(spool.fd)
        if not spool.dirty or not node.attached:
            spool.path.unlink(missing_ok=True)
            spool.meta_path.unlink(missing_ok=True)
            return
        self._recovery_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        kept = self._recovery_dir / spool.path.name
        spool.path.rename(kept)
        spool.meta_path.rename(kept.with_suffix(".json"))
        log.warning(
            "%s/%s was not uploaded; its content is kept at %s",
            node.folder.name,
            node.name,
            kept,
        )
        if node.remote is None:
            self._namespace.detach(node)

    async def wait_idle(self) -> None:
        """Return once no upload is in flight."""
        while self._uploads_in_flight:
            await self._idle.wait()
