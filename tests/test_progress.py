"""Progress of the waits before training (``rlhf_env.progress``): plain lines on stderr off a terminal, silent
where a caller (``train(progress=False)``, the bench's workers) shows its own, never in the metrics."""

from __future__ import annotations

import json
import re

import pytest
import torch

from rlhf_env import progress
from rlhf_env.plugins import cli
from rlhf_env.tiny import build_char_tokenizer, build_tiny_model, save_tiny


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model, tok = build_tiny_model(build_char_tokenizer("0123456789+-*= "), seed=0)
    return save_tiny(model, tok, tmp_path_factory.mktemp("ckpt") / "model")


@pytest.fixture
def at_once(monkeypatch):
    """Every wait counts as long: its lines are printed from its first update (the tiny models are quick)."""
    monkeypatch.setattr(progress, "FIRST_LINE_S", 0.0)


def without_seconds(err: str) -> list[str]:
    return [re.sub(r", \d+ s", ", N s", line) for line in err.splitlines()]


def test_a_long_wait_prints_a_line_a_quarter_and_the_end(at_once, capsys):
    with progress.Progress(8, "demo", "pairs") as bar:
        for done in range(1, 9):
            bar.set(done)
    assert without_seconds(capsys.readouterr().err) == [
        "demo: 1/8 pairs (12%), N s",  # the first line
        "demo: 2/8 pairs (25%), N s",
        "demo: 4/8 pairs (50%), N s",
        "demo: 6/8 pairs (75%), N s",
        "demo: 8/8 pairs (100%), N s, done",
    ]


def test_a_quick_wait_prints_nothing_and_shown_false_silences_a_long_one(at_once, capsys, monkeypatch):
    with progress.shown(False):
        with progress.Progress(4, "silenced") as bar:
            model = torch.nn.Linear(2, 2)
            with bar.forwards(model, bar.set):
                assert not model._forward_hooks  # nothing hooked when nothing is shown
                model(torch.zeros(1, 2))
    monkeypatch.setattr(progress, "FIRST_LINE_S", 60.0)
    with progress.Progress(4, "quick") as bar:
        bar.set(4)
    assert capsys.readouterr().err == ""


def test_forwards_move_the_bar_and_the_hook_is_removed(at_once, capsys):
    model = torch.nn.Linear(2, 2)
    with progress.Progress(4, "forwards", "tokens") as bar:
        with bar.forwards(model, bar.set):
            for _ in range(3):
                model(torch.zeros(1, 2))
        assert not model._forward_hooks
    assert without_seconds(capsys.readouterr().err) == [
        "forwards: 1/4 tokens (25%), N s",
        "forwards: 2/4 tokens (50%), N s",
        "forwards: 3/4 tokens (75%), N s",
        "forwards: 3/4 tokens (75%), N s, done",
    ]


def dpo(out, model, *extra):
    argv = ["train", "--algo", "dpo", "--task", "arithmetic", "--model", str(model), "--out", str(out)]
    return [*argv, "--steps", "1", "--eval-every", "1", "--set", "num_pairs=16", "--set", "batch_size=4", *extra]


def test_dpo_at_the_cli_shows_its_pairs_reference_and_evaluation_on_stderr_only(at_once, tmp_path, model_dir, capsys):
    out = tmp_path / "run"
    assert cli.main(dpo(out, model_dir)) == 0
    lines = without_seconds(capsys.readouterr().err)
    ends = [line for line in lines if line.endswith(", done")]
    # arithmetic completions: at most 6 tokens; the reference log-probs are one batch here, a quick wait
    assert ends == [
        "preference pairs: 16/16 pairs (100%), N s, done",
        "evaluation (64 prompts): 6/6 tokens (100%), N s, done",
    ]
    # Pair sampling moves within each call (a forward per token), not only when a round ends.
    pairs = [line for line in lines if line.startswith("preference pairs: ")]
    assert len(pairs) >= 3 and pairs[0] != "preference pairs: 0/16 pairs (0%), N s", pairs
    text = (out / "metrics.jsonl").read_text() + (out / "config.json").read_text()
    assert "preference pairs" not in text and "log-probs:" not in text
    assert len([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]) == 1


