"""``rlhf bench``'s report: mean and spread over seeds, the gain over the base, a multi-turn task's
episodes table, and the TRL peer baseline beside ours."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rlhf_env.algorithms.run import metrics as M
from rlhf_env.bench.report import write_report
from rlhf_env.bench.runner import _write_result, base_dir, cell_dir, run_suite
from rlhf_env.bench.suite import load_suite

TASK_KNOBS = "knobs = { digits = 1, n_train = 80, n_eval = 20, sft_steps = 100 }"


def write_suite(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


# -- the report ------------------------------------------------------------------------------


def test_report_gives_mean_and_std_over_seeds(tmp_path):
    suite = load_suite(
        write_suite(
            tmp_path / "s.toml",
            'seeds = [0, 1]\nalgorithms = ["ppo", "dpo"]\n[budget]\ntokens = 100\n[[tasks]]\nname = "arithmetic"\n',
        )
    )
    out = tmp_path / "out"
    base = {"status": "ok", "task": "arithmetic", "algorithm": "base", M.REWARD_GOLD: 0.25, M.OBJECTIVE_KL_EVAL: 0.0}
    _write_result(base_dir(out, suite.tasks[0]), base)
    figures = {("ppo", 0): (0.5, 2.0), ("ppo", 1): (0.7, 4.0), ("dpo", 0): (0.9, 1.0)}
    for c in suite.cells():
        if (c.algorithm, c.seed) not in figures:
            _write_result(cell_dir(out, c), {"status": "failed", "error": "ValueError: boom"})
            continue
        gold, kl = figures[(c.algorithm, c.seed)]
        result = {"status": "ok", M.REWARD_GOLD: gold, M.OBJECTIVE_KL_EVAL: kl, M.PERF_TOKENS_TOTAL: 100}
        result |= {M.TIME_ELAPSED_S: 2.0, M.PERF_MEAN_TOKENS_PER_S: 50.0, M.TIME_WALL_S: 3.0, M.PERF_PEAK_MEM_MB: 400.0}
        result |= {M.MEMORY_ESTIMATE_MB: 20.0, M.MEMORY_PEAK_MB: 20.0 + 4 * c.seed} if c.algorithm == "ppo" else {}
        _write_result(cell_dir(out, c), result)
        (cell_dir(out, c) / "metrics.jsonl").write_text(
            json.dumps(
                {
                    "step": 0,
                    "perf/tokens_total": 100,
                    "time/elapsed_s": 2.0,
                    "reward/gold": gold,
                    "objective/kl_eval": kl,
                }
            )
            + "\n"
        )
    md = write_report(suite, out)["markdown"].read_text()
    # ppo: mean(0.5, 0.7) = 0.6, sample std = 0.1414; KL mean 3, std 1.414. dpo: one seed ok, one failed.
    assert "| ppo | 2 | 0.600 ± 0.141 | – | 3.00 ± 1.41 | 50 ± 0 | 3 ± 0 | 400 ± 0 |" in md
    assert "| dpo | 1 (1 failed) | 0.900 | – | 1.00 |" in md
    assert md.index("| dpo |") < md.index("| ppo |")  # best gold first
    assert "| *base model* | – | 0.250 |" in md and "`arithmetic/dpo/seed1`: ValueError: boom" in md
    # Peak memory against the estimate: ppo's ratios 1.0 and 1.2; dpo recorded none, so no row.
    assert "| arithmetic | ppo | 20.0 ± 0.0 | 22.0 ± 2.8 | 1.10 ± 0.14 |" in md and "| arithmetic | dpo |" not in md


# -- the TRL peer baseline ---------------------------------------------------------------------


def test_trl_baseline_without_trl_says_how_to_install_it(monkeypatch, tmp_path):
    import sys

    from rlhf_env.bench.trl_baseline import run_trl_baseline
    from rlhf_env.errors import MissingExtraError

    monkeypatch.setitem(sys.modules, "trl", None)  # import trl -> ImportError
    suite = load_suite(
        write_suite(
            tmp_path / "s.toml",
            'seeds = [0]\nalgorithms = ["grpo"]\n[budget]\ntokens = 10\n[[tasks]]\nname = "arithmetic"\n',
        )
    )
    with pytest.raises(MissingExtraError, match=r'pip install -e "\.\[compare\]"'):  # a user error, one line
        run_trl_baseline(suite, tmp_path)


def test_trl_baseline_trains_trl_beside_ours_at_equal_iterations(tmp_path):
    pytest.importorskip("trl")
    from rlhf_env.bench.trl_baseline import run_trl_baseline

    body = (
        f'seeds = [0]\nalgorithms = ["grpo", "dpo"]\neval_points = 1\neval_prompts = 8\n[budget]\ntokens = 400\n'
        f"[hparams.grpo]\nnum_prompts = 4\ngroup_size = 4\nnum_minibatches = 2\n[hparams.dpo]\nnum_pairs = 32\n"
        f'batch_size = 8\n[[tasks]]\nname = "arithmetic"\n{TASK_KNOBS}\n'
    )
    suite = load_suite(write_suite(tmp_path / "s.toml", body))
    out = tmp_path / "out"
    ours = {r["algorithm"]: r for r in run_suite(suite, out, workers=0, progress=False)}
    trl = {r["algorithm"]: r for r in run_trl_baseline(suite, out, progress=False)}
    assert set(trl) == {"trl_grpo", "trl_dpo"} and all(r["status"] == "ok" for r in trl.values()), trl
    for algo in ("grpo", "dpo"):
        r = trl[f"trl_{algo}"]
        assert r[M.TIME_STEPS] == ours[algo][M.TIME_STEPS] and r["ours"][M.REWARD_GOLD] == ours[algo][M.REWARD_GOLD]
        # trained: it moved off the reference
        assert 0 <= r[M.REWARD_GOLD] <= 1 and r[M.OBJECTIVE_KL_EVAL] > 0 and r[M.PERF_STEPS_PER_S] > 0
    md = write_report(suite, out)["markdown"].read_text()
    assert "## Peer baseline: TRL at equal iterations" in md and "| arithmetic | dpo | 1 |" in md


def test_mask_positions_scores_left_padded_rows_like_unpadded_ones():
    import copy

    import torch

    from rlhf_env.bench.trl_baseline import mask_positions
    from rlhf_env.tiny import build_tiny_model

    model, tok = build_tiny_model(seed=0)
    ids = torch.tensor([tok("ab")["input_ids"]])
    pad = torch.full((1, 3), tok.pad_token_id)
    padded, mask = torch.cat([pad, ids], 1), torch.cat([torch.zeros(1, 3), torch.ones_like(ids)], 1).long()
    want = model(ids).logits[0]
    assert not torch.allclose(model(padded, attention_mask=mask).logits[0, 3:], want, atol=1e-4)  # shifted positions
    fixed = mask_positions(copy.deepcopy(model))
    twin = copy.deepcopy(fixed)  # copies (TRL's reference model) keep the fix
    for m in (fixed, twin):
        assert torch.allclose(m(padded, attention_mask=mask).logits[0, 3:], want, atol=1e-5)


def test_the_gain_over_the_base_and_its_standard_error_by_hand():
    from rlhf_env.bench.report import gain, gain_lines

    base = {M.REWARD_GOLD: 0.25, M.REWARD_GOLD_SE: 0.068}
    # three seeds whose spread (var 0.0025) is below their evaluations' own (0.07² = 0.0049): the floor holds
    e = {"algorithm": "grpo", M.REWARD_GOLD: [0.5, 0.6, 0.55], M.REWARD_GOLD_SE: [0.07] * 3}
    g, se = gain(e, base)
    assert g == pytest.approx(0.30) and se == pytest.approx(math.sqrt(0.0049 / 3 + 0.068**2))
    wide = {"algorithm": "rloo", M.REWARD_GOLD: [0.1, 0.5, 0.3], M.REWARD_GOLD_SE: [0.01] * 3}  # var 0.04
    g2, se2 = gain(wide, base)
    assert g2 == pytest.approx(0.05) and se2 == pytest.approx(math.sqrt(0.04 / 3 + 0.068**2))
    line = gain_lines([e, wide], base)[0]
    assert "grpo +0.300 ± 0.079 ✓;" in line and line.endswith("rloo +0.050 ± 0.134.")  # 0.05 < 2 × 0.134: no mark
    assert gain(e, {M.REWARD_GOLD: 0.25}) is None  # an older base result without its standard error


def test_a_multi_turn_task_gets_its_episodes_table_with_the_base_row(tmp_path):
    """Turns per episode, tool-call rate and accuracy: the base's, and each algorithm's mean ± std over seeds."""
    suite = load_suite(
        write_suite(
            tmp_path / "s.toml",
            'seeds = [0, 1]\nalgorithms = ["grpo"]\n[budget]\ntokens = 100\n[[tasks]]\nname = "calculator"\n',
        )
    )
    out = tmp_path / "out"
    turns = {M.EPISODE_TURNS: 1.75, M.TOOL_CALL_RATE: 0.75, M.TOOL_CALL_ACCURACY: 0.72}
    _write_result(base_dir(out, suite.tasks[0]), {"status": "ok", "algorithm": "base", M.REWARD_GOLD: 0.5, **turns})
    for c, (t, rate) in zip(suite.cells(), [(1.9, 0.9), (2.1, 1.0)]):
        result = {"status": "ok", M.REWARD_GOLD: 0.8, M.OBJECTIVE_KL_EVAL: 1.0, M.PERF_TOKENS_TOTAL: 100}
        result |= {M.TIME_ELAPSED_S: 2.0, M.PERF_MEAN_TOKENS_PER_S: 50.0, M.TIME_WALL_S: 3.0, M.PERF_PEAK_MEM_MB: 1.0}
        result |= {M.EPISODE_TURNS: t, M.TOOL_CALL_RATE: rate, M.TOOL_CALL_ACCURACY: 1.0}
        _write_result(cell_dir(out, c), result)
    md = write_report(suite, out)["markdown"].read_text()
    assert "| algorithm | turns / episode | tool-call rate | tool-call accuracy |" in md
    assert "| *base model* | 1.75 | 0.75 | 0.72 |" in md
    assert "| grpo | 2.00 ± 0.14 | 0.95 ± 0.07 | 1.00 ± 0.00 |" in md  # std of (1.9, 2.1) = 0.141


def test_a_single_turn_task_has_no_episodes_table(tmp_path):
    suite = load_suite(
        write_suite(
            tmp_path / "s.toml",
            'seeds = [0]\nalgorithms = ["grpo"]\n[budget]\ntokens = 100\n[[tasks]]\nname = "arithmetic"\n',
        )
    )
    out = tmp_path / "out"
    _write_result(base_dir(out, suite.tasks[0]), {"status": "ok", "algorithm": "base", M.REWARD_GOLD: 0.5})
    md = write_report(suite, out)["markdown"].read_text()
    assert "turns / episode" not in md
