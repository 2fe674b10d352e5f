"""Error bodies in the shapes the real service (FastAPI) and Azure Blob Storage use."""

from __future__ import annotations

import time
import uuid
from email.utils import formatdate
from typing import Any
from xml.sax.saxutils import escape

from starlette.responses import JSONResponse, Response


class ValidationFailed(Exception):
    """A request parameter is invalid: answered 422 in FastAPI's shape."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(errors)
        self.errors = errors


def detail(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """``{"detail": message}``, the service's usual error body."""
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


def validation_response(errors: list[dict[str, Any]]) -> JSONResponse:
    """422 ``{"detail": [{"type", "loc", "msg", "input", ...}]}``."""
    return JSONResponse({"detail": errors}, status_code=422)


def missing(loc: list[str]) -> dict[str, Any]:
    """FastAPI's entry for a required field that was not sent."""
    return {"type": "missing", "loc": loc, "msg": "Field required", "input": None}


def not_a_file(loc: list[str], value: str) -> dict[str, Any]:
    """FastAPI's entry for a form part sent as text (no filename) where a file is expected."""
    return {
        "type": "value_error",
        "loc": loc,
        "msg": "Value error, Expected UploadFile, received: <class 'str'>",
        "input": value,
        "ctx": {"error": {}},
    }


def int_parsing(loc: list[str], value: str) -> dict[str, Any]:
    """FastAPI's entry for a value that is not an integer."""
    return {
        "type": "int_parsing",
        "loc": loc,
        "msg": "Input should be a valid integer, unable to parse string as an integer",
        "input": value,
    }


def bound(loc: list[str], value: str, *, ge: int | None = None, le: int | None = None) -> dict:
    """FastAPI's entry for an integer outside its bounds."""
    if ge is not None:
        return {
            "type": "greater_than_equal",
            "loc": loc,
            "msg": f"Input should be greater than or equal to {ge}",
            "input": value,
            "ctx": {"ge": ge},
        }
    return {
        "type": "less_than_equal",
        "loc": loc,
        "msg": f"Input should be less than or equal to {le}",
        "input": value,
        "ctx": {"le": le},
    }


def bool_parsing(loc: list[str], value: str) -> dict[str, Any]:
    """FastAPI's entry for a value that is not a boolean."""
    return {
        "type": "bool_parsing",
        "loc": loc,
        "msg": "Input should be a valid boolean, unable to interpret input",
        "input": value,
    }


def enum(loc: list[str], value: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    """FastAPI's entry for a value outside an enumeration."""
    expected = " or ".join(f"'{a}'" for a in allowed)
    if len(allowed) > 2:
        expected = ", ".join(f"'{a}'" for a in allowed[:-1]) + f" or '{allowed[-1]}'"
    return {
        "type": "enum",
        "loc": loc,
        "msg": f"Input should be {expected}",
        "input": value,
        "ctx": {"expected": expected},
    }


def uuid_parsing(loc: list[str], value: str, reason: str) -> dict[str, Any]:
    """FastAPI's entry for a path parameter that is not a UUID."""
    return {
        "type": "uuid_parsing",
        "loc": loc,
        "msg": f"Input should be a valid UUID, {reason}",
        "input": value,
        "ctx": {"error": reason},
    }


def azure_error(status: int, code: str, message: str) -> Response:
    """An Azure Blob Storage error: XML body, as a signed URL's host answers."""
    request_id = uuid.uuid4()
    text = f"{message}\nRequestId:{request_id}\nTime:{time.strftime('%Y-%m-%dT%H:%M:%S.0000000Z')}"
    body = (
        '<?xml version="1.0" encoding="utf-8"?>'
        f"<Error><Code>{escape(code)}</Code><Message>{escape(text)}</Message></Error>"
    )
    return Response(
        body,
        status_code=status,
        media_type="application/xml",
        headers={
            "x-ms-error-code": code,
            "x-ms-request-id": str(request_id),
            "Date": formatdate(usegmt=True),
        },
    )
