"""Display names: safe, unique and stable, for every filename the service can hold."""

from __future__ import annotations

from mistralfs.fs.names import NAME_MAX, folder_name, plain_name, split_ext, with_id

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
