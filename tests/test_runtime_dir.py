"""The runtime folder (pid files, status sockets): private, or refused.

Another local user must not be able to plant a folder or a symlink where a daemon,
maybe root's, writes: these tests play that user, as root, with folders chowned to
`nobody` (uid 65534).
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from mistralfs.config import ConfigError
from mistralfs.daemon.control import serve_status
from mistralfs.daemon.state import remove_socket, runtime_dir
from mistralfs.private import write_private_file

NOBODY = 65534


def env_with(**values: Path) -> dict[str, str]:
    return {name: str(value) for name, value in values.items()}


def test_the_folder_is_made_private_in_xdg_runtime_dir(tmp_path: Path) -> None:
    folder = runtime_dir(env_with(XDG_RUNTIME_DIR=tmp_path), uid=os.getuid())
    assert folder == tmp_path / "mistralfs"
    assert stat.S_IMODE(os.lstat(folder).st_mode) == 0o700
    assert runtime_dir(env_with(XDG_RUNTIME_DIR=tmp_path), uid=os.getuid()) == folder


def owned_by_another_user(folder: Path) -> None:
    folder.mkdir(mode=0o700)
    os.chown(folder, NOBODY, NOBODY)


def open_to_others(folder: Path) -> None:
    folder.mkdir()
    folder.chmod(0o755)


def a_symlink(folder: Path) -> None:
    real = folder.parent.parent / "real"
    real.mkdir(mode=0o700)
    folder.symlink_to(real)


def a_file(folder: Path) -> None:
    folder.write_text("x")


@pytest.mark.parametrize(
    ("plant", "why"),
    [
        (owned_by_another_user, "uid 65534"),
        (open_to_others, "mode 0755"),
        (a_symlink, "symlink"),
        (a_file, "not a folder"),
    ],
)
def test_a_folder_that_is_not_private_is_refused_with_one_clear_line(
    tmp_path: Path, plant: Callable[[Path], None], why: str
) -> None:
    folder = tmp_path / "xdg" / "mistralfs"
    folder.parent.mkdir()
    plant(folder)
    with pytest.raises(ConfigError) as refused:
        runtime_dir(env_with(XDG_RUNTIME_DIR=folder.parent), uid=os.getuid())
    message = str(refused.value)
    assert str(folder) in message and why in message and "\n" not in message


def test_without_xdg_runtime_dir_a_user_gets_a_private_folder_in_tmp(tmp_path: Path) -> None:
    env = env_with(TMPDIR=tmp_path)
    mine = tmp_path / f"mistralfs-{NOBODY}"
    mine.mkdir(mode=0o700)
    os.chown(mine, NOBODY, NOBODY)
    assert runtime_dir(env, uid=NOBODY) == mine
    # Someone else (here root) made that predictable folder first: refused, not used.
    os.chown(mine, 0, 0)
    with pytest.raises(ConfigError, match=f"{mine}.*uid 0"):
        runtime_dir(env, uid=NOBODY)


def test_a_folder_that_cannot_be_made_is_one_clear_line(tmp_path: Path) -> None:
    env = env_with(TMPDIR=tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"cannot create runtime folder .*No such file"):
        runtime_dir(env, uid=NOBODY)


def test_an_xdg_runtime_dir_of_another_user_is_not_used(tmp_path: Path) -> None:
    """`sudo -E` keeps the user's XDG_RUNTIME_DIR: root must not write into it."""
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, NOBODY, NOBODY)
    folder = runtime_dir(env_with(XDG_RUNTIME_DIR=theirs, TMPDIR=tmp_path), uid=0)
    assert folder == Path("/run/mistralfs")
    assert not (theirs / "mistralfs").exists()


def test_private_files_are_written_without_following_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("keep\n")
    path = tmp_path / "mount-x.pid"
    path.symlink_to(target)
    write_private_file(path, "42\n")
    assert target.read_text() == "keep\n"
    assert not path.is_symlink() and path.read_text() == "42\n"
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mount-x.pid", "target"]  # no temp


def test_only_a_stale_socket_of_ours_is_removed(tmp_path: Path) -> None:
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(stale))
    remove_socket(stale)
    assert not stale.exists()
    other = tmp_path / "other.sock"
    other.write_text("not a socket")
    with pytest.raises(OSError, match="not a socket"):
        remove_socket(other)
    assert other.read_text() == "not a socket"
    remove_socket(tmp_path / "absent.sock")  # nothing there: nothing to do


async def test_the_status_channel_does_not_replace_what_is_not_its_socket(
    tmp_path: Path,
) -> None:
    path = tmp_path / "mount-x.sock"
    path.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError, match="not a socket of ours"):
        await serve_status(path, dict)
    assert path.is_symlink()
