"""Layers import downward only: plugins <- rlhf_env <- algorithms <- bench (the CLI's commands too); no import cycles.

The repository's folders install as one namespace (pyproject.toml's package-dir): ``plugins/`` is
``rlhf_env.plugins``, ``algorithms/`` is ``rlhf_env.algorithms``, ``benchmarks/`` is ``rlhf_env.bench``;
the rest of ``rlhf_env`` is the env layer. Every ``import`` counts, at module level or inside a
function (``ast.walk`` visits them all).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> the package it installs as, bottom layer first
PACKAGES = {
    "plugins": "rlhf_env.plugins",
    "rlhf_env": "rlhf_env",
    "algorithms": "rlhf_env.algorithms",
    "benchmarks": "rlhf_env.bench",
}
LAYERS = ("plugins", "env", "algorithms", "bench")


def module_name(path: Path) -> str:
    folder, *parts = path.relative_to(ROOT).with_suffix("").parts
    parts = parts[:-1] if parts[-1] == "__init__" else parts
    return ".".join([PACKAGES[folder], *parts])


def layer(name: str) -> str | None:
    """The layer of a dotted module name, None outside the project."""
    for prefix, which in (
        ("rlhf_env.plugins", "plugins"),
        ("rlhf_env.algorithms", "algorithms"),
        ("rlhf_env.bench", "bench"),
    ):
        if name == prefix or name.startswith(prefix + "."):
            return which
    return "env" if name == "rlhf_env" or name.startswith("rlhf_env.") else None


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


def imported_layers(path: Path, modules: set[str] = frozenset()) -> set[str]:
    return {which for name in imports(path, modules) if (which := layer(name))}


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for folder in PACKAGES for p in sorted((ROOT / folder).rglob("*.py"))}


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


@pytest.mark.parametrize("folder", ["plugins", "rlhf_env", "algorithms"])
def test_lower_layers_do_not_import_upper_ones(folder):
    modules = set(project_modules())
    own = LAYERS.index(layer(PACKAGES[folder]))
    offenders = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        bad = {which for which in imported_layers(path, modules) if LAYERS.index(which) > own}
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert not offenders


def test_function_level_imports_count(tmp_path):
    source = (
        "import os\n\ndef f():\n    from rlhf_env.algorithms.run.loop import train\n    import rlhf_env.bench.runner\n"
    )
    (tmp_path / "m.py").write_text(source)
    assert imported_layers(tmp_path / "m.py") == {"algorithms", "bench"}


def test_the_plugins_layer_is_named_as_a_module_of_the_namespace(tmp_path):
    (tmp_path / "m.py").write_text("from rlhf_env import plugins, tasks\n")
    assert imported_layers(tmp_path / "m.py", {"rlhf_env.plugins", "rlhf_env.tasks"}) == {"plugins", "env"}


def test_nothing_imports_the_folders_by_their_own_names():
    """``import plugins`` or ``from algorithms...`` would only work from a checkout, never from a wheel."""
    offenders = {}
    for path in sorted(
        [*ROOT.joinpath("tests").rglob("*.py"), *(p for f in PACKAGES for p in (ROOT / f).rglob("*.py"))]
    ):
        bad = {name for name in imports(path) if name.split(".")[0] in ("plugins", "algorithms", "benchmarks")}
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert not offenders


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None


def test_a_cycle_is_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
