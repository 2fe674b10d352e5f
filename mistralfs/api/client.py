"""The async Files API client: the one object the filesystem talks to.

`FilesClient` puts together the parts, each its own module:
- calls.py: how every request is made (one httpx client over one transport, the key
  for the API's origin only, timeouts, retries, the error mapping, the counts);
- listing.py: listing the account;
- uploads.py: whole and growing uploads, and finding what a lost upload stored;
- storage.py: reading byte ranges of signed URLs;
- batch_jobs.py: listing batch jobs and reading one (read only);
and the small endpoints below (one file's metadata, its content, its signed URL,
deleting it). protocol.py says what of it the filesystem uses.

Security rules enforced here rather than left to callers:
- the API key is attached per request, and only when the request goes to the
  server URL's own origin; signed-URL reads never carry it, whatever host
  they point at;
- nothing logged or kept on an error contains a signed URL's query string.
"""

from __future__ import annotations

import logging
import pathlib
import time
from types import TracebackType
from typing import Self
from urllib.parse import quote

import httpx
import trio

from mistralfs import __version__
from mistralfs.api.batch_jobs import BatchJobs
from mistralfs.api.calls import (
    MAX_ERROR_BODY,
    MAX_JSON_BODY,
    ApiCalls,
    RequestStats,
    parse_json,
    read_bounded,
)
from mistralfs.api.errors import ApiError, ProtocolError
from mistralfs.api.listing import Listing
from mistralfs.api.lost_uploads import RecentFiles, StoredFileSearch
from mistralfs.api.models import RemoteFile, SignedUrl
from mistralfs.api.retry import RetryPolicy
from mistralfs.api.storage import StorageReads
from mistralfs.api.upload_answer import SeenIds
from mistralfs.api.upload_body import CHUNK_SIZE
from mistralfs.api.uploads import MAX_UPLOAD_BYTES, Uploads

logger = logging.getLogger(__name__)


