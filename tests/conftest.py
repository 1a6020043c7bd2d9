"""Shared fixtures: throwaway installed distributions that declare ``rlhf_env`` plugins."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

from rlhf_env import plugins

# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine their
# spin-waits stall every forward; one thread keeps the suite fast and steady.
torch.set_num_threads(1)

# Base models built by tests go to one throwaway cache shared by the session (never the
# user's ~/.cache); a test that must see an empty cache sets its own RLHF_ENV_CACHE.
os.environ["RLHF_ENV_CACHE"] = tempfile.mkdtemp(prefix="rlhf_env_test_cache_")
# The learning tests' small arithmetic task (that of the quick suite) starts from a base model
# shipped with the package: a build on another CPU rounds differently and gives another model,
# which moved learning tests across their thresholds.

DEMO_SOURCE = """
from rlhf_env import hookimpl

@hookimpl
def rlhf_register_algorithms(register):
    register("demo_algo", object())

@hookimpl
def rlhf_register_tasks(register):
    register("demo_task", lambda: {"prompts": ["hi"]})

@hookimpl
def rlhf_register_rewards(register):
    register("demo_reward", lambda **kw: (lambda prompts, completions: [1.0] * len(completions)))
"""


def _write_dist(root: Path, dist: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
    """Write modules plus a ``<dist>-0.1.dist-info`` that importlib.metadata discovers on sys.path."""
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    eps = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[{plugins.ENTRY_POINT_GROUP}]\n{eps}")
    importlib.invalidate_caches()  # finders cache directory listings


@pytest.fixture
def write_dist():
    """``write_dist(root, dist, {entry point: module}, {module: source})``."""
    return _write_dist


@pytest.fixture
def plugin_path(tmp_path, monkeypatch):
    """A sys.path folder for throwaway dists; their modules are forgotten afterwards."""
    monkeypatch.delenv(plugins.DISABLE_AUTOLOAD_ENV, raising=False)
    monkeypatch.syspath_prepend(tmp_path)
    before = set(sys.modules)
    plugins.reset_host()  # the global host must not outlive (or predate) the fake install
    yield tmp_path
    plugins.reset_host()
    for name in set(sys.modules) - before:
        if name.startswith("rlhf_demo") or name.startswith("rlhf_broken"):
            del sys.modules[name]


@pytest.fixture
def demo_dist(plugin_path):
    """An installed-looking dist whose entry point ``demo`` adds demo_algo/demo_task/demo_reward."""
    _write_dist(plugin_path, "rlhf_demo_plugin", {"demo": "rlhf_demo_plugin"}, {"rlhf_demo_plugin": DEMO_SOURCE})
    return plugin_path


@pytest.fixture(scope="module")
def learning_task():
    """1-digit addition from the committed base model (the quick suite's task), evaluated on
    the training prompts × 4 (320 samples, ±0.03): the learning tests' low-noise signal."""
    from rlhf_env.tasks.arithmetic import make_arithmetic_task

    task = make_arithmetic_task(digits=1, n_train=80, n_eval=20, sft_steps=100)
    return dataclasses.replace(task, eval_prompts=task.train_prompts * 4)


@pytest.fixture(scope="session")
def arch_checkpoint(tmp_path_factory):
    """``arch_checkpoint(arch, tokenizer kind) -> dir``: a tiny ``tests/tinyarch.py`` checkpoint saved
    with ``save_pretrained``, built once per session."""
    from tinyarch import build, tokenizer

    from rlhf_env.models import save_pretrained

    root = tmp_path_factory.mktemp("arch_checkpoints")
    made: dict[tuple[str, str], Path] = {}

    def get(arch: str, tok_kind: str) -> Path:
        if (arch, tok_kind) not in made:
            made[arch, tok_kind] = save_pretrained(
                build(arch, tok_kind), tokenizer(tok_kind), root / f"{arch}-{tok_kind}"
            )
        return made[arch, tok_kind]

    return get


# -- learning tests ------------------------------------------------------------------------------
# A learning test asks for the ``learning`` fixture: it trains with ``learning.seed`` and states its
# claim as ``learning.check(value, floor)``. ``benchmarks/learning_check.py`` reruns every such test
# under each CPU kernel and several seeds through these two variables and prints value vs floor.
LEARNING_SEED_ENV = "RLHF_ENV_LEARNING_SEED"  # the seed the learning tests train with (default 0)
LEARNING_LOG_ENV = "RLHF_ENV_LEARNING_LOG"  # a JSON-lines file each check appends to, when set


@dataclasses.dataclass
class Learning:
    test: str
    seed: int

    def check(self, value: float, floor: float, what: str = "reward/gold") -> None:
        """Assert ``value > floor`` and, when ``$RLHF_ENV_LEARNING_LOG`` is set, record both."""
        log = os.environ.get(LEARNING_LOG_ENV)
        if log:
            row = {"test": self.test, "what": what, "seed": self.seed, "value": float(value), "floor": float(floor)}
            row["kernel"] = torch.backends.cpu.get_cpu_capability()
            row["blas"] = os.environ.get("MKL_CBWR") or "native"  # MKL's code path: learning_check --blas
            with open(log, "a") as f:  # one short line per write: appends from xdist workers do not interleave
                f.write(json.dumps(row) + "\n")
        assert value > floor, f"{what} {value:.4f} is not above {floor:.4f} (seed {self.seed})"


@pytest.fixture
def learning(request):
    """The seed a learning test trains with and its ``check(value, floor)``; marks it ``learning``."""
    return Learning(request.node.nodeid, int(os.environ.get(LEARNING_SEED_ENV, "0")))


def pytest_collection_modifyitems(items):
    for item in items:
        if "learning" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.learning)
