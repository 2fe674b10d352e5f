"""The emulator's ASGI application: Files API routes, storage route, admin routes.

Public routes (all need ``Authorization: Bearer <key>``)::

    GET    /v1/files                    list (page, page_size, include_total, purpose,
                                        search, sample_type*, source*, mimetypes*)
    POST   /v1/files                    upload (multipart: file; optional purpose, expiry,
                                        visibility: see upload_params.py)
    GET    /v1/files/{id}               retrieve (with "deleted": false)
    DELETE /v1/files/{id}               delete
    GET    /v1/files/{id}/content       download (application/octet-stream)
    GET    /v1/files/{id}/url?expiry=H  signed URL, H in 1..168 hours (default 24)
    *      /v1/batch/jobs[/...]         batch jobs: list, create, get, delete, cancel
                                        (see batch_routes.py, batch_jobs.py)
    *      /v1/fine_tuning/jobs[/...]   410 Gone: the fine-tuning jobs API is retired

Signed URL route (HMAC in the query, see signing.py)::

    GET|HEAD /storage/{id}?se=..&sp=r&sig=..   Range -> 206, errors as Azure XML

A storage request that carries an ``Authorization`` header is refused (403
``InvalidAuthenticationInfo``) and logged: the API key must never leave for
the storage host.

Admin routes for tests and tools (same auth; never faulted, never in the request log)::

    POST   /v1/_emulator/batch-outputs  multipart file + sample_type (batch_result|batch_error)
    POST   /v1/_emulator/files          multipart file + purpose, source, sample_type, expiry,
                                        visibility: any file (e.g. source repository)
    POST   /v1/_emulator/faults         JSON rule or list of rules, or {"random": SPEC|null}
                                        (seeded random faults; see faults.py; answers
                                        that lie, see lies.py)
    GET    /v1/_emulator/faults         {"faults": [rules]} (+ "random": {...} while set)
    DELETE /v1/_emulator/faults         clear rules and random faults
    GET    /v1/_emulator/requests       {"count": N, "requests": [{method, path, query, status,
                                        range, time, fault}, ...]}; status 0 = no answer sent
    DELETE /v1/_emulator/requests       clear the log
    GET    /v1/_emulator/clock          {"now": unix seconds, "offset": seconds}
    POST   /v1/_emulator/clock          {"advance": SECONDS}: move the emulator's clock on
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from email.utils import formatdate
from typing import Any
from urllib.parse import quote

import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mistralfs.emulator import batch_routes, errors, signing
from mistralfs.emulator.batch_jobs import BatchJobs, JobStore
from mistralfs.emulator.config import EmulatorConfig
from mistralfs.emulator.faults import (
    Fault,
    FaultInjector,
    FaultSpecError,
    Kind,
    parse_plan,
    route_of,
    status_body,
)
from mistralfs.emulator.params import bool_param as _bool_param
from mistralfs.emulator.params import int_param as _int_param
from mistralfs.emulator.params import uuid_param
from mistralfs.emulator.requestlog import RequestLog
from mistralfs.emulator.storage import FileRecord, ListQuery, Storage
from mistralfs.emulator.transport import reset_connection
from mistralfs.emulator.upload import (
    MalformedUpload,
    UploadForm,
    UploadTooLarge,
    receive_upload,
)
from mistralfs.emulator.upload_params import parse_upload_params
from mistralfs.emulator.validation import (
    ContentError,
    count_jsonl_lines,
    describe_content,
    inspect_upload,
    sample_type_for,
)

log = logging.getLogger("mistralfs.emulator")

ADMIN_PREFIX = "/v1/_emulator/"
STREAM_CHUNK = 256 * 1024
MAX_EXPIRY_HOURS = 168
DRAIN_LIMIT = 1024 * 1024 * 1024
DRAIN_SECONDS = 120.0
# Files the service keeps for a repository are not the account's to delete. How the
# service refuses is not documented: a 403 in its usual shape (docs/EMULATOR.md).
UNDELETABLE_SOURCES = ("repository",)
UNDELETABLE_MESSAGE = "Files from a repository cannot be deleted"


# --- helpers -------------------------------------------------------------------------------


def _state(request: Request) -> tuple[Storage, EmulatorConfig]:
    return request.app.state.storage, request.app.state.config


def _file_id(request: Request) -> str:
    """The canonical UUID of the path's file id; 422 in FastAPI's shape otherwise."""
    return uuid_param(request, "file_id")


def _record(storage: Storage, file_id: str) -> FileRecord:
    record = storage.get(file_id)
    if record is None:
        raise HTTPException(404, "File not found")
    return record


async def _blob_stream(file: Any, start: int, length: int) -> AsyncIterator[bytes]:
    """Chunks of an open blob from ``start``; closes the file whatever happens."""
    try:
        await file.seek(start)
        remaining = length
        while remaining > 0:
            chunk = await file.read(min(STREAM_CHUNK, remaining))
            if not chunk:
                break
            remaining -= len(chunk)
            yield chunk
    finally:
        await file.aclose()


def parse_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """One ``bytes=`` range as inclusive (start, end), None to ignore, or "unsatisfiable".

    Malformed or multi-range headers are ignored (full 200 answer), as RFC 9110 allows.
    """
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    try:
        if first == "":
            suffix = int(last)
            if suffix < 0:
                return None
            if suffix == 0 or size == 0:
                return "unsatisfiable"
            return max(0, size - suffix), size - 1
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start < 0 or (end < start and last):
        return None
    if start >= size:
        return "unsatisfiable"
    return start, min(end, size - 1)


# --- Files API -----------------------------------------------------------------------------


async def list_files(request: Request) -> Response:
    """GET /v1/files: newest first; ``total`` is null with ``include_total=false``
    (older SDKs, which require it, never send that)."""
    storage, _ = _state(request)
    params = request.query_params
    query = ListQuery(
        page=_int_param(request, "page", 0, ge=0),
        page_size=_int_param(request, "page_size", 100, ge=1),
        purpose=params.get("purpose"),
        search=params.get("search"),
        sample_types=params.getlist("sample_type"),
        sources=params.getlist("source"),
        mimetypes=params.getlist("mimetypes"),
        include_total=_bool_param(request, "include_total", True),
    )
    await request.app.state.batch_jobs.move_all()  # outputs of jobs done by now show
    storage.purge_expired()
    records, total = storage.list(query)
    return JSONResponse({"data": [r.to_api() for r in records], "object": "list", "total": total})


@contextlib.asynccontextmanager
async def _streamed_form(request: Request) -> AsyncIterator[UploadForm | Response]:
    """The multipart body, its file part streamed to a temp file removed afterwards.

    Yields the error answer instead (413 past the size limit, 400 if unparsable).
    """
    storage, config = _state(request)
    temp = storage.new_temp_path()
    try:
        try:
            yield await receive_upload(request, temp, config.max_file_size)
        except UploadTooLarge:
            yield errors.detail(
                413,
                f"File too large: maximum size is {config.max_file_size} bytes",
                headers={"Connection": "close"},
            )
        except MalformedUpload:
            yield errors.detail(400, "There was an error parsing the body")
    finally:
        with trio.CancelScope(shield=True):
            await trio.Path(temp).unlink(missing_ok=True)


async def upload_file(request: Request) -> Response:
    """POST /v1/files: stream to a temp file, validate per purpose, then publish atomically.

    Only ``file`` is required; see upload_params.py for the others' defaults."""
    storage, config = _state(request)
    async with _streamed_form(request) as form:
        if isinstance(form, Response):
            return form
        problems = []
        if form.file_path is None and "file" in form.fields:
            problems.append(errors.not_a_file(["body", "file"], form.fields["file"]))
        elif form.file_path is None:
            problems.append(errors.missing(["body", "file"]))
        params, invalid = parse_upload_params(form.fields)
        problems += invalid
        purpose = params.purpose
        if problems:
            return errors.validation_response(problems)
        assert form.file_path is not None and form.filename is not None
        try:
            info = await trio.to_thread.run_sync(
                inspect_upload, form.file_path, form.filename, purpose
            )
        except ContentError as exc:
            return JSONResponse(exc.body, status_code=exc.status)
        record = storage.add_file(
            form.file_path,
            move=True,
            filename=form.filename,
            purpose=purpose,
            sample_type=info.sample_type,
            source="upload",
            num_lines=info.num_lines,
            mimetype=info.mimetype,
            signature=info.md5,
            expires_at=params.expires_at(storage.clock.now(), config.expiry_unit),
            visibility=params.visibility,
        )
        log.info("stored %s (%d bytes, purpose %s)", record.id, record.bytes, purpose)
        return JSONResponse(record.to_api())


