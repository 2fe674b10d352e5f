"""What the filesystem needs of the Files API: the one interface `fs/` depends on.

`FilesClient` (client.py) is the implementation that speaks HTTP; tests also run the
filesystem on an in-memory one (tests/fake_api.py), which is what keeps this surface
small and explicit. Errors are the exceptions of errors.py, whichever side raises them.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Sequence
from typing import Protocol

from mistralfs.api.buffers import BlockBuffers
from mistralfs.api.calls import RequestStats
from mistralfs.api.models import BatchJob, RemoteFile, SignedUrl
from mistralfs.api.upload_body import GrowingFile


class GrowingSend(Protocol):
    """An upload that follows a file still being written (see uploads.py)."""

    filename: str
    purpose: str

    async def run(self) -> RemoteFile: ...


class FilesApi(Protocol):
    """The account as the filesystem sees it: list, upload, read, delete."""

    storage_url: str | None  # the signed URL handed out last (where content is read from)

    @property
    def stats(self) -> RequestStats: ...

    @property
    def sends_growing_uploads(self) -> bool:
        """Whether `growing_upload` may be used."""
        ...

    async def check_auth(self) -> None:
        """A cheap authenticated call: raises if the key or the server will not do."""
        ...

    async def warm_up(self) -> None:
        """Open ahead the connections a first listing and a first read need, if any."""
        ...

    async def list_all(
        self, *, purpose: str | None = None, page_size: int = 100
    ) -> list[RemoteFile]:
        """Every file (of one purpose), each id once."""
        ...

    async def upload(
        self,
        path: pathlib.Path,
        *,
        filename: str,
        purpose: str,
        progress: Callable[[int], None] | None = None,
        after: GrowingSend | None = None,
        expiry: int | None = None,
        visibility: str | None = None,
    ) -> RemoteFile:
        """Store the file at `path` once; `after` is a growing upload of it that failed.
        `expiry` and `visibility` are sent only when given (the service's defaults)."""
        ...

    def growing_upload(
        self,
        path: pathlib.Path,
        growing: GrowingFile,
        *,
        filename: str,
        purpose: str,
        progress: Callable[[int], None] | None = None,
        expiry: int | None = None,
        visibility: str | None = None,
    ) -> GrowingSend: ...

    async def find_upload(
        self, path: pathlib.Path, *, filename: str, purpose: str, started: float
    ) -> RemoteFile | None:
        """The file an upload of `path` begun at `started` (wall clock) stored, if any."""
        ...

    async def delete(self, file_id: str) -> None: ...

    async def content(self, file_id: str, size: int) -> bytes:
        """A small file's content, exactly `size` bytes."""
        ...

    async def signed_url(self, file_id: str, expiry_hours: int = 24) -> SignedUrl: ...

    async def read_range_pieces(
        self,
        url: str,
        start: int,
        length: int,
        piece_size: int,
        on_piece: Callable[[int, bytes], None] | None = None,
        buffers: BlockBuffers | None = None,
        receive_key: float | None = None,
    ) -> list[bytes]:
        """Bytes of a signed URL, in pieces of `piece_size` (short at the file's end);
        `on_piece(index, piece)`, if given, takes each whole piece as soon as it is in.
        `buffers`: where the pieces' memory comes from, if the client reads into memory
        of its own (buffers.py). `receive_key`: when the first piece is needed (lower
        is sooner), for the order in which ranges on their way are received."""
        ...

    async def connect_ahead(self, url: str, count: int = 1) -> None:
        """Have `count` connections for reading `url` (or any URL on its host) open or
        on their way, if that means anything."""
        ...

    async def list_batch_jobs(
        self, *, statuses: Sequence[str] = (), page_size: int = 100
    ) -> list[BatchJob]:
        """Every batch job (of these statuses), newest first."""
        ...

    async def get_batch_job(self, job_id: str) -> BatchJob:
        """One batch job as it is now (NotFound if there is none)."""
        ...
