"""Pid and state files: the runtime folder where a running mount keeps its pid file and
status socket, and whether the process a pid file names still runs.

Another local user must not be able to plant anything there: a symlink where the pid
file goes would make the daemon, perhaps root's, overwrite the file it points at. So
the folder is used only if it is a real folder (not a symlink) that this user owns,
mode 0700; anything else is refused with one line. Files in it are written through a
new temporary file and a rename, so that a symlink is replaced, never followed.

Where it is: `$XDG_RUNTIME_DIR/mistralfs` if that folder is the user's own; else, for
root (fstab, sudo, a system unit), `/run/mistralfs`; for anyone else,
`$TMPDIR/mistralfs-UID` (default `/tmp`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import time
from collections.abc import Mapping
from pathlib import Path

from mistralfs.usage import ConfigError

UNIX_SOCKET_PATH_MAX = 107  # sun_path holds 108 bytes with the terminating NUL


class UnsafeRuntimeDir(ConfigError):
    """The runtime folder could be another user's: the message is printed as is."""


def runtime_dir(env: Mapping[str, str] | None = None, uid: int | None = None) -> Path:
    """This user's runtime folder, created if missing, and refused if not private."""
    env = os.environ if env is None else env
    uid = os.getuid() if uid is None else uid
    base = env.get("XDG_RUNTIME_DIR")
    if base and _owned_by(Path(base), uid):
        return _private_folder(Path(base) / "mistralfs", uid)
    return short_runtime_dir(env, uid)


def short_runtime_dir(env: Mapping[str, str] | None = None, uid: int | None = None) -> Path:
    """The runtime folder without XDG_RUNTIME_DIR; its paths are short enough for a socket."""
    env = os.environ if env is None else env
    uid = os.getuid() if uid is None else uid
    if uid == 0:
        return _private_folder(Path("/run/mistralfs"), uid)
    return _private_folder(Path(env.get("TMPDIR") or "/tmp") / f"mistralfs-{uid}", uid)


def mount_state_file(mountpoint: Path, suffix: str) -> Path:
    """A running mount's pid file (`pid`) or status socket (`sock`), by mountpoint."""
    digest = hashlib.sha256(str(mountpoint).encode()).hexdigest()[:16]
    path = runtime_dir() / f"mount-{digest}.{suffix}"
    if suffix == "sock" and len(os.fsencode(path)) > UNIX_SOCKET_PATH_MAX:
        path = short_runtime_dir() / path.name
    return path


def _owned_by(folder: Path, uid: int) -> bool:
    try:
        found = folder.stat()
    except OSError:
        return False
    return stat.S_ISDIR(found.st_mode) and found.st_uid == uid


def _private_folder(folder: Path, uid: int) -> Path:
    try:
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=0o700)
        found = os.lstat(folder)
    except OSError as exc:
        raise UnsafeRuntimeDir(
            f"cannot create runtime folder {folder}: {exc.strerror}; "
            "set XDG_RUNTIME_DIR to a private folder of yours"
        ) from exc
    why = None
    if stat.S_ISLNK(found.st_mode):
        why = "it is a symlink"
    elif not stat.S_ISDIR(found.st_mode):
        why = "it is not a folder"
    elif found.st_uid != uid:
        why = f"it belongs to uid {found.st_uid}, not to you (uid {uid})"
    elif stat.S_IMODE(found.st_mode) & 0o077:
        why = f"it has mode {stat.S_IMODE(found.st_mode):04o}, not 0700"
    if why is not None:
        raise UnsafeRuntimeDir(
            f"unsafe runtime folder {folder}: {why}; remove it, "
            "or set XDG_RUNTIME_DIR to a private folder of yours"
        )
    return folder


def remove_socket(path: Path) -> None:
    """Remove a stale socket, but only one that is a socket and ours; nothing there is fine."""
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(found.st_mode) or found.st_uid != os.geteuid():
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket of ours")
    path.unlink()


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text(encoding="utf-8").split()[0])
    except (OSError, ValueError, IndexError):
        return None


def process_alive(pid: int) -> bool:
    """True while `pid` runs; an exited process waiting to be reaped (a zombie) is not."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_for_exit(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not process_alive(pid):
            return True
        time.sleep(0.02)
    return False