async def retrieve_file(request: Request) -> Response:
    """GET /v1/files/{id}: the File object plus ``"deleted": false``."""
    storage, _ = _state(request)
    record = _record(storage, _file_id(request))
    return JSONResponse({**record.to_api(), "deleted": False})


async def delete_file(request: Request) -> Response:
    """DELETE /v1/files/{id}."""
    storage, _ = _state(request)
    file_id = _file_id(request)
    if _record(storage, file_id).source in UNDELETABLE_SOURCES:
        return errors.detail(403, UNDELETABLE_MESSAGE)
    if not storage.delete(file_id):
        raise HTTPException(404, "File not found")
    return JSONResponse({"id": file_id, "object": "file", "deleted": True})


async def download_file(request: Request) -> Response:
    """GET /v1/files/{id}/content: the whole blob, streamed from disk."""
    storage, _ = _state(request)
    record = _record(storage, _file_id(request))
    headers = {
        "Content-Length": str(record.bytes),
        "Content-Disposition": f"attachment; filename*=UTF-8''{quote(record.filename)}",
    }
    try:
        if record.bytes <= STREAM_CHUNK:
            # A small blob is read at once: worker-thread round trips would cost more.
            with open(storage.blob_path(record.id), "rb") as f:  # noqa: ASYNC230
                body = f.read(record.bytes)
            return Response(body, media_type="application/octet-stream", headers=headers)
        blob = await trio.open_file(storage.blob_path(record.id), "rb")
    except FileNotFoundError:
        raise HTTPException(404, "File not found") from None
    return StreamingResponse(
        _blob_stream(blob, 0, record.bytes),
        media_type="application/octet-stream",
        headers=headers,
    )


