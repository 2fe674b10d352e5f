"""Injected faults, so that clients' retry and error paths can be exercised.

There are two kinds of fault configuration; admin routes (``/v1/_emulator/...``)
are never faulted by either.

Deterministic rules
-------------------
Posted to ``POST /v1/_emulator/faults`` as a JSON object or a list of them.
Rules are kept in the order they were added. A request takes the first rule
that matches its method and path prefix and still has uses left; each use
consumes one of the rule's ``times`` (``times: null`` means forever).

A rule answers with ``status`` (after ``delay`` seconds, with ``Retry-After``
when ``retry_after`` is set) and ``body`` as raw text when given, otherwise a
JSON body in the shape the real service uses for that status. A rule with a
``delay`` but no ``status`` only slows the request down and lets it through.
A rule with a ``lie`` (and no ``status``) lets the request through and
falsifies its answer (see lies.py).
A request that a deterministic rule matches draws no random fault.

Seeded random faults (``mistralfs emulator --faults SPEC``)
-----------------------------------------------------------
Each request to a known route draws from a ``random.Random`` seeded from the
spec, so the same seed and the same sequence of requests give the same faults,
run after run. Every (rule, route) pair has its own stream, derived from the
seed, so the faults uploads see do not depend on how many listings happened
in between.

Compact SPEC: ``;``-separated ``key=value`` items::

    seed=7;route=*;rate=0.2;kinds=500,502,503,429,reset,cut,stall:2,badjson,lost
    seed=1;route=upload;rate=0.5;kinds=lost,503;route=list,retrieve;rate=0.1;kinds=reset

- ``seed=INT`` (once, anywhere; default 0).
- ``route=R[,R...]`` starts a rule. Routes: ``list`` (GET /v1/files),
  ``upload`` (POST /v1/files), ``retrieve`` (GET /v1/files/{id}), ``delete``,
  ``content`` (GET .../content), ``url`` (GET .../url), ``storage`` (GET/HEAD
  of a signed URL), ``jobs`` (GET /v1/batch/jobs and GET /v1/batch/jobs/{id}),
  or ``*`` for all of them. A request uses the first rule
  that names its route, so put specific rules before ``*``.
- ``rate=P``: probability in [0, 1] that a request on the rule's routes is
  faulted.
- ``kinds=K[,K...]``: what a faulted request gets, picked uniformly (list a
  kind twice to make it twice as likely). ``rate`` and ``kinds`` before any
  ``route=`` make a rule for ``*``.

The same as JSON (``--faults`` value starting with ``{``, or ``@FILE`` holding
either form)::

    {"seed": 7, "rules": [{"route": "upload", "rate": 0.5, "kinds": ["lost", "503"]},
                          {"route": ["list", "retrieve"], "rate": 0.1, "kinds": "reset"}]}

Kinds, and what an HTTP client sees:

- ``500``, ``502``, ``503`` (any status 400..599): that status, the request is
  not processed. JSON ``{"detail": ...}`` on API routes; Azure XML on storage.
- ``429`` or ``429:S``: 429 with ``Retry-After: S`` (default 1) and the rate
  limit body; not processed.
- ``reset``: the request body is read and thrown away, then the TCP connection
  is reset (RST) without any answer; not processed.
- ``cut``: processed normally, the headers (with the full Content-Length) and
  about half the body are sent, then the connection is closed. A response
  without body bytes (HEAD, an empty file) is reset instead.
- ``stall:S``: wait S seconds, then process and answer normally.
- ``badjson``: processed normally (an upload IS stored), then answered 200
  with a body that is not JSON. Only on JSON routes (not content, storage).
- ``lost``: processed normally (an upload IS stored, a delete IS done), then
  the connection is reset instead of answering. The case a client must handle
  without creating duplicates.

Kinds that do not apply to a route are left out of its choice; a rule with no
kind left for a route never faults it.

At runtime: ``POST /v1/_emulator/faults`` with ``{"random": SPEC}`` (the
compact string or the JSON object) replaces the random faults, ``{"random":
null}`` turns them off, ``DELETE`` clears them along with the rules. ``GET``
shows them under ``"random"`` (only while set) with the faults injected so far.
"""

from __future__ import annotations

import collections
import json
import math
import pathlib
import random
import re
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from mistralfs.emulator.lies import Lie, LieSpecError

RATE_LIMIT_BODY = {
    "object": "error",
    "message": "Rate limit exceeded",
    "type": "rate_limited",
    "param": None,
    "code": "1300",
}

