"""`jobs/`: the account's batch jobs, read-only, one folder per job.

A batch job reads its input files and writes an output file and an error file, all
Files API files of purpose `batch`, which `batch/` shows among the others with nothing
to tell which job made which. Here each job is a folder, named by its id, or
`NAME (id8)` when its `metadata` gives a `name` (`names.labelled`), holding:
- `job.json`: the job object as the service last gave it (status, counts, times);
- `input.jsonl` (`input-1.jsonl`, `input-2.jsonl`... when it has several),
  `output.jsonl`, `error.jsonl`: read-only files that read the same remote files as
  their names in `batch/` do (the extension is the remote file's own). Files rather
  than symlinks, so that `cp -r`, `rsync -r`, `tar` and file managers copy content,
  not links that point back into the mount; `ls -l` shows their sizes, and their
  xattrs (`user.mistral.id`, ...) are those of the file in `batch/`.

A job's files appear once the service has them: when the job names a file that the
`batch/` listing does not hold yet, that listing is fetched again (once per fetch of
the job). The list of jobs and each job are trusted for `--dir-cache-time`, as folder
listings are. Nothing in here can be created, written, renamed or deleted
(`READ_ONLY_VIEW`); the files themselves stay where they are in `batch/`.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import stat
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import pyfuse3
import trio

from mistralfs.api import ApiError, BatchJob, NotFound
from mistralfs.api.protocol import FilesApi
from mistralfs.fs.errors import READ_ONLY_VIEW, FsError, errno_for
from mistralfs.fs.failures import RecentFailures
from mistralfs.fs.names import JOBS_FOLDER, labelled, split_ext
from mistralfs.fs.namespace import FileNode, Namespace

log = logging.getLogger(__name__)

T = TypeVar("T")

STATUS_FILE = "job.json"
DEFAULT_EXT = ".jsonl"  # batch files are JSONL; for a remote name with no extension
JOBS_PAGE_SIZE = 100


@dataclass(eq=False)
class JobsFolder:
    """`jobs/` itself."""

    inode: int
    name: str = JOBS_FOLDER


@dataclass(eq=False)
class JobFile:
    """`job.json` (`file_id` None), or a job's input, output or error file."""

    inode: int
    job_id: str
    name: str
    file_id: str | None = None


@dataclass(eq=False)
class JobFolder:
    """One job: its object as last fetched, and the files it names."""

    inode: int
    job_id: str
    name: str
    created_at: int
    status: bytes = b""  # job.json
    status_time: int = 0  # when job.json last changed (its mtime)
    file_ids: dict[str, str] = field(default_factory=dict)  # role ("output") -> file id
    files: dict[str, JobFile] = field(default_factory=dict)  # name -> entry
    fetched_at: float | None = None  # trio time the job object was fetched
    resolved_at: float | None = None  # the fetch its `files` were last built for


JobNode = JobsFolder | JobFolder | JobFile
JOB_NODES = (JobsFolder, JobFolder, JobFile)


def folder_name(job: BatchJob) -> str:
    """A job's folder: `NAME (id8)` when its metadata names it, else its id."""
    return labelled(job.name, job.id)


def job_json(job: BatchJob) -> bytes:
    """job.json: the job object, its fields as the service names them (`errors` as the
    messages it gave), and those the client does not know besides."""
    shown: dict[str, object] = {"id": job.id, "object": "batch"}
    for name in (f.name for f in dataclasses.fields(job) if f.name != "extra"):
        value = getattr(job, name)
        shown[name] = dict(value) if isinstance(value, Mapping) else value
    shown.update(job.extra)
    return json.dumps(shown, indent=2).encode("utf-8") + b"\n"


def roles(job: BatchJob) -> dict[str, str]:
    """What its files are to a job: `input` (`input-N`), `output`, `error` -> file id."""
    found: dict[str, str] = {}
    inputs = list(job.input_files)
    for number, file_id in enumerate(inputs, 1):
        found["input" if len(inputs) == 1 else f"input-{number}"] = file_id
    if job.output_file:
        found["output"] = job.output_file
    if job.error_file:
        found["error"] = job.error_file
    return found


