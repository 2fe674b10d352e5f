"""A Hypothesis state machine driving one real mount, checked against a plain model.

The model is ``{folder: {name: bytes}}`` for `batch/` and `fine-tune/`. Each rule
does one thing a user or another client would do (create, overwrite, append, read,
rename within and across folders, unlink, upload or delete with the SDK behind the
mount's back) and applies its expected effect to the model. After every step the
mount must list exactly the model's names with exactly its content, and the account
must hold exactly one remote file per model entry, with the purpose of its folder:
so an overwrite, an edit or a rename that leaves the old file behind, loses the new
one, or lets a name drift is caught, and Hypothesis shrinks it to a short sequence.

One mount serves the whole run (mounting per example would cost most of the time).
It is mounted with ``--dir-cache-time 0`` so that the SDK's changes are seen at
once, and each example starts by emptying the account and waiting until the mount
shows it empty. When the run fails, the tail of the daemon's log is printed.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import pytest
from conftest import RunningEmulator
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
from mistralai.client import Mistral
from mounting import Mounted, mount, remote_files, wait_for

from mistralfs.fs.names import split_ext, with_id

pytestmark = pytest.mark.fuse

FOLDERS = ("batch", "fine-tune")
# A small alphabet, so that creates, renames and remote uploads collide often.
NAMES = ("a.txt", "b.txt", "c.jsonl", "d")

# fine-tune/ only takes JSONL: one JSON object per non-blank line, and not empty.
lines = st.lists(st.integers(0, 10**6), max_size=40).map(
    lambda numbers: b"".join(b'{"i": %d}\n' % n for n in numbers)
)
jsonl = lines.filter(bool)
# batch/ takes anything, empty included; JSONL often enough that files can move to
# fine-tune/ later.
anything = st.one_of(st.binary(max_size=2048), jsonl, st.just(b""))
# A folder together with content it accepts.
placed = st.one_of(st.tuples(st.just("batch"), anything), st.tuples(st.just("fine-tune"), jsonl))


def is_jsonl(content: bytes) -> bool:
    """The emulator's fine-tune check (mistralfs.emulator.validation), on bytes."""
    count = 0
    for raw in _lines(content):
        if not raw.strip():
            continue
        count += 1
        try:
            value = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return False
        if not isinstance(value, dict):
            return False
    return count > 0


def _lines(content: bytes) -> list[bytes]:
    """Lines as a binary file iterates them: split after each b"\\n"."""
    parts = content.split(b"\n")
    out = [part + b"\n" for part in parts[:-1]]
    if parts[-1]:
        out.append(parts[-1])
    return out


def accepts(folder: str, content: bytes) -> bool:
    return folder != "fine-tune" or is_jsonl(content)


def is_tagged_form(name: str, filename: str) -> bool:
    """Whether `name` is `filename` shown with an id tag: `stem (xxxxxxxx).ext`."""
    stem, ext = split_ext(filename)
    prefix, suffix = f"{stem} (", f"){ext}"
    return (
        name.startswith(prefix)
        and name.endswith(suffix)
        and len(name) == len(prefix) + 8 + len(suffix)
    )


