"""The package type-checks: mypy, as CI runs it, finds nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mistralfs

PACKAGE = Path(mistralfs.__file__).parent


def test_mypy_finds_nothing_in_the_package(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache"), str(PACKAGE)],
        cwd=PACKAGE.parent, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
