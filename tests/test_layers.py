"""The package's layers, checked from its source: who may import whom.

- `api/` (the Files API client) knows nothing of the filesystem or the process;
- `fs/` (the filesystem) uses the client through `api/` and knows nothing of processes,
  command lines or settings files;
- `daemon/` puts a filesystem in a process;
- `pyfs/` (`mistral://` for fsspec) puts the client under fsspec: of the filesystem it
  takes the naming rules (`fs/names.py`) only, so that it runs where FUSE does not;
- the emulator is a server of its own and imports nothing of the client or the mount;
- and no module imports itself back through others (an import cycle), not even from
  inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import mistralfs

PACKAGE = Path(mistralfs.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node, but those under `if TYPE_CHECKING:` (annotations only, never run)."""
    out: list[ast.AST] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return out


def _imports() -> dict[str, set[str]]:
    """Each module of the package -> the package's modules it imports, anywhere in it."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            found |= {target for target in targets if target in modules and target != name}
        graph[name] = found
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the modules along it, or None."""
    state: dict[str, int] = {}  # 1: being visited, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            # A package's __init__ importing its own modules is how packages re-export.
            if target.startswith(node + "."):
                continue
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (found := visit(target)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_module_imports_itself_back() -> None:
    assert _cycle(_imports()) is None


def test_each_layer_imports_only_the_layers_below_it() -> None:
    allowed_above = {
        "mistralfs.api": (
            "mistralfs.daemon",
            "mistralfs.fs",
            "mistralfs.cli",
            "mistralfs.config",
            "mistralfs.pyfs",
        ),
        "mistralfs.fs": ("mistralfs.daemon", "mistralfs.cli", "mistralfs.config", "mistralfs.pyfs"),
        "mistralfs.emulator": (
            "mistralfs.api",
            "mistralfs.fs",
            "mistralfs.daemon",
            "mistralfs.cli",
            "mistralfs.config",
            "mistralfs.pyfs",
        ),
        "mistralfs.pyfs": ("mistralfs.daemon", "mistralfs.cli", "mistralfs.emulator"),
    }
    wrong = [
        f"{module} imports {target}"
        for module, targets in _imports().items()
        for layer, forbidden in allowed_above.items()
        if module == layer or module.startswith(layer + ".")
        for target in targets
        if any(target == f or target.startswith(f + ".") for f in forbidden)
    ]
    assert wrong == []


def test_pyfs_takes_only_the_naming_rules_of_the_filesystem() -> None:
    """The rest of fs/ needs pyfuse3, which fsspec users on macOS or Windows lack."""
    wrong = [
        f"{module} imports {target}"
        for module, targets in _imports().items()
        if module.startswith("mistralfs.pyfs")
        for target in targets
        if target.startswith("mistralfs.fs.") and target != "mistralfs.fs.names"
    ]
    assert wrong == []


def test_the_checks_see_imports_inside_functions(tmp_path: Path) -> None:
    """A check that found nothing because it looked at nothing would pass as well."""
    graph = _imports()
    assert "mistralfs.daemon.serve" in graph["mistralfs.daemon.commands"]  # a lazy import
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
