"""Batch jobs: what makes the batch outputs that accounts hold.

A job reads its input files (or inline ``requests``), gives each request line to the
fake model (batch_model.py), and writes what it answered to an output file and what it
refused to an error file: real files, purpose ``batch``, source ``mistral``, sample
types ``batch_result`` / ``batch_error``, listed like any other.

A job moves through its statuses on the emulator's clock (clock.py), in steps of half
the configured delay: QUEUED, then RUNNING, then done (SUCCESS, or FAILED when no input
could be read). ``cancel`` asks for CANCELLATION_REQUESTED, which becomes CANCELLED a
step later, with no outputs. A job past its ``timeout_hours`` before it is done ends
TIMEOUT_EXCEEDED. The statuses and the moves between them are the one table
`TRANSITIONS`; `Job.become` is the only way a status changes.

Jobs are moved on when they are looked at (any job route, and any files listing), so
that no task runs behind the server: the same requests at the same clock times always
see the same statuses. Jobs are kept in ``DATA/batch_jobs.sqlite3``, one JSON document
a job (an emulator holds few jobs; lists are filtered in memory).
"""

from __future__ import annotations

import enum
import json
import pathlib
import sqlite3
import threading
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import trio

from mistralfs.emulator.batch_model import answer_line
from mistralfs.emulator.clock import Clock
from mistralfs.emulator.storage import Storage

# Bytes of a job's results shown inline (GET ?inline=true) at most.
MAX_INLINE_BYTES = 8 * 1024 * 1024


class JobStatus(enum.StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCESS = "SUCCESS"
    FAILED = "FAILED"
    TIMEOUT_EXCEEDED = "TIMEOUT_EXCEEDED"
    CANCELLATION_REQUESTED = "CANCELLATION_REQUESTED"
    CANCELLED = "CANCELLED"


S = JobStatus
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    S.QUEUED: frozenset({S.RUNNING, S.CANCELLATION_REQUESTED, S.TIMEOUT_EXCEEDED}),
    S.RUNNING: frozenset({S.SUCCESS, S.FAILED, S.CANCELLATION_REQUESTED, S.TIMEOUT_EXCEEDED}),
    S.CANCELLATION_REQUESTED: frozenset({S.CANCELLED}),
    S.SUCCESS: frozenset(),
    S.FAILED: frozenset(),
    S.TIMEOUT_EXCEEDED: frozenset(),
    S.CANCELLED: frozenset(),
}
FINAL = frozenset(status for status, moves in TRANSITIONS.items() if not moves)


class IllegalTransition(Exception):
    """A status change the table does not allow (a bug, never a client's doing)."""


