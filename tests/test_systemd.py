"""The systemd units in systemd/ and the sd_notify protocol the daemon speaks to them.

- `systemd-analyze verify` accepts both units: the user unit as it is (with a HOME whose
  ~/.local/bin/mistralfs is this venv's script, as the unit's comments say to install
  it), the system template as an instance whose only change is the ExecStart binary.
  The same check rejects broken variants of those units, so it can fail.
- Neither unit uses a setting that gives the service its own mount namespace (the mount
  would be invisible outside the service), and the user unit sets nothing that implies
  NoNewPrivileges (it would disable the setuid fusermount3).
- A daemon started as systemd would start it (NOTIFY_SOCKET set, --foreground) sends
  READY=1 only once the mountpoint answers, STATUS= lines about uploads in flight, and
  STOPPING=1 on SIGTERM before it waits for an upload in flight; then it exits 0 and
  nothing stays mounted.

systemd-analyze works without a running systemd; `.ci/setup` installs it (package
`systemd`), and a missing one fails these tests rather than skipping them.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import RunningEmulator
from emulator_admin import set_faults
from mistralai.client import Mistral
from mounting import mount_command, remote_files

pytestmark = pytest.mark.fuse

UNITS = Path(__file__).resolve().parent.parent / "systemd"
USER_UNIT = UNITS / "mistralfs.service"
TEMPLATE = UNITS / "mistralfs@.service"
TEMPLATE_BINARY = "/usr/local/bin/mistralfs"
INSTANCE = "mistralfs@mnt-mistral.service"  # systemd-escape --path /mnt/mistral
VENV_BINARY = Path(sys.executable).parent / "mistralfs"


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    assert path, "systemd-analyze is missing: .ci/setup installs it (Debian package systemd)"
    return path


def verify(unit: Path, *, user: bool, home: Path | None = None) -> list[str]:
    """What `systemd-analyze verify` holds against `unit`; empty if it accepts it.

    `--recursive-errors=no` makes systemd 252 exit non-zero for an unknown key or a value
    it cannot parse in this unit (without the option it only prints a warning and exits
    0), while problems of other units it loads (default.target...) do not count.
    """
    runtime = unit.parent / "runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home or unit.parent),  # %h in a user unit
        "XDG_RUNTIME_DIR": str(runtime),  # --user needs one; no running systemd is needed
        "SYSTEMD_LOG_LEVEL": "notice",
        "SYSTEMD_LOG_COLOR": "0",
    }
    command = [systemd_analyze(), *(["--user"] if user else []), "verify"]
    command += ["--man=no", "--recursive-errors=no", str(unit)]
    result = subprocess.run(
        command, env=env, cwd=unit.parent, capture_output=True, text=True, timeout=60
    )
    lines = (result.stdout + result.stderr).splitlines()
    own = [line for line in lines if str(unit) in line or unit.name in line]
    if result.returncode != 0:
        return [f"exit status {result.returncode}", *lines]
    return own


def user_unit_home(tmp_path: Path) -> Path:
    """A HOME laid out as the user unit's comments say: ~/.local/bin/mistralfs is the script."""
    assert VENV_BINARY.is_file(), f"{VENV_BINARY} is missing: run .ci/setup"
    home = tmp_path / "home"
    (home / ".local" / "bin").mkdir(parents=True)
    (home / ".local" / "bin" / "mistralfs").symlink_to(VENV_BINARY)
    return home


def template_instance(tmp_path: Path, mutation: tuple[str, str] | None = None) -> Path:
    """The template as INSTANCE, with ExecStart running this venv's mistralfs; nothing else
    changes (checked), since /usr/local/bin/mistralfs need not exist here. A `mutation`
    (old, new) is applied after that."""
    assert VENV_BINARY.is_file(), f"{VENV_BINARY} is missing: run .ci/setup"
    original = TEMPLATE.read_text()
    copy = original.replace(f"ExecStart={TEMPLATE_BINARY} ", f"ExecStart={VENV_BINARY} ")
    changed = [
        (a, b) for a, b in zip(original.splitlines(), copy.splitlines(), strict=True) if a != b
    ]
    assert len(changed) == 1 and changed[0][0].startswith(f"ExecStart={TEMPLATE_BINARY} ")
    if mutation is not None:
        copy = mutate(copy, *mutation)
    folder = tmp_path / "system"
    folder.mkdir(exist_ok=True)
    unit = folder / INSTANCE
    unit.write_text(copy)
    return unit


