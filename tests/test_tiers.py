"""How the suite behaves where a real mount cannot be made: FUSE tests are skipped with
the reason said, and the tiers that need no kernel still run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent


def _pytest(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MISTRALFS_TESTS_WITHOUT_FUSE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *args],
        cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_without_fuse_mounting_tests_are_skipped_with_the_reason() -> None:
    marked = "tests/test_mount.py::test_50_mb_random_file_round_trips"  # marked `fuse`
    unmarked = "tests/test_full_disk.py"  # mounts through mounting.mount() without a mark
    result = _pytest(marked, unmarked, "-k", "round_trips or cache_folder")
    assert result.returncode == 0, result.stdout + result.stderr
    skipped = [line for line in result.stdout.splitlines() if line.startswith("SKIPPED")]
    assert len(skipped) >= 2, result.stdout
    assert all("needs /dev/fuse" in line for line in skipped), skipped
    assert " passed" not in result.stdout.splitlines()[-1]


def test_without_fuse_the_fast_tier_still_runs() -> None:
    result = _pytest("tests/test_fake_tier.py")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed" in result.stdout.splitlines()[-1] and "skipped" not in result.stdout