@dataclass
class Job:
    """One batch job: the API's fields, and when its status last changed (clock seconds)."""

    id: str
    endpoint: str
    input_files: list[str]
    model: str | None
    agent_id: str | None
    metadata: dict[str, Any] | None
    timeout_hours: int
    created_time: float
    status: JobStatus = JobStatus.QUEUED
    changed_time: float = 0.0
    started_at: int | None = None
    completed_at: int | None = None
    output_file: str | None = None
    error_file: str | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    total_requests: int = 0
    completed_requests: int = 0
    succeeded_requests: int = 0
    failed_requests: int = 0
    requests: list[dict[str, Any]] | None = None  # inline requests, when given instead of files
    # While RUNNING: "1" or "0" per request, whether the model answers it, so that the
    # counts grow as the job goes (requests are taken in order, at an even pace).
    outcomes: str = ""

    def become(self, status: JobStatus, at: float) -> None:
        if status not in TRANSITIONS[self.status]:
            raise IllegalTransition(f"job {self.id}: {self.status} -> {status}")
        self.status = status
        self.changed_time = at
        if status is JobStatus.RUNNING:
            self.started_at = int(at)
        elif status in FINAL:
            self.completed_at = int(at)

    @property
    def created_at(self) -> int:
        return int(self.created_time)

    def to_api(self) -> dict[str, Any]:
        """The job object as the service answers it (SDK 3.7's BatchJob)."""
        return {
            "id": self.id,
            "object": "batch",
            "input_files": self.input_files,
            "endpoint": self.endpoint,
            "model": self.model,
            "agent_id": self.agent_id,
            "metadata": self.metadata,
            "output_file": self.output_file,
            "error_file": self.error_file,
            "errors": self.errors,
            "status": str(self.status),
            "created_at": self.created_at,
            "started_at": self.started_at,
            "completed_at": self.completed_at,
            "total_requests": self.total_requests,
            "completed_requests": self.completed_requests,
            "succeeded_requests": self.succeeded_requests,
            "failed_requests": self.failed_requests,
        }

    def to_doc(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_doc(cls, doc: str) -> Job:
        data = json.loads(doc)
        data["status"] = JobStatus(data["status"])
        return cls(**data)


@dataclass(frozen=True)
class JobQuery:
    """Filters and paging of GET /v1/batch/jobs (None: no filter)."""

    page: int = 0
    page_size: int = 100
    model: str | None = None
    agent_id: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    created_after: float | None = None
    statuses: tuple[JobStatus, ...] = ()
    newest_first: bool = True

    def matches(self, job: Job) -> bool:
        if self.model is not None and job.model != self.model:
            return False
        if self.agent_id is not None and job.agent_id != self.agent_id:
            return False
        if self.created_after is not None and job.created_time <= self.created_after:
            return False
        if self.statuses and job.status not in self.statuses:
            return False
        held = job.metadata or {}
        return all(str(held.get(k)) == v and k in held for k, v in self.metadata.items())


class JobStore:
    """Jobs as JSON documents in SQLite, in creation order."""

    def __init__(self, data_dir: pathlib.Path) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            pathlib.Path(data_dir) / "batch_jobs.sqlite3",
            check_same_thread=False,
            isolation_level=None,
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
            "id TEXT NOT NULL UNIQUE, doc TEXT NOT NULL)"
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def put(self, job: Job) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, doc) VALUES (?, ?) "
                "ON CONFLICT (id) DO UPDATE SET doc = excluded.doc",
                (job.id, job.to_doc()),
            )

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT doc FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job.from_doc(row[0]) if row else None

    def delete(self, job_id: str) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,)).rowcount > 0

    def all(self) -> list[Job]:
        """Every job, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT doc FROM jobs ORDER BY seq").fetchall()
        return [Job.from_doc(row[0]) for row in rows]


@dataclass(frozen=True)
class NewJob:
    """What a create request asked for (checked by the route)."""

    endpoint: str
    input_files: list[str]
    requests: list[dict[str, Any]] | None
    model: str | None
    agent_id: str | None
    metadata: dict[str, Any] | None
    timeout_hours: int


class BatchJobs:
    """The jobs of one emulator, moved on at each look (see the module's docstring)."""

    def __init__(self, store: JobStore, storage: Storage, clock: Clock, delay: float) -> None:
        self.store = store
        self.storage = storage
        self.clock = clock
        self.delay = max(0.0, delay)
        self._lock = trio.Lock()  # one mover at a time: a job's outputs are written once

    async def create(self, new: NewJob) -> Job:
        now = self.clock.time()
        job = Job(
            id=str(uuid.uuid4()),
            endpoint=new.endpoint,
            input_files=new.input_files,
            model=new.model,
            agent_id=new.agent_id,
            metadata=new.metadata,
            timeout_hours=new.timeout_hours,
            created_time=now,
            changed_time=now,
            requests=new.requests,
        )
        job.total_requests = await trio.to_thread.run_sync(self._count_requests, job)
        self.store.put(job)
        return await self.get(job.id) or job

    async def get(self, job_id: str) -> Job | None:
        async with self._lock:
            job = self.store.get(job_id)
            if job is not None:
                await self._move_on(job)
            return job

    async def page(self, query: JobQuery) -> tuple[list[Job], int]:
        """One page of matching jobs, and how many match."""
        async with self._lock:
            jobs = self.store.all()
            for job in jobs:
                await self._move_on(job)
        matching = [job for job in jobs if query.matches(job)]
        if query.newest_first:
            matching.reverse()
        start = query.page * query.page_size
        return matching[start : start + query.page_size], len(matching)

    async def cancel(self, job_id: str) -> Job | None:
        """Ask a job to stop; one already done is answered as it is."""
        async with self._lock:
            job = self.store.get(job_id)
            if job is None:
                return None
            await self._move_on(job)
            if JobStatus.CANCELLATION_REQUESTED in TRANSITIONS[job.status]:
                job.become(JobStatus.CANCELLATION_REQUESTED, self.clock.time())
                self.store.put(job)
            return job

    async def delete(self, job_id: str) -> bool:
        async with self._lock:
            return self.store.delete(job_id)

    async def move_all(self) -> None:
        """Move every unfinished job on (before a files listing, so outputs show)."""
        async with self._lock:
            for job in self.store.all():
                if job.status not in FINAL:
                    await self._move_on(job)

    def inline_results(self, job: Job) -> list[dict[str, Any]] | None:
        """The output and error lines of a finished job, when small enough to inline."""
        lines: list[dict[str, Any]] = []
        for file_id in (job.output_file, job.error_file):
            record = self.storage.get(file_id) if file_id else None
            if record is None:
                continue
            if record.bytes > MAX_INLINE_BYTES:
                return None
            with open(self.storage.blob_path(record.id), "rb") as f:
                lines += [json.loads(line) for line in f if line.strip()]
        return lines

    # -- moving on ------------------------------------------------------------------

    def _next(self, job: Job) -> tuple[JobStatus, float] | None:
        """The job's next status and when it is due, if it has one."""
        step = self.delay / 2
        deadline = job.created_time + job.timeout_hours * 3600
        if job.status is JobStatus.QUEUED:
            due, status = job.changed_time + step, JobStatus.RUNNING
        elif job.status is JobStatus.RUNNING:
            due, status = job.changed_time + step, JobStatus.SUCCESS
        elif job.status is JobStatus.CANCELLATION_REQUESTED:
            return JobStatus.CANCELLED, job.changed_time + step
        else:
            return None
        if due > deadline:
            return JobStatus.TIMEOUT_EXCEEDED, deadline
        return status, due

    async def _move_on(self, job: Job) -> None:
        """Every step due by now, in order; the job is stored if it moved."""
        now = self.clock.time()
        moved = False
        while (step := self._next(job)) is not None and step[1] <= now:
            status, at = step
            if status is JobStatus.RUNNING:
                job.outcomes = await trio.to_thread.run_sync(self._outcomes, job)
            elif status is JobStatus.SUCCESS:
                await trio.to_thread.run_sync(self._run, job)
                status = JobStatus.FAILED if job.errors and not job.completed_requests else status
            if status is not JobStatus.RUNNING:
                job.outcomes = ""
            job.become(status, at)
            moved = True
        if job.status is JobStatus.RUNNING:
            moved = self._progress(job, now) or moved
        if moved:
            self.store.put(job)

    def _progress(self, job: Job, now: float) -> bool:
        """The counts of a running job at `now`; whether they changed."""
        step = self.delay / 2
        share = min(1.0, (now - job.changed_time) / step) if step > 0 else 1.0
        done = int(len(job.outcomes) * share)
        succeeded = job.outcomes[:done].count("1")
        counts = (done, succeeded, done - succeeded)
        before = (job.completed_requests, job.succeeded_requests, job.failed_requests)
        job.completed_requests, job.succeeded_requests, job.failed_requests = counts
        return counts != before

    def _outcomes(self, job: Job) -> str:
        """Whether the model answers each request of the job, in order (blocking)."""
        lines = self._lines_if_any(job)
        answered = (
            answer_line(raw, job_id=job.id, number=n, endpoint=job.endpoint, model=job.model,
                        created=job.created_at).ok
            for n, raw in enumerate(lines, 1)
        )  # fmt: skip
        return "".join("1" if ok else "0" for ok in answered)

    def _request_lines(self, job: Job) -> list[bytes] | None:
        """Every request line of the job (blank lines skipped); None if an input is gone,
        with the reason in ``job.errors``."""
        if job.requests is not None:
            return [json.dumps(r).encode() for r in job.requests]
        lines: list[bytes] = []
        for file_id in job.input_files:
            record = self.storage.get(file_id) if _is_uuid(file_id) else None
            if record is None:
                job.errors.append({"message": f"Input file {file_id} not found", "count": 1})
                return None
            with open(self.storage.blob_path(record.id), "rb") as f:
                lines += [line for line in f if line.strip()]
        return lines

    def _lines_if_any(self, job: Job) -> list[bytes]:
        """The job's request lines, none if an input is gone (noting nothing in the job)."""
        return self._request_lines(Job(**{**asdict(job), "errors": []})) or []

    def _count_requests(self, job: Job) -> int:
        return len(self._lines_if_any(job))

    def _run(self, job: Job) -> None:
        """The fake model over every request line: the output and error files (blocking)."""
        lines = self._request_lines(job)
        if lines is None:
            return
        if not lines:
            job.errors.append({"message": "The job has no requests", "count": 1})
            return
        outputs: list[bytes] = []
        failures: list[bytes] = []
        for number, raw in enumerate(lines, 1):
            result = answer_line(raw, job_id=job.id, number=number, endpoint=job.endpoint,
                                 model=job.model, created=job.created_at)  # fmt: skip
            (outputs if result.ok else failures).append(json.dumps(result.line).encode() + b"\n")
        job.total_requests = len(lines)
        job.completed_requests = len(lines)
        job.succeeded_requests = len(outputs)
        job.failed_requests = len(failures)
        if failures:
            job.errors.append(
                {"message": "Some requests could not be processed", "count": len(failures)}
            )
        for kind, content in (("batch_result", outputs), ("batch_error", failures)):
            if not content:
                continue
            suffix = "" if kind == "batch_result" else "_error"
            record = self.storage.add_batch_output(
                b"".join(content),
                filename=f"{job.id}{suffix}.jsonl",
                sample_type=kind,
                num_lines=len(content),
            )
            if kind == "batch_result":
                job.output_file = record.id
            else:
                job.error_file = record.id


def _is_uuid(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False