async def signed_url(request: Request) -> Response:
    """GET /v1/files/{id}/url: a storage URL on the host the request came in on.

    With ``config.storage_url`` set, the URL is on that base instead (see signing.py).
    """
    storage, config = _state(request)
    file_id = _file_id(request)
    expiry = _int_param(request, "expiry", 24, ge=1, le=MAX_EXPIRY_HOURS)
    record = _record(storage, file_id)
    expires_at = int(time.time()) + expiry * 3600
    url = signing.signed_url(
        str(request.base_url), storage.secret, record.id, expires_at, config.storage_url
    )
    return JSONResponse({"url": url})


# --- retired APIs --------------------------------------------------------------------------

RETIRED_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]


async def fine_tuning_jobs_retired(request: Request) -> Response:
    """/v1/fine_tuning/jobs[/...]: the fine-tuning jobs API is retired (API-NOTES). The
    files it took (purpose fine-tune) stay in accounts and are served as ever."""
    return errors.detail(
        410,
        "The fine-tuning jobs API has been retired: fine-tuning jobs can no longer be "
        "created, listed or managed. Existing fine-tune files remain available.",
    )


# --- storage (signed URLs) -----------------------------------------------------------------


async def storage_blob(request: Request) -> Response:
    """GET/HEAD /storage/{id}: blob-storage semantics, no API key, Range support."""
    storage, _ = _state(request)
    if "authorization" in request.headers:
        # Never log the header's value: it is most likely the API key.
        log.warning(
            "refused %s %s: it carries an Authorization header (the API key must never "
            "be sent to the storage host)",
            request.method,
            request.url.path,
        )
        return errors.azure_error(
            403,
            "InvalidAuthenticationInfo",
            "Authentication information is not given in the correct format. Check the value "
            "of Authorization header. A signed URL must be used without an Authorization header.",
        )
    reason = signing.check(
        storage.secret,
        request.url.path,
        request.query_params.get("se"),
        request.query_params.get("sig"),
    )
    if reason:
        return errors.azure_error(
            403,
            "AuthenticationFailed",
            "Server failed to authenticate the request. Make sure the value of Authorization "
            f"header is formed correctly including the signature. {reason}",
        )
    not_found = errors.azure_error(404, "BlobNotFound", "The specified blob does not exist.")
    try:
        file_id = str(uuid.UUID(request.path_params["file_id"]))
    except ValueError:
        return not_found
    record = storage.get(file_id)
    if record is None:
        return not_found
    size = record.bytes
    headers = {
        "Accept-Ranges": "bytes",
        "ETag": record.etag,
        "Last-Modified": formatdate(record.created_at, usegmt=True),
        "x-ms-blob-type": "BlockBlob",
    }
    media_type = record.mimetype or "application/octet-stream"
    wanted = parse_range(request.headers.get("range"), size)
    if wanted == "unsatisfiable":
        response = errors.azure_error(
            416,
            "InvalidRange",
            "The range specified is invalid for the current size of the resource.",
        )
        response.headers.update({**headers, "Content-Range": f"bytes */{size}"})
        return response
    if wanted is None:
        status, start, length = 200, 0, size
    else:
        assert isinstance(wanted, tuple)
        start, end = wanted
        status, length = 206, end - start + 1
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    headers["Content-Length"] = str(length)
    if request.method == "HEAD":
        return Response(b"", status_code=status, headers=headers, media_type=media_type)
    try:
        blob = await trio.open_file(storage.blob_path(file_id), "rb")
    except FileNotFoundError:
        return not_found
    return StreamingResponse(
        _blob_stream(blob, start, length),
        status_code=status,
        headers=headers,
        media_type=media_type,
    )


