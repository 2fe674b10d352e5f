"""The command line as people use it: status, -o options, mount(8), checks, logs."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import RunningEmulator
from emulator_admin import set_faults
from mistralai.client import Mistral
from mounting import Mounted, is_mounted, mount, mount_command, remote_files, wait_for

from mistralfs.daemon.state import process_alive, short_runtime_dir

pytestmark = pytest.mark.fuse

MISTRALFS = [sys.executable, "-m", "mistralfs"]
README = Path(__file__).resolve().parent.parent / "README.md"


def cli(*args: str, env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*MISTRALFS, *args], capture_output=True, text=True, timeout=60, env=env, **kw
    )


def env_for(m: Mounted) -> dict[str, str]:
    return dict(os.environ, XDG_RUNTIME_DIR=str(m.run_dir))


def test_help_and_version_for_every_command() -> None:
    assert cli("--version").stdout.startswith("mistralfs ")
    for command in ("mount", "unmount", "status", "demo", "emulator"):
        result = cli(command, "--help")
        assert result.returncode == 0 and "usage: mistralfs " + command in result.stdout


def test_status_shows_uploads_in_flight_with_progress(
    emulator_process: RunningEmulator, tmp_path: Path, sdk: Mistral
) -> None:
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(2 * 1024 * 1024))
    with mount(emulator_process, tmp_path) as m:
        set_faults(
            emulator_process.url,
            emulator_process.api_key,
            {"method": "POST", "path_prefix": "/v1/files", "status": None, "delay": 3.0},
        )
        copy = subprocess.Popen(["cp", str(source), str(m / "batch")])
        try:

            def in_flight() -> dict | None:
                snap = json.loads(cli("status", str(m.path), "--json", env=env_for(m)).stdout)
                return snap if snap["uploads"] else None

            snapshot = wait_for(in_flight, timeout=5)
            [upload] = snapshot["uploads"]
            assert (upload["name"], upload["purpose"]) == ("big.bin", "batch")
            assert upload["bytes"] == 2 * 1024 * 1024
            assert snapshot["server_url"] == emulator_process.url
            shown = cli("status", env=env_for(m)).stdout
            assert str(m.path) in shown and "batch/big.bin  [" in shown and "MiB/s" in shown
        finally:
            assert copy.wait(timeout=30) == 0
        after = json.loads(cli("status", str(m.path), "--json", env=env_for(m)).stdout)
        assert after["uploads"] == [] and after["uploaded"] == 1
        assert after["requests"]["POST /v1/files"] == 1
        # Only the mounting user can reach the status channel. (Long runtime paths fall
        # back to a short private folder, as a socket path must fit in 108 bytes.)
        found = list(m.run_dir.glob("mistralfs/mount-*.sock")) or list(
            short_runtime_dir().glob("mount-*.sock")
        )
        assert found
        for path in found:
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
        probe = subprocess.run(
            ["runuser", "-u", "nobody", "--", sys.executable, "-c",
             "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])",
             str(found[0])],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert probe.returncode != 0 and "Permission denied" in probe.stderr
    assert [f.filename for f in remote_files(sdk)] == ["big.bin"]


def test_unmount_shows_progress_while_it_waits(
    emulator_process: RunningEmulator, tmp_path: Path
) -> None:
    source = tmp_path / "slow.bin"
    source.write_bytes(os.urandom(500_000))
    with mount(emulator_process, tmp_path) as m:
        set_faults(
            emulator_process.url,
            emulator_process.api_key,
            {"method": "POST", "path_prefix": "/v1/files", "status": None, "delay": 2.5},
        )
        copy = subprocess.Popen(["cp", str(source), str(m / "batch")])
        time.sleep(0.5)
        result = cli("unmount", str(m.path), env=env_for(m))
        assert result.returncode == 0, result.stderr
        assert "busy" in result.stdout and "batch/slow.bin  [" in result.stdout
        assert copy.wait(timeout=30) == 0


def test_mount_options_with_o(emulator_process: RunningEmulator, tmp_path: Path) -> None:
    command, env, mounted = mount_command(emulator_process, tmp_path)
    bad = subprocess.run([*command, "-o", "bogus=1"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown mount option 'bogus=1'" in bad.stderr
    key = subprocess.run([*command, "-o", "api_key=x"], env=env, capture_output=True, text=True)
    assert key.returncode == 2 and "never a mount option" in key.stderr
    options = "read_only,dir_cache_time=5,max_throughput=500M"
    options += ",_netdev,nofail,noauto,x-systemd.automount,rw"
    ok = subprocess.run([*command, "-o", options], env=env, capture_output=True, text=True)
    try:
        assert ok.returncode == 0, ok.stderr + mounted.log()
        snapshot = json.loads(cli("status", str(mounted.path), "--json", env=env).stdout)
        assert snapshot["read_only"] is True
        daemon = Path(f"/proc/{mounted.daemon_pid()}/cmdline").read_bytes().split(b"\0")
        assert daemon[daemon.index(b"--max-throughput") + 1] == b"524288000"
    finally:
        cli("unmount", str(mounted.path), env=env)
    assert not is_mounted(mounted.path)


@pytest.fixture
def mistralfs_on_path() -> Iterator[None]:
    """mount(8) runs helpers with a fixed PATH: install the command where it looks."""
    link = Path("/usr/local/bin/mistralfs")
    ours = Path(sys.executable).parent / "mistralfs"
    created = not link.exists()
    if created:
        link.symlink_to(ours)
    assert link.resolve() == ours.resolve(), f"{link} is another mistralfs"
    yield
    if created:
        link.unlink()


def _daemon_pids(mountpoint: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"--foreground" in cmdline and str(mountpoint).encode() in cmdline:
                pids.append(int(proc.name))
    return pids


def test_mount_t_fuse_mistralfs_and_umount(
    emulator_process: RunningEmulator, tmp_path: Path, sdk: Mistral, mistralfs_on_path: None
) -> None:
    """fstab's way: mount(8) runs mount.fuse3, which runs `mistralfs SOURCE DIR -o OPTS`."""
    key_file = tmp_path / "key"
    key_file.write_text(emulator_process.api_key)
    key_file.chmod(0o600)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MISTRAL_API_KEY"}
    options = (
        f"server_url={emulator_process.url},api_key_file={key_file},"
        f"cache_dir={tmp_path / 'cache'},allow_other,_netdev,nofail"
    )
    sdk.files.upload(file={"file_name": "seen.txt", "content": b"x"}, purpose="batch")
    try:
        result = subprocess.run(
            ["mount", "-t", "fuse.mistralfs", "mistralfs", str(mnt), "-o", options],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert os.listdir(mnt / "batch") == ["seen.txt"]
        [pid] = _daemon_pids(mnt)
        assert subprocess.run(["umount", str(mnt)], timeout=60).returncode == 0
        assert not is_mounted(mnt)
        wait_for(lambda: not process_alive(pid), timeout=10)
    finally:
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)])
        for pid in _daemon_pids(mnt):
            os.kill(pid, signal.SIGKILL)


