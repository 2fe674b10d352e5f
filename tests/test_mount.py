"""Real mounts: `mistralfs mount` in a subprocess against the emulator, used with syscalls.

These are the foundation's end-to-end promises: what is copied in is in the account
with the right purpose and size, what the account holds shows up, content read back
is byte-identical, `rm` deletes remotely, refused content fails `cp` and stores
nothing, and a bad key refuses to mount.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import RunningEmulator
from emulator_admin import add_batch_output, clear_requests, requests, set_faults
from mistralai.client import Mistral
from mounting import Mounted, mount, mount_command, remote_files, sha256_of, wait_for

from mistralfs.daemon.state import process_alive

pytestmark = pytest.mark.fuse

MiB = 1024 * 1024


def test_root_shows_the_purpose_folders(mounted: Mounted) -> None:
    assert sorted(os.listdir(mounted.path)) == ["batch", "fine-tune", "jobs", "ocr"]
    root = os.stat(mounted.path)
    assert stat.S_IMODE(root.st_mode) == 0o555  # nothing can be created in it
    assert root.st_uid == os.getuid()
    for name in ("batch", "fine-tune", "ocr"):
        st = os.stat(mounted / name)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o755
        assert st.st_uid == os.getuid()
    jobs = os.stat(mounted / "jobs")  # the batch jobs, read-only (test_jobs_view.py)
    assert stat.S_ISDIR(jobs.st_mode) and stat.S_IMODE(jobs.st_mode) == 0o555


def test_50_mb_random_file_round_trips(
    mounted: Mounted, emulator_process: RunningEmulator, tmp_path: Path, sdk: Mistral
) -> None:
    source = tmp_path / "random.bin"
    with open(source, "wb") as f:
        for _ in range(50):
            f.write(os.urandom(MiB))
    clear_requests(emulator_process.url, emulator_process.api_key)
    subprocess.run(["cp", str(source), str(mounted / "batch")], check=True)
    # Sent while cp was writing it (docs/SEMANTICS.md), and once.
    uploads = requests(emulator_process.url, emulator_process.api_key)
    assert [r["path"] for r in uploads if r["method"] == "POST"] == ["/v1/files"]
    # Read back through a second mount, so the bytes come from the account and not
    # from this mount's spool or the kernel's page cache.
    with mount(emulator_process, tmp_path / "second") as second:
        clear_requests(emulator_process.url, emulator_process.api_key)
        assert sha256_of(second / "batch" / "random.bin") == sha256_of(source)
        storage_reads = [
            r
            for r in requests(emulator_process.url, emulator_process.api_key)
            if r["path"].startswith("/storage/")
        ]
        assert storage_reads, "content must be read through the signed URL"
        assert all(r["range"] for r in storage_reads), "reads must be ranged"
    [remote] = remote_files(sdk, purpose="batch")
    assert remote.size_bytes == 50 * MiB


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may change a mount's readahead")
def test_kernel_readahead_is_raised_to_one_block(mounted: Mounted) -> None:
    device = os.stat(mounted.path).st_dev
    knob = Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb")
    assert int(knob.read_text()) == 1024  # the kernel default is 128


def test_copy_in_is_in_the_account_with_its_purpose_and_size(
    mounted: Mounted, tmp_path: Path, sdk: Mistral
) -> None:
    data = b'{"messages": [{"role": "user", "content": "hi"}]}\n' * 100
    source = tmp_path / "train.jsonl"
    source.write_bytes(data)
    subprocess.run(["cp", str(source), str(mounted / "fine-tune")], check=True)
    [remote] = remote_files(sdk)
    assert remote.filename == "train.jsonl"
    assert remote.purpose == "fine-tune"
    assert remote.size_bytes == len(data)
    assert remote.num_lines == 100
    st = os.stat(mounted / "fine-tune" / "train.jsonl")
    assert st.st_size == len(data)
    assert int(st.st_mtime) == remote.created_at
    assert stat.S_IMODE(st.st_mode) == 0o644
    assert os.getxattr(mounted / "fine-tune" / "train.jsonl", "user.mistral.id") == (
        remote.id.encode()
    )


def test_files_advertise_1_mib_io(mounted: Mounted, tmp_path: Path) -> None:
    """st_blksize is what cp sizes its writes by: 1 MiB, the most one FUSE write carries."""
    target = mounted / "batch" / "blk.bin"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        assert os.fstat(fd).st_blksize == MiB  # while being written
        assert os.write(fd, os.urandom(MiB)) == MiB
    finally:
        os.close(fd)
    assert os.stat(target).st_blksize == MiB  # once uploaded


def test_sdk_upload_appears_and_reads_back(mounted: Mounted, sdk: Mistral) -> None:
    assert os.listdir(mounted / "batch") == []  # the listing is now cached
    content = b'{"custom_id": "1"}\n'
    sdk.files.upload(file={"file_name": "from-sdk.jsonl", "content": content}, purpose="batch")
    path = mounted / "batch" / "from-sdk.jsonl"
    wait_for(lambda: "from-sdk.jsonl" in os.listdir(mounted / "batch"), timeout=5)
    assert path.read_bytes() == content


def test_batch_outputs_are_listed(mounted: Mounted, emulator_process: RunningEmulator) -> None:
    body = b'{"custom_id": "1", "response": {"status_code": 200}}\n'
    add_batch_output(emulator_process.url, emulator_process.api_key, body, "results.jsonl")
    path = mounted / "batch" / "results.jsonl"
    wait_for(path.exists, timeout=5)
    assert path.read_bytes() == body
    assert os.getxattr(path, "user.mistral.source") == b"mistral"
    assert os.getxattr(path, "user.mistral.sample_type") == b"batch_result"


def test_ls_l_asks_for_security_labels_and_acls_once(
    mounted: Mounted, sdk: Mistral, tmp_path: Path
) -> None:
    """`ls -l` asks for every file's SELinux label and ACL unless told they are unsupported."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    for i in range(20):
        sdk.files.upload(file={"file_name": f"f{i}.jsonl", "content": b"{}\n"}, purpose="batch")
    wait_for(lambda: len(os.listdir(mounted / "batch")) == 20, timeout=5)
    trace = tmp_path / "ls.trace"
    command = ["strace", "-o", str(trace), "-e", "trace=getxattr,lgetxattr", "ls", "-l"]
    subprocess.run([*command, str(mounted / "batch")], check=True, capture_output=True)
    calls = [line for line in trace.read_text().splitlines() if "xattr(" in line]
    assert 0 < len(calls) < 20, calls
    assert all("EOPNOTSUPP" in line for line in calls), calls
    assert os.getxattr(mounted / "batch" / "f0.jsonl", "user.mistral.purpose") == b"batch"


