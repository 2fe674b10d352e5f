"""Answers that lie: the request is carried out, and its answer is falsified.

A client must not believe everything a server says. These lies let tests point a
client (or a real mount) at a server that answers well-formed HTTP with content
that is wrong, and check that nothing is lost and nothing unsafe follows.

A lie rides on a deterministic fault rule (see faults.py), as its ``lie`` field,
with no ``status``: ``{"method": "POST", "path_prefix": "/v1/files", "lie":
{"fields": {"bytes": 12345}}}``. One switch per lie:

Each lies only where it can (a rule's other requests go through untouched):

- ``{"fields": {NAME: VALUE, ...}}``: a JSON object answer (an upload's File,
  a retrieve, a signed URL) has these fields set, say another file's ``id`` or a wrong ``bytes``.
- ``{"records": [{...}, ...]}``: a listing gets these file records first in its
  ``data`` (and ``total`` grows by as many), say one with ``"bytes": -5``; with
  ``"total": false`` the listing has no ``total`` at all (``"records": []`` and
  ``"total": false``: the real listing, without its total).
- ``{"endless": true}``: a listing whose every page is full of files never seen
  before, with a ``total`` always two pages past the page asked for; nothing real
  is listed. ``"total": false`` leaves the total out of every page.
- ``{"extra_bytes": N}``: the body (a signed URL's 206 range, a ``/content``)
  goes on for N more bytes than its headers say it holds; ``"length": true``
  also raises ``Content-Length`` by N (an honest frame around a lying range),
  otherwise the answer has no length and is sent chunked.

A server that accepts and never answers needs no lie: a rule with a long
``delay`` and no ``status`` holds each request that long.
"""

from __future__ import annotations

import json
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

PAD_CHUNK = bytes(1 << 20)  # the extra bytes are zeros, sent a MiB at a time
MAX_EXTRA_BYTES = 1 << 40


class LieSpecError(ValueError):
    """A lie's JSON is malformed."""


@dataclass(frozen=True)
class Lie:
    """What to falsify in a rule's answers (exactly one switch is set)."""

    fields: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    endless: bool = False
    extra_bytes: int = 0
    length: bool = False
    total: bool = True

    @classmethod
    def from_json(cls, spec: Any) -> Lie:
        if not isinstance(spec, dict):
            raise LieSpecError("a lie must be a JSON object")
        unknown = set(spec) - {"fields", "records", "endless", "extra_bytes", "length", "total"}
        if unknown:
            raise LieSpecError(f"unknown lie fields: {sorted(unknown)}")
        switches = [k for k in ("fields", "records", "endless", "extra_bytes") if k in spec]
        if len(switches) != 1:
            raise LieSpecError("a lie sets one of fields, records, endless, extra_bytes")
        fields, records = spec.get("fields", {}), spec.get("records", [])
        extra, length = spec.get("extra_bytes", 0), spec.get("length", False)
        total = spec.get("total", True)
        if not isinstance(fields, dict) or (not fields and "fields" in spec):
            raise LieSpecError("fields must be a non-empty JSON object")
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise LieSpecError("records must be a list of JSON objects")
        if "endless" in spec and spec["endless"] is not True:
            raise LieSpecError("endless must be true")
        if type(extra) is not int or not 0 <= extra <= MAX_EXTRA_BYTES:
            raise LieSpecError(f"extra_bytes must be an integer in 0..{MAX_EXTRA_BYTES}")
        if type(length) is not bool or type(total) is not bool:
            raise LieSpecError("length and total must be true or false")
        return cls(fields, records, "endless" in spec, extra, length, total)

    def applies_to(self, route: str | None) -> bool:
        """Listing lies lie about listings, body lies about content, fields about JSON."""
        if self.endless or self.records or not self.total:
            return route == "list"
        if self.extra_bytes:
            return route in ("content", "storage")
        return route in ("upload", "retrieve", "url", "delete")

    def describe(self) -> dict[str, Any]:
        if self.fields:
            return {"fields": self.fields}
        if self.endless:
            return {"endless": True, "total": self.total}
        if self.extra_bytes:
            return {"extra_bytes": self.extra_bytes, "length": self.length}
        return {"records": self.records, "total": self.total}

    async def tell(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve the request through `app`, with this lie in its answer."""
        if self.endless:
            await _answer_json(send, 200, _endless_page(scope, self.total))
        elif self.extra_bytes:
            await app(scope, receive, _padding(send, self.extra_bytes, self.length))
        else:
            await _rewrite_json(app, scope, receive, send, self._rewrite)

    def _rewrite(self, data: Any) -> Any:
        if isinstance(data, dict) and self.fields:
            return {**data, **self.fields}
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            total = data.get("total")
            total = total + len(self.records) if isinstance(total, int) else total
            listing = {**data, "data": [*self.records, *data["data"]], "total": total}
            if not self.total:
                del listing["total"]
            return listing
        return data


async def _answer_json(send: Send, status: int, data: Any) -> None:
    body = json.dumps(data).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _rewrite_json(
    app: ASGIApp, scope: Scope, receive: Receive, send: Send, rewrite: Any
) -> None:
    """Run `app`, then send its JSON answer as `rewrite` changed it (errors untouched)."""
    start: Message = {}
    chunks: list[bytes] = []

    async def keep(message: Message) -> None:
        nonlocal start
        if message["type"] == "http.response.start":
            start = message
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, keep)
    status = start.get("status", 500)
    try:
        data = json.loads(b"".join(chunks))
    except ValueError:
        data = None
    if status != 200 or data is None:
        await send(start)
        await send({"type": "http.response.body", "body": b"".join(chunks)})
        return
    await _answer_json(send, status, rewrite(data))


def _endless_page(scope: Scope, with_total: bool) -> dict[str, Any]:
    """A full page of files never listed before, and a total past it (if any)."""
    query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
    page = int(query.get("page", ["0"])[0] or 0)
    size = int(query.get("page_size", ["100"])[0] or 100)
    purpose = query.get("purpose", ["batch"])[0]
    now = int(time.time())
    data = [
        {
            "id": str(uuid.uuid4()),
            "object": "file",
            "bytes": 10,
            "created_at": now,
            "filename": f"endless-{page}-{i}.jsonl",
            "purpose": purpose,
            "sample_type": "batch_result",
            "source": "mistral",
            "num_lines": 1,
            "mimetype": "application/jsonl",
            "signature": None,
        }
        for i in range(size)
    ]
    total = (page + 2) * size if with_total else None
    return {"data": data, "object": "list", "total": total}


def _padding(send: Send, extra: int, keep_length: bool) -> Send:
    """A send that follows the app's last body message with `extra` more bytes."""

    async def padded(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = []
            for name, value in message.get("headers", []):
                if name.lower() == b"content-length":
                    if not keep_length:
                        continue
                    value = b"%d" % (int(value) + extra)
                headers.append((name, value))
            await send({**message, "headers": headers})
            return
        if message["type"] != "http.response.body" or message.get("more_body", False):
            await send(message)
            return
        await send({**message, "more_body": True})
        left = extra
        while left > 0:
            chunk = PAD_CHUNK if left >= len(PAD_CHUNK) else PAD_CHUNK[:left]
            left -= len(chunk)
            await send({"type": "http.response.body", "body": chunk, "more_body": left > 0})

    return padded
