"""Several programs changing the same few names at once, through one real mount.

The state machine (`test_stateful.py`) runs one operation at a time. Races between a
close() that uploads, the release of a new file, a rename that uploads again and an
rm are only met when programs overlap, as editors, copy tools and scripts do. Four
threads run seeded random operations on five names; the interleaving differs from run
to run, so any failure is a real race, whatever the run. Afterwards the account must
hold exactly one file per name the mount shows, each with the content the mount
reads: no duplicate, no file left without a name, nothing shown that is not stored.
"""

from __future__ import annotations

import errno
import os
import random
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import RunningEmulator
from mistralai.client import Mistral
from mounting import mount, remote_files, wait_for

pytestmark = pytest.mark.fuse

NAMES = [f"s{i}.txt" for i in range(5)]
THREADS = 4
OPERATIONS_PER_THREAD = 50
# Every operation may find its name gone or taken by another thread. A program whose
# file a rename replaced while it was open for writing gets EIO at close (the changes
# are kept for recovery): only operations that open for writing may see it.
ALWAYS_ALLOWED = {errno.ENOENT, errno.EEXIST}
WRITES = {"write", "append", "truncate", "atomic_save", "empty", "read_write"}


def operations(folder: Path, thread: int) -> dict[str, Callable[[random.Random, Path], None]]:
    def write(rng: random.Random, path: Path) -> None:
        path.write_bytes(os.urandom(rng.randrange(0, 3000)))

    def append(rng: random.Random, path: Path) -> None:
        with open(path, "ab") as f:
            f.write(b"x" * rng.randrange(1, 100))

    def rename(rng: random.Random, path: Path) -> None:
        os.rename(path, folder / rng.choice(NAMES))

    def unlink(rng: random.Random, path: Path) -> None:
        path.unlink()

    def read(rng: random.Random, path: Path) -> None:
        path.read_bytes()

    def swap_file(rng: random.Random, path: Path) -> None:
        """What vim does with .NAME.swx: create, close, remove at once."""
        swap = folder / f".{path.name}.{thread}.swp"
        os.close(os.open(swap, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600))
        swap.unlink()

    def truncate(rng: random.Random, path: Path) -> None:
        os.truncate(path, rng.randrange(0, 50))

    def atomic_save(rng: random.Random, path: Path) -> None:
        """What editors and GLib do: write a temporary file, then rename it over."""
        temporary = folder / f".tmp-{thread}-{rng.randrange(1000)}"
        temporary.write_bytes(os.urandom(rng.randrange(1, 500)))
        os.replace(temporary, path)

    def empty(rng: random.Random, path: Path) -> None:
        open(path, "w").close()

    def read_write(rng: random.Random, path: Path) -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            os.pwrite(fd, b"Z", 0)
            os.pread(fd, 10, 0)  # another thread may have truncated it meanwhile
        finally:
            os.close(fd)

    return {f.__name__: f for f in (write, append, rename, unlink, read, swap_file, truncate,
                                     atomic_save, empty, read_write)}  # fmt: skip


def run_thread(folder: Path, seed: int, thread: int, failures: list[str]) -> None:
    rng = random.Random(seed * 100 + thread)
    table = operations(folder, thread)
    for _ in range(OPERATIONS_PER_THREAD):
        kind = rng.choice(sorted(table))
        path = folder / rng.choice(NAMES)
        try:
            table[kind](rng, path)
        except OSError as exc:
            if exc.errno in ALWAYS_ALLOWED or (exc.errno == errno.EIO and kind in WRITES):
                continue
            failures.append(f"{kind} {path.name}: {exc}")
        except Exception as exc:  # an assertion in an operation: report, do not hang
            failures.append(f"{kind} {path.name}: {exc!r}")


def account(sdk: Mistral) -> list[tuple[str, str, int]]:
    return sorted((f.filename, f.id, f.size_bytes) for f in remote_files(sdk, purpose="batch"))