def mutate(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"{old!r} is not in the unit exactly once"
    return text.replace(old, new)


def settings(unit: Path) -> dict[str, list[str]]:
    """KEY -> values, over all sections; comments and blank lines skipped."""
    found: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


# --- systemd-analyze verify ---------------------------------------------------------------


def test_user_unit_verifies(tmp_path: Path) -> None:
    folder = tmp_path / "user"
    folder.mkdir()
    unit = folder / USER_UNIT.name
    shutil.copyfile(USER_UNIT, unit)  # unchanged
    assert verify(unit, user=True, home=user_unit_home(tmp_path)) == []


def test_system_template_verifies_as_an_instance(tmp_path: Path) -> None:
    assert verify(template_instance(tmp_path), user=False) == []


# Each mutation turns one of the real units into a broken one that verify must reject.
# (systemd 252's verify checks only the first command of each Exec*= setting, and none
# with a "-" prefix: test_every_command_is_there covers the others.)
BROKEN = {
    "typo in a key": ("TimeoutStopSec=600", "TimeoutStopSek=600"),
    "bad Type": ("Type=notify", "Type=notifyy"),
    "bad KillMode": ("KillMode=mixed", "KillMode=gently"),
    "missing binary": ("/mistralfs mount ", "/no-such-mistralfs mount "),
}


@pytest.mark.parametrize("mutation", BROKEN, ids=list(BROKEN))
@pytest.mark.parametrize("which", ["user", "template"])
def test_verify_rejects_a_broken_unit(which: str, mutation: str, tmp_path: Path) -> None:
    if which == "user":
        folder = tmp_path / "user"
        folder.mkdir()
        unit = folder / USER_UNIT.name
        unit.write_text(mutate(USER_UNIT.read_text(), *BROKEN[mutation]))
        problems = verify(unit, user=True, home=user_unit_home(tmp_path))
    else:
        problems = verify(template_instance(tmp_path, BROKEN[mutation]), user=False)
    assert problems, f"systemd-analyze verify accepted a unit with {mutation}"


@pytest.mark.parametrize("unit", [USER_UNIT, TEMPLATE], ids=lambda p: p.name)
def test_every_command_is_there(unit: Path) -> None:
    """The commands verify does not look at: ExecStartPre=, ExecStopPost= (fusermount3, mkdir)."""
    for key, values in settings(unit).items():
        if not key.startswith("Exec") or key == "ExecStart":  # verify checks ExecStart=
            continue
        for value in values:
            binary = value.lstrip("-@:+!").split()[0]
            assert os.access(binary, os.X_OK), f"{key}={value}: {binary} is not executable"


# --- what the units must not contain -------------------------------------------------------

# Settings that run the service in its own mount namespace. systemd cuts propagation from
# that namespace to the host, so the FUSE mount would exist only inside the service.
MOUNT_NAMESPACE = {
    "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts",
    "ReadWritePaths", "ReadOnlyPaths", "InaccessiblePaths", "ExecPaths", "NoExecPaths",
    "BindPaths", "BindReadOnlyPaths", "TemporaryFileSystem", "ProtectKernelTunables",
    "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups", "ProtectProc",
    "ProcSubset", "MountFlags", "RootDirectory", "RootImage", "PrivateNetwork",
    "PrivateIPC", "PrivateUsers", "DynamicUser",
}  # fmt: skip
# Not in a user unit: NoNewPrivileges=yes disables the setuid fusermount3 ("mount failed:
# Operation not permitted"), the seccomp-based settings imply it in a user manager, and
# the rest need privileges a user manager lacks.
NOT_IN_USER_UNIT = {
    "NoNewPrivileges", "SystemCallFilter", "SystemCallArchitectures", "SystemCallLog",
    "RestrictAddressFamilies", "RestrictNamespaces", "RestrictRealtime", "RestrictSUIDSGID",
    "LockPersonality", "MemoryDenyWriteExecute", "ProtectClock", "ProtectHostname",
    "ProtectKernelModules", "ProtectKernelLogs", "PrivateDevices", "CapabilityBoundingSet",
}  # fmt: skip


@pytest.mark.parametrize("unit", [USER_UNIT, TEMPLATE], ids=lambda p: p.name)
def test_no_setting_hides_the_mount_in_a_namespace(unit: Path) -> None:
    assert MOUNT_NAMESPACE.isdisjoint(settings(unit))


def test_user_unit_keeps_setuid_fusermount3_working() -> None:
    assert NOT_IN_USER_UNIT.isdisjoint(settings(USER_UNIT))


@pytest.mark.parametrize("unit", [USER_UNIT, TEMPLATE], ids=lambda p: p.name)
def test_service_shape(unit: Path) -> None:
    found = settings(unit)
    assert found["Type"] == ["notify"] and found["NotifyAccess"] == ["main"]
    assert found["KillMode"] == ["mixed"] and found["TimeoutStopSec"] == ["600"]
    assert found["Restart"] == ["on-failure"]
    assert found["LoadCredential"][0].startswith("mistral-api-key:")
    [start] = found["ExecStart"]
    assert re.fullmatch(r"\S+/mistralfs mount --foreground \$MISTRALFS_OPTIONS %[hf]\S*", start)
    assert found["ExecStartPre"][0].startswith("-/usr/bin/fusermount3 -uz ")


def test_template_is_hardened_but_may_mount() -> None:
    found = settings(TEMPLATE)
    assert found["NoNewPrivileges"] == ["yes"]
    assert found["CapabilityBoundingSet"] == ["CAP_SYS_ADMIN"]
    assert found["DeviceAllow"] == ["/dev/fuse rw"]
    assert found["CacheDirectory"] == ["mistralfs/%i"]


# --- the sd_notify protocol, end to end -------------------------------------------------


class NotifySocket:
    """The receiving end of NOTIFY_SOCKET: every datagram's KEY=VALUE lines, in order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.lines: list[str] = []

    def next_line(self, predicate, timeout: float) -> str:
        """Wait for the next line (after those already returned) that satisfies `predicate`."""
        deadline = time.monotonic() + timeout
        while True:
            for i, line in enumerate(self.lines):
                if predicate(line):
                    del self.lines[: i + 1]
                    return line
            self.lines.clear()
            left = deadline - time.monotonic()
            assert left > 0, f"no matching notification within {timeout} s"
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.lines.extend(data.decode().splitlines())

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def foreground_daemon(
    emulator: RunningEmulator, root: Path, notify: Path
) -> Iterator[tuple[subprocess.Popen, Path]]:
    """`mistralfs mount --foreground` as systemd runs it; always unmounted and ended."""
    command, env, mounted = mount_command(emulator, root, "--foreground")
    for name in ("JOURNAL_STREAM", "CACHE_DIRECTORY", "CREDENTIALS_DIRECTORY", "LISTEN_FDS"):
        env.pop(name, None)
    env["NOTIFY_SOCKET"] = str(notify)
    with open(root / "daemon.log", "wb") as log:
        proc = subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        yield proc, mounted.path
    finally:
        for flags in (["-u"], ["-z", "-u"]):
            if os.path.ismount(mounted.path):
                subprocess.run(["fusermount3", *flags, str(mounted.path)], capture_output=True)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if proc.poll() is None:
                proc.send_signal(sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
        assert not os.path.ismount(mounted.path), f"{mounted.path} is still mounted"


def test_ready_status_and_stopping_reach_notify_socket(
    emulator_process: RunningEmulator, tmp_path: Path, sdk: Mistral
) -> None:
    notify = NotifySocket(tmp_path / "notify")
    source = tmp_path / "slow.bin"
    source.write_bytes(os.urandom(300_000))
    slow_upload = {"method": "POST", "path_prefix": "/v1/files", "status": None, "delay": 3.0}
    try:
        with foreground_daemon(emulator_process, tmp_path, notify.path) as (proc, mnt):
            notify.next_line(lambda line: line == "READY=1", timeout=30)
            # At READY=1 the mount must already answer: no wait, no retry.
            assert {"fine-tune", "batch", "ocr"} <= set(os.listdir(mnt))
            status = notify.next_line(lambda line: line.startswith("STATUS="), timeout=5)
            assert "idle" in status, status

            set_faults(emulator_process.url, emulator_process.api_key, slow_upload)
            copy = subprocess.Popen(["cp", str(source), str(mnt / "batch")])
            try:
                busy = notify.next_line(lambda line: "in flight" in line, timeout=5)
                assert busy.startswith("STATUS="), busy

                proc.send_signal(signal.SIGTERM)
                notify.next_line(lambda line: line == "STOPPING=1", timeout=5)
                # STOPPING=1 comes first; the daemon then waits for the upload.
                assert proc.poll() is None, "the daemon must wait for the upload in flight"
                assert proc.wait(timeout=30) == 0, (tmp_path / "daemon.log").read_text()
                assert copy.wait(timeout=30) == 0, "close() must succeed after the upload"
            finally:
                if copy.poll() is None:
                    copy.kill()
                    copy.wait()
            assert not os.path.ismount(mnt)
    finally:
        notify.close()
    [remote] = remote_files(sdk)
    assert (remote.filename, remote.size_bytes) == ("slow.bin", 300_000)
