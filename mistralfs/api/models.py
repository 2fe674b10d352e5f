"""Plain, tolerant data objects for what the Files API returns.

The real service adds fields and enum values over time (``audio`` purposes,
``ocr_input`` sample types, ``expires_at``...), so nothing here is an enum and
unknown fields are kept in ``extra`` instead of being rejected.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from mistralfs.api.errors import ProtocolError
from mistralfs.files_api import FILE_FIELDS, UNCHANGEABLE_SOURCES

_KNOWN_FIELDS = frozenset({*FILE_FIELDS, "deleted"})  # the rest is kept in `extra`


# What a stat can carry: st_size is a signed 64-bit count of bytes, and times are
# signed 64-bit nanoseconds (until 2262).
MAX_SIZE = 2**63 - 1
MAX_SECONDS = MAX_SIZE // 10**9


def _is_int(value: object) -> bool:
    # bool is an int subclass; a JSON ``true`` is not a size.
    return isinstance(value, int) and not isinstance(value, bool)


def _opt_str(value: object) -> str | None:
    """Optional text field: tolerate odd types rather than fail a whole listing."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    return str(value)


def _opt_int(value: object) -> int | None:
    if _is_int(value):
        return value  # type: ignore[return-value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


@dataclass(frozen=True)
class RemoteFile:
    """One file as the service describes it; immutable because content never changes for an id."""

    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    sample_type: str | None
    source: str | None
    num_lines: int | None
    mimetype: str | None
    signature: str | None
    # Optional fields of newer services: absent (None) on files of older ones.
    expires_at: int | None = None
    visibility: str | None = None
    deleted: bool = False
    extra: Mapping[str, object] = field(default_factory=dict, compare=False, repr=False)
    # False when the service sent `"bytes": null` (its own spec's examples do): `bytes`
    # is then 0, and means nothing.
    size_known: bool = True

    @property
    def unchangeable(self) -> bool:
        """The service keeps this file as it is: it refuses to delete or replace it."""
        return self.source in UNCHANGEABLE_SOURCES

    @classmethod
    def from_json(cls, data: object, notes: list[str] | None = None) -> RemoteFile:
        """Build from a decoded JSON object; ProtocolError if it is not a usable File.

        A `created_at` out of what a stat can carry is clamped, and a null `bytes` taken
        for unknown; each such repair is said in `notes`, for the caller to log.
        """
        if not isinstance(data, dict):
            raise ProtocolError(f"expected a file object, got {type(data).__name__}")
        required = ("id", "bytes", "created_at", "filename", "purpose")
        missing = [name for name in required if name not in data]
        if missing:
            raise ProtocolError(f"file object lacks required field(s): {', '.join(missing)}")
        file_id, size, created = data["id"], data["bytes"], data["created_at"]
        filename, purpose = data["filename"], data["purpose"]
        if not isinstance(file_id, str) or not file_id:
            raise ProtocolError("file object has a non-string or empty 'id'")
        size_known = size is not None
        if size is None:
            size = 0
            if notes is not None:
                notes.append("'bytes' is null: its size is not known, and shown as 0")
        if not _is_int(size) or not 0 <= size <= MAX_SIZE:
            raise ProtocolError(f"file {file_id}: 'bytes' is not a size: {str(size)[:40]}")
        if isinstance(created, float) and math.isfinite(created):
            created = int(created)
        if not _is_int(created):
            raise ProtocolError(f"file {file_id}: 'created_at' is not an integer")
        if not 0 <= created <= MAX_SECONDS:
            clamped = min(max(created, 0), MAX_SECONDS)
            if notes is not None:
                notes.append(f"'created_at' {str(created)[:40]} is out of range: {clamped} taken")
            created = clamped
        if not isinstance(filename, str):
            raise ProtocolError(f"file {file_id}: 'filename' is not a string")
        if not isinstance(purpose, str):
            raise ProtocolError(f"file {file_id}: 'purpose' is not a string")
        extra = {k: v for k, v in data.items() if k not in _KNOWN_FIELDS}
        return cls(
            id=file_id,
            bytes=size,
            created_at=created,
            filename=filename,
            purpose=purpose,
            sample_type=_opt_str(data.get("sample_type")),
            source=_opt_str(data.get("source")),
            num_lines=_opt_int(data.get("num_lines")),
            mimetype=_opt_str(data.get("mimetype")),
            signature=_opt_str(data.get("signature")),
            expires_at=_opt_int(data.get("expires_at")),
            visibility=_opt_str(data.get("visibility")),
            deleted=data.get("deleted") is True,
            extra=MappingProxyType(extra),
            size_known=size_known,
        )


