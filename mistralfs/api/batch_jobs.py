"""Batch jobs (``/v1/batch/jobs``), read only: the jobs behind the account's batch outputs.

The mount shows jobs beside the files they read and wrote; it never creates or cancels
one, so only listing and one job's details are here. A listing ends whatever the
service says, as file listings do (listing.py): at a short page, at the pages its
``total`` makes, at a page with no job not seen, past `MAX_LISTED_JOBS`, and within the
retry policy's total budget.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from urllib.parse import quote

import trio

from mistralfs.api.calls import ApiCalls
from mistralfs.api.errors import ProtocolError
from mistralfs.api.listing import check_bounds
from mistralfs.api.models import BatchJob

logger = logging.getLogger(__name__)

JOBS_PATH = "/v1/batch/jobs"
MAX_LISTED_JOBS = 100_000


class BatchJobs:
    """Listing batch jobs and reading one."""

    def __init__(self, calls: ApiCalls) -> None:
        self._calls = calls

    async def list_batch_jobs(
        self, *, statuses: Sequence[str] = (), page_size: int = 100
    ) -> list[BatchJob]:
        """Every job (of these statuses), newest first, each id once. A record that is not
        a usable job is skipped with a warning, never allowed to hide the others."""
        if page_size < 1:
            raise ValueError("page_size must be >= 1")
        url = self._calls.url(JOBS_PATH)
        deadline = trio.current_time() + self._calls.retry.total_budget
        jobs: dict[str, BatchJob] = {}
        page = 0
        while True:
            params = [("page", str(page)), ("page_size", str(page_size))]
            params += [("status", s) for s in statuses]
            data = await self._calls.json_call("GET", JOBS_PATH, params=params, deadline=deadline)
            items = data.get("data") if isinstance(data, dict) else None
            if items is None and isinstance(data, dict) and "total" in data:
                items = []  # the SDK's model has `data` optional
            if not isinstance(items, list):
                raise ProtocolError(
                    "batch job listing is not an object with a 'data' array", method="GET", url=url
                )
            new = 0
            for item in items:
                try:
                    job = BatchJob.from_json(item)
                except ProtocolError as exc:
                    logger.warning("GET %s: a batch job record skipped: %s", JOBS_PATH, exc.message)
                    continue
                if job.id not in jobs:
                    jobs[job.id] = job
                    new += 1
            total = data.get("total") if isinstance(data, dict) else None
            if not isinstance(total, int) or isinstance(total, bool):
                total = None
            if len(items) < page_size or not new or (total is not None and len(jobs) >= total):
                return list(jobs.values())
            check_bounds(self._calls, url, "batch jobs", len(jobs), page + 1, MAX_LISTED_JOBS,
                         deadline)  # fmt: skip
            page += 1

    async def get_batch_job(self, job_id: str) -> BatchJob:
        """``GET /v1/batch/jobs/{id}``: one job as it is now."""
        path = f"{JOBS_PATH}/{quote(job_id, safe='')}"
        data = await self._calls.json_call("GET", path)
        try:
            return BatchJob.from_json(data)
        except ProtocolError as exc:
            raise ProtocolError(exc.message, method="GET", url=self._calls.url(path)) from None