class FilesClient:
    """Async client for the Mistral Files API (``/v1/files``) and its signed URLs.

    ``transport`` replaces the network transport (tests: httpx.MockTransport).
    ``ca_file`` (PEM) is the only trust of every connection when given; else see tls.py.
    """

    def __init__(
        self,
        server_url: str,
        api_key: str,
        *,
        retry: RetryPolicy | None = None,
        timeout: float = 30.0,
        user_agent: str = f"mistralfs/{__version__}",
        max_upload_bytes: int | None = MAX_UPLOAD_BYTES,
        transport: httpx.AsyncBaseTransport | None = None,
        ca_file: pathlib.Path | None = None,
    ) -> None:
        calls = ApiCalls(
            server_url,
            api_key,
            retry=retry,
            timeout=timeout,
            user_agent=user_agent,
            transport=transport,
            ca_file=ca_file,
        )
        self._calls = calls
        recent = RecentFiles()
        self._seen = SeenIds()  # to refuse an upload answer that names a known file
        self._listing = Listing(calls, recent, self._seen)
        stored_search = StoredFileSearch(self._listing.list_page, calls.url("/v1/files"), recent)
        self._uploads = Uploads(calls, recent, self._seen, stored_search, max_upload_bytes)
        self._storage = StorageReads(calls)
        self._batch_jobs = BatchJobs(calls)
        # The parts' endpoints, as they are (their modules say what each does).
        self.list_files = self._listing.list_files
        self.list_all = self._listing.list_all
        self.upload = self._uploads.upload
        self.growing_upload = self._uploads.growing_upload
        self.find_upload = self._uploads.find_upload
        self.read_range = self._storage.read_range
        self.read_range_pieces = self._storage.read_range_pieces
        self.connect_ahead = self._storage.connect_ahead
        self.list_batch_jobs = self._batch_jobs.list_batch_jobs
        self.get_batch_job = self._batch_jobs.get_batch_job
        # The signed URL handed out last: its host is where content is read from, known
        # before the next file's URL comes (the reader opens connections to it ahead).
        self.storage_url: str | None = None

    @property
    def server_url(self) -> str:
        return self._calls.base

    @property
    def retry_policy(self) -> RetryPolicy:
        return self._calls.retry

    @property
    def stats(self) -> RequestStats:
        return self._calls.stats

    @property
    def sends_growing_uploads(self) -> bool:
        """Whether `growing_upload` may be used (see uploads.py)."""
        return self._uploads.sends_growing_uploads

    async def aclose(self) -> None:
        await self._calls.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def idle_connections(self, url: str | None = None) -> int:
        """Connections kept open for reuse, to the origin of `url` or to all (0 when
        the transport was replaced)."""
        transport = self._calls.transport
        return transport.idle_connections(url) if transport is not None else 0

    # ------------------------------------------------------------ one file's endpoints

    async def retrieve(self, file_id: str) -> RemoteFile:
        """``GET /v1/files/{id}``: metadata of one file (``deleted`` may be set)."""
        path = f"/v1/files/{quote(file_id, safe='')}"
        data = await self._calls.json_call("GET", path)
        found = self._calls.file_from(data, "GET", path)
        self._seen.note((found,))
        return found

    async def delete(self, file_id: str) -> None:
        """``DELETE /v1/files/{id}``.

        A 404 on a retry (after an attempt whose outcome was unknown) counts
        as success: the first attempt most likely deleted it.
        """
        path = f"/v1/files/{quote(file_id, safe='')}"
        url = self._calls.url(path)

        async def handle(response: httpx.Response, n: int) -> object:
            if response.status_code == 404:
                body = await read_bounded(response, MAX_ERROR_BODY)
                if n > 1:
                    logger.info("DELETE %s: 404 on retry; treating as already deleted", path)
                    return None
                raise self._calls.error(response, body, "DELETE", url, storage=False)
            data = await read_bounded(response, MAX_JSON_BODY)
            return parse_json(data, response, "DELETE", url)

        # 404 reaches ``handle`` so that it can tell a first attempt from a retry.
        data = await self._calls.call(
            "DELETE", url, handle, pass_statuses=(404,), answer_limit=MAX_JSON_BODY
        )
        if isinstance(data, dict) and data.get("deleted") is False:
            raise ProtocolError("service answered deleted: false", method="DELETE", url=url)

    async def download(self, file_id: str, dest: pathlib.Path) -> int:
        """``GET /v1/files/{id}/content`` streamed into ``dest`` (rewritten on each retry).

        Returns the number of bytes written. On failure ``dest`` may hold a
        partial copy; the caller owns it.
        """
        path = f"/v1/files/{quote(file_id, safe='')}/content"

        async def handle(response: httpx.Response, n: int) -> int:
            written = 0
            async with await trio.open_file(dest, "wb") as out:
                async for chunk in response.aiter_bytes(CHUNK_SIZE):
                    await out.write(chunk)
                    written += len(chunk)
            return written

        # Redirects are followed (the service may hand off to storage); httpx
        # drops Authorization when a redirect leaves the API's origin.
        return await self._calls.call("GET", self._calls.url(path), handle, follow_redirects=True)

    async def content(self, file_id: str, size: int) -> bytes:
        """``GET /v1/files/{id}/content`` of a small file, in memory: one request in all.

        ``size`` is the file's listed size; more than that is refused, never read.
        """
        path = f"/v1/files/{quote(file_id, safe='')}/content"
        url = self._calls.url(path)

        async def handle(response: httpx.Response, n: int) -> bytes:
            data = await read_bounded(response, size + 1)
            if len(data) != size:
                raise ProtocolError(
                    f"expected {size} bytes of content, got {len(data)}"
                    + (" or more" if len(data) > size else ""),
                    status=response.status_code,
                    method="GET",
                    url=url,
                )
            return data

        return await self._calls.call(
            "GET", url, handle, follow_redirects=True, answer_limit=max(size + 1, MAX_ERROR_BODY)
        )

    async def signed_url(self, file_id: str, expiry_hours: int = 24) -> SignedUrl:
        """``GET /v1/files/{id}/url?expiry=H``; ``expires_at`` is estimated from request time."""
        path = f"/v1/files/{quote(file_id, safe='')}/url"
        requested_at = time.time()
        data = await self._calls.json_call("GET", path, params=[("expiry", str(expiry_hours))])
        url = data.get("url") if isinstance(data, dict) else None
        if not isinstance(url, str) or "://" not in url:
            raise ProtocolError(
                "signed URL answer has no usable 'url'", method="GET", url=self._calls.url(path)
            )
        self.storage_url = url
        return SignedUrl(url=url, expires_at=requested_at + expiry_hours * 3600)

    async def check_auth(self, retry: RetryPolicy | None = None) -> None:
        """A cheap authenticated call, so ``mount`` fails early on a bad key or no network;
        ``retry`` replaces the client's retry policy for it."""
        deadline = trio.current_time() + retry.total_budget if retry is not None else None
        await self.list_files(page_size=1, include_total=False, deadline=deadline, policy=retry)

    async def warm_up(self) -> None:
        """Open the connections that the first listing and the first read will need:
        one to the API, and one to the storage host that serves the account's content
        (learnt from one file's signed URL). On a long link each costs several round
        trips (TCP, then TLS), which a user would otherwise wait for at the first `ls`
        and the first read. Two requests; errors are left to the calls that follow."""
        try:
            page = await self.list_files(page_size=1, include_total=False)
            if page.files:
                url = await self.signed_url(page.files[0].id)
                await self.connect_ahead(url.url)
        except ApiError as exc:
            logger.debug("no connections opened ahead: %s", exc)
