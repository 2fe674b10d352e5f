"""Kept times with the real tools on real mounts: a second `rsync -a` of an unchanged
tree uploads nothing (counted at the emulator); `touch -d`, `cp -p` and Midnight
Commander's copy with "preserve attributes" set times that `stat` shows, also after an
unmount and a mount again."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import emulator_admin
import pytest
from conftest import RunningEmulator
from mistralai.client import Mistral
from mounting import Mounted, mount
from test_tools import (
    README,
    Tmux,
    assert_account,
    assert_quiet_log,
    copy_with_f5,
    panel_rows,
    requests_made,
    run,
    start_mc,
    tmux,  # noqa: F401 - a fixture, asked for below
    tool,
)

pytestmark = pytest.mark.fuse

NS = 10**9
OLD = 981_173_106  # 2001-02-03 04:05:06 UTC
JSONL = b'{"custom_id": "1", "body": {"messages": []}}\n'


def make_tree(root: Path, files: dict[str, bytes], mtime: int = OLD) -> None:
    """`files` under `root`, each with its own old mtime (one second apart)."""
    for index, (name, data) in enumerate(sorted(files.items())):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.utime(path, ns=(mtime * NS, (mtime + index) * NS + 250_000_000))


def mtimes(folder: Path) -> dict[str, int]:
    return {entry.name: entry.stat().st_mtime_ns for entry in os.scandir(folder)}


def uploads_and_deletes(emulator: RunningEmulator) -> tuple[int, int]:
    """Uploads and deletions since the emulator's request log was cleared."""
    uploads = requests_made(emulator, "POST")  # which waits for uploads at a release
    log = emulator_admin.requests(emulator.url, emulator.api_key)
    return uploads, sum(r["method"] == "DELETE" and r["path"].startswith("/v1/files") for r in log)


def test_a_second_rsync_a_of_an_unchanged_tree_uploads_nothing(
    mounted: Mounted, tmp_path: Path, sdk: Mistral, emulator_process: RunningEmulator
) -> None:
    source = tmp_path / "src"
    files = {f"f{i}.jsonl": JSONL * (i + 1) for i in range(6)} | {"empty.jsonl": b""}
    make_tree(source, files)
    target = f"{mounted / 'batch'}/"
    emulator_admin.clear_requests(emulator_process.url, emulator_process.api_key)
    run(mounted, "rsync", "-a", f"{source}/", target)
    assert uploads_and_deletes(emulator_process) == (len(files), 0)
    assert mtimes(mounted / "batch") == mtimes(source)  # to the nanosecond

    emulator_admin.clear_requests(emulator_process.url, emulator_process.api_key)
    again = run(mounted, "rsync", "-a", "--itemize-changes", f"{source}/", target)
    # rsync's quick check finds every file up to date (only the folder's time, which is
    # not kept, is set again).
    assert [line for line in again.stdout.splitlines() if not line.startswith(b".d")] == []
    assert uploads_and_deletes(emulator_process) == (0, 0)

    # A changed file (new content, new mtime) is the only one sent, and keeps its mtime.
    files["f2.jsonl"] = JSONL * 10
    (source / "f2.jsonl").write_bytes(files["f2.jsonl"])
    emulator_admin.clear_requests(emulator_process.url, emulator_process.api_key)
    run(mounted, "rsync", "-a", f"{source}/", target)
    assert uploads_and_deletes(emulator_process) == (1, 1)
    assert mtimes(mounted / "batch") == mtimes(source)
    assert_account(sdk, mounted, {f"batch/{name}": data for name, data in files.items()})
    assert_quiet_log(mounted)


