"""Query and path parameters read as the service (FastAPI) reads them: a bad one raises
`errors.ValidationFailed`, answered 422 with FastAPI's entry for it."""

from __future__ import annotations

import uuid

from starlette.requests import Request

from mistralfs.emulator import errors

_TRUE = {"true", "1", "yes", "on", "t", "y"}
_FALSE = {"false", "0", "no", "off", "f", "n"}


def uuid_param(request: Request, name: str) -> str:
    """The canonical UUID of path parameter ``name``."""
    raw = request.path_params[name]
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        if len(raw.replace("-", "")) != 32:
            reason = f"invalid length: expected length 32 for simple format, found {len(raw)}"
        else:
            reason = (
                "invalid character: expected an optional prefix of `urn:uuid:` "
                "followed by [0-9a-fA-F-]"
            )
        raise errors.ValidationFailed([errors.uuid_parsing(["path", name], raw, reason)]) from None


def int_param(
    request: Request, name: str, default: int, *, ge: int | None = None, le: int | None = None
) -> int:
    """Query parameter ``name`` as an integer within bounds, ``default`` when absent."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    loc = ["query", name]
    try:
        value = int(raw.strip())
    except ValueError:
        raise errors.ValidationFailed([errors.int_parsing(loc, raw)]) from None
    if ge is not None and value < ge:
        raise errors.ValidationFailed([errors.bound(loc, raw, ge=ge)])
    if le is not None and value > le:
        raise errors.ValidationFailed([errors.bound(loc, raw, le=le)])
    return value


def bool_param(request: Request, name: str, default: bool) -> bool:
    """Query parameter ``name`` as a boolean (FastAPI's spellings), ``default`` when absent."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise errors.ValidationFailed([errors.bool_parsing(["query", name], raw)])
