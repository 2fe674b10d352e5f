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
