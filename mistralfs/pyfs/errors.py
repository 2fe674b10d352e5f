"""The client's errors as the Python exceptions fsspec users catch.

Each keeps the service's own message (which JSONL line is broken, which size is over
the limit) and the client's error as its `__cause__`; none holds the key or a signed
URL's query, since the client's errors never do.
"""

from __future__ import annotations

import errno

from mistralfs.api import ApiError, AuthError, NotFound, Rejected, TooLarge


class ServiceRefused(ValueError):
    """The service refused the request or its content (400, 413, 422...): `message` is
    its own reason, `status` its HTTP status."""

    def __init__(self, path: str, message: str, status: int | None) -> None:
        super().__init__(f"{path}: refused by the service ({status}): {message}")
        self.path = path
        self.message = message
        self.status = status


class KeyRefused(PermissionError):
    """The service refused the API key (401/403): missing, wrong, or not allowed."""


class ServiceFailed(OSError):
    """The service could not be reached, kept failing through every retry, or answered
    what the API does not promise."""


def translated(exc: ApiError, path: str) -> Exception:
    """The exception to raise for `exc`, met on `path` (raise it `from exc`)."""
    if isinstance(exc, NotFound):
        return FileNotFoundError(errno.ENOENT, exc.message, path)
    if isinstance(exc, AuthError):
        return KeyRefused(errno.EACCES, f"the service refused the API key: {exc.message}", path)
    if isinstance(exc, Rejected | TooLarge):
        return ServiceRefused(path, exc.message, exc.status)
    return ServiceFailed(errno.EIO, str(exc), path)
