"""What an upload asks of the service besides the content: its `visibility` and `expiry`.

Three places decide them, the first that says wins, field by field:
1. the file's own setting, given through its xattr (`user.mistral.visibility`,
   `user.mistral.expiry`) before its first close or since (a change after an upload
   means a re-upload, as any other change);
2. for a file the account already holds (a changed file's new version, a rename), what
   it has: its `visibility`, and its `expires_at` as the hours left, rounded up, so that
   changing a file neither shows it to others nor makes it live longer;
3. the mount's `--visibility` and `--expiry`.
What none of them says is not sent: the service's defaults apply (workspace, no expiry).

`expiry` is in the service's unit, which is not documented: hours, as for signed URLs,
and as the emulator takes it (API-NOTES.md). `files_api.EXPIRY_UNIT_SECONDS` is the one
place to change it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, TypeGuard

from mistralfs.api import RemoteFile
from mistralfs.files_api import EXPIRY_UNIT_SECONDS, VISIBILITIES
from mistralfs.fs.errors import BAD_SETTING, FsError

if TYPE_CHECKING:
    from mistralfs.fs.namespace import FileNode

# `expiry` that sends none: the file never expires, whatever the mount's default says.
NEVER = 0
NEVER_WORDS = ("none", "never")

XATTR_VISIBILITY = "user.mistral.visibility"
XATTR_EXPIRY = "user.mistral.expiry"
SETTABLE_XATTRS = (XATTR_VISIBILITY, XATTR_EXPIRY)


@dataclass(frozen=True)
class UploadSettings:
    """`None` in a field: this level does not say (the next one decides)."""

    visibility: str | None = None
    expiry: int | None = None  # in EXPIRY_UNIT_SECONDS; NEVER: send none

    def over(self, base: UploadSettings) -> UploadSettings:
        """These settings, with `base`'s where these say nothing."""
        return UploadSettings(
            visibility=self.visibility if self.visibility is not None else base.visibility,
            expiry=self.expiry if self.expiry is not None else base.expiry,
        )

    @property
    def sent_expiry(self) -> int | None:
        """The upload's `expiry`: None sends none."""
        return None if self.expiry == NEVER else self.expiry


def parse_visibility(text: str) -> str:
    """A visibility as the service takes it; ValueError saying which ones it takes."""
    value = text.strip()
    if value not in VISIBILITIES:
        raise ValueError(f"invalid visibility {text!r}: use {' or '.join(VISIBILITIES)}")
    return value


def parse_expiry(text: str) -> int:
    """Whole hours (>= 1), or `none` for never; ValueError saying what is expected."""
    value = text.strip().lower()
    if value in NEVER_WORDS:
        return NEVER
    try:
        hours = int(value)
    except ValueError:
        hours = 0
    if hours < 1:
        raise ValueError(f"invalid expiry {text!r}: use a whole number of hours (>= 1) or none")
    return hours


def hours_left(expires_at: int | None, now: float) -> int | None:
    """A file's `expires_at` as an expiry from `now`, rounded up; None if it has none."""
    if expires_at is None:
        return None
    return max(1, math.ceil((expires_at - now) / EXPIRY_UNIT_SECONDS))


def expired(remote: RemoteFile, now: float) -> bool:
    """Whether the service no longer holds `remote`: a listing may still name it."""
    return remote.expires_at is not None and remote.expires_at <= now


def kept_from(remote: RemoteFile | None, now: float) -> UploadSettings:
    """What a new version of `remote` keeps of it."""
    if remote is None:
        return UploadSettings()
    return UploadSettings(remote.visibility, hours_left(remote.expires_at, now))


def effective(node: FileNode, defaults: UploadSettings, now: float) -> UploadSettings:
    """The settings `node`'s next upload is sent with (see the module's docstring)."""
    return node.upload_settings.over(kept_from(node.remote, now).over(defaults))


def noted(node: FileNode) -> dict[str, object]:
    """What a crash note keeps of `node`'s own settings (levels 1 and 2 above), so that
    the next mount sends it as this one would have (`from_note`)."""
    own, remote = node.upload_settings, node.remote
    kept_visibility = remote.visibility if remote is not None else None
    return {
        "visibility": own.visibility if own.visibility is not None else kept_visibility,
        "expiry": own.expiry,
        # Its replaced version's end, kept as the hours left when the upload is sent.
        "expires_at": remote.expires_at if remote is not None and own.expiry is None else None,
    }


def from_note(note: Mapping[str, object], defaults: UploadSettings, now: float) -> UploadSettings:
    """The settings a crash note says its file is sent with, over `defaults`; what the
    note lacks, or holds in a form no mount wrote, the defaults decide."""
    visibility, expiry, ends = (note.get(key) for key in ("visibility", "expiry", "expires_at"))
    if not (isinstance(visibility, str) and visibility in VISIBILITIES):
        visibility = None
    if not _whole(expiry):
        expiry = hours_left(ends, now) if _whole(ends) else None
    return UploadSettings(visibility, expiry).over(defaults)


def _whole(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def with_xattr(settings: UploadSettings, name: str, value: bytes | None) -> UploadSettings:
    """`settings` with the xattr `name` set to `value` (None: removed, so not said).

    A value the service would refuse is refused here, before anything is uploaded.
    """
    try:
        text = value.decode("utf-8") if value is not None else None
        if name == XATTR_VISIBILITY:
            return replace(
                settings, visibility=parse_visibility(text) if text is not None else None
            )
        return replace(settings, expiry=parse_expiry(text) if text is not None else None)
    except (UnicodeDecodeError, ValueError) as exc:
        raise FsError(BAD_SETTING, f"{name}: {exc}") from None


def xattr_value(node: FileNode, name: str, defaults: UploadSettings, now: float) -> str | None:
    """What reading a settable xattr shows: the visibility the file has, or will be sent
    with; the expiry it was given (its own, or the mount's while it is not uploaded)."""
    if name == XATTR_VISIBILITY:
        if node.upload_settings.visibility is None and node.remote is not None:
            return node.remote.visibility
        return effective(node, defaults, now).visibility
    if node.upload_settings.expiry is None and node.remote is not None:
        return None  # its `expires_at` says when it goes
    expiry = node.upload_settings.over(defaults).expiry
    if expiry is None:
        return None
    return "none" if expiry == NEVER else str(expiry)
