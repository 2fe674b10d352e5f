"""The text fields of an upload (``purpose``, ``expiry``, ``visibility``), checked as the
service (FastAPI) checks form fields; each choice the service does not document is
one constant here, and said in docs/EMULATOR.md.

As FastAPI does for form fields, an empty value counts as a missing one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mistralfs.emulator import errors
from mistralfs.files_api import EXPIRY_UNIT_SECONDS, VISIBILITIES

# A missing purpose: the service's default is not documented. The Files API began as
# fine-tuning's, and older SDKs sent purpose "fine-tune" unless told otherwise.
DEFAULT_PURPOSE = "fine-tune"
DEFAULT_VISIBILITY = VISIBILITIES[0]
# `expiry` is refused below 1 and above this (not documented either): an expiry time
# must stay a 64-bit count of seconds whatever the unit.
MIN_EXPIRY = 1
MAX_EXPIRY = 1_000_000_000


@dataclass(frozen=True)
class UploadParams:
    """What an upload asked for besides its file."""

    purpose: str
    visibility: str
    expiry: int | None  # in units of `expiry_unit` seconds; None: never expires

    def expires_at(self, now: int, expiry_unit: int = EXPIRY_UNIT_SECONDS) -> int | None:
        """The unix time the file stops being served, if it expires."""
        return None if self.expiry is None else now + self.expiry * expiry_unit


def parse_upload_params(fields: dict[str, str]) -> tuple[UploadParams, list[dict[str, Any]]]:
    """The upload's parameters, and FastAPI's 422 entries for those that are invalid."""
    problems: list[dict[str, Any]] = []
    purpose = fields.get("purpose") or DEFAULT_PURPOSE
    visibility = fields.get("visibility") or DEFAULT_VISIBILITY
    if visibility not in VISIBILITIES:
        problems.append(errors.enum(["body", "visibility"], visibility, VISIBILITIES))
        visibility = DEFAULT_VISIBILITY
    expiry: int | None = None
    raw = fields.get("expiry") or ""
    if raw.strip():
        loc = ["body", "expiry"]
        try:
            expiry = int(raw.strip())
        except ValueError:
            problems.append(errors.int_parsing(loc, raw))
        else:
            if expiry < MIN_EXPIRY:
                problems.append(errors.bound(loc, raw, ge=MIN_EXPIRY))
            elif expiry > MAX_EXPIRY:
                problems.append(errors.bound(loc, raw, le=MAX_EXPIRY))
    return UploadParams(purpose, visibility, expiry), problems