def test_mountpoint_problems_are_said_clearly(
    emulator_process: RunningEmulator, tmp_path: Path
) -> None:
    command, env, mounted = mount_command(emulator_process, tmp_path)
    base = command[: command.index(str(mounted.path))]
    rest = command[command.index(str(mounted.path)) + 1 :]
    missing = subprocess.run(
        [*base, str(tmp_path / "nope"), *rest], env=env, capture_output=True, text=True
    )
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    (tmp_path / "file").write_text("x")
    not_dir = subprocess.run(
        [*base, str(tmp_path / "file"), *rest], env=env, capture_output=True, text=True
    )
    assert not_dir.returncode == 2 and "is not a folder" in not_dir.stderr
    (mounted.path / "mine.txt").write_text("x")
    full = subprocess.run(command, env=env, capture_output=True, text=True)
    assert full.returncode == 2 and "is not empty" in full.stderr
    (mounted.path / "mine.txt").unlink()
    with mount(emulator_process, tmp_path) as m:
        again = subprocess.run(command, env=env, capture_output=True, text=True)
        assert again.returncode == 2 and "already a mountpoint" in again.stderr
        assert is_mounted(m.path)


def test_a_stale_mount_after_a_crash_is_cleared_by_the_next_mount(
    emulator_process: RunningEmulator, tmp_path: Path
) -> None:
    with mount(emulator_process, tmp_path) as m:
        pid = m.daemon_pid()
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not process_alive(pid), timeout=10)
        assert is_mounted(m.path)  # dead: "Transport endpoint is not connected"
        with pytest.raises(OSError):
            os.listdir(m.path)
        command, env, _ = mount_command(emulator_process, tmp_path)
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "stale mount" in result.stderr
        assert sorted(os.listdir(m.path)) == ["batch", "fine-tune", "jobs", "ocr"]


