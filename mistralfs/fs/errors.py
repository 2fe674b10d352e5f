"""Which errno the filesystem answers with, and why: the one table.

A failure of the service reaches the program that made the syscall as the errno whose
message reads closest to its cause:

| the service said                  | errno  | the program shows                 |
|-----------------------------------|--------|-----------------------------------|
| 401/403: the key is refused       | EACCES | Permission denied                 |
| 404: no such file                 | ENOENT | No such file or directory         |
| 413: the file is too large        | EFBIG  | File too large                    |
| another 4xx: the content, refused | EBADMSG| Bad message                       |
| 5xx, no answer, a bad answer      | EIO    | Input/output error                |

A refusal is EBADMSG, not EINVAL: the service found the file (the message sent) bad,
and that is what "Bad message" says. EINVAL tells programs something else: `mv` reads
it from `rename` as "a subdirectory of itself", and first as "this kernel lacks
RENAME_NOREPLACE", so it renamed (and uploaded) twice; `cp` and file managers showed
"Invalid argument", as if they had called wrongly. The service's own message goes with
the error (`reason`): to the log, the file's `user.mistral.error` and the desktop.

Reading content maps the same way, except that a refusal cannot be the reader's fault:
anything but EACCES and ENOENT is EIO there. What a mount refuses by design (folders,
links, custom metadata) is EROFS on a read-only mount, so that tools say "Read-only file
system", and the errno below otherwise. The other local errnos (EBADF, EEXIST, ENOTDIR,
...) are the ones POSIX names for the same situation on any filesystem, raised where
the situation is found.
"""

from __future__ import annotations

import errno

from mistralfs.api import ApiError, AuthError, NotFound, Rejected, TooLarge

# The content, refused by the service (see above).
REFUSED = errno.EBADMSG

# Most specific first: TooLarge is a Rejected too.
_REMOTE: tuple[tuple[type[ApiError], int], ...] = (
    (AuthError, errno.EACCES),
    (NotFound, errno.ENOENT),
    (TooLarge, errno.EFBIG),
    (Rejected, REFUSED),
)
_MEANINGFUL_WHEN_READING = frozenset({errno.EACCES, errno.ENOENT})

# What a writable mount refuses by design, by operation.
NOT_SUPPORTED = errno.EPERM  # folders, links, device nodes: the account has none
NO_CUSTOM_METADATA = errno.ENOTSUP  # the service keeps no xattrs: cp -a and mv carry on
BAD_SETTING = errno.EINVAL  # an upload setting (user.mistral.visibility, .expiry) it refuses
UNCHANGEABLE = errno.EPERM  # a file the service keeps as it is (a repository's): as for chattr +i
READ_ONLY_VIEW = errno.EROFS  # jobs/: what the service's batch jobs are, never changed here


class FsError(Exception):
    """A failure to report to the caller as `errno`; the message goes to the log."""

    def __init__(self, errno_: int, message: str = "") -> None:
        super().__init__(message or errno.errorcode.get(errno_, str(errno_)))
        self.errno = errno_


def errno_for(exc: ApiError, *, reading: bool = False) -> int:
    """The errno of a failure of the service (the table above)."""
    code = next((code for kind, code in _REMOTE if isinstance(exc, kind)), errno.EIO)
    if reading and code not in _MEANINGFUL_WHEN_READING:
        return errno.EIO
    return code


def refused(read_only: bool, otherwise: int) -> FsError:
    """What the mount does not do: EROFS on a read-only mount, else `otherwise`."""
    return FsError(errno.EROFS if read_only else otherwise)


def reason(error: BaseException) -> str:
    """What the service said (its status and own message), else the error's text.

    An `FsError` raised from an `ApiError` carries it as its cause.
    """
    cause = error if isinstance(error, ApiError) else error.__cause__
    if isinstance(cause, ApiError):
        return f"{cause.status} {cause.message}" if cause.status is not None else cause.message
    return str(error)
