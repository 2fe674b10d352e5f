"""The Hypothesis state machine of test_stateful.py, on `Filesystem` over the in-memory
account (fake_api.py): no kernel, no HTTP, so it runs hundreds of examples in the time
the mounted one runs a few. The model is ``{folder: {name: bytes}}``; after every step
the filesystem must list exactly the model's names with exactly its content, and the
account must hold exactly one file per entry, under its folder's purpose.

Hypothesis drives steps synchronously; the filesystem lives in a trio loop on a thread
of its own (`TrioPortal`), and each step runs there with `trio.from_thread.run`.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pyfuse3
import pytest
import trio
from fake_api import FakeFilesApi, fine_tune_refusal
from fs_driver import FsDriver
from hypothesis import HealthCheck, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from mistralfs.fs.build import FsOptions, build_filesystem
from mistralfs.fs.operations import Operations

T = TypeVar("T")
ROOT = pyfuse3.ROOT_INODE
BLOCK = 4096  # small blocks, so that files of a few KiB span several
FOLDERS = ("batch", "fine-tune")
NAMES = ("a.txt", "b.txt", "c.jsonl", "d")
REMOTE_NAMES = ("r.txt", "s.jsonl")  # what another client uploads

lines = st.lists(st.integers(0, 10**6), max_size=40).map(
    lambda numbers: b"".join(b'{"i": %d}\n' % n for n in numbers)
)
jsonl = lines.filter(bool)
anything = st.one_of(st.binary(max_size=3 * BLOCK), jsonl, st.just(b""))
placed = st.one_of(st.tuples(st.just("batch"), anything), st.tuples(st.just("fine-tune"), jsonl))


def accepts(folder: str, content: bytes) -> bool:
    return folder != "fine-tune" or fine_tune_refusal(content) is None


class TrioPortal:
    """A trio loop on its own thread, with a nursery for what runs in the background."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self._thread.start()
        self._ready.wait()

    async def _main(self) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            self._token = trio.lowlevel.current_trio_token()
            self._ready.set()
            await trio.sleep_forever()

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def run_sync(self, fn: Callable[[], object]) -> None:
        trio.from_thread.run_sync(fn, trio_token=self._token)

    def close(self) -> None:
        trio.from_thread.run_sync(self.nursery.cancel_scope.cancel, trio_token=self._token)
        self._thread.join()