ROUTES = ("list", "upload", "retrieve", "delete", "content", "url", "storage", "jobs")
JSON_ROUTES = frozenset({"list", "upload", "retrieve", "delete", "url", "jobs"})
KIND_NAMES = ("STATUS", "429[:S]", "reset", "cut", "stall:S", "badjson", "lost")
HISTORY_MAX = 1000
MAX_STALL = 3600.0

_ID = r"[^/]+"
_ROUTE_PATTERNS = [
    ("GET", re.compile(r"/v1/files"), "list"),
    ("POST", re.compile(r"/v1/files"), "upload"),
    ("GET", re.compile(rf"/v1/files/{_ID}"), "retrieve"),
    ("DELETE", re.compile(rf"/v1/files/{_ID}"), "delete"),
    ("GET", re.compile(rf"/v1/files/{_ID}/content"), "content"),
    ("GET", re.compile(rf"/v1/files/{_ID}/url"), "url"),
    ("GET", re.compile(rf"/storage/{_ID}"), "storage"),
    ("HEAD", re.compile(rf"/storage/{_ID}"), "storage"),
    ("GET", re.compile(r"/v1/batch/jobs"), "jobs"),
    ("GET", re.compile(rf"/v1/batch/jobs/{_ID}"), "jobs"),
]


class FaultSpecError(ValueError):
    """A fault description (admin JSON or ``--faults`` SPEC) is malformed."""


def route_of(method: str, path: str) -> str | None:
    """The route name of a request (see ROUTES), or None for any other path."""
    method = method.upper()
    for want, pattern, name in _ROUTE_PATTERNS:
        if want == method and pattern.fullmatch(path):
            return name
    return None


def status_body(status: int) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Headers (without length) and JSON body the service sends with ``status``."""
    if status == 429:
        payload: dict[str, Any] = RATE_LIMIT_BODY
    else:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Error"
        payload = {"detail": phrase}
    return [(b"content-type", b"application/json")], json.dumps(payload).encode()


def _retry_after_text(value: float) -> bytes:
    return (str(int(value)) if float(value).is_integer() else repr(float(value))).encode()


# --- deterministic rules -------------------------------------------------------------------


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
    lie: Lie | None = None

    @classmethod
    def from_json(cls, spec: Any) -> Fault:
        """Build a rule from the admin route's JSON, checking types."""
        if not isinstance(spec, dict):
            raise FaultSpecError("fault must be a JSON object")
        known = {"method", "path_prefix", "status", "times", "retry_after", "body", "delay", "lie"}
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
        try:
            lie = Lie.from_json(spec["lie"]) if spec.get("lie") is not None else None
        except LieSpecError as exc:
            raise FaultSpecError(str(exc)) from None
        if lie is not None:
            status = spec.get("status")  # a lie answers as the service would, falsified
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
        if lie is not None and status is not None:
            raise FaultSpecError("a lie falsifies the service's answer: give it no status")
        if status is None and delay is None and lie is None:
            raise FaultSpecError("a fault needs a status, a delay, a lie, or a delay and one")
        return cls(
            method=method.upper() if method else None,
            path_prefix=path_prefix,
            status=status,
            remaining=times,
            retry_after=retry_after,
            body=body,
            delay=delay,
            lie=lie,
        )

    def matches(self, method: str, path: str) -> bool:
        """Whether this rule applies to a request (ignoring uses left)."""
        if self.method is not None and self.method != method.upper():
            return False
        if self.lie is not None and not self.lie.applies_to(route_of(method, path)):
            return False
        return self.path_prefix is None or path.startswith(self.path_prefix)

    def response(self) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """Status, headers and body to answer with; only for rules with a status."""
        assert self.status is not None
        headers: list[tuple[bytes, bytes]]
        if self.body is not None:
            body = self.body.encode()
            headers = [(b"content-type", b"text/plain; charset=utf-8")]
        else:
            headers, body = status_body(self.status)
        if self.retry_after is not None:
            headers.append((b"retry-after", _retry_after_text(self.retry_after)))
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
            "lie": self.lie.describe() if self.lie else None,
        }


