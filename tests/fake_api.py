"""An account in memory behind `FilesApi`: the filesystem without HTTP, for fast tests.

It keeps what the service keeps (files with ids, names, purposes, sizes, content) and
answers as `FilesClient` does: the same exceptions (`NotFound` for a missing id, a
`Rejected` for content a purpose refuses), signed URLs that expire, ranges cut at the
end of a file. Each call is counted by name in `calls`, and `fail_next` makes the next
calls of one name raise, as a flaky service would; with `latency`, reads take that long
and `peak_in_flight` says how many were on their way at once. No growing uploads: a file is
uploaded once closed, as through a proxy.
"""

from __future__ import annotations

import collections
import itertools
import json
import pathlib
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import trio

from mistralfs.api import (
    BatchJob,
    NotFound,
    ProtocolError,
    Rejected,
    RemoteFile,
    SignedUrl,
    UrlExpired,
)
from mistralfs.api.buffers import BlockBuffers
from mistralfs.api.calls import RequestStats
from mistralfs.api.protocol import GrowingSend
from mistralfs.api.storage import cut
from mistralfs.api.upload_body import GrowingFile
from mistralfs.files_api import EXPIRY_UNIT_SECONDS


def fine_tune_refusal(data: bytes) -> str | None:
    """Why the service refuses content for fine-tune/ (JSONL, one object per line)."""
    lines = [line for line in data.splitlines() if line.strip()]
    if not lines:
        return "Invalid file format. The file is empty"
    for number, line in enumerate(lines, 1):
        try:
            json.loads(line)
        except ValueError:
            return f"Invalid file format. Some lines are not valid JSON line {number}"
    return None


@dataclass
class StoredFile:
    remote: RemoteFile
    content: bytes