# --- admin ---------------------------------------------------------------------------------


async def add_batch_output(request: Request) -> Response:
    """POST /v1/_emulator/batch-outputs: create a batch job output file (source mistral)."""
    storage, _ = _state(request)
    async with _streamed_form(request) as form:
        if isinstance(form, Response):
            return form
        if form.file_path is None:
            return errors.validation_response([errors.missing(["body", "file"])])
        sample_type = form.fields.get("sample_type") or "batch_result"
        if sample_type not in ("batch_result", "batch_error"):
            return errors.validation_response(
                [errors.enum(["body", "sample_type"], sample_type, ("batch_result", "batch_error"))]
            )
        num_lines = await trio.to_thread.run_sync(count_jsonl_lines, form.file_path)
        record = storage.add_file(
            form.file_path,
            move=True,
            filename=form.filename or "output.jsonl",
            purpose="batch",
            sample_type=sample_type,
            source="mistral",
            num_lines=num_lines,
            mimetype="application/jsonl",
            signature=None,
        )
        return JSONResponse(record.to_api())


SOURCES = ("upload", "repository", "mistral")


async def add_any_file(request: Request) -> Response:
    """POST /v1/_emulator/files: a file as the service may hold it, content unchecked.

    Multipart ``file``; optional ``purpose``, ``expiry``, ``visibility`` (as uploads take
    them), ``source`` (upload | repository | mistral; default repository) and
    ``sample_type`` (default: what an upload of that purpose gets)."""
    storage, config = _state(request)
    async with _streamed_form(request) as form:
        if isinstance(form, Response):
            return form
        params, problems = parse_upload_params(form.fields)
        if form.file_path is None:
            problems.insert(0, errors.missing(["body", "file"]))
        source = form.fields.get("source") or "repository"
        if source not in SOURCES:
            problems.append(errors.enum(["body", "source"], source, SOURCES))
        if problems:
            return errors.validation_response(problems)
        assert form.file_path is not None
        filename = form.filename or "file"
        info = await trio.to_thread.run_sync(describe_content, form.file_path, filename)
        record = storage.add_file(
            form.file_path,
            move=True,
            filename=filename,
            purpose=params.purpose,
            sample_type=form.fields.get("sample_type") or sample_type_for(params.purpose),
            source=source,
            num_lines=info.num_lines,
            mimetype=info.mimetype,
            signature=info.md5,
            expires_at=params.expires_at(storage.clock.now(), config.expiry_unit),
            visibility=params.visibility,
        )
        return JSONResponse(record.to_api())


async def faults_route(request: Request) -> Response:
    """POST adds rules (object or list) or sets random faults, DELETE clears, GET shows."""
    injector: FaultInjector = request.app.state.faults
    if request.method == "POST":
        try:
            spec = json.loads(await request.body())
            if isinstance(spec, dict) and "random" in spec:
                if set(spec) != {"random"}:
                    raise FaultSpecError('"random" must be the only field of its object')
                plan = None if spec["random"] is None else parse_plan(spec["random"])
                injector.set_random(plan)
                log.info("random faults: %s", plan.describe() if plan else "off")
            else:
                specs = spec if isinstance(spec, list) else [spec]
                new = [Fault.from_json(s) for s in specs]
                for fault in new:
                    injector.add(fault)
        except (ValueError, FaultSpecError) as exc:
            return errors.detail(422, f"Invalid fault: {exc}")
    elif request.method == "DELETE":
        injector.clear()
    body: dict[str, Any] = {"faults": [f.describe() for f in injector.active()]}
    if injector.random is not None:
        body["random"] = injector.random.describe()
    return JSONResponse(body)


