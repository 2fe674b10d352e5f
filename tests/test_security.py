"""Nobody let in, nothing leaked: keys, signed URLs, other users, bad input."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import RunningEmulator
from emulator_admin import set_faults
from mistralai.client import Mistral
from mounting import (
    Mounted,
    force_unmount,
    is_mounted,
    mount,
    mount_command,
    remote_files,
    wait_for,
)

pytestmark = pytest.mark.fuse

SECRET_KEY = "sk-secret-0123456789abcdef"


@pytest.fixture
def secret_emulator(tmp_path: Path) -> Iterator[RunningEmulator]:
    """An emulator with a key distinctive enough to search the logs for."""
    log = (tmp_path / "emulator.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mistralfs", "emulator", "--port", "0",
         "--data", str(tmp_path / "emu"), "--log-level", "debug"],
        stdout=subprocess.PIPE, stderr=log, text=True,
        env=dict(os.environ, MISTRAL_API_KEY=SECRET_KEY),
    )  # fmt: skip
    try:
        url = proc.stdout.readline().rsplit(" ", 1)[1].strip()
        yield RunningEmulator(url=url, api_key=SECRET_KEY, data_dir=tmp_path / "emu", config=None)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def test_key_and_url_signatures_never_reach_a_log(
    secret_emulator: RunningEmulator, tmp_path: Path
) -> None:
    with mount(secret_emulator, tmp_path) as m:  # at --log-level debug
        (m / "batch" / "a.txt").write_bytes(b"content")
        assert (m / "batch" / "a.txt").read_bytes() == b"content"
        url = os.getxattr(m / "batch" / "a.txt", "user.mistral.signed_url").decode()
        with pytest.raises(OSError):
            (m / "fine-tune" / "bad.jsonl").write_bytes(b"not json")
        os.unlink(m / "batch" / "a.txt")
        pid = m.daemon_pid()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert SECRET_KEY.encode() not in cmdline
        daemon_log = m.log()
    signature = url.split("sig=", 1)[1].split("&")[0]
    assert len(signature) >= 32
    emulator_log = (tmp_path / "emulator.log").read_text()
    assert "DEBUG" in daemon_log and "uploaded batch/a.txt" in daemon_log
    for log in (daemon_log, emulator_log):
        assert SECRET_KEY not in log
        assert signature not in log
        assert "sig=" not in log


def test_a_key_file_others_can_read_is_warned_about(
    emulator_process: RunningEmulator, tmp_path: Path
) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(emulator_process.api_key)
    key_file.chmod(0o644)
    command, env, m = mount_command(emulator_process, tmp_path)
    env.pop("MISTRAL_API_KEY")
    result = subprocess.run(
        [*command, "--api-key-file", str(key_file)], env=env, capture_output=True, text=True
    )
    try:
        assert result.returncode == 0, result.stderr
        assert "can be read by others; chmod 600" in result.stderr
    finally:
        subprocess.run([sys.executable, "-m", "mistralfs", "unmount", str(m.path)], env=env)


@pytest.fixture
def public_root() -> Iterator[Path]:
    """A folder other users can traverse (pytest's tmp folders are private)."""
    root = Path(tempfile.mkdtemp(prefix="mistralfs-public-", dir="/tmp"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def as_nobody(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["runuser", "-u", "nobody", "--", *command], capture_output=True, text=True, timeout=30
    )


def test_only_the_mounting_user_gets_in_unless_allow_other(
    emulator_process: RunningEmulator, public_root: Path, sdk: Mistral
) -> None:
    sdk.files.upload(file={"file_name": "shared.txt", "content": b"hello"}, purpose="batch")
    with mount(emulator_process, public_root / "private") as m:
        (public_root / "private").chmod(0o755)
        listing = as_nobody("ls", str(m / "batch"))
        assert listing.returncode != 0 and "Permission denied" in listing.stderr
        reading = as_nobody("cat", str(m / "batch" / "shared.txt"))
        assert reading.returncode != 0 and "Permission denied" in reading.stderr
    with mount(emulator_process, public_root / "shared", "--allow-other") as m:
        (public_root / "shared").chmod(0o755)
        assert as_nobody("ls", str(m / "batch")).stdout.split() == ["shared.txt"]
        assert as_nobody("cat", str(m / "batch" / "shared.txt")).stdout == "hello"
        writing = as_nobody("sh", "-c", f"echo x > {m / 'batch' / 'shared.txt'}")
        assert writing.returncode != 0 and "Permission denied" in writing.stderr


def test_a_server_that_is_not_a_files_api_is_refused(
    emulator_process: RunningEmulator, tmp_path: Path
) -> None:
    wrong = RunningEmulator(
        url=emulator_process.url + "/storage", api_key="k", data_dir=tmp_path, config=None
    )
    command, env, m = mount_command(wrong, tmp_path)
    started = time.monotonic()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
    assert time.monotonic() - started < 15
    assert result.returncode != 0 and "cannot use the server" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not os.path.ismount(m.path)


def test_refused_writes_leave_nothing_behind(mounted: Mounted, sdk: Mistral) -> None:
    refusals = [
        (lambda: (mounted / "batch" / ("x" * 256)).write_bytes(b"x"), errno.ENAMETOOLONG),
        (lambda: (mounted / "root.txt").write_bytes(b"x"), errno.EACCES),
        (lambda: os.mkdir(mounted / "batch" / "dir"), errno.EPERM),
    ]
    for action, code in refusals:
        with pytest.raises(OSError) as raised:
            action()
        assert raised.value.errno == code
    fd = os.open(mounted / "batch" / "huge.bin", os.O_WRONLY | os.O_CREAT)
    os.write(fd, b"start")
    with pytest.raises(OSError):
        os.pwrite(fd, b"x", 512 * 1024 * 1024)
    with pytest.raises(OSError):
        os.close(fd)
    time.sleep(0.5)  # the release that follows close()
    assert remote_files(sdk) == []
    assert sorted(os.listdir(mounted / "batch")) == []
    assert list(mounted.cache_dir.rglob("*.spool")) == []


def test_when_retries_run_out_the_call_fails_in_time_and_the_data_is_kept(
    emulator_process: RunningEmulator, tmp_path: Path, sdk: Mistral
) -> None:
    with mount(emulator_process, tmp_path, "--retry-time", "2") as m:
        set_faults(
            emulator_process.url,
            emulator_process.api_key,
            {"method": "POST", "path_prefix": "/v1/files", "status": 503, "times": None},
        )
        started = time.monotonic()
        with pytest.raises(OSError) as raised:
            (m / "batch" / "later.txt").write_bytes(b"keep me")
        assert raised.value.errno == errno.EIO
        assert time.monotonic() - started < 10
        assert sorted(os.listdir(m.path)) == ["batch", "fine-tune", "jobs", "ocr"]  # still serving
        # The last release tries once more, then keeps the content.
        kept = wait_for(lambda: list((m.cache_dir / "recovery").glob("*.spool")), timeout=10)
        assert [p.read_bytes() for p in kept] == [b"keep me"]
    assert remote_files(sdk) == []


def state_name(mountpoint: Path, suffix: str) -> str:
    """The name a mount's pid file or socket has in the runtime folder."""
    return f"mount-{hashlib.sha256(str(mountpoint.resolve()).encode()).hexdigest()[:16]}.{suffix}"


def test_a_runtime_folder_another_user_owns_is_refused_and_nothing_is_overwritten(
    emulator_process: RunningEmulator, tmp_path: Path
) -> None:
    command, env, m = mount_command(emulator_process, tmp_path)
    precious = tmp_path / "precious"
    precious.write_text("root's own data\n")
    planted = m.run_dir / "mistralfs"  # what another user made before root's first mount
    planted.mkdir(mode=0o777)
    planted.chmod(0o777)
    for suffix in ("pid", "sock"):
        (planted / state_name(m.path, suffix)).symlink_to(precious)
    os.chown(planted, 65534, 65534)
    try:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, result.stderr
        [line] = result.stderr.strip().splitlines()
        assert str(planted) in line and "uid 65534" in line
        assert not is_mounted(m.path)
    finally:
        force_unmount(m, env)
    assert precious.read_text() == "root's own data\n"


def test_root_without_a_runtime_folder_uses_run_mistralfs(
    emulator_process: RunningEmulator, tmp_path: Path
) -> None:
    command, env, m = mount_command(emulator_process, tmp_path)
    env.pop("XDG_RUNTIME_DIR")  # fstab, sudo, a root shell
    pid_file = Path("/run/mistralfs") / state_name(m.path, "pid")
    try:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        folder = os.lstat("/run/mistralfs")
        assert stat.S_ISDIR(folder.st_mode) and folder.st_uid == 0
        assert stat.S_IMODE(folder.st_mode) == 0o700
        assert stat.S_IMODE(os.lstat(pid_file).st_mode) == 0o600
        pid = int(pid_file.read_text().split()[0])
        assert f"(pid {pid}," in subprocess.run(
            [sys.executable, "-m", "mistralfs", "status", str(m.path)],
            env=env, capture_output=True, text=True, timeout=30,
        ).stdout  # fmt: skip
    finally:
        force_unmount(m, env)
    assert not pid_file.exists()


def test_the_cache_folder_and_the_log_are_private(
    emulator_process: RunningEmulator, tmp_path: Path
) -> None:
    with mount(emulator_process, tmp_path / "fresh") as m:
        (m / "batch" / "a.txt").write_bytes(b"content")
        assert stat.S_IMODE(os.stat(m.cache_dir).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(m.log_file).st_mode) == 0o600
    # As versions before this one left them: readable by every user.
    command, env, m = mount_command(emulator_process, tmp_path / "older")
    m.cache_dir.mkdir(mode=0o755)
    m.cache_dir.chmod(0o755)
    m.log_file.write_text("2026-01-01 00:00:00,000 INFO mistralfs: uploaded batch/a.txt\n")
    m.log_file.chmod(0o644)
    try:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert stat.S_IMODE(os.stat(m.cache_dir).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(m.log_file).st_mode) == 0o600
    finally:
        force_unmount(m, env)


@pytest.mark.parametrize("source", ["env", "key-file", "systemd-credential"])
def test_the_daemon_environment_holds_no_key(
    secret_emulator: RunningEmulator, tmp_path: Path, source: str
) -> None:
    command, env, m = mount_command(secret_emulator, tmp_path)
    key_file = tmp_path / "credentials" / "mistral-api-key"
    key_file.parent.mkdir(mode=0o700)
    key_file.write_text(SECRET_KEY + "\n")
    key_file.chmod(0o600)
    if source != "env":
        env.pop("MISTRAL_API_KEY")
    if source == "key-file":
        command += ["--api-key-file", str(key_file)]
    if source == "systemd-credential":
        env["CREDENTIALS_DIRECTORY"] = str(key_file.parent)
    try:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        pid = m.daemon_pid()
        assert pid is not None
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert b"XDG_RUNTIME_DIR=" in environ  # the environment read is the daemon's
        assert SECRET_KEY.encode() not in environ and b"MISTRAL_API_KEY" not in environ
        assert SECRET_KEY.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        (m / "batch" / "a.txt").write_bytes(b"the key works")
        assert (m / "batch" / "a.txt").read_bytes() == b"the key works"
    finally:
        force_unmount(m, env)


def test_a_foreground_daemon_wipes_the_key_from_its_environment(
    secret_emulator: RunningEmulator, tmp_path: Path
) -> None:
    """Run by hand or from a unit's EnvironmentFile= with MISTRAL_API_KEY set."""
    command, env, m = mount_command(secret_emulator, tmp_path)
    daemon = subprocess.Popen(
        [*command, "--foreground"], env=env, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        wait_for(lambda: is_mounted(m.path) and m.daemon_pid() == daemon.pid, timeout=30)
        environ = Path(f"/proc/{daemon.pid}/environ").read_bytes()
        assert b"XDG_RUNTIME_DIR=" in environ
        assert SECRET_KEY.encode() not in environ
        (m / "batch" / "a.txt").write_bytes(b"the key works")
    finally:
        force_unmount(m, env)
        daemon.wait(timeout=30)


def test_a_file_name_cannot_forge_a_log_line(mounted: Mounted) -> None:
    """U+2028 is a line break to many viewers (and to str.splitlines), and a valid name."""
    forged = "2026-12-06 01:00:00,000 INFO mistralfs.fs.writer: FAKE LOG LINE"
    name = f"a\u2028{forged}.txt"
    (mounted / "batch" / name).write_bytes(b"content")
    assert os.listdir(mounted / "batch") == [name]
    log = wait_for(lambda: "FAKE LOG LINE" in mounted.log() and mounted.log())
    lines = log.splitlines()
    assert not any(line.startswith(forged) for line in lines), log
    assert any("uploaded batch/a\\u2028" + forged in line for line in lines), log