class MountMachine(RuleBasedStateMachine):
    """Set `mounted`, `sdk` and `emulator` on a subclass before running it."""

    mounted: Mounted
    sdk: Mistral
    emulator: RunningEmulator

    def __init__(self) -> None:
        super().__init__()
        self.model: dict[str, dict[str, bytes]] = {folder: {} for folder in FOLDERS}

    # -- setup ----------------------------------------------------------------------

    @initialize()
    def empty_the_account(self) -> None:
        """Every example starts from an empty account, seen empty through the mount."""
        for remote in remote_files(self.sdk):
            with contextlib.suppress(Exception):
                self.sdk.files.delete(file_id=remote.id)
        # Names a failed earlier example may have left only locally (a refused upload).
        for folder in FOLDERS:
            with contextlib.suppress(OSError):
                for name in os.listdir(self.path(folder)):
                    with contextlib.suppress(OSError):
                        os.unlink(self.path(folder, name))
        wait_for(lambda: not remote_files(self.sdk))
        wait_for(lambda: all(not os.listdir(self.path(folder)) for folder in FOLDERS))

    # -- helpers --------------------------------------------------------------------

    def path(self, folder: str, name: str | None = None) -> Path:
        return self.mounted / folder if name is None else self.mounted / folder / name

    def pick(self, folder: str, index: int) -> str:
        names = sorted(self.model[folder])
        return names[index % len(names)]

    def has_files(self) -> bool:
        return any(self.model.values())

    def pick_any(self, index: int) -> tuple[str, str]:
        entries = [(folder, name) for folder in FOLDERS for name in sorted(self.model[folder])]
        return entries[index % len(entries)]

    def file_id(self, folder: str, name: str) -> str:
        return os.getxattr(self.path(folder, name), "user.mistral.id").decode()

    def write(self, folder: str, name: str, content: bytes, flags: int) -> None:
        fd = os.open(self.path(folder, name), flags, 0o644)
        try:
            view = memoryview(content)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)

    def wait_uploaded(self, folder: str, name: str) -> None:
        """Wait for an empty file, and for the version it replaces to go.

        Content that is only a creation or a truncation is uploaded when the last
        descriptor closes (so a shell's open, dup2, close uploads nothing), which is
        just after close() returns.
        """

        def uploaded() -> bool:
            try:
                file_id = self.file_id(folder, name)
            except OSError:
                return False
            remote = [r for r in remote_files(self.sdk) if r.purpose == folder]
            return len(remote) == len(self.model[folder]) and any(
                r.id == file_id and r.size_bytes == 0 for r in remote
            )

        wait_for(uploaded, timeout=5)

    # -- rules: through the mount ---------------------------------------------------

    @rule(where=placed, name=st.sampled_from(NAMES))
    def create(self, where: tuple[str, bytes], name: str) -> None:
        """open(O_CREAT|O_WRONLY|O_TRUNC), write, close: new, or replacing the name."""
        folder, content = where
        note(
            f"create {folder}/{name} ({len(content)} bytes, existed: {name in self.model[folder]})"
        )
        self.write(folder, name, content, os.O_CREAT | os.O_WRONLY | os.O_TRUNC)
        self.model[folder][name] = content
        if not content:
            self.wait_uploaded(folder, name)

    @precondition(has_files)
    @rule(index=st.integers(0, 50), content=anything, lines=jsonl)
    def overwrite(self, index: int, content: bytes, lines: bytes) -> None:
        """O_TRUNC onto any existing name, tagged ones included: the name stays."""
        folder, name = self.pick_any(index)
        data = lines if folder == "fine-tune" else content
        note(f"overwrite {folder}/{name} with {len(data)} bytes")
        self.write(folder, name, data, os.O_CREAT | os.O_WRONLY | os.O_TRUNC)
        self.model[folder][name] = data
        if not data:
            self.wait_uploaded(folder, name)

    @rule(
        where=placed,
        name=st.sampled_from(NAMES),
        content=anything,
        lines=jsonl,
        second_closes_last=st.booleans(),
    )
    def two_writers(
        self,
        where: tuple[str, bytes],
        name: str,
        content: bytes,
        lines: bytes,
        second_closes_last: bool,
    ) -> None:
        """Two programs copy to one name at once (`O_TRUNC`, writes in turns): the
        content of whichever close() came last, whole, is the file."""
        folder, first = where
        second = lines if folder == "fine-tune" else content
        note(f"two writers on {folder}/{name}: {len(first)} and {len(second)} bytes, "
             f"the {'second' if second_closes_last else 'first'} closing last")  # fmt: skip
        flags = os.O_CREAT | os.O_WRONLY | os.O_TRUNC
        fds = [os.open(self.path(folder, name), flags, 0o644)]
        half = len(first) // 2
        os.write(fds[0], first[:half])
        fds.append(os.open(self.path(folder, name), flags, 0o644))
        os.write(fds[1], second)
        os.write(fds[0], first[half:])
        for fd in fds if second_closes_last else reversed(fds):
            os.close(fd)
        last = second if second_closes_last else first
        self.model[folder][name] = last
        if not last:
            self.wait_uploaded(folder, name)

    @precondition(has_files)
    @rule(index=st.integers(0, 50), content=anything, lines=lines)
    def append(self, index: int, content: bytes, lines: bytes) -> None:
        """O_WRONLY|O_APPEND, write, close: copy-on-write of an uploaded file."""
        folder, name = self.pick_any(index)
        old = self.model[folder][name]
        if folder == "fine-tune":
            data = lines if old.endswith(b"\n") else b"\n" + lines
        else:
            data = content
        note(f"append {len(data)} bytes to {folder}/{name} ({len(old)} bytes)")
        self.write(folder, name, data, os.O_WRONLY | os.O_APPEND)
        self.model[folder][name] = old + data

    @precondition(has_files)
    @rule(index=st.integers(0, 50))
    def read(self, index: int) -> None:
        folder, name = self.pick_any(index)
        note(f"read {folder}/{name}")
        with open(self.path(folder, name), "rb") as f:
            assert f.read() == self.model[folder][name]

    @precondition(has_files)
    @rule(
        index=st.integers(0, 50),
        to_folder=st.sampled_from(FOLDERS),
        to_name=st.one_of(st.sampled_from(NAMES), st.integers(0, 50)),
    )
    def rename(self, index: int, to_folder: str, to_name: str | int) -> None:
        """os.rename within or across folders, onto a free or an existing name."""
        folder, name = self.pick_any(index)
        content = self.model[folder][name]
        if not accepts(to_folder, content):
            to_folder = folder  # fine-tune/ would refuse it: rename within its folder
        if isinstance(to_name, int):  # an existing name in the target folder, if any
            to_name = self.pick(to_folder, to_name) if self.model[to_folder] else NAMES[0]
        replaced = to_name in self.model[to_folder] and (to_folder, to_name) != (folder, name)
        note(f"rename {folder}/{name} -> {to_folder}/{to_name} (replacing: {replaced})")
        os.rename(self.path(folder, name), self.path(to_folder, to_name))
        del self.model[folder][name]
        self.model[to_folder][to_name] = content

    @precondition(has_files)
    @rule(index=st.integers(0, 50))
    def unlink(self, index: int) -> None:
        folder, name = self.pick_any(index)
        note(f"unlink {folder}/{name}")
        os.unlink(self.path(folder, name))
        del self.model[folder][name]

    # -- rules: behind the mount's back ---------------------------------------------

    @rule(where=placed, name=st.sampled_from(NAMES))
    def remote_upload(self, where: tuple[str, bytes], name: str) -> None:
        """Uploaded elsewhere: plain name if free, else `stem (id8).ext`."""
        folder, content = where
        created = self.sdk.files.upload(
            file={"file_name": name, "content": content}, purpose=folder
        )
        shown = with_id(name, created.id) if name in self.model[folder] else name
        note(f"remote upload {folder}/{name} as {created.id}, expected as {shown!r}")
        self.model[folder][shown] = content

    @precondition(has_files)
    @rule(index=st.integers(0, 50))
    def remote_delete(self, index: int) -> None:
        """Deleted elsewhere: the name goes at the next listing."""
        folder, name = self.pick_any(index)
        file_id = self.file_id(folder, name)
        note(f"remote delete {folder}/{name} ({file_id})")
        self.sdk.files.delete(file_id=file_id)
        del self.model[folder][name]

    # -- what must hold after every step ---------------------------------------------

    @invariant()
    def mount_shows_the_model(self) -> None:
        assert sorted(os.listdir(self.mounted.path)) == ["batch", "fine-tune", "jobs", "ocr"]
        for folder in FOLDERS:
            assert sorted(os.listdir(self.path(folder))) == sorted(self.model[folder]), folder
        for folder in FOLDERS:
            for name, content in self.model[folder].items():
                path = self.path(folder, name)
                assert os.stat(path).st_size == len(content), f"{folder}/{name} size"
                with open(path, "rb") as f:
                    assert f.read() == content, f"{folder}/{name} content"

    @invariant()
    def account_holds_the_model(self) -> None:
        """One remote file per name, with its folder's purpose, size and filename."""
        remote = {r.id: r for r in remote_files(self.sdk)}
        shown: dict[str, tuple[str, str]] = {}
        for folder in FOLDERS:
            for name, content in self.model[folder].items():
                file_id = self.file_id(folder, name)
                assert file_id in remote, f"{folder}/{name}: {file_id} is not in the account"
                assert file_id not in shown, f"{folder}/{name} and {shown[file_id]} share an id"
                shown[file_id] = (folder, name)
                r = remote[file_id]
                assert r.purpose == folder, f"{folder}/{name}: purpose {r.purpose}"
                assert r.size_bytes == len(content), f"{folder}/{name}: remote size"
                assert r.filename == name or is_tagged_form(name, r.filename), (
                    f"{folder}/{name}: remote filename {r.filename!r}"
                )
        leftovers = {i: (r.purpose, r.filename) for i, r in remote.items() if i not in shown}
        assert not leftovers, f"remote files the mount does not show: {leftovers}"


