"""Streaming multipart parsing of uploads straight to a temp file.

Starlette's ``request.form()`` spools parts without a bound we control, so the
body is fed chunk by chunk from ``request.stream()`` into python-multipart's
``MultipartParser``. The ``file`` part goes to a temp file in the data dir
(memory stays flat whatever the size) and the size limit is enforced while
streaming: the moment the part exceeds it, reading stops and the partial file
is deleted. Other parts are small text fields, each capped in memory.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

import trio
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks
from starlette.requests import Request

MAX_FIELD_SIZE = 64 * 1024
MAX_PARTS = 64
# File data is gathered to this size before each write, which goes through a worker
# thread: over TLS a body arrives one record (often 8 or 16 KiB) at a time, and a
# thread round trip per record made the emulator, not the link, set an upload's pace.
WRITE_SIZE = 1 << 20


def _decode(raw: bytes) -> str:
    """UTF-8, else Latin-1 (as Starlette, and so FastAPI, decode form parts and names)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


class UploadTooLarge(Exception):
    """The file part exceeded the size limit."""


class MalformedUpload(Exception):
    """The body is not usable multipart/form-data."""


@dataclass
class UploadForm:
    """The parsed upload: the file part on disk, the text fields in memory."""

    fields: dict[str, str] = field(default_factory=dict)
    file_path: pathlib.Path | None = None
    filename: str | None = None
    file_size: int = 0


class _Collector:
    """Receives parser callbacks; file data is queued and written after each chunk."""

    def __init__(self, max_file_size: int) -> None:
        self.max_file_size = max_file_size
        self.form = UploadForm()
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.too_large = False
        self.error: str | None = None
        self._parts = 0
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, bytes] = {}
        self._target: str | None = None  # a field name, or None (the file, or ignored)
        self._in_file = False
        self._field_data = bytearray()

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
        }

    def on_part_begin(self) -> None:
        self._parts += 1
        if self._parts > MAX_PARTS:
            self.error = "too many parts"
        self._headers = {}
        self._target = None
        self._in_file = False
        self._field_data = bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._header_field.decode("latin-1").lower()] = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get("content-disposition", b""))
        name = _decode(options.get(b"name", b""))
        if name == "file" and b"filename" not in options:
            # No filename: a plain text field, which FastAPI refuses as the file (422).
            if name not in self.form.fields:
                self._target = name
        elif name == "file" and self.form.filename is None:
            # Only ever metadata: blobs are stored under the file's id.
            self.form.filename = _decode(options[b"filename"]) or "file"
            self._in_file = True
        elif name and name != "file" and name not in self.form.fields:
            self._target = name

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            self.form.file_size += end - start
            if self.form.file_size > self.max_file_size:
                self.too_large = True
                return
            self.pending.append(data[start:end])
            self.pending_size += end - start
        elif self._target is not None:
            if len(self._field_data) + end - start > MAX_FIELD_SIZE:
                self.error = f"field {self._target!r} is too large"
                return
            self._field_data += data[start:end]

    def take_pending(self) -> bytes:
        """The file data gathered since the last call, to be written."""
        data = b"".join(self.pending)
        self.pending.clear()
        self.pending_size = 0
        return data

    def on_part_end(self) -> None:
        if self._target is not None:
            self.form.fields[self._target] = _decode(bytes(self._field_data))
        self._target = None
        self._in_file = False


async def _urlencoded(request: Request) -> UploadForm:
    """A form without a file part, as FastAPI also accepts; bounded in size."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FIELD_SIZE:
            raise MalformedUpload("form too large")
    fields = parse_qs(body.decode("latin-1"), keep_blank_values=True, encoding="utf-8")
    return UploadForm(fields={k: v[0] for k, v in fields.items()})


def boundary_of(content_type: str | None) -> bytes | None:
    """The multipart boundary of a Content-Type header, if it is multipart/form-data."""
    ctype, options = parse_options_header(content_type)
    if ctype != b"multipart/form-data":
        return None
    return options.get(b"boundary") or None


async def receive_upload(
    request: Request, temp_path: pathlib.Path, max_file_size: int
) -> UploadForm:
    """Parse the request body; the file part (if any) ends up at ``temp_path``.

    Raises UploadTooLarge or MalformedUpload; on any failure the temp file is
    removed. A body that is not multipart yields an empty form (the caller
    then reports the missing fields, as FastAPI does).
    """
    content_type = request.headers.get("content-type")
    if parse_options_header(content_type)[0] == b"application/x-www-form-urlencoded":
        return await _urlencoded(request)
    boundary = boundary_of(content_type)
    if boundary is None:
        return UploadForm()
    collector = _Collector(max_file_size)
    try:
        parser = MultipartParser(boundary, collector.callbacks())
    except FormParserError as exc:  # e.g. a boundary over 256 bytes
        raise MalformedUpload(str(exc)) from exc
    try:
        async with await trio.open_file(temp_path, "wb") as out:
            async for chunk in request.stream():
                if not chunk:
                    continue
                try:
                    parser.write(chunk)
                except FormParserError as exc:
                    raise MalformedUpload(str(exc)) from exc
                if collector.too_large:
                    raise UploadTooLarge()
                if collector.error:
                    raise MalformedUpload(collector.error)
                if collector.pending_size >= WRITE_SIZE:
                    await out.write(collector.take_pending())
            try:
                parser.finalize()
            except FormParserError as exc:
                raise MalformedUpload(str(exc)) from exc
            if collector.pending:
                await out.write(collector.take_pending())
            if parser.state not in (MultipartState.END, MultipartState.BOUNDARY_PADDING):
                raise MalformedUpload("body ended before the closing boundary")
    except BaseException:
        with trio.CancelScope(shield=True):
            await trio.Path(temp_path).unlink(missing_ok=True)
        raise
    form = collector.form
    if form.filename is None:
        await trio.Path(temp_path).unlink(missing_ok=True)
    else:
        form.file_path = temp_path
    return form