@dataclass
class FakeFilesApi:
    """The fake account (see the module's docstring)."""

    refusals: dict[str, Callable[[bytes], str | None]] = field(
        default_factory=lambda: {"fine-tune": fine_tune_refusal}
    )
    files: dict[str, StoredFile] = field(default_factory=dict)
    jobs: dict[str, BatchJob] = field(default_factory=dict)  # batch jobs, oldest first
    calls: collections.Counter[str] = field(default_factory=collections.Counter)
    failures: dict[str, list[Exception]] = field(default_factory=dict)
    stats: RequestStats = field(default_factory=RequestStats)
    sends_growing_uploads: bool = False
    storage_url: str | None = None  # the signed URL handed out last
    latency: float = 0.0  # seconds each content and range read takes, as a link would
    piece_time: float = 0.0  # seconds each piece of a range read takes after the latency
    ranges: list[tuple[int, int]] = field(default_factory=list)  # (start, length) asked, in order
    receive_keys: list[float | None] = field(default_factory=list)  # each range's, in order
    in_flight: collections.Counter[str] = field(default_factory=collections.Counter)
    peak_in_flight: collections.Counter[str] = field(default_factory=collections.Counter)
    _clock: itertools.count[int] = field(default_factory=lambda: itertools.count(1_700_000_000))

    # -- what tests use to arrange and look -------------------------------------------

    def add(
        self,
        filename: str,
        purpose: str,
        content: bytes,
        *,
        expires_at: int | None = None,
        visibility: str | None = "workspace",
        source: str = "upload",
    ) -> RemoteFile:
        """A file stored by someone else; one whose `expires_at` (wall clock) has passed
        is gone, as on the service."""
        remote = RemoteFile(
            id=str(uuid.uuid4()),
            bytes=len(content),
            created_at=next(self._clock),
            filename=filename,
            purpose=purpose,
            sample_type=None,
            source=source,
            num_lines=None,
            mimetype=None,
            signature=None,
            expires_at=expires_at,
            visibility=visibility,
        )
        self.files[remote.id] = StoredFile(remote, content)
        return remote

    def add_job(self, job: BatchJob | None = None, **fields: object) -> BatchJob:
        """A batch job (given, or made of `fields` over a finished one), or its new state."""
        if job is None:
            values: dict[str, object] = {
                "id": str(uuid.uuid4()),
                "status": "SUCCESS",
                "endpoint": "/v1/chat/completions",
                "model": "m",
                "input_files": (),
                "output_file": None,
                "error_file": None,
                "created_at": next(self._clock),
            }
            job = BatchJob(**(values | fields))  # type: ignore[arg-type]
        self.jobs[job.id] = job
        return job

    def held(self) -> dict[tuple[str, str], list[bytes]]:
        """(purpose, filename) -> the contents stored under it."""
        out: dict[tuple[str, str], list[bytes]] = collections.defaultdict(list)
        for stored in self.files.values():
            out[(stored.remote.purpose, stored.remote.filename)].append(stored.content)
        return dict(out)

    def fail_next(self, call: str, *errors: Exception) -> None:
        """The next calls of `call` raise these, one each."""
        self.failures.setdefault(call, []).extend(errors)

    def _count(self, call: str) -> None:
        self.calls[call] += 1
        self.stats.requests[call] += 1
        pending = self.failures.get(call)
        if pending:
            raise pending.pop(0)

    def _gone(self, stored: StoredFile) -> bool:
        expires_at = stored.remote.expires_at
        return expires_at is not None and expires_at <= time.time()

    def _get(self, file_id: str) -> StoredFile:
        stored = self.files.get(file_id)
        if stored is None or self._gone(stored):
            raise NotFound("No file found", status=404, method="GET", url=f"/v1/files/{file_id}")
        return stored

    # -- FilesApi ---------------------------------------------------------------------

    async def check_auth(self) -> None:
        self._count("check_auth")

    async def warm_up(self) -> None:
        self._count("warm_up")

    async def list_all(
        self, *, purpose: str | None = None, page_size: int = 100
    ) -> list[RemoteFile]:
        self._count("list_all")
        return [
            stored.remote
            for stored in self.files.values()
            if (purpose is None or stored.remote.purpose == purpose) and not self._gone(stored)
        ]

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
        self._count("upload")
        content = await trio.Path(path).read_bytes()
        refusal = self.refusals.get(purpose, lambda data: None)(content)
        if refusal is not None:
            raise Rejected(refusal, status=400, method="POST", url="/v1/files")
        if progress is not None:
            progress(len(content))
        expires_at = None if expiry is None else int(time.time()) + expiry * EXPIRY_UNIT_SECONDS
        return self.add(
            filename, purpose, content, expires_at=expires_at, visibility=visibility or "workspace"
        )

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
    ) -> GrowingSend:
        raise AssertionError("the fake sends no growing uploads (sends_growing_uploads)")

    async def find_upload(
        self, path: pathlib.Path, *, filename: str, purpose: str, started: float
    ) -> RemoteFile | None:
        self._count("find_upload")
        content = await trio.Path(path).read_bytes()
        for stored in self.files.values():
            remote = stored.remote
            if (remote.filename, remote.purpose, stored.content) == (filename, purpose, content):
                return remote
        return None

    async def delete(self, file_id: str) -> None:
        self._count("delete")
        self._get(file_id)
        del self.files[file_id]

    async def _wait(self, call: str) -> None:
        """The link's latency, with the calls of this kind in flight meanwhile counted."""
        self.in_flight[call] += 1
        self.peak_in_flight[call] = max(self.peak_in_flight[call], self.in_flight[call])
        try:
            await trio.sleep(self.latency)
        finally:
            self.in_flight[call] -= 1

    async def content(self, file_id: str, size: int) -> bytes:
        self._count("content")
        await self._wait("content")
        data = self._get(file_id).content
        if len(data) != size:
            raise ProtocolError(f"expected {size} bytes of content, got {len(data)}")
        return data

    async def signed_url(self, file_id: str, expiry_hours: int = 24) -> SignedUrl:
        self._count("signed_url")
        self._get(file_id)
        expires_at = time.time() + expiry_hours * 3600
        self.storage_url = f"fake://storage/{file_id}?se={expires_at}"
        return SignedUrl(url=self.storage_url, expires_at=expires_at)

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
        self._count("read_range")
        self.ranges.append((start, length))
        self.receive_keys.append(receive_key)
        await self._wait("read_range")
        file_id, _, expiry = url.removeprefix("fake://storage/").partition("?se=")
        if float(expiry) < time.time():
            raise UrlExpired("Signature expired", status=403, method="GET", url=url)
        data = self._get(file_id).content[start : start + length]
        pieces = cut([data], 0, len(data), piece_size) if data else []
        for index, piece in enumerate(pieces):
            if self.piece_time:  # the link's rate: a piece after another
                await trio.sleep(self.piece_time)
            whole = len(piece) == min(piece_size, length - index * piece_size)
            if on_piece is not None and whole and index < len(pieces) - 1:
                on_piece(index, piece)
        return pieces

    async def connect_ahead(self, url: str, count: int = 1) -> None:
        self._count("connect_ahead")

    async def list_batch_jobs(
        self, *, statuses: Sequence[str] = (), page_size: int = 100
    ) -> list[BatchJob]:
        self._count("list_batch_jobs")
        jobs = [job for job in self.jobs.values() if not statuses or job.status in statuses]
        return jobs[::-1]

    async def get_batch_job(self, job_id: str) -> BatchJob:
        self._count("get_batch_job")
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound("Batch job not found", status=404, method="GET",
                           url=f"/v1/batch/jobs/{job_id}")  # fmt: skip
        return job
