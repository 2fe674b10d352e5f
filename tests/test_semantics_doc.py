"""docs/SEMANTICS.md names, for each promise, the tests that check it: those must exist.

A test renamed or removed would otherwise leave a promise that nothing checks any more,
while the contract still cites it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SEMANTICS = ROOT / "docs" / "SEMANTICS.md"
# `test_x.py::test_y` names one test; `test_x.py` alone, a whole module.
REFERENCE = re.compile(r"`(test_\w+\.py)(?:::(test_\w+))?`")


def _tests_in(module: Path) -> set[str]:
    tree = ast.parse(module.read_text(encoding="utf-8"))
    return {
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name.startswith("test_")
    }


def test_every_test_the_semantics_cite_exists() -> None:
    references = REFERENCE.findall(SEMANTICS.read_text(encoding="utf-8"))
    assert len(references) > 100, "the reference pattern no longer matches how the doc cites"
    missing = []
    for module_name, test_name in references:
        module = ROOT / "tests" / module_name
        if not module.is_file():
            missing.append(module_name)
        elif test_name and test_name not in _tests_in(module):
            missing.append(f"{module_name}::{test_name}")
    assert not missing, f"docs/SEMANTICS.md cites tests that do not exist: {sorted(set(missing))}"