@pytest.mark.parametrize(
    "algo, expected",
    [
        ("dpo", ["4/8 pairs (50%)", "8/8 pairs (100%), N s, done"]),
        # KTO: 16 examples, then their 16 mismatched ones, 4 a batch: a line at the first and each quarter
        ("kto", ["4/32 examples (12%)", "8/32 examples (25%)", "16/32 examples (50%)", "24/32 examples (75%)"]),
    ],
)
def test_the_reference_logprobs_show_each_batch(at_once, model_dir, capsys, monkeypatch, algo, expected):
    import sys

    from rlhf_env import plugins
    from rlhf_env.algorithms.base import TrainContext
    from rlhf_env.models import load_pretrained
    from rlhf_env.tasks import get_task

    ref, tok = load_pretrained(model_dir)
    spec = plugins.get_host().algorithms.get(algo)
    ctx = TrainContext(get_task("arithmetic"), ref, ref, tok, torch.device("cpu"))
    with progress.shown(False):
        pairs = ctx.task.preference_pairs(ref, tok, 8, seed=0)
    monkeypatch.setattr(sys.modules[spec.Trainer.__module__], "load_pairs", lambda ctx, config: pairs)
    spec.Trainer(ctx, spec.make_config(num_pairs=8, batch_size=4), reference_batch_size=4)
    lines = without_seconds(capsys.readouterr().err)
    if algo == "kto":
        expected = [*expected, "32/32 examples (100%), N s, done"]
    assert lines == [f"reference log-probs: {e}" + ("" if e.endswith("done") else ", N s") for e in expected]


def test_train_without_progress_and_the_bench_are_silent(at_once, tmp_path, model_dir, capfd):
    from rlhf_env import plugins
    from rlhf_env.algorithms.run.loop import train
    from rlhf_env.tasks import get_task

    spec = plugins.get_host().algorithms.get("kto")
    config = {"num_pairs": 8, "batch_size": 4}
    train(
        spec,
        get_task("arithmetic"),
        tmp_path / "api",
        steps=1,
        model_path=str(model_dir),
        config=config,
        progress=False,
    )
    suite = tmp_path / "s.toml"
    suite.write_text(
        'seeds = [0]\nalgorithms = ["dpo"]\neval_points = 1\neval_prompts = 4\nworkers = 0\n[budget]\ntokens = 8\n'
        "[hparams.dpo]\nnum_pairs = 8\nbatch_size = 4\n[[tasks]]\n"
        f'name = "arithmetic"\nmodel = "{model_dir}"\n'
    )
    assert cli.main(["bench", "--no-progress", "--suite", str(suite), "--out", str(tmp_path / "bench")]) == 0
    err = capfd.readouterr().err
    assert not [
        line for line in err.splitlines() if re.match(r"(preference pairs|reference log-probs|evaluation)", line)
    ]


def test_a_bench_worker_process_never_shows_its_own_progress(monkeypatch):
    from rlhf_env.bench import cells as runner

    monkeypatch.setattr(progress, "_shown", [True])
    runner._init_worker(None, None, inline=True)  # the parent running cells itself keeps its setting
    assert progress.enabled()
    runner._init_worker(None, None)  # a pool or Ray worker
    assert not progress.enabled()
    with progress.shown(True):  # train(progress=True) inside it could still ask
        assert progress.enabled()


def test_a_base_model_build_shows_its_sft_steps(at_once, capsys):
    from rlhf_env.tasks.base_models import train_sft

    tok = build_char_tokenizer("0123456789+=")
    model, _ = build_tiny_model(tok, n_layer=1, n_head=1, n_embd=8, seed=0)
    train_sft(model, tok, [("1+1=", "2")] * 4, steps=4, batch_size=2, lr=1e-3, seed=0)
    lines = without_seconds(capsys.readouterr().err)
    assert lines == [
        "SFT base model: 1/4 steps (25%), N s",
        "SFT base model: 2/4 steps (50%), N s",
        "SFT base model: 3/4 steps (75%), N s",
        "SFT base model: 4/4 steps (100%), N s, done",
    ]
    train_sft(model, tok, [("1+1=", "2")] * 4, steps=4, batch_size=2, lr=1e-3, seed=0, progress=False)
    assert capsys.readouterr().err == ""