async def clock_route(request: Request) -> Response:
    """GET the emulator's clock; POST ``{"advance": SECONDS}`` moves it forward (files
    expire, batch jobs' timestamps follow it)."""
    storage, _ = _state(request)
    if request.method == "POST":
        try:
            spec = json.loads(await request.body())
            seconds = spec.get("advance") if isinstance(spec, dict) else None
            if isinstance(seconds, bool) or not isinstance(seconds, int | float):
                raise ValueError('expected {"advance": SECONDS}')
            storage.clock.advance(seconds)
        except ValueError as exc:
            return errors.detail(422, f"Invalid clock change: {exc}")
    return JSONResponse({"now": storage.clock.time(), "offset": storage.clock.offset})


async def requests_route(request: Request) -> Response:
    """GET the request log, DELETE to clear it."""
    requests_log: RequestLog = request.app.state.requests
    if request.method == "DELETE":
        requests_log.clear()
    return JSONResponse(requests_log.to_json())


# --- middleware ----------------------------------------------------------------------------


async def _drain(receive: Receive) -> None:
    """Discard the unread rest of a request body, within bounds, before answering.

    A response decided before the body was read (413, 401, 422, an injected
    fault) must still reach HTTP/1.1 clients that write the whole body before
    reading, such as httpx. Hypercorn closes the connection as soon as such a
    response is complete, and the client then only sees a reset; so the rest
    of the body is read and thrown away (never stored) first. Past DRAIN_LIMIT
    bytes or DRAIN_SECONDS the answer is sent anyway.
    """
    drained = 0
    with trio.move_on_after(DRAIN_SECONDS):
        while drained <= DRAIN_LIMIT:
            message = await receive()
            if message["type"] != "http.request":
                return
            drained += len(message.get("body", b""))
            if not message.get("more_body", False):
                return


def _has_body(scope: Scope) -> bool:
    """Whether the request announces a body (so there may be something to drain)."""
    for name, value in scope.get("headers", []):
        if name == b"transfer-encoding":
            return True
        if name == b"content-length":
            return value.strip() not in (b"", b"0")
    return False


FAULT_KEY = "mistralfs.fault"  # scope key: the random fault kind applied to a request
NO_ANSWER_KEY = "mistralfs.no_answer"  # scope key: a fault dropped the connection on purpose
BAD_JSON_BODY = b"<!DOCTYPE html><html><body><h1>Service temporarily unavailable</h1></body></html>"
RESET_WAIT_SECONDS = 5.0
STORAGE_FAULT_CODES = {
    403: "AuthenticationFailed",
    404: "BlobNotFound",
    429: "ServerBusy",
    503: "ServerBusy",
}


class ObserveMiddleware:
    """Outermost layer: logs each request and records it in the request log."""

    def __init__(self, app: ASGIApp, requests_log: RequestLog) -> None:
        self.app = app
        self.requests_log = requests_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body_done = not _has_body(scope)
        recorded = False

        def record(status: int) -> None:
            # At response start, so a client that got its answer finds it in the log.
            nonlocal recorded
            recorded = True
            path: str = scope["path"]
            method: str = scope["method"]
            fault: str | None = scope.get(FAULT_KEY)
            is_storage = path.startswith(signing.STORAGE_PREFIX)
            query = "" if is_storage else scope.get("query_string", b"").decode("latin-1")
            log.info(
                "%s %s%s %s%s",
                method,
                path,
                f"?{query}" if query else "",
                status or "(no answer)",
                f" [fault {fault}]" if fault else "",
            )
            if not path.startswith(ADMIN_PREFIX):
                range_header = None
                for name, value in scope.get("headers", []):
                    if name == b"range":
                        range_header = value.decode("latin-1")
                self.requests_log.record(method, path, query, status, range_header, fault)

        async def send_wrapper(message: Message) -> None:
            nonlocal body_done
            if message["type"] == "http.response.start":
                if not body_done:
                    body_done = True
                    await _drain(receive)
                record(message["status"])
            await send(message)

        async def receive_wrapper() -> Message:
            nonlocal body_done
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                body_done = True
            return message

        try:
            await self.app(scope, receive_wrapper, send_wrapper)
        finally:
            if not recorded:
                record(0 if scope.get(NO_ANSWER_KEY) else 500)