@pytest.mark.parametrize("seed", [1, 2])
def test_programs_racing_on_the_same_names_leave_the_account_as_the_mount_shows(
    seed: int, emulator_process: RunningEmulator, sdk: Mistral, tmp_path: Path
) -> None:
    with mount(emulator_process, tmp_path, "--dir-cache-time", "0") as mounted:
        folder = mounted / "batch"
        failures: list[str] = []
        threads = [
            threading.Thread(target=run_thread, args=(folder, seed, i, failures))
            for i in range(THREADS)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not any(thread.is_alive() for thread in threads), "an operation hangs"
        assert failures == [], failures

        # Uploads at release are not waited for by the programs: let them end.
        def settled() -> list[tuple[str, str, int]] | None:
            before = account(sdk)
            time.sleep(0.5)
            return before if account(sdk) == before else None

        stored = wait_for(settled, timeout=15)
        names = [name for name, _, _ in stored]
        assert len(names) == len(set(names)), f"a name stored twice: {stored}"
        assert sorted(os.listdir(folder)) == names, "the mount and the account differ"
        for name, file_id, size in stored:
            content = (folder / name).read_bytes()
            assert len(content) == size, name
            download = sdk.files.download(file_id=file_id)
            try:
                assert download.read() == content, f"{name}: the mount reads other bytes"
            finally:
                download.close()


CONTENT_SIZE = 2 << 20
TRIALS = 20


def stored_under(sdk: Mistral, name: str) -> list[bytes]:
    """The content of every file of the account named `name` in batch/."""
    contents = []
    for f in remote_files(sdk, purpose="batch"):
        if f.filename == name:
            download = sdk.files.download(file_id=f.id)
            try:
                contents.append(download.read())
            finally:
                download.close()
    return contents


def test_two_cp_to_one_new_name_leave_one_whole_version(
    emulator_process: RunningEmulator, sdk: Mistral, tmp_path: Path
) -> None:
    """Two `cp` of different contents to one new name at once, again and again: the
    account holds one file of that name with one of the two contents, never empty or a
    mix, and the mount reads the same bytes."""
    sources = [tmp_path / "a.bin", tmp_path / "b.bin"]
    contents = [os.urandom(CONTENT_SIZE), os.urandom(CONTENT_SIZE)]
    for source, content in zip(sources, contents, strict=True):
        source.write_bytes(content)
    rng = random.Random(7)
    with mount(emulator_process, tmp_path / "m") as mounted:
        for trial in range(TRIALS):
            target = mounted / "batch" / f"both-{trial}.bin"
            copies = []
            for source in sources:
                copies.append(
                    subprocess.Popen(["cp", str(source), str(target)], stderr=subprocess.PIPE)
                )
                time.sleep(rng.uniform(0, 0.05))  # the second lands anywhere in the first
            done = [copy.communicate(timeout=60) for copy in copies]
            for copy, (_, err) in zip(copies, done, strict=True):
                # As on any filesystem, a cp that found the name missing creates it
                # with O_EXCL, and fails if the other cp created it meanwhile.
                assert copy.returncode == 0 or b"File exists" in err, f"trial {trial}: {err!r}"
            copied = [c for copy, c in zip(copies, contents, strict=True) if copy.returncode == 0]
            assert copied, f"trial {trial}: no cp succeeded"
            stored = stored_under(sdk, target.name)
            assert len(stored) == 1, f"trial {trial}: {len(stored)} files of that name"
            assert stored[0] in copied, f"trial {trial}: {len(stored[0])} bytes, not a whole copy"
            assert target.read_bytes() == stored[0], f"trial {trial}: the mount shows other bytes"


def test_two_writers_to_one_name_the_last_close_wins(
    emulator_process: RunningEmulator, sdk: Mistral, tmp_path: Path
) -> None:
    """Threads opening one name with O_TRUNC, writing and closing at once: whichever
    close() returned last is what the account holds and the mount reads."""
    contents = [os.urandom(CONTENT_SIZE), os.urandom(CONTENT_SIZE)]
    with mount(emulator_process, tmp_path / "m") as mounted:
        for trial in range(TRIALS):
            target = mounted / "batch" / f"race-{trial}.bin"
            closed_at = [0.0, 0.0]
            start = threading.Barrier(2)

            def write(
                i: int,
                target: Path = target,
                closed_at: list[float] = closed_at,
                start: threading.Barrier = start,
            ) -> None:
                start.wait()
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    for offset in range(0, CONTENT_SIZE, 1 << 20):
                        os.pwrite(fd, contents[i][offset : offset + (1 << 20)], offset)
                finally:
                    os.close(fd)
                closed_at[i] = time.monotonic()

            threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
            assert all(closed_at), f"trial {trial}: a writer failed"
            last = contents[closed_at.index(max(closed_at))]
            assert stored_under(sdk, target.name) == [last], f"trial {trial}: not the last close"
            assert target.read_bytes() == last, f"trial {trial}: the mount shows other bytes"
