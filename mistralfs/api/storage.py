"""Signed-URL range answers: what a 206 must say for its body to be taken.

A body is never read past the range asked for: a server whose 206 carries a gigabyte
for a megabyte asked must not make the reader hold a gigabyte. The reads themselves
go through the client's one transport (transport.py), the range read with the
answer's headers, in block-sized pieces.
"""

from __future__ import annotations


class BadRange(Exception):
    """A 206 that does not answer the range asked: another start, more bytes than
    asked, or a Content-Length that disagrees with its Content-Range."""


def range_length(
    content_range: str | None, content_length: int | None, start: int, length: int
) -> int:
    """How many bytes a 206 answer to `length` bytes at `start` carries (fewer at the
    end of the file); `BadRange` unless its headers answer that range and no more.

    A body is never read past this: a server whose 206 carries a gigabyte for a
    megabyte asked must not make the reader hold a gigabyte.
    """
    parsed = _content_range(content_range)
    last_wanted = start + length - 1
    if parsed is None:
        raise BadRange(f"206 answer with a missing or malformed Content-Range {content_range!r}")
    first, last = parsed
    if first != start or not first <= last <= last_wanted:
        raise BadRange(f"206 answer with Content-Range {content_range!r} for {start}-{last_wanted}")
    size = last - first + 1
    if content_length is not None and content_length != size:
        raise BadRange(f"206 answer of {content_length} bytes for Content-Range {content_range!r}")
    return size


def _content_range(value: str | None) -> tuple[int, int] | None:
    """(first, last) of `Content-Range: bytes first-last/total`; None if malformed."""
    unit, _, rest = (value or "").strip().partition(" ")
    first, dash, rest = rest.partition("-")
    last = rest.partition("/")[0]
    if unit.lower() != "bytes" or not dash or not first.isdigit() or not last.isdigit():
        return None
    return int(first), int(last)