def test_mount_behaves_like_a_dict_of_folders(
    emulator_process: RunningEmulator, sdk: Mistral, tmp_path: Path
) -> None:
    # The test function runs once and Hypothesis runs every example inside it, so
    # tmp_path and the mount last for the whole run.
    with mount(emulator_process, tmp_path, "--dir-cache-time", "0") as mounted:
        machine = type(
            "MountMachine",
            (MountMachine,),
            {"mounted": mounted, "sdk": sdk, "emulator": emulator_process},
        )
        started = time.monotonic()
        try:
            run_state_machine_as_test(
                machine,
                settings=settings(
                    max_examples=12,
                    stateful_step_count=18,
                    deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
                ),
            )
        except BaseException:
            print(f"--- daemon log ({mounted.log_file}), last 150 lines ---")
            print("\n".join(mounted.log().splitlines()[-150:]))
            raise
        finally:
            print(f"state machine ran for {time.monotonic() - started:.1f}s")


# -- what the state machine found, as short deterministic checks -----------------------


def test_listing_while_an_upload_is_in_flight_shows_the_file_once(
    emulator_process: RunningEmulator, sdk: Mistral, tmp_path: Path
) -> None:
    """`touch f; ls`: the listing that races the upload must not show `f (id8)` too."""
    with mount(emulator_process, tmp_path, "--dir-cache-time", "0") as mounted:
        for i in range(10):
            # Empty: uploaded when the last descriptor closes, just after close() returns,
            # while the listings below are being made.
            os.close(os.open(mounted / "batch" / f"e{i}.txt", os.O_CREAT | os.O_WRONLY, 0o644))
            deadline = time.monotonic() + 0.5
            while time.monotonic() < deadline:
                names = os.listdir(mounted / "batch")
                assert f"e{i}.txt" in names
                assert len(names) == i + 1, sorted(names)
        assert len(remote_files(sdk)) == 10


def test_truncating_an_uploaded_file_to_empty_replaces_it(
    emulator_process: RunningEmulator, sdk: Mistral, tmp_path: Path
) -> None:
    """`: > f` (O_TRUNC, nothing written) and truncate(2) to 0 both empty the file."""
    with mount(emulator_process, tmp_path, "--dir-cache-time", "0") as mounted:
        by_open, by_truncate = mounted / "batch" / "by-open.txt", mounted / "batch" / "by-truncate"
        by_open.write_bytes(b"x")
        by_truncate.write_bytes(b"y")
        os.close(os.open(by_open, os.O_WRONLY | os.O_TRUNC))
        os.truncate(by_truncate, 0)

        def sizes() -> list[tuple[str, int]]:
            return sorted((r.filename, r.size_bytes) for r in remote_files(sdk))

        expected = [("by-open.txt", 0), ("by-truncate", 0)]
        with contextlib.suppress(AssertionError):  # uploaded as the last descriptor closes
            wait_for(lambda: sizes() == expected, timeout=5)
        assert sizes() == expected
        assert by_open.read_bytes() == by_truncate.read_bytes() == b""
