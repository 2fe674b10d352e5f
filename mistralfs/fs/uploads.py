"""Sending spools to the account: whole at close, or while a new file is written.

`Writer` decides when a version of a file is uploaded and what it replaces; this
module does the sending. A new file written from its first byte on starts uploading
once it holds `GROWING_START_BYTES` (a `Growing` upload that follows the spool as it
grows), so that its close waits only for the rest; any other change is sent whole.
It also counts the uploads in flight, so that unmounting can wait for them, and
deletes the versions a successful upload replaced.
"""

from __future__ import annotations

import errno
import logging
import time
from dataclasses import dataclass, field

import trio

from mistralfs.api import ApiError, GrowingFile, NotFound, RemoteFile, StreamAbandoned
from mistralfs.api.protocol import FilesApi, GrowingSend
from mistralfs.fs.activity import Activity, UploadProgress
from mistralfs.fs.errors import FsError, errno_for
from mistralfs.fs.namespace import FileNode, Namespace
from mistralfs.fs.reader import BlockReader
from mistralfs.fs.spool import Spool
from mistralfs.fs.upload_settings import UploadSettings, effective

log = logging.getLogger(__name__)

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
    upload: GrowingSend
    progress: UploadProgress
    activity_key: int
    done: trio.Event = field(default_factory=trio.Event)
    remote: RemoteFile | None = None  # what it stored, once done; None if it did not


class Uploader:
    """Uploads spools and deletes what they replace; counts the uploads in flight."""

    def __init__(
        self,
        client: FilesApi,
        namespace: Namespace,
        reader: BlockReader,
        activity: Activity,
        nursery: trio.Nursery,
        defaults: UploadSettings | None = None,
    ) -> None:
        self._client = client
        self.defaults = defaults or UploadSettings()  # the mount's --visibility, --expiry
        self._namespace = namespace
        self._reader = reader
        self._activity = activity
        self._nursery = nursery
        self._uploads_in_flight = 0
        self._idle = trio.Event()
        self._idle.set()

    async def send(self, spool: Spool, *, filename: str, purpose: str) -> RemoteFile:
        growing = self._finish_growing(spool, filename, purpose)
        if growing is None:
            spool.upload_started = time.time()
            key = self._activity.start_upload(filename, purpose, spool.size)
            self._upload_began()
        else:
            key = growing.activity_key
        spool.write_note()
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
                settings = self.settings(spool.node)
                with self._namespace.uploading(purpose, filename):
                    remote = await self._client.upload(
                        spool.path,
                        filename=filename,
                        purpose=purpose,
                        progress=progress.update,
                        after=growing.upload if growing is not None else None,
                        expiry=settings.sent_expiry,
                        visibility=settings.visibility,
                    )
            error = None
        except ApiError as exc:
            error = str(exc)
            log.error("upload of %s/%s failed: %s", purpose, filename, exc)  # the target
            raise FsError(errno_for(exc), str(exc)) from exc
        except OSError as exc:  # the spool itself could not be read
            error = f"reading {spool.path}: {exc}"
            log.error("upload of %s/%s failed reading %s: %s", purpose, filename,
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

    def settings(self, node: FileNode) -> UploadSettings:
        """What `node`'s upload asks for besides its content (see upload_settings.py)."""
        return effective(node, self.defaults, time.time())

    def _upload_began(self) -> None:
        self._uploads_in_flight += 1
        self._idle = trio.Event()

    def _upload_ended(self) -> None:
        self._uploads_in_flight -= 1
        if self._uploads_in_flight == 0:
            self._idle.set()

    # -- uploading while the file is written -----------------------------------------

    def may_grow(self, spool: Spool) -> bool:
        """Whether `spool` is a new file being written from start to end, never sent yet."""
        return (
            spool.appended_only
            and spool.upload_started is None
            and spool.node.attached
            and spool.refused is None
            and self._client.sends_growing_uploads
        )

    def start_growing(self, spool: Spool) -> None:
        """Start uploading a new file while it is written, from its first byte."""
        node = spool.node
        filename, purpose = node.filename, node.folder.purpose
        file = GrowingFile()
        file.grew(spool.size)
        settings = self.settings(node)
        key = self._activity.start_upload(filename, purpose, spool.size)
        progress = self._activity.progress(key)
        upload = self._client.growing_upload(
            spool.path,
            file,
            filename=filename,
            purpose=purpose,
            progress=progress.update,
            expiry=settings.sent_expiry,
            visibility=settings.visibility,
        )
        spool.growing = Growing(file, upload, progress, key)
        spool.upload_started = time.time()
        spool.write_note()
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

    def stop_growing(self, spool: Spool, reason: str) -> None:
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
            self.stop_growing(spool, "the file was renamed")
            return None
        spool.growing = None
        growing.file.finish(spool.size)
        return growing

    async def delete(self, node: FileNode, replaced: list[RemoteFile], *, why: str = "") -> None:
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

    async def wait_idle(self) -> None:
        """Return once no upload is in flight."""
        while self._uploads_in_flight:
            await self._idle.wait()
