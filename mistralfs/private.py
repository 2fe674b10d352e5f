"""Files and folders only this user can read: the cache folder, the log, the pid file.

The cache folder holds spooled file content and the log holds every file name and id,
so neither may be left to the umask (0755 and 0644 on most systems).
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from mistralfs.usage import ConfigError


def private_folder(folder: Path, what: str) -> Path:
    """`folder`, created 0700 or tightened to it; another user's folder is refused."""
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        found = folder.stat()
    except OSError as exc:
        raise ConfigError(f"cannot create the {what} {folder}: {exc.strerror}") from exc
    uid = os.geteuid()
    if found.st_uid != uid:
        raise ConfigError(
            f"the {what} {folder} belongs to uid {found.st_uid}, not to you (uid {uid})"
        )
    if stat.S_IMODE(found.st_mode) & 0o077:
        folder.chmod(0o700)  # left open to others by an older version, or by hand
    return folder


def open_private_append(path: Path) -> int:
    """A descriptor appending to `path`, created 0600; a file of ours others could read
    is tightened to 0600 (devices such as /dev/null are left as they are)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    found = os.fstat(fd)
    ours = stat.S_ISREG(found.st_mode) and found.st_uid == os.geteuid()
    if ours and stat.S_IMODE(found.st_mode) & 0o077:
        os.fchmod(fd, 0o600)
    return fd


def write_private_file(path: Path, text: str) -> None:
    """Write `path` (mode 0600) through a new file and a rename: a symlink there is replaced."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()  # left by a daemon of ours that died with this pid
    fd = os.open(temporary, flags, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