class JobsView:
    """The jobs/ tree: its nodes (inodes from the namespace), listings and reads."""

    def __init__(self, client: FilesApi, namespace: Namespace) -> None:
        self._client = client
        self._namespace = namespace
        self.root = JobsFolder(namespace.new_inode())
        self._nodes: dict[int, JobNode] = {self.root.inode: self.root}
        self._jobs: dict[str, JobFolder] = {}  # by job id
        self._listed_at: float | None = None
        self._lock = trio.Lock()
        self._failures = RecentFailures()
        self._started = int(time.time())

    def node(self, inode: int) -> JobNode | None:
        return self._nodes.get(inode)

    # -- listings -------------------------------------------------------------------

    async def entries(self, node: JobNode) -> list[tuple[str, JobNode]]:
        """What a folder of jobs/ holds now, fetched again if older than the cache time."""
        if isinstance(node, JobsFolder):
            await self._list_jobs()
            return sorted(((f.name, f) for f in self._jobs.values()), key=lambda e: e[0])
        if isinstance(node, JobFolder):
            await self._fresh_job(node)
            return sorted(node.files.items())
        raise FsError(errno.ENOTDIR)

    async def lookup(self, parent: JobNode, name: str) -> JobNode:
        if isinstance(parent, JobsFolder):
            await self._list_jobs()
            found: JobNode | None = next((f for f in self._jobs.values() if f.name == name), None)
            if isinstance(found, JobFolder):
                await self._resolve(found)  # its files, for the `ls` or `cd` that follows
        elif isinstance(parent, JobFolder):
            await self._fresh_job(parent)
            found = parent.files.get(name)
        else:
            raise FsError(errno.ENOTDIR)
        if found is None:
            raise FsError(errno.ENOENT)
        return found

    def _stale(self, fetched_at: float | None) -> bool:
        return fetched_at is None or (
            trio.current_time() - fetched_at >= self._namespace.dir_cache_time
        )

    async def _list_jobs(self) -> None:
        async with self._lock:
            if not self._stale(self._listed_at):
                return
            started = trio.current_time()
            jobs = await self._fetch(
                "list", lambda: self._client.list_batch_jobs(page_size=JOBS_PAGE_SIZE)
            )
            listed = {job.id for job in jobs}
            for job in jobs:
                self._apply(job, started)
            for job_id in [i for i in self._jobs if i not in listed]:
                self._drop(self._jobs[job_id])
            self._listed_at = started
            log.debug("batch jobs listed: %d", len(jobs))

    async def _fresh_job(self, folder: JobFolder) -> None:
        """The job fetched again if older than the cache time, and its files found."""
        if self._stale(folder.fetched_at):
            started = trio.current_time()
            try:
                job = await self._fetch(
                    folder.job_id, lambda: self._client.get_batch_job(folder.job_id)
                )
            except FsError as exc:
                if exc.errno == errno.ENOENT:
                    self._drop(folder)
                raise
            self._apply(job, started)
        await self._resolve(folder)

    async def _fetch(self, key: str, call: Callable[[], Awaitable[T]]) -> T:
        try:
            return await self._failures.run(("jobs", key), call)
        except ApiError as exc:
            if not isinstance(exc, NotFound):
                log.error("fetching the batch jobs failed: %s", exc)
            raise FsError(errno_for(exc), str(exc)) from exc

    def _apply(self, job: BatchJob, fetched_at: float) -> None:
        """What a fetch said of `job`: its folder made or brought up to date."""
        folder = self._jobs.get(job.id)
        if folder is None:
            folder = JobFolder(
                self._namespace.new_inode(), job.id, folder_name(job), job.created_at
            )
            self._jobs[job.id] = folder
            self._nodes[folder.inode] = folder
        status = job_json(job)
        if status != folder.status:
            folder.status, folder.status_time = status, int(time.time())
        folder.file_ids = roles(job)
        folder.fetched_at = max(folder.fetched_at or fetched_at, fetched_at)

    def _drop(self, folder: JobFolder) -> None:
        self._jobs.pop(folder.job_id, None)
        self._nodes.pop(folder.inode, None)
        for entry in folder.files.values():
            self._nodes.pop(entry.inode, None)

    async def _resolve(self, folder: JobFolder) -> None:
        """Build the folder's entries for the job as last fetched.

        A file the namespace does not know yet was made after the `batch/` listing it
        has: that listing is fetched again, once per fetch of the job.
        """
        if folder.resolved_at == folder.fetched_at and folder.files:
            return
        missing = [i for i in folder.file_ids.values() if self._target(i) is None]
        batch = await self._namespace.find_folder("batch")
        if (
            missing
            and batch is not None
            and folder.fetched_at is not None
            and (batch.fetched_at is None or batch.fetched_at < folder.fetched_at)
        ):
            batch.fetched_at = None  # older than the job: it cannot hold its files
            try:
                await self._namespace.ensure_folder_fresh(batch)
            except ApiError as exc:
                raise FsError(errno_for(exc), str(exc)) from exc
        wanted: dict[str, str | None] = {STATUS_FILE: None}
        for role, file_id in folder.file_ids.items():
            target = self._target(file_id)
            if target is None or target.remote is None:
                log.debug("batch job %s: its %s file %s is not listed", folder.job_id, role,
                          file_id)  # fmt: skip
                continue
            wanted[role + (split_ext(target.remote.filename)[1] or DEFAULT_EXT)] = file_id
        for name, entry in list(folder.files.items()):
            if name not in wanted or wanted[name] != entry.file_id:
                del folder.files[name]
                self._nodes.pop(entry.inode, None)
        for name, wanted_id in wanted.items():
            if name not in folder.files:
                entry = JobFile(self._namespace.new_inode(), folder.job_id, name, wanted_id)
                folder.files[name] = entry
                self._nodes[entry.inode] = entry
        folder.resolved_at = folder.fetched_at

    def _target(self, file_id: str) -> FileNode | None:
        node = self._namespace.file_by_id(file_id)
        return node if node is not None and node.remote is not None else None

    # -- reading ----------------------------------------------------------------------

    def target(self, node: object) -> FileNode | None:
        """The file in `batch/` that a job's input, output or error file reads."""
        if isinstance(node, JobFile) and node.file_id is not None:
            return self._target(node.file_id)
        return None

    def opened(self, node: JobNode) -> bytes | FileNode:
        """What an open of `node` reads: job.json's content as the listing showed it, or
        the file in `batch/` (ENOENT once it is gone from there)."""
        if not isinstance(node, JobFile):
            raise FsError(errno.EISDIR)
        if node.file_id is None:
            folder = self._folder_of(node)
            return folder.status if folder is not None else b""
        target = self.target(node)
        if target is None:
            raise FsError(errno.ENOENT, f"{node.name}: the file is no longer in batch/")
        return target

    def _folder_of(self, entry: JobFile) -> JobFolder | None:
        return self._jobs.get(entry.job_id)

    # -- refusing ---------------------------------------------------------------------

    @staticmethod
    def refuse(*nodes: object) -> None:
        """Nothing in jobs/ is changed through the mount."""
        if any(isinstance(node, JOB_NODES) for node in nodes):
            raise FsError(READ_ONLY_VIEW, "jobs/ shows the service's batch jobs; it is read-only")

    # -- attributes -------------------------------------------------------------------

    def fresh_for(self, node: JobNode) -> float:
        """Seconds the kernel may keep what it was told of `node`."""
        if isinstance(node, JobsFolder):
            fetched = self._listed_at
        elif isinstance(node, JobFolder):
            fetched = node.fetched_at if node.fetched_at is not None else self._listed_at
        else:
            folder = self._folder_of(node)
            fetched = folder.fetched_at if folder is not None else None
        if fetched is None:
            return 0.0
        return max(0.0, fetched + self._namespace.dir_cache_time - trio.current_time())

    def attributes(self, node: JobNode, entry: pyfuse3.EntryAttributes) -> pyfuse3.EntryAttributes:
        """`entry` (with its owner, inode and I/O size set) completed for `node`."""
        seconds = self._started
        if isinstance(node, JobFile):
            entry.st_mode = stat.S_IFREG | 0o444
            entry.st_nlink = 1
            target = self.target(node)
            folder = self._folder_of(node)
            if node.file_id is None:
                entry.st_size = len(folder.status) if folder is not None else 0
                seconds = folder.status_time if folder is not None else seconds
            elif target is not None and target.remote is not None:
                entry.st_size, seconds = target.remote.bytes, target.remote.created_at
            entry.st_blocks = (entry.st_size + 511) // 512
        else:
            entry.st_mode = stat.S_IFDIR | 0o555
            entry.st_nlink = 2
            if isinstance(node, JobFolder):
                seconds = node.created_at
        entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = seconds * 10**9
        entry.entry_timeout = entry.attr_timeout = self.fresh_for(node)
        return entry
