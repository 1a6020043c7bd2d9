"""One metric vocabulary, documented; `policy/clipfrac` defined once; the maths page cited as it is."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from rlhf_env.algorithms import maths
from rlhf_env.algorithms.run import metrics as M
from rlhf_env.algorithms.zoo import grpo, ppo

ROOT = Path(__file__).resolve().parents[1]
NAMESPACES = (
    "reward",
    "objective",
    "loss",
    "policy",
    "optim",
    "dpo",
    "rm",
    "rollout",
    "perf",
    "memory",
    "time",
    "model",
    "episode",
    "tool",
)
METRIC_LITERAL = re.compile(rf"^({'|'.join(NAMESPACES)})/[a-z_]+$")


def test_the_architecture_doc_tables_the_vocabulary_as_declared():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    assert M.markdown_table() in doc
    assert "`policy/clipfrac` | share of completion tokens where clipping changed the objective" in doc


def test_every_name_has_a_namespace_a_meaning_and_a_unit():
    for name, metric in M.VOCABULARY.items():
        assert METRIC_LITERAL.match(name) and metric.meaning and metric.unit, metric
        assert "|" not in metric.meaning + metric.unit, metric  # it would split the Markdown table's cell
    with pytest.raises(ValueError, match="'reward/gold' is declared twice"):
        M._metric("reward/gold", "again", "reward")


def test_algorithms_and_benchmarks_spell_no_metric_name_outside_the_vocabulary():
    """Metric names are string literals only in algorithms/run/metrics.py; everyone else uses its constants."""
    offenders = []
    for package in ("algorithms", "benchmarks"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / "algorithms" / "run" / "metrics.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and METRIC_LITERAL.match(node.value):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not offenders


# -- policy/clipfrac -----------------------------------------------------------------------------

# docs/maths.md §5's worked example, ε = 0.2: (ρ, Â) per token and whether clipping changed the objective.
EXAMPLE = [
    ((1.5, 1.0), True),
    ((0.5, 1.0), False),
    ((1.5, -1.0), False),
    ((0.5, -1.0), True),
    ((1.1, 1.0), False),
    ((0.9, -1.0), False),
]


def test_clipped_means_clipping_changed_the_objective():
    ratio = torch.tensor([[r for (r, _), _ in EXAMPLE]])
    adv = torch.tensor([[a for (_, a), _ in EXAMPLE]])
    assert maths.clipped(ratio, adv, 0.2).tolist() == [[c for _, c in EXAMPLE]]
    # Equivalently: the min took the clipped term, and it differs from ρÂ.
    surrogate, _ = maths.clipped_surrogate(ratio.log(), torch.zeros_like(ratio), adv, 0.2)
    assert (surrogate != ratio * adv).tolist() == [[c for _, c in EXAMPLE]]


def test_ppo_and_grpo_count_clipfrac_the_same_way():
    """The worked example as PPO sees it (per-token Â) and as GRPO does (one Â per completion):
    row 0 has Â = +1 and ratios (1.5, 0.5, 1.1), row 1 Â = −1 and (1.5, 0.5, 0.9): clipfrac 2/6.
    A padding position with ρ = 3 and Â = +1 must not count."""
    ratios = torch.tensor([[1.5, 0.5, 1.1, 3.0], [1.5, 0.5, 0.9, 3.0]])
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 0]])
    per_completion = torch.tensor([1.0, -1.0])
    old = torch.zeros_like(ratios)
    _, ppo_clipfrac = ppo.policy_loss(ratios.log(), old, per_completion[:, None].expand(2, 4), mask, clip_eps=0.2)
    parts = grpo.grpo_loss(ratios.log(), old, ratios.log(), per_completion, mask, clip_eps=0.2, kl_coef=0.0)
    dr_parts = grpo.dr_grpo_loss(ratios.log(), old, ratios.log(), per_completion, mask, max_new_tokens=4, clip_eps=0.2)
    for clipfrac in (ppo_clipfrac, parts.clipfrac, dr_parts.clipfrac):
        assert clipfrac.item() == pytest.approx(1 / 3)
    # The old GRPO count (ρ outside [1−ε, 1+ε]) would have said 4/6.
    assert ((ratios - 1).abs() > 0.2)[mask.bool()].float().mean().item() == pytest.approx(4 / 6)


# -- the maths page ------------------------------------------------------------------------------


def sections() -> set[int]:
    text = (ROOT / "docs" / "maths.md").read_text()
    return {int(n) for n in re.findall(r"^## §(\d+) ", text, flags=re.M)}


def citations(text: str) -> set[int]:
    """Sections cited as ``docs/maths.md §2 (…) and §8`` or ``docs/maths.md (§1 …, §3 …)``: every §N
    after ``docs/maths.md`` up to the end of its sentence or paragraph."""
    found = set()
    for tail in re.findall(r"docs/maths\.md(.*?)(?:\.\s|\n\s*\n|$)", text, flags=re.S):
        found |= {int(n) for n in re.findall(r"§(\d+)", tail)}
    return found


def test_every_maths_citation_names_a_section_that_exists():
    assert sections() == set(range(1, 27))
    cited, design = {}, []
    for path in sorted(ROOT.rglob("*")):
        rel = path.relative_to(ROOT)
        if path.suffix not in (".py", ".md") or any(part.startswith(".") for part in rel.parts):
            continue
        text = path.read_text()
        for n in citations(text):
            cited.setdefault(n, []).append(str(rel))
        if "DESIGN" + " §" in text:  # split, so this file does not match itself
            design.append(str(rel))
    assert set(cited) == sections(), {n: p for n, p in cited.items() if n not in sections()}  # all cited, all exist
    # The retired design document is cited nowhere. rlhf_env/episodes.py is being rewritten in
    # another branch; its one citation moves to docs/maths.md §2 there.
    assert not design, design


CITES = {
    "algorithms/maths.py": {1, 3, 4, 5, 25},
    "algorithms/run/memory.py": {24},
    "algorithms/zoo/ppo.py": {2, 4, 5, 6},
    "algorithms/zoo/grpo.py": {3, 5, 7},
    "algorithms/zoo/reinforce.py": {2, 8},
    "algorithms/zoo/dpo.py": {9},
    "rlhf_env/scoring.py": {10},
    "algorithms/zoo/reward_model.py": {11},
    "algorithms/run/plumbing.py": {12},
    "rlhf_env/env.py": {2},
}


@pytest.mark.parametrize("path, want", CITES.items())
def test_the_code_cites_the_maths_it_implements(path, want):
    assert want <= citations((ROOT / path).read_text())
