"""Per-purpose content checks and metadata derivation for uploaded files.

Everything here reads files in chunks or line by line, never whole, and is
blocking: the server runs it in a worker thread (``trio.to_thread.run_sync``).

Metadata the emulator derives for an upload (the real service's rules are not
documented; these match what has been observed):

- ``sample_type``: fine-tune -> ``instruct``, batch -> ``batch_request``,
  ocr -> ``ocr_input``, any other purpose (audio, ...) -> ``pretrain``.
- ``mimetype``: content first (magic bytes: PDF, PNG, JPEG, GIF, WEBP, TIFF,
  AVIF/HEIC, ZIP and the Office formats inside a ZIP), then the extension
  (``.jsonl`` -> ``application/jsonl``, then :func:`mimetypes.guess_type`),
  then ``application/octet-stream``.
- ``num_lines``: ``0`` for OCR inputs; for fine-tune uploads, and for any other
  upload whose mimetype is ``application/jsonl``, the number of non-blank
  lines; otherwise null.
- ``signature``: MD5 hex of the content.

Checks: fine-tune content must be UTF-8 JSONL with one JSON object per
non-blank line (400); OCR uploads must be a document or image type (422).
Batch uploads are not checked, only counted.
"""

from __future__ import annotations

import hashlib
import json
import mimetypes
import os
import zipfile
from dataclasses import dataclass, field
from typing import Any

CHUNK = 1024 * 1024
MAX_ERRORS = 10

SAMPLE_TYPES = {"fine-tune": "instruct", "batch": "batch_request", "ocr": "ocr_input"}
DEFAULT_SAMPLE_TYPE = "pretrain"

DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
PPTX = "application/vnd.openxmlformats-officedocument.presentationml.presentation"
XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"

OCR_MIMETYPES = (
    "application/pdf",
    "image/png",
    "image/jpeg",
    "image/webp",
    "image/gif",
    "image/tiff",
    "image/avif",
    "image/bmp",
    DOCX,
    PPTX,
)

_EXTRA_TYPES = {
    ".jsonl": "application/jsonl",
    ".avif": "image/avif",
    ".webp": "image/webp",
    ".docx": DOCX,
    ".pptx": PPTX,
    ".xlsx": XLSX,
}

# Marker file inside an Office Open XML zip -> mimetype.
_OOXML_MARKERS = {
    "word/document.xml": DOCX,
    "ppt/presentation.xml": PPTX,
    "xl/workbook.xml": XLSX,
}


class ContentError(Exception):
    """The service refuses the content: carries the HTTP status and JSON body."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(body)
        self.status = status
        self.body = body


@dataclass
class Inspection:
    """What the emulator learned about an upload."""

    size: int
    md5: str
    mimetype: str
    sample_type: str
    num_lines: int | None
    errors: list[dict[str, Any]] = field(default_factory=list)


def sample_type_for(purpose: str) -> str:
    """The sample_type an upload of ``purpose`` gets."""
    return SAMPLE_TYPES.get(purpose, DEFAULT_SAMPLE_TYPE)


def _by_extension(filename: str) -> str | None:
    ext = os.path.splitext(filename)[1].lower()
    if ext in _EXTRA_TYPES:
        return _EXTRA_TYPES[ext]
    return mimetypes.guess_type(filename, strict=False)[0]


def _sniff(head: bytes) -> str | None:
    if head.startswith(b"%PDF"):
        return "application/pdf"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "image/webp"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "image/tiff"
    if head.startswith(b"BM") and head[6:10] == b"\x00\x00\x00\x00":
        return "image/bmp"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"avif", b"avis"):
            return "image/avif"
        if brand in (b"heic", b"heix", b"mif1"):
            return "image/heic"
    if head.startswith(b"PK\x03\x04"):
        return "application/zip"
    return None


def _zip_kind(path: os.PathLike[str] | str) -> str:
    """Tell an Office document from a plain zip by its members (central directory only)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return "application/zip"
    for marker, mimetype in _OOXML_MARKERS.items():
        if marker in names:
            return mimetype
    return "application/zip"


