"""The daemon's log: private, and one record is one line that a name cannot forge."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from mistralfs.logs import setup_logging

FORGED = "2026-12-06 01:00:00,000 INFO mistralfs.fs.writer: FAKE LOG LINE"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        handler.close()
    root.handlers[:], root.level = handlers, level


def names_that_forge() -> list[str]:
    return [
        f"a\n{FORGED}.txt",
        f"a\r{FORGED}.txt",
        f"a\u2028{FORGED}.txt",
        f"a\x85{FORGED}.txt",
        "a\x1b[2K\r.txt",  # a terminal escape that would erase the line on `tail -f`
    ]


def test_a_name_cannot_forge_a_log_line(tmp_path: Path, restore_logging: None) -> None:
    log_file = tmp_path / "mistralfs.log"
    setup_logging(log_file, "debug")
    log = logging.getLogger("mistralfs.fs.writer")
    for name in names_that_forge():
        log.info("uploaded batch/%s: 5 bytes", name)
    try:
        raise ValueError(f"refused batch/a\n{FORGED}")
    except ValueError:
        log.exception("upload failed")
    logging.getLogger().handlers[0].flush()
    text = log_file.read_text(encoding="utf-8")
    lines = text.splitlines()  # also splits at \r, \x85, \u2028: what any viewer might
    records = [line for line in lines if line[:1].isdigit()]
    assert len(records) == len(names_that_forge()) + 1, text
    assert all(" INFO " in r or " ERROR " in r for r in records)
    assert not any(line.startswith(FORGED) for line in lines)
    assert "\x1b" not in text and "a\\x1b[2K\\r.txt" in text
    assert "a\\n" + FORGED in text  # escaped, still readable
    # A traceback keeps its lines, each indented so that none can pass for a record.
    assert "Traceback (most recent call last):" in text
    assert all(line[:1].isdigit() or line.startswith(" ") for line in lines), text


def test_under_systemd_every_line_carries_the_priority(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, restore_logging: None
) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    setup_logging(None, "info")
    logging.getLogger("mistralfs.fs.writer").info("uploaded batch/%s", f"a\n<3>{FORGED}")
    try:
        raise ValueError("boom\n<2>forged")
    except ValueError:
        logging.getLogger("mistralfs.daemon.serve").exception("failed")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == f"<6>mistralfs.fs.writer: uploaded batch/a\\n<3>{FORGED}"
    assert lines[1] == "<3>mistralfs.daemon.serve: failed"
    assert all(line.startswith("<3>  ") for line in lines[2:]), lines


def test_the_log_file_is_private_even_if_it_was_not(tmp_path: Path, restore_logging: None) -> None:
    log_file = tmp_path / "cache" / "mistralfs.log"
    setup_logging(log_file, "info")
    assert stat.S_IMODE(os.stat(log_file).st_mode) == 0o600
    logging.getLogger().handlers[0].close()
    log_file.chmod(0o644)  # as versions before this one left it
    setup_logging(log_file, "info")
    assert stat.S_IMODE(os.stat(log_file).st_mode) == 0o600