# --- seeded random faults ------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """One fault kind: ``name`` is status, reset, cut, stall, badjson or lost."""

    name: str
    status: int | None = None
    seconds: float | None = None

    @classmethod
    def parse(cls, text: Any) -> Kind:
        """``"503"``, ``"429:2"``, ``"stall:1.5"``, ``"reset"``, ..."""
        if isinstance(text, int) and not isinstance(text, bool):
            text = str(text)
        if not isinstance(text, str) or not text.strip():
            raise FaultSpecError(f"a fault kind must be a non-empty string, not {text!r}")
        word, colon, arg = text.strip().lower().partition(":")
        if word.isdigit():
            status = int(word)
            if not 400 <= status <= 599:
                raise FaultSpecError(f"fault status {status} is not an error (400..599)")
            seconds = None
            if colon:
                if status != 429:
                    raise FaultSpecError(f"only 429 takes seconds ({text!r})")
                seconds = _seconds(arg, text)
            elif status == 429:
                seconds = 1.0
            return cls("status", status=status, seconds=seconds)
        if word == "stall":
            if not colon:
                raise FaultSpecError("stall needs its seconds, e.g. stall:2")
            return cls("stall", seconds=_seconds(arg, text))
        if word in ("reset", "cut", "badjson", "lost"):
            if colon:
                raise FaultSpecError(f"{word} takes no argument ({text!r})")
            return cls(word)
        raise FaultSpecError(f"unknown fault kind {text!r} (known: {', '.join(KIND_NAMES)})")

    def applies_to(self, route: str) -> bool:
        """badjson needs a JSON route; every other kind applies everywhere."""
        return self.name != "badjson" or route in JSON_ROUTES

    def __str__(self) -> str:
        if self.name == "status":
            assert self.status is not None
            if self.status == 429 and self.seconds != 1.0:
                return f"429:{self.seconds:g}"
            return str(self.status)
        if self.name == "stall":
            return f"stall:{self.seconds:g}"
        return self.name