def test_logs_under_systemd_carry_priorities_and_no_timestamps(
    emulator_process: RunningEmulator, tmp_path: Path
) -> None:
    command, env, mounted = mount_command(emulator_process, tmp_path)
    command = [c for c in command if c != "debug"]
    command[command.index("--log-level")] = "--log-level"
    command.insert(command.index("--log-level") + 1, "info")
    env["JOURNAL_STREAM"] = "8:12345"
    daemon = subprocess.Popen(
        [*command, "--foreground"], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for(lambda: is_mounted(mounted.path) and os.listdir(mounted.path), timeout=15)
        daemon.send_signal(signal.SIGTERM)
        _, stderr = daemon.communicate(timeout=30)
    finally:
        if is_mounted(mounted.path):
            subprocess.run(["fusermount3", "-u", "-z", str(mounted.path)])
        if daemon.poll() is None:
            daemon.kill()
    lines = [line for line in stderr.splitlines() if line]
    assert lines and all(line.startswith(("<6>", "<4>", "<3>", "<7>")) for line in lines), lines
    assert any(line.startswith("<6>mistralfs.daemon.serve: mounted") for line in lines)
    assert not any(line[3:7].isdigit() for line in lines)  # no timestamp


def test_status_watch_refreshes_until_interrupted(mounted: Mounted) -> None:
    # Started as a shell starts a background job, with SIGINT ignored: ^C must still work.
    watch = subprocess.Popen(
        [*MISTRALFS, "status", "--watch"],
        env=env_for(mounted), stdout=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )  # fmt: skip
    assert watch.stdout is not None
    seen, deadline = "", time.monotonic() + 20  # two screens, however busy the machine
    while seen.count(str(mounted.path)) < 2 and time.monotonic() < deadline:
        if select.select([watch.stdout], [], [], 1.0)[0]:
            seen += os.read(watch.stdout.fileno(), 65536).decode()
    watch.send_signal(signal.SIGINT)
    out, _ = watch.communicate(timeout=10)
    out = seen + out
    assert watch.returncode == 0
    assert out.count("\033[H\033[2J") >= 2 and out.count(str(mounted.path)) >= 2


def test_the_daemon_heap_is_settled_once_it_answers(mounted: Mounted) -> None:
    """What startup built is frozen out of every later collection, and young collections
    are rarer than CPython's default (collector.py says why)."""
    from mistralfs.daemon.collector import OLDER_THRESHOLD, YOUNG_THRESHOLD

    (mounted.path / "batch").stat()
    snapshot = json.loads(cli("status", str(mounted.path), "--json", env=env_for(mounted)).stdout)
    assert snapshot["gc"]["frozen"] > 10_000  # imports, the HTTP client, trio
    assert snapshot["gc"]["threshold"] == [YOUNG_THRESHOLD, OLDER_THRESHOLD, OLDER_THRESHOLD]
    assert snapshot["gc"]["collections"][2] >= 1  # the one that settled it


def test_a_mount_error_raised_inside_a_nursery_is_still_reported() -> None:
    """trio wraps an error raised in a nursery in an ExceptionGroup; its one line still shows."""
    from mistralfs.daemon.commands import mount_error_in
    from mistralfs.daemon.serve import MountError

    error = MountError("cannot mount at /x: bad")
    assert mount_error_in(error, MountError) is error
    assert mount_error_in(ExceptionGroup("g", [ExceptionGroup("h", [error])]), MountError) is error
    assert mount_error_in(ExceptionGroup("g", [error, ValueError()]), MountError) is None
    assert mount_error_in(ValueError(), MountError) is None


def test_demo_mounts_a_seeded_emulator_kept_in_its_state_folder_and_stops(
    tmp_path: Path,
) -> None:
    """The README's first command: no key, so a local emulator with example files."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("MISTRAL_API_KEY", "MISTRAL_SERVER_URL")
    }
    env["XDG_RUNTIME_DIR"] = str(tmp_path / "run")
    (tmp_path / "run").mkdir()
    mnt = tmp_path / "mnt"
    state = tmp_path / ".demo"  # the default, relative to where the command runs
    started = cli("demo", "mnt", env=env, cwd=tmp_path)
    try:
        assert started.returncode == 0, started.stderr
        assert "a local emulator" in started.stdout and "demo --stop" in started.stdout
        assert is_mounted(mnt)
        # It prints its server URL, the key the README names, and an SDK snippet that works.
        url = re.search(r"server URL: (http://127\.0\.0\.1:\d+)", started.stdout)
        assert url is not None, started.stdout
        assert "key: emulator-key" in started.stdout
        assert "emulator-key" in (README.read_text())
        snippet = started.stdout.split("From Python (the official SDK):\n", 1)[1]
        snippet = "\n".join(line.strip() for line in snippet.splitlines()[:2])
        sdk_listing = subprocess.run(
            [sys.executable, "-c", snippet + "\nprint(len(client.files.list().data))"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert sdk_listing.returncode == 0 and int(sdk_listing.stdout) >= 2, sdk_listing.stderr
        # A second demo on the same mountpoint says how to stop the first.
        twice = cli("demo", "mnt", env=env, cwd=tmp_path)
        assert twice.returncode != 0 and "demo --stop" in twice.stderr, twice.stderr
        assert "mistralfs unmount" not in twice.stderr
        # Its batch job, in jobs/, fills in once the emulator's fake model is done.
        [job] = os.listdir(mnt / "jobs")
        assert re.fullmatch(r"demo \([0-9a-f]{8}\)", job), job
        assert "jobs/*/output.jsonl" in started.stdout
        output = wait_for(lambda: (mnt / "jobs" / job / "output.jsonl").exists(), timeout=20)
        assert output and (mnt / "jobs" / job / "output.jsonl").read_bytes()
        status = json.loads((mnt / "jobs" / job / "job.json").read_bytes())
        assert status["status"] == "SUCCESS" and status["metadata"] == {"name": "demo"}
        (mnt / "batch" / "mine.jsonl").write_bytes(b'{"a": 1}\n')
        # The data is in the state folder, not shared with another folder's demo.
        assert (state / "emulator").is_dir()
        emulator_pid = int((state / "emulator.pid").read_text())
        stopped = cli("demo", "--stop", "mnt", env=env, cwd=tmp_path)
        assert stopped.returncode == 0, stopped.stderr
        assert not is_mounted(mnt)
        wait_for(lambda: not process_alive(emulator_pid), timeout=10)
        # Started again, it shows what was written: the same account.
        again = cli("demo", "mnt", env=env, cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        # On the same port, so that the printed URL and snippet still hold.
        assert f"server URL: {url[1]}" in again.stdout, again.stdout
        assert (mnt / "batch" / "mine.jsonl").read_bytes() == b'{"a": 1}\n'
    finally:
        cli("demo", "--stop", "mnt", env=env, cwd=tmp_path)
        for flags in (["-u"], ["-z", "-u"]):
            if is_mounted(mnt):
                subprocess.run(["fusermount3", *flags, str(mnt)], capture_output=True)
        if (state / "emulator.pid").exists():
            pid = int((state / "emulator.pid").read_text())
            if process_alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert not is_mounted(mnt)
