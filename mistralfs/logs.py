"""The daemon's logging: one record is one line, and the log file is the user's alone.

File names and server messages go into log lines. A newline in one would let a name
forge a whole record (`a\\n2026-... INFO ...: uploaded x`), and a terminal escape could
rewrite what `tail -f` shows; so control characters in a record are written escaped
(`\\n`, `\\x1b`), and a traceback's lines are indented, so none can pass for a record.
"""

from __future__ import annotations

import io
import logging
import os
import sys
from pathlib import Path
from types import TracebackType

from mistralfs.private import open_private_append

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]

# C0, DEL and C1 controls, and the two Unicode separators that viewers break lines at.
_CONTROLS = {
    code: chr(code).encode("unicode_escape").decode("ascii")
    for code in (*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029)
}


def one_line(text: str) -> str:
    """`text` with every control character written as its escape."""
    return text.translate(_CONTROLS)


class SafeFormatter(logging.Formatter):
    """`time LEVEL module: message`, the message on one line whatever it holds."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return one_line(super().formatMessage(record))

    def formatException(self, ei: ExcInfo) -> str:
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indented(super().formatStack(stack_info))


def _indented(text: str) -> str:
    return "\n".join("  " + one_line(line) for line in text.split("\n"))


class JournalFormatter(SafeFormatter):
    """`<priority>name: message`: journald reads the priority and adds the time itself.

    Every line carries it, a traceback's too, so that journald files them all alike.
    """

    PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3}

    def format(self, record: logging.LogRecord) -> str:
        priority = self.PRIORITIES.get(record.levelno, 2 if record.levelno > 40 else 6)
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).split("\n"))


class PrivateFileHandler(logging.FileHandler):
    """A FileHandler whose file is created 0600 (and tightened to it if it was not)."""

    def _open(self) -> io.TextIOWrapper:
        fd = open_private_append(Path(self.baseFilename))
        return open(fd, "a", encoding=self.encoding, errors=self.errors)


def setup_logging(log_file: Path | None, level: str) -> None:
    """Log to `log_file`, or to stderr (in journald's format under systemd)."""
    handler: logging.Handler
    formatter: logging.Formatter = SafeFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    if log_file is None:
        handler = logging.StreamHandler(sys.stderr)
        if os.environ.get("JOURNAL_STREAM"):
            formatter = JournalFormatter("%(name)s: %(message)s")
    else:
        log_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        handler = PrivateFileHandler(log_file, encoding="utf-8")
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "hpack"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