def detect_mimetype(path: os.PathLike[str] | str, filename: str) -> str:
    """Mimetype from content, then from the filename, then octet-stream."""
    with open(path, "rb") as f:
        head = f.read(64)
    sniffed = _sniff(head)
    if sniffed == "application/zip":
        return _zip_kind(path)
    if sniffed is not None:
        return sniffed
    return _by_extension(filename) or "application/octet-stream"


def md5_of(path: os.PathLike[str] | str) -> tuple[str, int]:
    """MD5 hex digest and size, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def count_jsonl_lines(path: os.PathLike[str] | str) -> int:
    """Number of non-blank lines, without decoding or parsing them."""
    count = 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                count += 1
    return count


def check_jsonl(path: os.PathLike[str] | str) -> tuple[int, list[dict[str, Any]]]:
    """Count JSONL lines and collect errors (1-based line numbers, at most MAX_ERRORS)."""
    count = 0
    errors: list[dict[str, Any]] = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            count += 1
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                errors.append(
                    {"message": f"line is not valid UTF-8: {exc.reason}", "line_number": number}
                )
            else:
                try:
                    value = json.loads(text)
                except json.JSONDecodeError as exc:
                    errors.append(
                        {"message": f"line contains invalid json: {exc}", "line_number": number}
                    )
                else:
                    if not isinstance(value, dict):
                        errors.append(
                            {
                                "message": "line contains invalid json: expected a JSON object, "
                                f"got {type(value).__name__}",
                                "line_number": number,
                            }
                        )
            if len(errors) >= MAX_ERRORS:
                break
    return count, errors


def describe_content(path: os.PathLike[str] | str, filename: str) -> Inspection:
    """Metadata of content taken as it is (no purpose's rules): for files the service
    made itself. ``sample_type`` is left empty for the caller to decide."""
    mimetype = detect_mimetype(path, filename)
    md5, size = md5_of(path)
    num_lines = count_jsonl_lines(path) if mimetype == "application/jsonl" else None
    return Inspection(size=size, md5=md5, mimetype=mimetype, sample_type="", num_lines=num_lines)


def inspect_upload(path: os.PathLike[str] | str, filename: str, purpose: str) -> Inspection:
    """Derive metadata and enforce the purpose's rules; raises ContentError on refusal."""
    mimetype = detect_mimetype(path, filename)
    md5, size = md5_of(path)
    num_lines: int | None = None
    if purpose == "ocr":
        if mimetype not in OCR_MIMETYPES:
            raise ContentError(
                422,
                {
                    "detail": "Invalid file format.",
                    "message": f"Received file with mimetype {mimetype}, only "
                    f"{', '.join(OCR_MIMETYPES)} are currently supported",
                },
            )
        num_lines = 0
    elif purpose == "fine-tune":
        if size == 0:
            raise ContentError(
                400,
                {
                    "detail": "Invalid file format.",
                    "description": "The file is empty",
                    "errors": [{"message": "file contains no lines", "line_number": 0}],
                },
            )
        num_lines, errors = check_jsonl(path)
        if errors:
            raise ContentError(
                400,
                {
                    "detail": "Invalid file format.",
                    "description": "Some lines are not valid JSON",
                    "errors": errors,
                },
            )
        if num_lines == 0:
            raise ContentError(
                400,
                {
                    "detail": "Invalid file format.",
                    "description": "The file is empty",
                    "errors": [{"message": "file contains no lines", "line_number": 0}],
                },
            )
    elif mimetype == "application/jsonl":
        num_lines = count_jsonl_lines(path)
    return Inspection(
        size=size,
        md5=md5,
        mimetype=mimetype,
        sample_type=sample_type_for(purpose),
        num_lines=num_lines,
    )
