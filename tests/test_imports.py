"""The modules of ``hub/`` import each other without cycles, and never the harness.

Every import counts, wherever it stands: at the top, under
``TYPE_CHECKING`` or inside a function. A cycle means two parts that cannot
be understood (or tested) one without the other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import hub

HUB_DIR = Path(hub.__file__).parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(HUB_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The ``hub`` modules that the module at ``path`` imports."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            # "from . import protocol" names a module; "from .x import y" names x.
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(HUB_DIR.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    graph = {module_name(p): imports_of(p, modules) for p in paths}
    # A package's __init__ re-exporting its modules is not a cycle with them.
    for name, deps in graph.items():
        deps.discard(name.rpartition(".")[0])
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as a list of modules, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep]
            if dep not in state and (cycle := visit(dep)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_find_cycle_reports_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_import_graph_sees_relative_imports() -> None:
    graph = import_graph()
    assert "hub.cells" in graph["hub.app"]
    assert "hub.protocol" in graph["hub.router"]


def test_hub_modules_have_no_import_cycle() -> None:
    assert find_cycle(import_graph()) is None


def loadtest_imports_at_import_time(path: Path) -> list[int]:
    """Lines of the module at ``path`` that import ``loadtest`` outside a function."""
    tree = ast.parse(path.read_text(), str(path))
    in_functions: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            in_functions.update(id(inner) for inner in ast.walk(node))
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        else:
            continue
        harness = any(n == "loadtest" or n.startswith("loadtest.") for n in names)
        if harness and id(node) not in in_functions:
            lines.append(node.lineno)
    return lines


def test_hub_loads_the_harness_only_when_hub_bench_runs() -> None:
    # docs/architecture.md: hub/ never imports loadtest when it is imported;
    # hub bench (hub/cli.py) loads it inside the command.
    found = {
        str(path.relative_to(HUB_DIR.parent)): lines
        for path in sorted(HUB_DIR.rglob("*.py"))
        if (lines := loadtest_imports_at_import_time(path))
    }
    assert found == {}
    cli = (HUB_DIR / "cli.py").read_text()
    assert "from loadtest.__main__ import main" in cli


def test_loadtest_imports_at_import_time_sees_a_top_level_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "import os\nfrom loadtest import report\n\ndef f():\n    import loadtest.worker\n"
    )
    assert loadtest_imports_at_import_time(module) == [2]
