"""Layers import downward only: plugins <- rlhf_env <- algorithms <- benchmarks (the CLI's commands too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


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
