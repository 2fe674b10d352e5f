"""Exceptions raised by the Files API client, one class per thing a caller reacts to.

Each error carries the service's own message, because that message (for
example which JSONL line is broken) is what the user needs to see. The URL
kept on an error never has its query string: signed URLs carry their
signature there. The API key is never part of an error.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

MAX_MESSAGE_CHARS = 500


class ApiError(Exception):
    """Base class: a request to the Files API or to a signed URL failed."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        method: str = "",
        url: str = "",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.method = method
        self.url = strip_query(url)

    @property
    def path(self) -> str:
        """The URL's path, which is what a human needs to see in a log line."""
        match = re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/]*", self.url)
        if match is None:
            return self.url
        return self.url[match.end() :] or "/"

    def __str__(self) -> str:
        where = f"{self.method} {self.path}".strip()
        what = f"{self.status} {self.message}" if self.status is not None else self.message
        return f"{where}: {what}" if where else what

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(status={self.status!r}, message={self.message!r}, "
            f"method={self.method!r}, url={self.url!r})"
        )


class AuthError(ApiError):
    """401/403 from the API: the key is missing, wrong or not allowed (EACCES)."""


class NotFound(ApiError):
    """404: the file does not exist (any more) (ENOENT)."""


class Rejected(ApiError):
    """400/422 (and other unclassified 4xx): the service refused the request or content."""


class TooLarge(ApiError):
    """413: the upload is over the service's size limit (EFBIG)."""


class Unavailable(ApiError):
    """The service could not be reached or kept failing within the retry budget (EIO).

    ``timed_out`` says that the budget ran out waiting for the service, which did not
    answer in time (not that it answered errors): asking again would wait as long.
    """

    timed_out = False


class RateLimited(Unavailable):
    """429 persisted after every retry."""


class ServerError(Unavailable):
    """5xx persisted after every retry."""


class ProtocolError(ApiError):
    """The answer was not what the API promises (not JSON, wrong shape) (EIO)."""


class UploadMismatch(ApiError):
    """An upload's answer describes another file than the one sent (another file's id,
    size, name or purpose) (EIO).

    Never taken for a lost answer and sent again: the service may have stored the
    upload, and a second copy could not be told apart from it. The caller keeps the
    content; the name is bound to no id.
    """


class CertificateRejected(ApiError):
    """The server's TLS certificate failed verification (EIO). Never retried: it fails
    the same way every time, until the certificate or the trusted ones change."""


class UrlExpired(ApiError):
    """403 (or 401) from the storage host of a signed URL: expired or tampered; fetch a new one."""


def strip_query(url: str) -> str:
    """Drop query and fragment: signed URLs carry their credentials in the query string."""
    return url.split("?", 1)[0].split("#", 1)[0]


def _truncate(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _validation_messages(items: list[object]) -> str:
    """FastAPI validation errors: ``[{"loc": [...], "msg": "..."}]`` -> "body.purpose: msg; ..."."""
    parts: list[str] = []
    for item in items:
        if isinstance(item, Mapping):
            msg = item.get("msg") or item.get("message")
            loc = item.get("loc")
            where = ".".join(str(p) for p in loc) if isinstance(loc, list) else ""
            text = str(msg) if msg is not None else json.dumps(item, default=str)
            parts.append(f"{where}: {text}" if where else text)
        else:
            parts.append(str(item))
    return "; ".join(parts)


def _line_errors(items: list[object]) -> str:
    """Content validation errors: ``[{"message": ..., "line_number": N}]`` -> "line N: ..."."""
    parts: list[str] = []
    for item in items:
        if isinstance(item, Mapping):
            msg = item.get("message") or item.get("msg") or ""
            line = item.get("line_number", item.get("line"))
            parts.append(f"line {line}: {msg}" if line is not None else str(msg))
        else:
            parts.append(str(item))
    return " ".join(p for p in parts if p)


def _message_from_json(data: object) -> str | None:
    if isinstance(data, str):
        return data
    if not isinstance(data, Mapping):
        return None
    parts: list[str] = []
    detail = data.get("detail")
    if isinstance(detail, str):
        parts.append(detail)
    elif isinstance(detail, list):
        parts.append(_validation_messages(detail))
    elif isinstance(detail, Mapping):
        nested = _message_from_json(detail)
        if nested:
            parts.append(nested)
    for key in ("description", "message", "error"):
        value = data.get(key)
        if isinstance(value, str) and value and value not in parts:
            parts.append(value)
        elif isinstance(value, Mapping):
            nested = _message_from_json(value)
            if nested:
                parts.append(nested)
    errors = data.get("errors")
    if isinstance(errors, list) and errors:
        parts.append(_line_errors(errors))
    text = " ".join(p.strip() for p in parts if p and p.strip())
    return text or None


def extract_message(body: bytes, content_type: str | None = None, reason: str = "") -> str:
    """The server's own message from any known error body shape, else the raw text, bounded.

    Shapes: ``{"detail": str}``, ``{"detail": [validation errors]}``,
    ``{"message": ...}``, ``{"detail": "Invalid file format.", "description":
    ..., "errors": [{"message", "line_number"}]}``, Azure XML ``<Message>``.
    """
    text = body.decode("utf-8", errors="replace").strip()
    if not text:
        return reason or "(empty body)"
    if text[:1] in '{["':
        try:
            data = json.loads(text)
            message = _message_from_json(data) if data is not None else None
        except (ValueError, RecursionError):  # not JSON, or nested past what json can take
            message = None
        if message:
            return _truncate(message, MAX_MESSAGE_CHARS * 4)
    if "<" in text[:200]:
        match = re.search(r"<Message>(.*?)</Message>", text, re.DOTALL | re.IGNORECASE)
        if match:
            code = re.search(r"<Code>(.*?)</Code>", text, re.DOTALL | re.IGNORECASE)
            msg = match.group(1).strip()
            if code:
                msg = f"{code.group(1).strip()}: {msg}"
            return _truncate(msg)
    return _truncate(text)
