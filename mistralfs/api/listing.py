"""Listing the account: pages of ``GET /v1/files``, and whole listings that end.

A listing is what ``ls`` waits on, so once the first page says how many files there
are, the other pages are fetched at once. A listing also ends whatever the service
says (see `Listing.list_all`), and one bad record is skipped or repaired with a
warning, never allowed to hide the others.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import trio

from mistralfs.api.calls import ApiCalls
from mistralfs.api.errors import ProtocolError, Unavailable
from mistralfs.api.lost_uploads import RecentFiles
from mistralfs.api.models import FilePage, RemoteFile
from mistralfs.api.retry import RetryPolicy
from mistralfs.api.upload_answer import SeenIds

logger = logging.getLogger(__name__)

# A listing is read no further than this many files (about 0.5 KiB of memory each):
# a server whose pages never end must not take all the memory there is.
MAX_LISTED_FILES = 500_000
MAX_ODD_RECORDS = 10_000  # bad listing records remembered, so that each is warned about once


def check_bounds(
    calls: ApiCalls, url: str, what: str, count: int, pages: int, limit: int, deadline: float
) -> None:
    """Stop a listing that goes on: ProtocolError past `limit` items (`what`), Unavailable
    (timed out) past `deadline`, the end of the retry policy's total budget."""
    if count >= limit:
        raise ProtocolError(f"the listing goes on past {limit} {what}", method="GET", url=url)
    if trio.current_time() >= deadline:
        late = Unavailable(
            f"the listing did not end within {calls.retry.total_budget:g}s "
            f"({count} {what} in {pages} pages)",
            method="GET",
            url=url,
        )
        late.timed_out = True
        raise late


