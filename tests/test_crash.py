"""A daemon killed with SIGKILL loses nothing: the next mount recovers what it left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import RunningEmulator
from emulator_admin import clear_faults, set_faults
from mistralai.client import Mistral
from mounting import is_mounted, mount, remote_files, wait_for

from mistralfs.daemon.state import process_alive

pytestmark = pytest.mark.fuse


def kill_daemon(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not process_alive(pid), timeout=10)


@pytest.mark.parametrize("size", ["small", "large"])
def test_half_written_file_is_kept_for_recovery(
    emulator_process: RunningEmulator, tmp_path: Path, sdk: Mistral, size: str
) -> None:
    # A large one has its upload under way (docs/SEMANTICS.md): that request dies too.
    work = b"half of my work" if size == "small" else os.urandom(6 * 1024 * 1024)
    with mount(emulator_process, tmp_path) as first:
        fd = os.open(first / "batch" / "draft.txt", os.O_WRONLY | os.O_CREAT, 0o644)
        for start in range(0, len(work), 1024 * 1024):
            os.write(fd, work[start : start + 1024 * 1024])
        time.sleep(0.2)
        kill_daemon(first.daemon_pid())
        with pytest.raises(OSError):
            os.close(fd)
        with mount(emulator_process, tmp_path) as second:
            assert "draft.txt" not in os.listdir(second / "batch")
            kept = wait_for(lambda: list((second.cache_dir / "recovery").glob("*.spool")))
            assert [p.read_bytes() for p in kept] == [work]
            meta = json.loads(kept[0].with_suffix(".json").read_text())
            assert (meta["purpose"], meta["filename"]) == ("batch", "draft.txt")
            assert "still being written at the crash" in second.log()
    assert remote_files(sdk) == []


def test_file_closed_while_its_upload_was_in_flight_is_uploaded_once(
    emulator_process: RunningEmulator, tmp_path: Path, sdk: Mistral
) -> None:
    source = tmp_path / "done.jsonl"
    source.write_bytes(b'{"finished": true}\n' * 1000)
    with mount(emulator_process, tmp_path) as first:
        set_faults(
            emulator_process.url,
            emulator_process.api_key,
            {"method": "POST", "path_prefix": "/v1/files", "status": None, "delay": 3.0},
        )
        copy = subprocess.Popen(["cp", str(source), str(first / "batch")], stderr=subprocess.PIPE)
        time.sleep(1.0)  # cp is in close(), the upload in flight
        kill_daemon(first.daemon_pid())
        copy.wait(timeout=10)
        with mount(emulator_process, tmp_path) as second:
            wait_for(lambda: "done.jsonl" in second.log().split("recovery:")[-1], timeout=30)
            time.sleep(1.0)  # an erroneous second upload would land by now
            files = remote_files(sdk)
            assert [(f.filename, f.purpose, f.size_bytes) for f in files] == [
                ("done.jsonl", "batch", source.stat().st_size)
            ]
            wait_for(lambda: "done.jsonl" in os.listdir(second / "batch"), timeout=5)
            assert (second / "batch" / "done.jsonl").read_bytes() == source.read_bytes()
            assert not list(second.cache_dir.glob("spool/*/*.spool"))
    assert not is_mounted(tmp_path / "mnt")


def test_a_files_own_upload_settings_survive_a_crash_before_its_upload(
    emulator_process: RunningEmulator, tmp_path: Path, sdk: Mistral
) -> None:
    """A file given `user.mistral.visibility` before its close, closed while the service
    failed every upload, is sent by the next mount with that visibility, not the mount's."""
    url, key = emulator_process.url, emulator_process.api_key
    with mount(emulator_process, tmp_path, "--visibility", "workspace") as first:
        set_faults(url, key, {"method": "POST", "path_prefix": "/v1/files", "status": 503,
                              "times": None})  # fmt: skip
        writer = subprocess.Popen([sys.executable, "-c", WRITE_WITH_SETTING,
                                   str(first / "batch" / "private.jsonl")])  # fmt: skip
        wait_for(lambda: "private.jsonl" in first.log(), timeout=10)  # its upload is retried
        kill_daemon(first.daemon_pid())
        writer.wait(timeout=10)
        clear_faults(url, key)
        with mount(emulator_process, tmp_path, "--visibility", "workspace") as second:
            wait_for(lambda: "uploaded batch/private.jsonl" in second.log(), timeout=30)
            [stored] = remote_files(sdk)
            assert (stored.filename, stored.visibility) == ("private.jsonl", "user")


# Opens the file, gives it its own visibility, writes and closes it (the close waits on
# the upload, which the service fails until the daemon is killed).
WRITE_WITH_SETTING = """
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
os.setxattr(sys.argv[1], "user.mistral.visibility", b"user")
os.write(fd, b'{"secret": true}\\n')
try:
    os.close(fd)
except OSError:
    pass
"""
