"""The report: the printed tables (loopback and long link), the results JSON with every
sample, and the loopback chart (PNG)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .case import Case
from .common import RCLONE, RESULTS, log
from .procs import head_commit

SIDES = ("mfs", "rclone", "curl", "sdk")  # the long link's sides, in its table's order


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"
    return f"{value:.0f} {unit}"


def met_cell(c: Case) -> str:
    met = c.met()
    return "-" if met is None else ("met" if met else "NOT MET")


def aligned(rows: Sequence[Sequence[str]]) -> list[str]:
    """Rows in columns, the header's underlined."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def table(cases: list[Case], info: dict[str, float]) -> str:
    """The loopback table: medians, ratio, target, met; ``info``'s lines under it."""
    rows: list[tuple[str, ...]] = [
        ("case", "what", "mistralfs", "peer", "peer is", "ratio", "target", "met")
    ]
    for c in cases:
        r = c.ratio()
        rows.append(
            (
                c.key,
                c.title,
                fmt(c.median("mfs"), c.unit),
                fmt(c.median("peer"), c.unit),
                c.peer_name,
                "-" if r is None else f"{r:.2f}x",
                c.target,
                met_cell(c),
            )
        )
    lines = aligned(rows)
    lines.append("")
    lines += [f"{k}: {v:.2f}" for k, v in info.items()]
    lines.append(
        "(medians; ratio is mistralfs/peer of the row's unit: MiB/s rows want >=, "
        "time rows want <=)"
    )
    return "\n".join(lines)


def median_of(values: list[float] | None) -> float | None:
    return statistics.median(values) if values else None


def link_table(link: object, cases: list[Case], calibration: dict[str, float]) -> str:
    """One link's rows: every side's median, and mistralfs against its target's peer."""
    rows: list[tuple[str, ...]] = [
        ("case", "what", "mistralfs", "rclone", "curl", "SDK", "ratio", "target", "met")
    ]
    for c in cases:
        r = c.ratio()
        values = [c.median("mfs"), *(median_of(c.extra.get(side)) for side in SIDES[1:])]
        rows.append(
            (
                c.key,
                c.title,
                *(fmt(v, c.unit) for v in values),
                "-" if r is None or c.limit is not None else f"{r:.2f}x {c.peer_name.split()[0]}",
                c.target,
                met_cell(c),
            )
        )
    lines = [f"link: {link}"]
    lines += [f"  calibration: {k}: {v:.1f}" for k, v in calibration.items()]
    return "\n".join(lines + aligned(rows))


def summary(c: Case) -> str:
    """A long-link row's medians, side by side, for the log."""
    return ", ".join(
        f"{side} {fmt(c.median('mfs') if side == 'mfs' else median_of(c.extra.get(side)), c.unit)}"
        for side in SIDES
        if side == "mfs" or c.extra.get(side)
    )


def proxy_note(c: Case) -> str:
    """Cores used by the busiest proxy, the emulator and the mount's daemon (medians)."""

    def shares(what: str) -> str:
        return ", ".join(
            f"{side} {median_of(c.extra[f'{what}_{side}']):.2f}"
            for side in SIDES
            if c.extra.get(f"{what}_{side}")
        )

    return (
        f"cores used by the busiest proxy: {shares('proxy_cpu')}; "
        f"by the emulator: {shares('emulator_cpu')}; by the daemon: {shares('daemon_cpu')}"
    )


def load_line(load_before: tuple[float, ...]) -> str:
    """How busy the machine was: other work on it skews every number."""
    return (
        f"load average before/after: {load_before[0]:.1f}/{os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} CPUs"
    )


def case_record(c: Case) -> dict[str, object]:
    """A case as it goes into the results JSON: every sample, medians, ratio, target."""
    return {
        "key": c.key,
        "title": c.title,
        "unit": c.unit,
        "peer": c.peer_name,
        "target": c.target,
        "mistralfs": c.mfs,
        "peer_samples": c.peer,
        "median_mistralfs": c.median("mfs"),
        "median_peer": c.median("peer"),
        "ratio": c.ratio(),
        "met": c.met(),
        "extra": c.extra,
    }


def write_results(stamp: str, result: dict[str, Any], load_before: tuple[float, ...]) -> Path:
    """``bench/results/<stamp>.json`` with the host's load and the tools' versions added."""
    result["host"] = {
        "cpus": os.cpu_count(),
        "uname": " ".join(os.uname()),
        # other work on the machine skews the numbers; this says how busy it was
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }
    rclone = subprocess.run([RCLONE, "version"], capture_output=True, text=True)
    nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True)
    result["versions"] = {
        "rclone": rclone.stdout.split("\n")[0],
        "nginx": nginx.stderr.strip(),
    }
    # The tree is shared: commits may land while a run goes on (each mount runs the code
    # of its moment), so the commit at the start is in ``result`` and this is the end's.
    result["commit_at_end"] = head_commit()
    RESULTS.mkdir(exist_ok=True)
    json_path = RESULTS / f"{stamp}.json"
    json_path.write_text(json.dumps(result, indent=1))
    return json_path


def chart(cases: list[Case], path: Path) -> bool:
    """A bar per case: how far past its target (log scale); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is missing (bench/setup installs it): no chart")
        return False
    rows = [c for c in cases if c.median("mfs") is not None]
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(rows) + 1.5))
    labels = [f"{c.key} {c.title}" for c in rows]
    colors = ["tab:green" if c.met() else "tab:red" for c in rows]
    ax.barh(labels, [goodness(c) for c in rows], color=colors)
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("how far past the target (>1 met, <1 not met; log scale)")
    ax.set_title("mistralfs vs rclone mount / curl / httpx, same bytes on loopback")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def goodness(c: Case) -> float:
    """A case relative to its target: > 1 means the target is met."""
    if c.limit is not None:
        return c.limit / (c.median("mfs") or 0.0)
    value = c.ratio() or 0
    goal = float(c.target.split()[1].rstrip("x"))
    return value / goal if c.target.startswith(">=") else goal / value