def _seconds(arg: str, text: str) -> float:
    try:
        value = float(arg)
    except ValueError:
        raise FaultSpecError(f"{text!r}: {arg!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0 or value > MAX_STALL:
        raise FaultSpecError(f"{text!r}: seconds must be between 0 and {MAX_STALL:g}")
    return value


@dataclass(frozen=True)
class RandomRule:
    """Routes it covers, the chance of a fault, and the kinds to pick from."""

    routes: tuple[str, ...]
    rate: float
    kinds: tuple[Kind, ...]

    def describe(self) -> dict[str, Any]:
        return {
            "route": list(self.routes),
            "rate": self.rate,
            "kinds": [str(k) for k in self.kinds],
        }


@dataclass(frozen=True)
class RandomPlan:
    """A parsed SPEC: immutable, so one plan can start many emulators alike."""

    seed: int
    rules: tuple[RandomRule, ...]

    def describe(self) -> dict[str, Any]:
        """The JSON form of the spec (which parses back to an equal plan)."""
        return {"seed": self.seed, "rules": [r.describe() for r in self.rules]}


def _parse_routes(value: Any) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise FaultSpecError("route must be a name, a comma-separated list, or a JSON list")
    routes: list[str] = []
    for item in items:
        name = item.strip().lower() if isinstance(item, str) else item
        if name == "*":
            routes.extend(r for r in ROUTES if r not in routes)
        elif name in ROUTES:
            if name not in routes:
                routes.append(name)
        else:
            raise FaultSpecError(f"unknown route {item!r} (known: {', '.join(ROUTES)}, *)")
    return tuple(routes)


def _parse_rate(value: Any) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise FaultSpecError(f"rate {value!r} is not a number") from None
    if type(value) not in (int, float) or not 0 <= value <= 1:
        raise FaultSpecError(f"rate must be a number between 0 and 1, not {value!r}")
    return float(value)


def _parse_kinds(value: Any) -> tuple[Kind, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise FaultSpecError("kinds must be a comma-separated list or a JSON list")
    return tuple(Kind.parse(k) for k in items)


def _parse_seed(value: Any) -> int:
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise FaultSpecError(f"seed {value!r} is not an integer") from None
    if type(value) is not int:
        raise FaultSpecError(f"seed must be an integer, not {value!r}")
    return value


def _rule_from_json(spec: Any) -> RandomRule:
    if not isinstance(spec, dict):
        raise FaultSpecError("each rule must be a JSON object")
    unknown = set(spec) - {"route", "rate", "kinds"}
    if unknown:
        raise FaultSpecError(f"unknown rule fields: {sorted(unknown)}")
    for name in ("rate", "kinds"):
        if name not in spec:
            raise FaultSpecError(f"a rule needs {name}=")
    return RandomRule(
        routes=_parse_routes(spec.get("route", "*")),
        rate=_parse_rate(spec["rate"]),
        kinds=_parse_kinds(spec["kinds"]),
    )


def _compact_to_json(text: str) -> dict[str, Any]:
    seed: Any = 0
    seen_seed = False
    rules: list[dict[str, Any]] = []
    for raw in text.split(";"):
        item = raw.strip()
        if not item:
            continue
        key, eq, value = item.partition("=")
        key = key.strip().lower()
        value = value.strip()
        if not eq:
            raise FaultSpecError(f"{item!r} is not key=value")
        if key == "seed":
            if seen_seed:
                raise FaultSpecError("seed= given twice")
            seen_seed = True
            seed = value
        elif key == "route":
            rules.append({"route": value})
        elif key in ("rate", "kinds"):
            if not rules:
                rules.append({"route": "*"})
            if key in rules[-1]:
                raise FaultSpecError(f"{key}= given twice in one rule (start a rule with route=)")
            rules[-1][key] = value
        else:
            raise FaultSpecError(f"unknown key {key!r} (known: seed, route, rate, kinds)")
    return {"seed": seed, "rules": rules}


def parse_plan(spec: Any) -> RandomPlan:
    """A plan from a compact SPEC string, ``@FILE``, the JSON form (str or dict), or a plan."""
    if isinstance(spec, RandomPlan):
        return spec
    if isinstance(spec, str):
        text = spec.strip()
        if text.startswith("@"):
            try:
                text = pathlib.Path(text[1:]).read_text().strip()
            except OSError as exc:
                raise FaultSpecError(f"cannot read {text[1:]}: {exc.strerror}") from None
        if text.startswith("{"):
            try:
                spec = json.loads(text)
            except ValueError as exc:
                raise FaultSpecError(f"invalid JSON: {exc}") from None
        else:
            spec = _compact_to_json(text)
    if not isinstance(spec, dict):
        raise FaultSpecError("a random fault spec is a string or a JSON object")
    unknown = set(spec) - {"seed", "rules"}
    if unknown:
        raise FaultSpecError(f"unknown fields: {sorted(unknown)}")
    rules = spec.get("rules")
    if not isinstance(rules, list) or not rules:
        raise FaultSpecError("no rules: give at least route=..;rate=..;kinds=..")
    return RandomPlan(
        seed=_parse_seed(spec.get("seed", 0)), rules=tuple(_rule_from_json(r) for r in rules)
    )


class RandomFaults:
    """The running state of a plan: one random stream per (rule, route), and a history."""

    def __init__(self, plan: RandomPlan) -> None:
        self.plan = plan
        self._streams: dict[tuple[int, str], random.Random] = {}
        self._requests = 0
        self.history: collections.deque[dict[str, Any]] = collections.deque(maxlen=HISTORY_MAX)
        self.injected = 0

    def draw(self, method: str, path: str) -> Kind | None:
        """The fault for this request, if any; advances the route's stream."""
        route = route_of(method, path)
        if route is None:
            return None
        index = next((i for i, r in enumerate(self.plan.rules) if route in r.routes), None)
        if index is None:
            return None
        rule = self.plan.rules[index]
        stream = self._streams.get((index, route))
        if stream is None:
            # str seeds are hashed with SHA-512: the same on every run and platform.
            stream = random.Random(f"{self.plan.seed}/{index}/{route}")
            self._streams[(index, route)] = stream
        self._requests += 1
        choices = [k for k in rule.kinds if k.applies_to(route)]
        if stream.random() >= rule.rate or not choices:
            return None
        kind = choices[stream.randrange(len(choices))]
        self.injected += 1
        self.history.append(
            {"n": self._requests, "route": route, "method": method, "path": path, "kind": str(kind)}
        )
        return kind

    def describe(self) -> dict[str, Any]:
        """The plan plus what it did: requests seen, faults injected, recent history."""
        return {
            **self.plan.describe(),
            "requests": self._requests,
            "injected": self.injected,
            "history": list(self.history),
        }


class FaultInjector:
    """The ordered list of deterministic rules, plus the random faults if any."""

    def __init__(self, plan: RandomPlan | None = None) -> None:
        self._faults: list[Fault] = []
        self.random: RandomFaults | None = RandomFaults(plan) if plan else None

    def add(self, fault: Fault) -> None:
        """Append a rule; earlier rules win."""
        self._faults.append(fault)

    def set_random(self, plan: RandomPlan | None) -> None:
        """Replace the random faults (fresh streams from the plan's seed), or turn them off."""
        self.random = RandomFaults(plan) if plan else None

    def clear(self) -> None:
        """Remove every rule and the random faults."""
        self._faults.clear()
        self.random = None

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

    def draw(self, method: str, path: str) -> Kind | None:
        """A random fault for a request that no rule took, if random faults are on."""
        return self.random.draw(method, path) if self.random else None