class _CutShort(Exception):
    """Raised through the app's send to stop a response the ``cut`` fault truncated."""


def _only_cut(exc: BaseException) -> bool:
    if isinstance(exc, _CutShort):
        return True
    if isinstance(exc, BaseExceptionGroup):
        _, rest = exc.split(_CutShort)
        return rest is None
    return False


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class FaultMiddleware:
    """Applies deterministic rules, else seeded random faults; admin routes are exempt."""

    def __init__(self, app: ASGIApp, injector: FaultInjector) -> None:
        self.app = app
        self.injector = injector

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(ADMIN_PREFIX):
            await self.app(scope, receive, send)
            return
        fault = self.injector.take(scope["method"], scope["path"])
        if fault is None:
            kind = self.injector.draw(scope["method"], scope["path"])
            if kind is None:
                await self.app(scope, receive, send)
            else:
                scope[FAULT_KEY] = str(kind)
                await self._random(kind, scope, receive, send)
            return
        if fault.delay:
            await trio.sleep(fault.delay)
        if fault.lie is not None:
            await fault.lie.tell(self.app, scope, receive, send)
            return
        if fault.status is None:
            await self.app(scope, receive, send)
            return
        status, headers, body = fault.response()
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _random(self, kind: Kind, scope: Scope, receive: Receive, send: Send) -> None:
        if kind.name == "status":
            assert kind.status is not None
            await self._status(kind, scope, receive, send)
        elif kind.name == "stall":
            assert kind.seconds is not None
            await trio.sleep(kind.seconds)
            await self.app(scope, receive, send)
        elif kind.name == "reset":
            await _drain(receive)
            await self._reset(scope, receive)
        elif kind.name == "lost":
            await self._lost(scope, receive)
        elif kind.name == "cut":
            await self._cut(scope, receive, send)
        elif kind.name == "badjson":
            await self._bad_json(scope, receive, send)
        else:  # pragma: no cover - parse_plan only builds the kinds above
            raise AssertionError(kind)

    async def _status(self, kind: Kind, scope: Scope, receive: Receive, send: Send) -> None:
        assert kind.status is not None
        extra: dict[str, str] = {}
        if kind.status == 429:
            extra["retry-after"] = _retry_after(kind.seconds or 0)
        if route_of(scope["method"], scope["path"]) == "storage":
            response = errors.azure_error(
                kind.status,
                STORAGE_FAULT_CODES.get(kind.status, "InternalError"),
                "Injected fault.",
            )
            response.headers.update(extra)
            await response(scope, receive, send)
            return
        headers, body = status_body(kind.status)
        headers += [(k.encode(), v.encode()) for k, v in extra.items()]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": kind.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _reset(self, scope: Scope, receive: Receive) -> None:
        """Drop the connection without an answer, then wait until the server noticed."""
        scope[NO_ANSWER_KEY] = True
        if not reset_connection(scope):
            scope[NO_ANSWER_KEY] = False
            return  # the server answers 500 for an app that sent nothing
        with trio.move_on_after(RESET_WAIT_SECONDS):
            while (await receive())["type"] != "http.disconnect":
                pass

    async def _lost(self, scope: Scope, receive: Receive) -> None:
        """Process the request completely (side effects happen), then reset."""

        async def swallow(message: Message) -> None:
            pass

        await self.app(scope, receive, swallow)
        await self._reset(scope, receive)

    async def _cut(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Send the headers and about half the body, then close the connection."""
        state: dict[str, Any] = {"cut_at": None, "sent": 0, "reset": False}

        async def cutting_send(message: Message) -> None:
            if state["reset"]:
                return
            if message["type"] == "http.response.start":
                length = _content_length(list(message.get("headers", [])))
                if scope["method"] == "HEAD" or length == 0:
                    state["reset"] = True  # nothing to cut: drop the connection instead
                    return
                state["cut_at"] = None if length is None else length // 2
                await send(message)
                return
            if message["type"] != "http.response.body":
                await send(message)
                return
            body: bytes = message.get("body", b"")
            if state["cut_at"] is None:
                if not body:
                    if not message.get("more_body", False):
                        raise _CutShort()
                    return
                state["cut_at"] = len(body) // 2
            room = state["cut_at"] - state["sent"]
            if len(body) < room:
                state["sent"] += len(body)
                await send({"type": "http.response.body", "body": body, "more_body": True})
                if not message.get("more_body", False):
                    raise _CutShort()
                return
            if room > 0:
                await send({"type": "http.response.body", "body": body[:room], "more_body": True})
            raise _CutShort()

        try:
            await self.app(scope, receive, cutting_send)
        except BaseException as exc:
            if not _only_cut(exc):
                raise
            # Returning with the body incomplete makes the server close the connection.
            log.info("cut %s %s after %d bytes", scope["method"], scope["path"], state["sent"])
            return
        if state["reset"]:
            await self._reset(scope, receive)

    async def _bad_json(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Process the request, then answer 200 with a body that is not JSON."""

        async def replacing_send(message: Message) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                headers = [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(BAD_JSON_BODY)).encode()),
                ]
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                await send({"type": "http.response.body", "body": BAD_JSON_BODY})

        await self.app(scope, receive, replacing_send)