def test_rm_deletes_remotely(mounted: Mounted, sdk: Mistral) -> None:
    (mounted / "batch" / "gone.txt").write_bytes(b"bye\n")
    [remote] = remote_files(sdk)
    os.unlink(mounted / "batch" / "gone.txt")
    assert not (mounted / "batch" / "gone.txt").exists()
    assert remote_files(sdk) == []
    with pytest.raises(Exception, match=r"404|[Nn]ot found"):
        sdk.files.retrieve(file_id=remote.id)


def test_invalid_jsonl_in_fine_tune_fails_cp_and_stores_nothing(
    mounted: Mounted, tmp_path: Path, sdk: Mistral
) -> None:
    source = tmp_path / "broken.jsonl"
    source.write_bytes(b'{"ok": 1}\nthis is not json\n')
    result = subprocess.run(
        ["cp", str(source), str(mounted / "fine-tune")], capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "Bad message" in result.stderr
    assert remote_files(sdk) == []
    # The name stays, and reads what was written, while its content is kept.
    assert (mounted / "fine-tune" / "broken.jsonl").read_bytes() == source.read_bytes()
    # The service's own message, line number included, reaches the log.
    assert "line 2" in mounted.log() and "invalid json" in mounted.log()
    # Nothing the user wrote is lost: the spool is kept for recovery.
    kept = list((mounted.cache_dir / "recovery").glob("*.spool"))
    assert [p.read_bytes() for p in kept] == [source.read_bytes()]


def test_write_past_512_mb_fails_with_efbig_and_uploads_nothing(
    mounted: Mounted, sdk: Mistral
) -> None:
    fd = os.open(mounted / "batch" / "huge.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"x" * 4096, 0)
        with pytest.raises(OSError) as raised:
            os.pwrite(fd, b"x", 512 * MiB)
        assert raised.value.errno == errno.EFBIG
    finally:
        with pytest.raises(OSError) as closed:
            os.close(fd)
        assert closed.value.errno == errno.EFBIG
    assert remote_files(sdk) == []


def test_creating_outside_purpose_folders_is_refused(mounted: Mounted) -> None:
    with pytest.raises(OSError) as raised:
        (mounted / "loose.txt").write_bytes(b"x")
    assert raised.value.errno in (errno.EACCES, errno.EPERM)
    for path in (mounted / "newdir", mounted / "batch" / "sub"):
        with pytest.raises(OSError) as raised:
            os.mkdir(path)
        assert raised.value.errno == errno.EPERM


def test_read_only_mount_refuses_changes(
    emulator_process: RunningEmulator, tmp_path: Path, sdk: Mistral
) -> None:
    sdk.files.upload(file={"file_name": "keep.txt", "content": b"keep"}, purpose="batch")
    with mount(emulator_process, tmp_path, "--read-only") as m:
        path = m / "batch" / "keep.txt"
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o444
        assert stat.S_IMODE(os.stat(m / "batch").st_mode) == 0o555
        assert path.read_bytes() == b"keep"
        for action in (
            lambda: (m / "batch" / "new.txt").write_bytes(b"x"),
            lambda: os.unlink(path),
        ):
            with pytest.raises(OSError) as raised:
                action()
            assert raised.value.errno == errno.EROFS
    assert [f.filename for f in remote_files(sdk)] == ["keep.txt"]


def test_wrong_key_refuses_to_mount_quickly(
    emulator_process: RunningEmulator, tmp_path: Path
) -> None:
    command, env, mounted = mount_command(emulator_process, tmp_path, key="wrong-key")
    started = time.monotonic()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
    assert time.monotonic() - started < 15
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "refused the API key" in lines[0], result.stderr
    assert "wrong-key" not in result.stderr and "wrong-key" not in mounted.log()
    assert not os.path.ismount(mounted.path)


def test_unreachable_server_refuses_to_mount_quickly(tmp_path: Path) -> None:
    nowhere = RunningEmulator(url="http://127.0.0.1:9", api_key="k", data_dir=tmp_path, config=None)
    command, env, mounted = mount_command(nowhere, tmp_path)
    started = time.monotonic()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
    assert time.monotonic() - started < 15
    assert result.returncode != 0
    assert "cannot use the server" in result.stderr
    assert not os.path.ismount(mounted.path)


def test_unmount_returns_after_the_daemon_exits(
    emulator_process: RunningEmulator, tmp_path: Path
) -> None:
    with mount(emulator_process, tmp_path) as m:
        pid = m.daemon_pid()
        assert pid is not None
        env = dict(os.environ, XDG_RUNTIME_DIR=str(m.run_dir))
        result = subprocess.run(
            [sys.executable, "-m", "mistralfs", "unmount", str(m.path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert not os.path.ismount(m.path)
        assert not process_alive(pid)


def test_mode_and_owner_changes_are_accepted_without_effect(
    mounted: Mounted, tmp_path: Path, sdk: Mistral
) -> None:
    path = mounted / "batch" / "meta.txt"
    path.write_bytes(b"meta\n")
    before = os.stat(path)
    os.chmod(path, 0o600)
    os.utime(path, (1_000_000_000, 1_000_000_000))
    os.chown(path, os.getuid(), os.getgid())
    after = os.stat(path)
    assert stat.S_IMODE(after.st_mode) == 0o644
    assert after.st_mtime == 1_000_000_000 != before.st_mtime  # times are kept: mtimes.py
    source = tmp_path / "p.txt"
    source.write_bytes(b"preserved\n")
    os.utime(source, (1_000_000_000, 1_000_000_000))
    subprocess.run(["cp", "-p", str(source), str(mounted / "batch")], check=True)
    subprocess.run(["touch", "-d", "2001-01-01", str(path)], check=True)
    assert sorted(f.filename for f in remote_files(sdk)) == ["meta.txt", "p.txt"]


def test_mv_uploads_under_the_new_name_then_deletes(mounted: Mounted, sdk: Mistral) -> None:
    batch, fine_tune = mounted / "batch", mounted / "fine-tune"
    (batch / "a.jsonl").write_bytes(b'{"messages": []}\n')
    subprocess.run(["mv", str(batch / "a.jsonl"), str(batch / "b.jsonl")], check=True)
    assert os.listdir(batch) == ["b.jsonl"]
    [moved] = remote_files(sdk)
    assert (moved.filename, moved.purpose) == ("b.jsonl", "batch")
    # Across folders the purpose changes, and the target's content rules apply.
    subprocess.run(["mv", str(batch / "b.jsonl"), str(fine_tune / "b.jsonl")], check=True)
    [moved] = remote_files(sdk)
    assert (moved.filename, moved.purpose) == ("b.jsonl", "fine-tune")
    assert (fine_tune / "b.jsonl").read_bytes() == b'{"messages": []}\n'
    (batch / "notes.txt").write_bytes(b"not json\n")
    refused = subprocess.run(
        ["mv", str(batch / "notes.txt"), str(fine_tune / "notes.jsonl")], capture_output=True
    )
    assert refused.returncode != 0
    assert (batch / "notes.txt").read_bytes() == b"not json\n"
    assert sorted((f.filename, f.purpose) for f in remote_files(sdk)) == [
        ("b.jsonl", "fine-tune"),
        ("notes.txt", "batch"),
    ]
    # Onto an existing name: the target is replaced.
    (batch / "c.txt").write_bytes(b"new\n")
    (batch / "d.txt").write_bytes(b"old\n")
    subprocess.run(["mv", str(batch / "c.txt"), str(batch / "d.txt")], check=True)
    assert (batch / "d.txt").read_bytes() == b"new\n"
    assert sorted(f.filename for f in remote_files(sdk, purpose="batch")) == ["d.txt", "notes.txt"]


@pytest.mark.parametrize("stop", ["unmount", "sigterm"])
def test_stopping_waits_for_uploads_in_flight(
    stop: str, emulator_process: RunningEmulator, tmp_path: Path, sdk: Mistral
) -> None:
    source = tmp_path / "slow.bin"
    source.write_bytes(os.urandom(300_000))
    slow_upload = {"method": "POST", "path_prefix": "/v1/files", "status": None, "delay": 2.0}
    with mount(emulator_process, tmp_path) as m:
        pid = m.daemon_pid()
        set_faults(emulator_process.url, emulator_process.api_key, slow_upload)
        copy = subprocess.Popen(["cp", str(source), str(m / "batch")])
        time.sleep(0.5)  # cp is now inside close(), waiting for the upload
        started = time.monotonic()
        if stop == "unmount":
            env = dict(os.environ, XDG_RUNTIME_DIR=str(m.run_dir))
            command = [sys.executable, "-m", "mistralfs", "unmount", str(m.path)]
            assert subprocess.run(command, env=env, timeout=60).returncode == 0
        else:
            os.kill(pid, signal.SIGTERM)
            wait_for(lambda: not process_alive(pid), timeout=30)
        assert copy.wait(timeout=30) == 0, "the upload in flight must finish, and close() succeed"
        assert time.monotonic() - started > 1.0
        assert not os.path.ismount(m.path)
    [remote] = remote_files(sdk)
    assert (remote.filename, remote.size_bytes) == ("slow.bin", 300_000)


def _getdents(fd: int, size: int = 512) -> list[str]:
    """One getdents64 call with a small buffer, so a listing takes many calls."""
    import ctypes
    import struct

    number = {"x86_64": 217, "aarch64": 61}[os.uname().machine]
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(size)
    got = libc.syscall(number, fd, buf, size)
    if got < 0:
        raise OSError(ctypes.get_errno(), "getdents64")
    names, pos = [], 0
    while pos < got:
        reclen = struct.unpack_from("H", buf.raw, pos + 16)[0]
        names.append(buf.raw[pos + 19 : pos + reclen].split(b"\0", 1)[0].decode())
        pos += reclen
    return names


def test_readdir_offsets_stay_valid_while_the_folder_changes(
    mounted: Mounted, sdk: Mistral
) -> None:
    names = [f"file-{i:03d}.txt" for i in range(60)]
    for name in names:
        sdk.files.upload(file={"file_name": name, "content": b"x"}, purpose="batch")
    batch = mounted / "batch"
    wait_for(lambda: len(os.listdir(batch)) == 60, timeout=5)
    fd = os.open(batch, os.O_RDONLY | os.O_DIRECTORY)
    try:
        seen = _getdents(fd)
        assert 0 < len(seen) < 30, "the listing must take several calls"
        for name in names[40:50]:  # deleted here, and elsewhere, while the listing goes on
            os.unlink(batch / name)
        sdk.files.upload(file={"file_name": "late.txt", "content": b"x"}, purpose="batch")
        time.sleep(1.2)  # past the folder cache time
        while more := _getdents(fd):
            seen += more
    finally:
        os.close(fd)
    assert seen[:2] == [".", ".."]
    assert sorted(seen[2:]) == names  # nothing skipped, nothing twice
    assert sorted(os.listdir(batch)) == sorted([*names[:40], *names[50:], "late.txt"])


def test_ls_l_and_probes_on_a_listed_folder_make_no_api_call(
    emulator_process: RunningEmulator, tmp_path: Path, sdk: Mistral
) -> None:
    for i in range(30):
        sdk.files.upload(file={"file_name": f"f{i}.jsonl", "content": b"{}\n"}, purpose="batch")
    with mount(emulator_process, tmp_path, "--dir-cache-time", "60") as m:
        assert len(os.listdir(m / "batch")) == 30
        assert "batch" in os.listdir(m.path)  # the root's listing answers probes of the root
        clear_requests(emulator_process.url, emulator_process.api_key)
        result = subprocess.run(["ls", "-la", str(m / "batch")], capture_output=True, text=True)
        assert result.returncode == 0 and result.stdout.count(".jsonl") == 30
        for probe in (".hidden", ".directory", ".Trash-0", "autorun.inf", ".git", "desktop.ini"):
            assert not (m / "batch" / probe).exists()
            assert not (m / probe).exists()
        assert requests(emulator_process.url, emulator_process.api_key) == []


def test_a_missing_name_is_remembered_only_while_the_listing_is_trusted(
    emulator_process: RunningEmulator, tmp_path: Path, sdk: Mistral
) -> None:
    with mount(emulator_process, tmp_path, "--dir-cache-time", "2") as m:
        batch = m / "batch"
        assert os.listdir(batch) == []
        assert not (batch / "later.txt").exists()
        assert not (batch / "made-here.txt").exists()
        (batch / "made-here.txt").write_bytes(b"here")  # a name remembered missing can be made
        assert (batch / "made-here.txt").read_bytes() == b"here"
        sdk.files.upload(file={"file_name": "later.txt", "content": b"x"}, purpose="batch")
        # Seen once the listing is old, as any remote change: the absence is not kept longer.
        wait_for(lambda: (batch / "later.txt").exists(), timeout=10)
        assert (batch / "later.txt").read_bytes() == b"x"


def test_the_daemon_may_open_as_many_files_as_the_hard_limit_allows(
    emulator_process: RunningEmulator, tmp_path: Path
) -> None:
    """Each block served from the disk tier keeps its file open (a mapping)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # the daemon inherits it
    try:
        with mount(emulator_process, tmp_path) as m:
            limits = Path(f"/proc/{m.daemon_pid()}/limits").read_text()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    [line] = [x for x in limits.splitlines() if x.startswith("Max open files")]
    daemon_soft, daemon_hard = line.split()[3:5]
    assert daemon_soft == daemon_hard != "256"