def test_the_readmes_rsync_of_a_tree_twice_uploads_once(
    mounted: Mounted, tmp_path: Path, emulator_process: RunningEmulator
) -> None:
    """The README's form for a tree with subfolders, flattened into one purpose folder."""
    command = "rsync -a --files-from=<(cd src && find . -type f) --no-relative src/ mnt/batch/"
    assert command in README.read_text()
    make_tree(tmp_path / "src", {"top.txt": b"top\n", "a/mid.txt": b"mid\n", "a/b/low.txt": b""})
    emulator_admin.clear_requests(emulator_process.url, emulator_process.api_key)
    for _ in range(2):
        run(mounted, "bash", "-c", command, cwd=tmp_path)
    assert uploads_and_deletes(emulator_process) == (3, 0)
    assert sorted(os.listdir(mounted / "batch")) == ["low.txt", "mid.txt", "top.txt"]


def stat_line(path: Path) -> str:
    """What `stat` prints for the times: modification and access, to the nanosecond."""
    return subprocess.run(
        [tool("stat"), "-c", "%y | %x", str(path)], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_touch_d_and_cp_p_times_survive_a_remount(
    emulator_process: RunningEmulator, tmp_path: Path
) -> None:
    source = tmp_path / "report.jsonl"
    # Past GROWING_START_BYTES: cp's upload is under way while it writes, and its
    # futimens comes before the close that ends it.
    make_tree(tmp_path, {"report.jsonl": JSONL * (5 * 2**20 // len(JSONL))})
    with mount(emulator_process, tmp_path, "--dir-cache-time", "1") as mounted:
        batch = mounted / "batch"
        run(mounted, "touch", "-d", "2001-02-03 04:05:06.5 UTC", batch / "new.txt")
        (batch / "old.txt").write_bytes(b"uploaded before its touch\n")
        run(mounted, "touch", "-m", "-d", "1999-12-31 23:59:59 UTC", batch / "old.txt")
        run(mounted, "cp", "-p", source, batch / "copied.jsonl")
        run(mounted, "touch", "-a", "-d", "2020-01-01 00:00:00 UTC", batch / "copied.jsonl")
        before = {name: stat_line(batch / name) for name in os.listdir(batch)}
        assert before["new.txt"].startswith("2001-02-03 04:05:06.500000000 +0000 | 2001-02-03")
        assert before["old.txt"].startswith("1999-12-31 23:59:59.000000000 +0000 | ")
        assert (batch / "copied.jsonl").stat().st_mtime_ns == source.stat().st_mtime_ns
        assert before["copied.jsonl"].endswith("| 2020-01-01 00:00:00.000000000 +0000")
        assert_quiet_log(mounted)
    assert list((tmp_path / "cache" / "times").glob("*.sqlite3")), "kept in the cache folder"
    with mount(emulator_process, tmp_path, "--dir-cache-time", "1") as mounted:
        batch = mounted / "batch"
        assert {name: stat_line(batch / name) for name in os.listdir(batch)} == before
        # New content drops the kept time: the file shows its upload's time again.
        (batch / "old.txt").write_bytes(b"new content\n")
        assert (batch / "old.txt").stat().st_mtime > OLD + 20 * 365 * 86400


def test_midnight_commander_copy_preserves_the_mtime(
    mounted: Mounted,
    tmp_path: Path,
    sdk: Mistral,
    tmux: Tmux,  # noqa: F811 - the fixture
) -> None:
    local = tmp_path / "local"
    make_tree(local, {"fromlocal.txt": b"copied by mc, attributes preserved\n" * 20})
    start_mc(tmux, tmp_path / "mc-home", mounted / "batch", local)
    screen = copy_with_f5(tmux, "fromlocal.txt")
    assert "[x] Preserve attributes" in screen, screen  # mc's default for a copy
    tmux.keys("Enter")
    screen = tmux.wait(lambda s: "fromlocal.txt" in panel_rows(s, 0), "the copy to show up")
    assert "Error" not in screen, screen
    copied = mounted / "batch" / "fromlocal.txt"
    assert copied.stat().st_mtime_ns == (local / "fromlocal.txt").stat().st_mtime_ns
    tmux.keys("F10")
    tmux.wait(lambda s: "mc exited with status" in s, "mc to exit")
    assert_account(sdk, mounted, {"batch/fromlocal.txt": (local / "fromlocal.txt").read_bytes()})