def _retry_after(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else repr(float(seconds))


class AuthMiddleware:
    """Every /v1 route needs ``Authorization: Bearer <key>``, compared in constant time."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (scope["path"] == "/v1" or scope["path"].startswith("/v1/")):
            given = b""
            for name, value in scope.get("headers", []):
                if name == b"authorization":
                    given = value
            scheme, _, token = given.partition(b" ")
            normalized = b"Bearer " + token.strip() if scheme.lower() == b"bearer" else b""
            if not hmac.compare_digest(normalized, self.expected):
                response = JSONResponse({"detail": "Unauthorized"}, status_code=401)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


# --- assembly ------------------------------------------------------------------------------


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, errors.ValidationFailed)
    return errors.validation_response(exc.errors)


def create_app(config: EmulatorConfig, storage: Storage | None = None) -> Starlette:
    """The ASGI app over ``config.data_dir`` (or an already open ``storage``)."""
    if not config.api_key:
        raise ValueError("the emulator needs an API key")
    storage = storage or Storage(config.data_dir)
    routes = [
        Route("/v1/files", list_files, methods=["GET"]),
        Route("/v1/files", upload_file, methods=["POST"]),
        Route("/v1/files/{file_id}", retrieve_file, methods=["GET"]),
        Route("/v1/files/{file_id}", delete_file, methods=["DELETE"]),
        Route("/v1/files/{file_id}/content", download_file, methods=["GET"]),
        Route("/v1/files/{file_id}/url", signed_url, methods=["GET"]),
        Route("/storage/{file_id}", storage_blob, methods=["GET", "HEAD"]),
        Route("/v1/batch/jobs", batch_routes.list_jobs, methods=["GET"]),
        Route("/v1/batch/jobs", batch_routes.create_job, methods=["POST"]),
        Route("/v1/batch/jobs/{job_id}", batch_routes.get_job, methods=["GET"]),
        Route("/v1/batch/jobs/{job_id}", batch_routes.delete_job, methods=["DELETE"]),
        Route("/v1/batch/jobs/{job_id}/cancel", batch_routes.cancel_job, methods=["POST"]),
        Route("/v1/fine_tuning/jobs", fine_tuning_jobs_retired, methods=RETIRED_METHODS),
        Route(
            "/v1/fine_tuning/jobs/{rest:path}", fine_tuning_jobs_retired, methods=RETIRED_METHODS
        ),
        Route(ADMIN_PREFIX + "batch-outputs", add_batch_output, methods=["POST"]),
        Route(ADMIN_PREFIX + "files", add_any_file, methods=["POST"]),
        Route(ADMIN_PREFIX + "faults", faults_route, methods=["GET", "POST", "DELETE"]),
        Route(ADMIN_PREFIX + "requests", requests_route, methods=["GET", "DELETE"]),
        Route(ADMIN_PREFIX + "clock", clock_route, methods=["GET", "POST"]),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={
            HTTPException: _http_error,
            errors.ValidationFailed: _validation_error,
        },
    )
    app.state.config = config
    app.state.storage = storage
    app.state.batch_jobs = BatchJobs(
        JobStore(config.data_dir), storage, storage.clock, config.batch_delay
    )
    app.state.faults = FaultInjector(parse_plan(config.faults) if config.faults else None)
    app.state.requests = RequestLog()
    app.add_middleware(AuthMiddleware, api_key=config.api_key)
    app.add_middleware(FaultMiddleware, injector=app.state.faults)
    app.add_middleware(ObserveMiddleware, requests_log=app.state.requests)
    return app
