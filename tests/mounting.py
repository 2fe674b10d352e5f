"""Real mounts for tests: `mistralfs mount` in a subprocess, always unmounted afterwards.

Teardown unmounts with `mistralfs unmount`, then `fusermount3 -u`, then `-z -u`, and
ends the daemon by its pid, whether the test passed or not, so that no stale mount
is ever left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import RunningEmulator
from mistralai.client import Mistral

from mistralfs.daemon.state import process_alive


@dataclass
class Mounted:
    """A live mount and the paths around it."""

    path: Path
    cache_dir: Path
    log_file: Path
    run_dir: Path

    def __truediv__(self, other: str) -> Path:
        return self.path / other

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def daemon_pid(self) -> int | None:
        for pid_file in self.run_dir.glob("mistralfs/mount-*.pid"):
            with contextlib.suppress(ValueError, OSError):
                return int(pid_file.read_text().split()[0])
        return None


def mount_command(
    emulator: RunningEmulator, root: Path, *extra: str, key: str | None = None
) -> tuple[list[str], dict[str, str], Mounted]:
    """The command line and environment that mount `emulator` under `root`."""
    mounted = Mounted(
        path=root / "mnt",
        cache_dir=root / "cache",
        log_file=root / "cache" / "mistralfs.log",
        run_dir=root / "run",
    )
    if not is_mounted(mounted.path):  # a dead mount cannot be looked at, but may be there
        mounted.path.mkdir(parents=True, exist_ok=True)
    mounted.run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["MISTRAL_API_KEY"] = key if key is not None else emulator.api_key
    env["XDG_RUNTIME_DIR"] = str(mounted.run_dir)
    env.pop("MISTRAL_SERVER_URL", None)
    command = [sys.executable, "-m", "mistralfs", "mount", str(mounted.path)]
    command += ["--server-url", emulator.url, "--cache-dir", str(mounted.cache_dir)]
    command += ["--log-level", "debug", *extra]
    return command, env, mounted


def fuse_missing() -> str | None:
    """Why a real mount cannot be made here, if it cannot (None where it can).

    ``MISTRALFS_TESTS_WITHOUT_FUSE=1`` makes any machine look like one without FUSE, so
    that the skipping itself is tested."""
    if os.environ.get("MISTRALFS_TESTS_WITHOUT_FUSE") == "1" or not os.path.exists("/dev/fuse"):
        return "needs /dev/fuse, which this machine does not have (a container without it?)"
    if shutil.which("fusermount3") is None:
        return "needs fusermount3 (apt-get install fuse3)"
    return None


@contextlib.contextmanager
def mount(emulator: RunningEmulator, root: Path, *extra: str) -> Iterator[Mounted]:
    """Mount, yield, and unmount however the test ends; skip the test where FUSE is missing."""
    if (reason := fuse_missing()) is not None:
        pytest.skip(f"mounts a real filesystem, so it {reason}")
    command, env, mounted = mount_command(emulator, root, *extra)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    try:
        assert result.returncode == 0, f"mount failed: {result.stderr}\n{mounted.log()}"
        assert os.path.ismount(mounted.path)
        yield mounted
    finally:
        force_unmount(mounted, env)


def is_mounted(path: Path) -> bool:
    """Also true for a dead FUSE mount, which `os.path.ismount` cannot stat."""
    with open("/proc/mounts", encoding="utf-8") as mounts:
        return any(line.split()[1] == str(path) for line in mounts)


def force_unmount(mounted: Mounted, env: dict[str, str]) -> None:
    """Unmount the polite way, then harder; end the daemon; never leave a mount behind."""
    pid = mounted.daemon_pid()
    if is_mounted(mounted.path):
        subprocess.run(
            [sys.executable, "-m", "mistralfs", "unmount", str(mounted.path), "--timeout", "20"],
            env=env,
            capture_output=True,
            timeout=60,
        )
    for flags in (["-u"], ["-z", "-u"]):
        if is_mounted(mounted.path):
            subprocess.run(["fusermount3", *flags, str(mounted.path)], capture_output=True)
    if pid is not None:
        _end_process(pid)
    assert not is_mounted(mounted.path), f"{mounted.path} is still mounted"


def _end_process(pid: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not process_alive(pid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + 10
        while process_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.1):
    """Poll until `predicate()` is truthy; return its value, or fail with the last one."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            assert value, f"condition not met within {timeout}s"
            return value
        time.sleep(interval)


def remote_files(sdk: Mistral, **filters: object) -> list:
    """What the account holds, seen through the official SDK."""
    return list(sdk.files.list(page_size=1000, **filters).data)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()