class FakeMachine(RuleBasedStateMachine):
    """Set `portal` and `root` on a subclass before running it."""

    portal: TrioPortal
    root: Path
    examples = 0

    def __init__(self) -> None:
        super().__init__()
        self.model: dict[str, dict[str, bytes]] = {folder: {} for folder in FOLDERS}
        self.api = FakeFilesApi()
        self.scope: trio.CancelScope | None = None

    @initialize()
    def start(self) -> None:
        """A fresh account and filesystem for every example."""
        type(self).examples += 1
        cache = self.root / str(self.examples)
        options = FsOptions(
            spool_dir=cache / "spool",
            recovery_dir=cache / "recovery",
            cache_size=64 * BLOCK,
            block_size=BLOCK,
            max_file_size=1 << 20,
            dir_cache_time=0,  # what the account holds is seen at once
        )

        async def serve(task_status: trio.TaskStatus[Operations]) -> None:
            with trio.CancelScope() as self.scope:
                async with trio.open_nursery() as nursery:
                    task_status.started(Operations(build_filesystem(self.api, nursery, options).fs))
                    await trio.sleep_forever()

        self.fs = FsDriver(self.portal.run(self.portal.nursery.start, serve), BLOCK)

    def teardown(self) -> None:
        if self.scope is not None:
            self.portal.run_sync(self.scope.cancel)

    # -- helpers, run in the trio thread ----------------------------------------------

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        return self.portal.run(fn, *args)

    def pick_any(self, index: int) -> tuple[str, str]:
        entries = [(folder, name) for folder in FOLDERS for name in sorted(self.model[folder])]
        return entries[index % len(entries)]

    def has_files(self) -> bool:
        return any(self.model.values())

    # -- rules --------------------------------------------------------------------------

    @rule(where=placed, name=st.sampled_from(NAMES))
    def create(self, where: tuple[str, bytes], name: str) -> None:
        folder, content = where
        note(f"create {folder}/{name}: {len(content)} bytes")
        self.call(self.fs.write_file, folder, name, content)
        self.model[folder][name] = content

    @precondition(has_files)
    @rule(index=st.integers(0, 50), content=anything)
    def append(self, index: int, content: bytes) -> None:
        folder, name = self.pick_any(index)
        grown = self.model[folder][name] + content
        if not accepts(folder, grown):
            return
        note(f"append {len(content)} bytes to {folder}/{name}")
        self.call(self.fs.append, folder, name, content)
        self.model[folder][name] = grown

    @precondition(has_files)
    @rule(index=st.integers(0, 50), to=st.sampled_from(FOLDERS), name=st.sampled_from(NAMES))
    def rename(self, index: int, to: str, name: str) -> None:
        folder, old = self.pick_any(index)
        content = self.model[folder][old]
        if not accepts(to, content) or (folder, old) == (to, name):
            return
        note(f"rename {folder}/{old} -> {to}/{name}")

        async def rename() -> None:
            await self.fs.ops.rename(
                await self.fs.folder(folder),
                old.encode(),
                await self.fs.folder(to),
                name.encode(),
                0,
                None,
            )

        self.call(rename)
        del self.model[folder][old]
        self.model[to][name] = content

    @precondition(has_files)
    @rule(index=st.integers(0, 50))
    def unlink(self, index: int) -> None:
        folder, name = self.pick_any(index)
        note(f"unlink {folder}/{name}")

        async def unlink() -> None:
            await self.fs.ops.unlink(await self.fs.folder(folder), name.encode(), None)

        self.call(unlink)
        del self.model[folder][name]

    @rule(first=placed, second=anything, name=st.sampled_from(NAMES))
    def two_writers(self, first: tuple[str, bytes], second: bytes, name: str) -> None:
        """Two O_TRUNC opens of one name, written in turn: the last close wins, whole."""
        folder, content = first
        later = second if accepts(folder, second) else content
        note(f"two writers on {folder}/{name}: {len(content)} then {len(later)} bytes")

        async def race() -> None:
            a = await self.fs.open_truncated(folder, name)
            b = await self.fs.open_truncated(folder, name)
            await self.fs.ops.write(a, 0, content)
            await self.fs.ops.write(b, 0, later)
            await self.fs.write_and_close(a, b"", len(content))
            await self.fs.write_and_close(b, b"", len(later))

        self.call(race)
        self.model[folder][name] = later

    @rule(name=st.sampled_from(REMOTE_NAMES), content=jsonl)
    def another_client_uploads(self, name: str, content: bytes) -> None:
        if name in self.model["batch"]:
            return  # a second file of one name is shown tagged; test_stateful.py covers it
        note(f"another client uploads batch/{name}")
        self.api.add(name, "batch", content)
        self.model["batch"][name] = content

    @precondition(has_files)
    @rule(index=st.integers(0, 50))
    def another_client_deletes(self, index: int) -> None:
        folder, name = self.pick_any(index)
        [file_id] = [
            file_id
            for file_id, stored in self.api.files.items()
            if (stored.remote.purpose, stored.remote.filename) == (folder, name)
        ]
        note(f"another client deletes {folder}/{name}")
        del self.api.files[file_id]
        del self.model[folder][name]

    @rule(folder=st.sampled_from(FOLDERS), name=st.sampled_from(NAMES))
    def lookup_of_a_missing_name_is_enoent(self, folder: str, name: str) -> None:
        if name in self.model[folder]:
            return
        try:
            self.call(self.fs.inode, folder, name)
        except pyfuse3.FUSEError as exc:
            assert exc.errno == errno.ENOENT
        else:
            raise AssertionError(f"{folder}/{name} is shown but was never written")

    # -- what must hold after every step ----------------------------------------------

    @invariant()
    def the_filesystem_and_the_account_match_the_model(self) -> None:
        if self.scope is None:
            return
        for folder in FOLDERS:
            assert self.call(self.fs.names, folder) == sorted(self.model[folder]), folder
            for name, content in self.model[folder].items():
                assert self.call(self.fs.read_file, folder, name) == content, (folder, name)
        expected = {(f, n): [c] for f in FOLDERS for n, c in self.model[f].items()}
        assert self.api.held() == expected


@pytest.fixture
def portal() -> Any:
    running = TrioPortal()
    yield running
    running.close()


def test_the_filesystem_keeps_the_model(portal: TrioPortal, tmp_path: Path) -> None:
    machine = type("Machine", (FakeMachine,), {"portal": portal, "root": tmp_path})
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=150,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
