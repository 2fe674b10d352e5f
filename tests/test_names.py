"""Display names: safe, unique and stable, for every filename the service can hold."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from conftest import RunningEmulator
from mounting import mount

from mistralfs.fs.names import NAME_MAX, folder_name, plain_name, split_ext, storable, with_id

FILE_ID = "0123abcd-0000-4000-8000-000000000000"


def test_names_that_cannot_be_paths_fall_back_to_the_id() -> None:
    for filename in ("", ".", ".."):
        assert plain_name(filename, FILE_ID) == (FILE_ID, False)


def test_separators_and_control_characters_are_replaced() -> None:
    assert plain_name("a/b.txt", FILE_ID) == ("a\u2215b.txt", False)
    assert plain_name("nul\x00\x1f.txt", FILE_ID) == ("nul\ufffd\ufffd.txt", False)
    assert plain_name("lone\udcff.txt", FILE_ID) == ("lone\ufffd.txt", False)


def test_long_names_are_shortened_on_a_character_boundary_and_keep_the_id() -> None:
    name, unique = plain_name("é" * 200 + ".jsonl", FILE_ID)
    assert unique and name.endswith(" (0123abcd).jsonl")
    assert len(name.encode("utf-8")) <= NAME_MAX
    name.encode("utf-8")  # no half character left behind


def test_duplicates_get_the_id_before_the_extension() -> None:
    assert with_id("data.jsonl", FILE_ID) == "data (0123abcd).jsonl"
    assert with_id(".hidden", FILE_ID) == ".hidden (0123abcd)"
    assert with_id("archive.tar.gz", FILE_ID) == "archive.tar (0123abcd).gz"
    assert split_ext("noext") == ("noext", "")


def test_folder_names_are_safe_too() -> None:
    assert folder_name("fine-tune") == "fine-tune"
    assert folder_name("a/b") == "a\u2215b"
    assert folder_name("..").startswith("purpose-")


# Names a program may give through the mount that the service keeps as they are ...
KEPT = [
    'quote".txt',
    "back\\slash.txt",
    "a%0Ab.txt",  # the very text a newline used to be uploaded as
    "line\u2028separator.txt",
    " spaced  .txt",
    "ünï cödé 🙂.txt",
]
# ... and names with control characters, which would come back changed.
REFUSED = [
    "new\nline.txt",
    "cr\r.txt",
    "tab\there.txt",
    "esc\x1b[31m.txt",
    "del\x7f.txt",
    "nel\x85.txt",
]


def test_only_names_that_come_back_the_same_are_storable() -> None:
    for name in KEPT:
        assert storable(name) and plain_name(name, FILE_ID) == (name, False)
    for name in REFUSED:
        assert not storable(name)


@pytest.mark.fuse
def test_a_name_shows_the_same_before_and_after_a_remount(
    emulator_process: RunningEmulator, tmp_path: Path
) -> None:
    with mount(emulator_process, tmp_path) as m:
        batch = m / "batch"
        for name in KEPT:
            (batch / name).write_bytes(b"kept")
        (batch / "plain.txt").write_bytes(b"renamed later")
        for name in REFUSED:
            with pytest.raises(OSError) as created:
                (batch / name).write_bytes(b"refused")
            assert created.value.errno == errno.EINVAL, name
            with pytest.raises(OSError) as renamed:
                os.rename(batch / "plain.txt", batch / name)
            assert renamed.value.errno == errno.EINVAL, name
        before = sorted(os.listdir(batch))
    with mount(emulator_process, tmp_path) as m:
        after = sorted(os.listdir(m / "batch"))
    assert before == after == sorted([*KEPT, "plain.txt"])
