"""Layers import downward only: plugins <- rlhf_env <- algorithms <- benchmarks (the CLI's commands too); no import cycles.

Every ``import`` counts, at module level or inside a function (``ast.walk`` visits them all).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("plugins", "rlhf_env", "algorithms", "benchmarks")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str] = frozenset()) -> set[str]:
    """Dotted names of everything ``path`` imports: ``from a import b`` is ``a.b`` if that is one of
    ``modules``, else ``a``."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                names.add(sub if sub in modules else node.module)
    return names


def imported_packages(path: Path) -> set[str]:
    return {name.split(".")[0] for name in imports(path)}


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def import_graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports (a ``from`` name that is not a module is its package)."""
    modules = project_modules()
    return {
        name: {n for n in imports(path, set(modules)) if n in modules and n != name} for name, path in modules.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


@pytest.mark.parametrize(
    "package, forbidden",
    [
        ("plugins", {"rlhf_env", "algorithms", "benchmarks"}),
        ("rlhf_env", {"algorithms", "benchmarks"}),
        ("algorithms", {"benchmarks"}),
    ],
)
def test_lower_layers_do_not_import_upper_ones(package, forbidden):
    offenders = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = imported_packages(path) & forbidden
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert not offenders


def test_function_level_imports_count(tmp_path):
    source = "import os\n\ndef f():\n    from algorithms.loop import train\n    import benchmarks.runner\n"
    (tmp_path / "m.py").write_text(source)
    assert imported_packages(tmp_path / "m.py") == {"os", "algorithms", "benchmarks"}


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None


def test_a_cycle_is_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
