"""Display names for remote files: safe for any filesystem tool, unique, and stable.

The service lets many files share one `filename` and does not forbid `/`, control
characters or very long names. Every remote file gets a name here that is valid on
Linux and unique within its folder; the oldest holder of a name keeps it plain and
newer ones get `stem (id8).ext`. Names given through the mount are kept as given, so
only those that come back the same (`storable`) are taken.
"""

from __future__ import annotations

import fnmatch
import re
import unicodedata
from collections.abc import Container, Iterable
from typing import Protocol, TypeVar

NAME_MAX = 255  # bytes, as statfs reports
# The purposes whose folders are shown even while they hold no file.
STANDARD_PURPOSES = ("fine-tune", "batch", "ocr")
JOBS_FOLDER = "jobs"  # the root's batch jobs view (jobs.py): no purpose folder takes it


def _clean(text: str) -> str:
    """Replace what cannot appear in a Linux file name or would be read as a path."""
    if "/" not in text and text.isprintable():
        return text  # the usual name, checked in C: printable excludes Cc and surrogates
    out = []
    for ch in text:
        if ch == "/":
            out.append("\u2215")  # DIVISION SLASH: looks like "/" but is not a separator
        elif ch == "\x00" or unicodedata.category(ch) == "Cc":
            out.append("\ufffd")
        elif 0xD800 <= ord(ch) <= 0xDFFF:
            out.append("\ufffd")  # lone surrogate: not encodable as UTF-8
        else:
            out.append(ch)
    return "".join(out)


def storable(name: str) -> bool:
    """Whether a name given through the mount shows the same after a remount.

    A control character cannot: a newline or CR cannot stand in a multipart header
    (the upload sends `%0A`, which the service keeps as is), and any other comes back
    from the listing as U+FFFD. So such names are refused at create and rename.
    """
    return _clean(name) == name


def split_ext(name: str) -> tuple[str, str]:
    """`data.tar.jsonl` -> (`data.tar`, `.jsonl`); a leading dot is part of the stem."""
    dot = name.rfind(".")
    if dot <= 0 or dot == len(name) - 1:
        return name, ""
    return name[:dot], name[dot:]


def _truncate_utf8(text: str, max_bytes: int) -> str:
    encoded = text.encode("utf-8")
    if len(encoded) <= max_bytes:
        return text
    return encoded[:max_bytes].decode("utf-8", errors="ignore")


def _id_tag(an_id: str) -> str:
    return f" ({_clean(an_id[:8])})"


def with_id(name: str, file_id: str) -> str:
    """`stem (id8).ext`, shortened so that it fits in NAME_MAX bytes."""
    stem, ext = split_ext(name)
    tag = _id_tag(file_id)
    if len((tag + ext).encode("utf-8")) > NAME_MAX // 2:
        ext = ""  # an absurd extension is not worth keeping over the stem
    room = NAME_MAX - len((tag + ext).encode("utf-8"))
    return _truncate_utf8(stem, room) + tag + ext


def plain_name(filename: str, file_id: str) -> tuple[str, bool]:
    """The name a file would like to have, and whether it must carry its id to be unique.

    Names that had to be invented or shortened keep the id so they cannot collide.
    """
    name = _clean(filename)
    if name in ("", ".", ".."):
        fallback = _clean(file_id)  # ids are UUIDs, but trust nothing from the wire
        return (fallback if fallback not in ("", ".", "..") else "unnamed"), False
    if len(name.encode("utf-8")) > NAME_MAX:
        return with_id(name, file_id), True
    return name, False


class Listed(Protocol):
    """What naming needs of a remote file (`api.RemoteFile` has it)."""

    @property
    def id(self) -> str: ...
    @property
    def filename(self) -> str: ...
    @property
    def created_at(self) -> int: ...


L = TypeVar("L", bound=Listed)


def oldest_first(files: Iterable[L]) -> list[L]:
    """The order in which files new to a folder claim their names: the oldest first, so
    that it keeps the plain name and newer ones carry their id."""
    return sorted(files, key=lambda f: (f.created_at, f.id))


def free_name(taken: Container[str], filename: str, file_id: str) -> str:
    """The name a file gets in a folder whose `taken` names are held by others: its
    plain name if free, else `stem (id8).ext` (the whole id in the unlikely case that
    is taken too)."""
    name, unique = plain_name(filename, file_id)
    if unique or name not in taken:
        return name
    tagged = with_id(name, file_id)
    return tagged if tagged not in taken else with_id(name, file_id.replace("-", ""))


def shown_names(files: Iterable[L]) -> dict[str, L]:
    """The names a folder holding just `files` shows, as a mount started now shows them
    (the mount's own writes may keep other names for files it already showed)."""
    names: dict[str, L] = {}
    for listed in oldest_first(files):
        names[free_name(names, listed.filename, listed.id)] = listed
    return names


def labelled(label: str | None, an_id: str) -> str:
    """A thing named by its id and, where it has one, a label people gave it (a batch
    job's `metadata` name): `label (id8)`, shortened to NAME_MAX bytes; the whole id,
    cleaned, when the label is missing or cleans to nothing usable."""
    name = _clean(label or "").strip()
    if name in ("", ".", ".."):
        return plain_name(an_id, an_id)[0]
    tag = _id_tag(an_id)
    return _truncate_utf8(name, NAME_MAX - len(tag.encode("utf-8"))) + tag


def folder_name(purpose: str) -> str:
    """Folder name for a purpose; purposes are short identifiers, but trust nothing."""
    name = _clean(purpose)
    if name in ("", ".", ".."):
        name = f"purpose-{name.encode('utf-8').hex() or 'empty'}"
    elif name == JOBS_FOLDER:
        name = f"purpose-{name}"
    return _truncate_utf8(name, NAME_MAX)


# Names that programs give their scratch files: they live in the local spool only (see
# `LocalNames`). Each pattern is an fnmatch glob, matched case-sensitively against the
# whole name. `_X6` is what mkstemp puts for XXXXXX. Real names they would also catch
# (documented in docs/SEMANTICS.md, "Scratch files"): a hidden name with a 6-letter
# extension (`.env.sample`), `sed` and 6 letters or digits (`sediment1`), `4913`, and
# names ending in `~` or wrapped in `#`.
_X6 = "[A-Za-z0-9]" * 6
DEFAULT_LOCAL_NAMES = (
    ".*.sw?",  # vim's and nano's swap files (.NAME.swp, .swo, ...), vim's probe .NAME.swx
    "4913",  # vim's probe of whether it may create files in the folder
    "*~",  # backups: vim's while it saves, emacs, nano, gedit
    "sed" + _X6,  # sed -i writes sedXXXXXX, then renames it over the file
    ".?*." + _X6,  # rsync's .NAME.XXXXXX, renamed over NAME once complete
    ".goutputstream-" + _X6,  # GLib (gedit, file managers) saving a file
    ".~lock.*#",  # LibreOffice's lock file
    "#*#",  # emacs's auto-save file
    ".#*",  # emacs's lock (a symlink, refused here: emacs then goes on without it)
)


class LocalNames:
    """Whether a name is a scratch file's: `name in local_names`."""

    def __init__(self, patterns: tuple[str, ...] = DEFAULT_LOCAL_NAMES) -> None:
        self.patterns = patterns
        self._match = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))

    def __contains__(self, name: object) -> bool:
        return bool(self.patterns) and isinstance(name, str) and bool(self._match.match(name))
