"""How remote failures become errno values for the process that made the syscall."""

from __future__ import annotations

import errno

from mistralfs.api import ApiError, AuthError, NotFound, Rejected, TooLarge


class FsError(Exception):
    """A failure to report to the caller as `errno`; the message goes to the log."""

    def __init__(self, errno_: int, message: str = "") -> None:
        super().__init__(message or errno.errorcode.get(errno_, str(errno_)))
        self.errno = errno_


def errno_for(exc: ApiError) -> int:
    """The error table of DESIGN.md: what each kind of remote answer means locally."""
    if isinstance(exc, AuthError):
        return errno.EACCES
    if isinstance(exc, NotFound):
        return errno.ENOENT
    if isinstance(exc, TooLarge):
        return errno.EFBIG
    if isinstance(exc, Rejected):
        return errno.EINVAL
    return errno.EIO