@dataclass(frozen=True)
class FilePage:
    """One page of a listing; ``total`` is None when the service did not say."""

    files: list[RemoteFile]
    total: int | None


@dataclass(frozen=True)
class SignedUrl:
    """A signed download URL and the wall-clock unix time it stops working.

    The service only answers with the URL, so ``expires_at`` is computed from
    the requested expiry at request time (a slightly early, safe estimate).
    The URL carries secrets in its query string: never log it whole.
    """

    url: str
    expires_at: float

    def __repr__(self) -> str:
        return f"SignedUrl(url={_redact(self.url)!r}, expires_at={self.expires_at!r})"


def _redact(url: str) -> str:
    base, sep, _query = url.partition("?")
    return base + ("?..." if sep else "")


# A batch job's statuses that do not change any more (the others may).
FINAL_JOB_STATUSES = frozenset({"SUCCESS", "FAILED", "TIMEOUT_EXCEEDED", "CANCELLED"})


def _str_list(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        return ()
    return tuple(v for v in value if isinstance(v, str))


@dataclass(frozen=True)
class BatchJob:
    """One batch job as the service describes it (``/v1/batch/jobs``): what it read, what
    it wrote, how far it got. Tolerant like `RemoteFile`: statuses are plain strings,
    odd counts are 0, unknown fields go to ``extra``."""

    id: str
    status: str
    endpoint: str | None
    model: str | None
    input_files: tuple[str, ...]
    output_file: str | None
    error_file: str | None
    created_at: int
    started_at: int | None = None
    completed_at: int | None = None
    total_requests: int = 0
    completed_requests: int = 0
    succeeded_requests: int = 0
    failed_requests: int = 0
    agent_id: str | None = None
    metadata: Mapping[str, object] = field(default_factory=dict, compare=False)
    errors: tuple[str, ...] = ()  # the service's error messages, each once
    extra: Mapping[str, object] = field(default_factory=dict, compare=False, repr=False)

    @property
    def done(self) -> bool:
        """Whether its status is final (its files, if any, are all written)."""
        return self.status in FINAL_JOB_STATUSES

    @property
    def name(self) -> str | None:
        """The ``name`` its metadata gives, if any (how users tell their jobs apart)."""
        name = self.metadata.get("name")
        return name if isinstance(name, str) and name else None

    @classmethod
    def from_json(cls, data: object) -> BatchJob:
        """Build from a decoded JSON object; ProtocolError if it has no id or status."""
        if not isinstance(data, dict):
            raise ProtocolError(f"expected a batch job object, got {type(data).__name__}")
        job_id, status = data.get("id"), data.get("status")
        if not isinstance(job_id, str) or not job_id:
            raise ProtocolError("batch job object has a non-string or empty 'id'")
        if not isinstance(status, str) or not status:
            raise ProtocolError(f"batch job {job_id}: 'status' is not a string")
        metadata = data.get("metadata")
        errors = data.get("errors")
        messages: list[object] = []
        if isinstance(errors, list):
            messages = [e.get("message") for e in errors if isinstance(e, dict)]
        known = {f for f in cls.__dataclass_fields__ if f != "extra"} | {"object"}
        return cls(
            id=job_id,
            status=status,
            endpoint=_opt_str(data.get("endpoint")),
            model=_opt_str(data.get("model")),
            input_files=_str_list(data.get("input_files")),
            output_file=_opt_str(data.get("output_file")),
            error_file=_opt_str(data.get("error_file")),
            created_at=_opt_int(data.get("created_at")) or 0,
            started_at=_opt_int(data.get("started_at")),
            completed_at=_opt_int(data.get("completed_at")),
            total_requests=_opt_int(data.get("total_requests")) or 0,
            completed_requests=_opt_int(data.get("completed_requests")) or 0,
            succeeded_requests=_opt_int(data.get("succeeded_requests")) or 0,
            failed_requests=_opt_int(data.get("failed_requests")) or 0,
            agent_id=_opt_str(data.get("agent_id")),
            metadata=MappingProxyType(dict(metadata) if isinstance(metadata, dict) else {}),
            errors=tuple(dict.fromkeys(m for m in messages if isinstance(m, str))),
            extra=MappingProxyType({k: v for k, v in data.items() if k not in known}),
        )
