"""One installed namespace: the wheel and the editable install put only ``rlhf_env`` at the top level.

pyproject.toml lists the packages and maps the repository's folders into the namespace
(``plugins/`` -> ``rlhf_env.plugins``, ``algorithms/`` -> ``rlhf_env.algorithms``, ``benchmarks/``
-> ``rlhf_env.bench``). These checks read that table, so they take milliseconds; the build
itself was checked by hand (docs/architecture.md, "Installing").
"""

from __future__ import annotations

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def folder_of(package: str) -> Path:
    """Where setuptools finds ``package``: the longest mapped prefix, then the rest as folders."""
    mapping = SETUPTOOLS["package-dir"]
    prefix = max((p for p in mapping if package == p or package.startswith(p + ".")), key=len)
    return ROOT / mapping[prefix] / Path(*package[len(prefix) :].lstrip(".").split(".") if package != prefix else ())


def test_every_package_is_inside_the_rlhf_env_namespace():
    assert {p.split(".")[0] for p in SETUPTOOLS["packages"]} == {"rlhf_env"}
    assert {p.split(".")[0] for p in SETUPTOOLS["package-dir"]} == {"rlhf_env"}


def test_every_folder_with_python_code_is_a_listed_package():
    """A package folder missing from the list would be left out of the wheel (an editable install hides that)."""
    listed = {folder_of(p) for p in SETUPTOOLS["packages"]}
    assert all((folder / "__init__.py").is_file() for folder in listed), listed
    roots = {ROOT / d for d in SETUPTOOLS["package-dir"].values()}
    found = {init.parent for root in roots for init in root.rglob("__init__.py")}
    assert found == listed


def test_the_entry_point_is_in_the_namespace():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"rlhf": "rlhf_env.plugins.cli:main"}