class Listing:
    """Pages and whole listings; every file listed is noted in ``recent`` and ``seen``
    (what upload answers and lost uploads are checked against)."""

    def __init__(self, calls: ApiCalls, recent: RecentFiles, seen: SeenIds) -> None:
        self._calls = calls
        self._recent = recent
        self._seen = seen
        self._odd_records: set[str] = set()  # listed records already warned about

    async def list_files(
        self,
        *,
        purpose: str | None = None,
        page: int = 0,
        page_size: int = 100,
        search: str | None = None,
        sample_types: Sequence[str] = (),
        sources: Sequence[str] = (),
        mimetypes: Sequence[str] = (),
        include_total: bool = True,
        deadline: float | None = None,
        policy: RetryPolicy | None = None,
    ) -> FilePage:
        """One page of ``GET /v1/files``; array filters are sent as repeated keys.

        ``deadline`` (trio clock) bounds it, retries included, as in `_call`."""
        params: list[tuple[str, str]] = [
            ("page", str(page)),
            ("page_size", str(page_size)),
            ("include_total", "true" if include_total else "false"),
        ]
        if purpose is not None:
            params.append(("purpose", purpose))
        if search is not None:
            params.append(("search", search))
        params += [("sample_type", v) for v in sample_types]
        params += [("source", v) for v in sources]
        params += [("mimetypes", v) for v in mimetypes]
        data = await self._calls.json_call(
            "GET", "/v1/files", params=params, deadline=deadline, policy=policy
        )
        url = self._calls.url("/v1/files")
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise ProtocolError(
                "listing is not an object with a 'data' array", method="GET", url=url
            )
        files = self._listed_files(data["data"])
        self._recent.note(files)
        self._seen.note(files)
        total = data.get("total")
        if not isinstance(total, int) or isinstance(total, bool) or total < 0:
            total = None
        return FilePage(files=files, total=total)

    def _listed_files(self, items: list[object]) -> list[RemoteFile]:
        """The files of a listing page. One bad record must not hide the others: it is
        skipped, or repaired, with one WARNING naming it (the first time it is seen)."""
        files = []
        for item in items:
            notes: list[str] = []
            try:
                files.append(RemoteFile.from_json(item, notes))
            except ProtocolError as exc:
                self._warn_once(item, f"skipped: {exc.message}")
                continue
            if notes:
                self._warn_once(item, "; ".join(notes))
        return files

    def _warn_once(self, item: object, what: str) -> None:
        file_id = item.get("id") if isinstance(item, dict) else None
        name = file_id if isinstance(file_id, str) else repr(item)[:80]
        if name in self._odd_records:
            return
        if len(self._odd_records) >= MAX_ODD_RECORDS:
            self._odd_records.clear()
        self._odd_records.add(name)
        logger.warning("GET /v1/files: file %s in a listing: %s", name, what)

    async def list_all(
        self,
        *,
        purpose: str | None = None,
        page_size: int = 100,
        max_parallel: int = 8,
        search: str | None = None,
        sample_types: Sequence[str] = (),
        sources: Sequence[str] = (),
        mimetypes: Sequence[str] = (),
    ) -> list[RemoteFile]:
        """Every matching file, in the service's order, each id once.

        Page 0 comes first; once ``total`` is known all remaining pages are
        fetched at once (bounded by ``max_parallel``), because a listing is
        what ``ls`` waits on. Without ``total``, pages are read one by one
        until a short page.

        A listing ends, whatever the service says: at the pages ``total`` makes
        (and one more, for files added meanwhile), at a page that brings no file
        not seen, or past ``MAX_LISTED_FILES`` (ProtocolError); and all of it within
        the retry policy's ``total_budget`` (Unavailable), so that a listing nobody
        waits for any more stops too.
        """
        if page_size < 1:
            raise ValueError("page_size must be >= 1")
        filters: dict[str, Any] = {
            "purpose": purpose,
            "search": search,
            "sample_types": sample_types,
            "sources": sources,
            "mimetypes": mimetypes,
        }
        url = self._calls.url("/v1/files")
        deadline = trio.current_time() + self._calls.retry.total_budget
        filters["deadline"] = deadline
        first = await self.list_files(page=0, page_size=page_size, include_total=True, **filters)
        pages: dict[int, list[RemoteFile]] = {0: first.files}
        total = first.total
        if total is not None and total > MAX_LISTED_FILES:
            raise ProtocolError(
                f"the listing says it holds {total} files, more than the {MAX_LISTED_FILES} "
                "a listing is read for",
                method="GET",
                url=url,
            )
        if total is not None and len(first.files) < min(page_size, total) and first.files:
            # The service capped the page size: page offsets follow its size, not ours.
            logger.debug("page size capped by the service at %d", len(first.files))
            page_size = len(first.files)
        last_page = 0
        if total is not None and len(first.files) == page_size:
            n_pages = math.ceil(total / page_size)
            limiter = trio.CapacityLimiter(max(1, max_parallel))

            async def fetch(index: int) -> None:
                async with limiter:
                    result = await self.list_files(
                        page=index, page_size=page_size, include_total=False, **filters
                    )
                pages[index] = result.files

            async with trio.open_nursery() as nursery:
                for index in range(1, n_pages):
                    nursery.start_soon(fetch, index)
            last_page = max(0, n_pages - 1)

        # Sequential tail: no total, or more files appeared than ``total`` said. Page 0
        # alone is one consistent answer: if it holds all ``total`` files, that is all.
        complete = total is not None and len(first.files) >= total
        seen = {f.id for files in pages.values() for f in files}
        tail = 1 if total is not None else math.inf  # pages past those ``total`` makes
        while not complete and len(pages[last_page]) == page_size and tail > 0:
            check_bounds(self._calls, url, "files", len(seen), last_page + 1, MAX_LISTED_FILES,
                         deadline)  # fmt: skip
            last_page += 1
            tail -= 1
            result = await self.list_files(
                page=last_page, page_size=page_size, include_total=False, **filters
            )
            pages[last_page] = result.files
            new = {f.id for f in result.files} - seen
            if not new:  # a service ignoring ``page`` must not loop us forever
                break
            seen |= new

        out: list[RemoteFile] = []
        ids: set[str] = set()
        for index in sorted(pages):
            for f in pages[index]:
                if f.id not in ids:
                    ids.add(f.id)
                    out.append(f)
        return out

    async def list_page(self, params: list[tuple[str, str]], deadline: float) -> object:
        return await self._calls.json_call("GET", "/v1/files", params=params, deadline=deadline)
