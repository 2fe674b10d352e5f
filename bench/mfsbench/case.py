"""A case (one row of the table) and how its samples are taken: timed commands, sides
run in turn."""

from __future__ import annotations

import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Case:
    """One row: samples of mistralfs and of the peer, and how they compare to the target."""

    key: str
    title: str
    unit: str  # "s" (lower is better), "MiB/s" (higher is better) or "MiB" (memory)
    peer_name: str
    target: str
    mfs: list[float] = field(default_factory=list)
    peer: list[float] = field(default_factory=list)
    limit: float | None = None  # for absolute targets (M1)
    extra: dict[str, list[float]] = field(default_factory=dict)

    def median(self, side: str) -> float | None:
        values = self.mfs if side == "mfs" else self.peer
        return statistics.median(values) if values else None

    def ratio(self) -> float | None:
        m, p = self.median("mfs"), self.median("peer")
        if m is None or not p:
            return None
        return m / p

    def met(self) -> bool | None:
        m = self.median("mfs")
        if m is None:
            return None
        if self.limit is not None:
            return m <= self.limit
        r = self.ratio()
        if r is None:
            return None
        op, value = self.target.split()[0], float(self.target.split()[1].rstrip("x"))
        return r >= value if op == ">=" else r <= value

    def side(self, side: str) -> list[float]:
        """The samples of ``side``: "mfs" or "peer"."""
        return self.mfs if side == "mfs" else self.peer


def timed(cmd: list[str] | Callable[[], Any]) -> float:
    """Seconds a command (its output thrown away) or a function takes."""
    t0 = time.perf_counter()
    if callable(cmd):
        cmd()
    else:
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def alternate(rep: int) -> tuple[str, str]:
    """Loopback: which side goes first in this rep."""
    return ("mfs", "peer") if rep % 2 == 0 else ("peer", "mfs")


def measure(
    case: Case, sides: dict[str, Callable[[], float]], reps: int, once: frozenset[str] = frozenset()
) -> None:
    """Long link: run every side ``reps`` times (those in ``once``: once), rotating who
    goes first; mistralfs's samples go to ``case.mfs``, each peer's to
    ``case.extra[side]``, and the target's peer's to ``case.peer`` too."""
    names = list(sides)
    for rep in range(reps):
        for side in names[rep % len(names) :] + names[: rep % len(names)]:
            if side in once and rep > 0:
                continue
            value = sides[side]()
            (case.mfs if side == "mfs" else case.extra.setdefault(side, [])).append(value)
    target_peer = case.peer_name.split()[0]
    case.peer = case.extra.get(target_peer, [])
