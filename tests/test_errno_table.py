"""The errno table of docs/SEMANTICS.md is the one in `mistralfs/fs/errors.py`."""

from __future__ import annotations

import errno
import re
from pathlib import Path

from mistralfs.api import ApiError, AuthError, NotFound, Rejected, TooLarge, Unavailable
from mistralfs.fs.errors import errno_for, reason

SEMANTICS = Path(__file__).resolve().parent.parent / "docs" / "SEMANTICS.md"

# The first words of each row of the table, and the failure the client raises for it.
ROWS: dict[str, ApiError] = {
    "401, 403": AuthError("no", status=401),
    "404": NotFound("gone", status=404),
    "400 or 422": Rejected("Invalid file format.", status=400),
    "413": TooLarge("too large", status=413),
    "429, 5xx": Unavailable("down", status=503),
}


def table_rows() -> dict[str, str]:
    text = SEMANTICS.read_text(encoding="utf-8")
    section = text.split("## Errors", 1)[1].split("\n## ", 1)[0]
    return {
        cells[0].strip(): cells[1]
        for line in section.splitlines()
        if line.startswith("| ") and (cells := line.strip("|").split("|"))[1:]
    }


def test_the_table_here_is_the_code_table() -> None:
    rows = table_rows()
    for start, failure in ROWS.items():
        [row] = [errnos for label, errnos in rows.items() if label.startswith(start)]
        named = re.findall(r"`(E[A-Z]+)`", row)
        assert named[-1] == errno.errorcode[errno_for(failure)], (start, row)
    assert errno_for(Rejected("bad", status=422)) == errno.EBADMSG
    assert errno_for(Rejected("bad", status=422), reading=True) == errno.EIO


def test_the_reason_is_the_services_own_message() -> None:
    refused = Rejected("Invalid file format.", status=400, method="POST", url="http://h/v1/files")
    assert str(refused) == "POST /v1/files: 400 Invalid file format."
    assert reason(refused) == "400 Invalid file format."
