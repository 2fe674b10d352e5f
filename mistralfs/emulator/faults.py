"""Injected faults, so that clients' retry and error paths can be exercised.

Rules are kept in the order they were added. A request takes the first rule
that matches its method and path prefix and still has uses left; each use
consumes one of the rule's ``times`` (``times: null`` means forever).

A rule answers with ``status`` (after ``delay`` seconds, with ``Retry-After``
when ``retry_after`` is set) and ``body`` as raw text when given, otherwise a
JSON body in the shape the real service uses for that status. A rule with a
``delay`` but no ``status`` only slows the request down and lets it through.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

RATE_LIMIT_BODY = {
    "object": "error",
    "message": "Rate limit exceeded",
    "type": "rate_limited",
    "param": None,
    "code": "1300",
}


class FaultSpecError(ValueError):
    """The admin request describing a fault is malformed."""


@dataclass
class Fault:
    """One rule; ``remaining`` None means unlimited."""

    method: str | None = None
    path_prefix: str | None = None
    status: int | None = 503
    remaining: int | None = 1
    retry_after: float | None = None
    body: str | None = None
    delay: float | None = None

    @classmethod
    def from_json(cls, spec: Any) -> Fault:
        """Build a rule from the admin route's JSON, checking types."""
        if not isinstance(spec, dict):
            raise FaultSpecError("fault must be a JSON object")
        known = {"method", "path_prefix", "status", "times", "retry_after", "body", "delay"}
        unknown = set(spec) - known
        if unknown:
            raise FaultSpecError(f"unknown fault fields: {sorted(unknown)}")
        method = spec.get("method")
        path_prefix = spec.get("path_prefix")
        status = spec.get("status", 503)
        times = spec.get("times", 1)
        retry_after = spec.get("retry_after")
        body = spec.get("body")
        delay = spec.get("delay")
        if method is not None and not isinstance(method, str):
            raise FaultSpecError("method must be a string or null")
        if path_prefix is not None and not isinstance(path_prefix, str):
            raise FaultSpecError("path_prefix must be a string or null")
        if status is not None and (type(status) is not int or not 100 <= status <= 599):
            raise FaultSpecError("status must be an HTTP status code or null")
        if times is not None and (type(times) is not int or times < 1):
            raise FaultSpecError("times must be a positive integer or null")
        for name, value in (("retry_after", retry_after), ("delay", delay)):
            if value is not None and (
                type(value) not in (int, float) or value < 0 or value != value
            ):
                raise FaultSpecError(f"{name} must be a non-negative number")
        if body is not None and not isinstance(body, str):
            raise FaultSpecError("body must be a string")
        if status is None and delay is None:
            raise FaultSpecError("a fault needs a status, a delay, or both")
        return cls(
            method=method.upper() if method else None,
            path_prefix=path_prefix,
            status=status,
            remaining=times,
            retry_after=retry_after,
            body=body,
            delay=delay,
        )

    def matches(self, method: str, path: str) -> bool:
        """Whether this rule applies to a request (ignoring uses left)."""
        if self.method is not None and self.method != method.upper():
            return False
        return self.path_prefix is None or path.startswith(self.path_prefix)

    def response(self) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """Status, headers and body to answer with; only for rules with a status."""
        assert self.status is not None
        headers: list[tuple[bytes, bytes]] = []
        if self.body is not None:
            body = self.body.encode()
            headers.append((b"content-type", b"text/plain; charset=utf-8"))
        else:
            if self.status == 429:
                payload: dict[str, Any] = RATE_LIMIT_BODY
            else:
                try:
                    phrase = HTTPStatus(self.status).phrase
                except ValueError:
                    phrase = "Error"
                payload = {"detail": phrase}
            body = json.dumps(payload).encode()
            headers.append((b"content-type", b"application/json"))
        if self.retry_after is not None:
            value = self.retry_after
            text = str(int(value)) if float(value).is_integer() else repr(float(value))
            headers.append((b"retry-after", text.encode()))
        headers.append((b"content-length", str(len(body)).encode()))
        return self.status, headers, body

    def describe(self) -> dict[str, Any]:
        """JSON view for the admin route."""
        return {
            "method": self.method,
            "path_prefix": self.path_prefix,
            "status": self.status,
            "times": self.remaining,
            "retry_after": self.retry_after,
            "body": self.body,
            "delay": self.delay,
        }


class FaultInjector:
    """The ordered list of active rules."""

    def __init__(self) -> None:
        self._faults: list[Fault] = []

    def add(self, fault: Fault) -> None:
        """Append a rule; earlier rules win."""
        self._faults.append(fault)

    def clear(self) -> None:
        """Remove every rule."""
        self._faults.clear()

    def active(self) -> list[Fault]:
        """Rules that still have uses left."""
        return list(self._faults)

    def take(self, method: str, path: str) -> Fault | None:
        """Consume one use of the first matching rule, if any."""
        for fault in self._faults:
            if fault.matches(method, path):
                if fault.remaining is not None:
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        self._faults.remove(fault)
                return fault
        return None
