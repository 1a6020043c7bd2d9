"""Preference pairs are sampled by the run's generator (``rlhf train --generator``, a suite's ``generator``).

The plugin generator here writes completions the tiny model never would (one random digit, then
EOS), so the pairs show which backend sampled them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf_env.plugins import cli
from rlhf_env.tiny import build_char_tokenizer, build_tiny_model, save_tiny

DIGITS_GENERATOR = """
import numpy as np
from rlhf_env import hookimpl

BUILT = []  # batch size of every sampler built
DIGIT_IDS = list(range(3, 13))  # "0".."9" in build_char_tokenizer("0123456789+-*= ")


class Digits:
    \"\"\"One uniformly random digit, then the first stop id (EOS).\"\"\"

    def __init__(self, model, batch_size, *, pad_token_id, vocab_size, seed, temperature=1.0, greedy=False,
                 stop_token_ids=None):
        BUILT.append(batch_size)
        self.rng, self.eos = np.random.default_rng(seed), stop_token_ids[0]

    def act(self, obs):
        first = obs["length"] == obs["prompt_length"]
        digits = self.rng.choice(DIGIT_IDS, size=len(first))
        tokens = np.where(first, digits, self.eos).astype(np.int64)
        return {"token": tokens, "logprob": np.where(first, np.log(0.1), 0.0).astype(np.float32)}


@hookimpl
def rlhf_register_generators(register):
    register("digits", Digits)
"""


@pytest.fixture
def digits(plugin_path, write_dist):
    """The ``digits`` generator installed as a plugin; its module (``BUILT``), emptied."""
    write_dist(plugin_path, "rlhf_demo_digits", {"digits": "rlhf_demo_digits"}, {"rlhf_demo_digits": DIGITS_GENERATOR})
    from rlhf_env import plugins

    assert "digits" in plugins.get_host().generators
    import rlhf_demo_digits

    rlhf_demo_digits.BUILT.clear()
    return rlhf_demo_digits


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model, tok = build_tiny_model(build_char_tokenizer("0123456789+-*= "), seed=0)
    return save_tiny(model, tok, tmp_path_factory.mktemp("ckpt") / "model")


def one_digit(text: str) -> bool:
    return len(text) == 1 and text.isdigit()


def test_the_annotators_sample_with_the_named_generator(digits, model_dir):
    from rlhf_env.models import load_causal_lm, load_tokenizer
    from rlhf_env.tasks import get_task

    task = get_task("arithmetic", digits=1, n_train=40, n_eval=10, sft_steps=20)
    model, tok = load_causal_lm(model_dir), load_tokenizer(model_dir)
    pairs = task.preference_pairs(model, tok, 6, seed=0, generator="digits")
    assert len(pairs) == 6 and all(one_digit(p.chosen) and one_digit(p.rejected) for p in pairs)
    assert all(p.chosen != p.rejected for p in pairs)
    assert digits.BUILT[:2] == [9, 9]  # one round: 1.5 × 6 prompts, sample a then sample b
    default = task.preference_pairs(model, tok, 6, seed=0)  # kv_cache: the model's own completions
    assert not all(one_digit(p.chosen) and one_digit(p.rejected) for p in default)


@pytest.mark.parametrize("algo", ["dpo", "reward_model"])
def test_rlhf_train_samples_its_pairs_with_the_runs_generator(digits, model_dir, tmp_path, algo):
    out = tmp_path / algo
    argv = ["train", "--algo", algo, "--task", "arithmetic", "--model", str(model_dir), "--out", str(out)]
    argv += ["--generator", "digits", "--steps", "1", "--eval-every", "1", "--set", "num_pairs=8"]
    if algo == "reward_model":
        argv += ["--set", "num_heldout_pairs=4", "--set", "batch_size=4"]
    assert cli.main(argv) == 0
    assert json.loads((out / "config.json").read_text())["generator"] == "digits"
    # The first samplers built are the pairs' rounds (1.5 × 8 = 12 rows, a then b); the reward
    # model's held-out pairs (1.5 × 4 = 6 rows) come next.
    assert digits.BUILT[:2] == [12, 12]
    if algo == "reward_model":
        assert digits.BUILT[2:4] == [6, 6]


SUITE = """seeds = [0]
algorithms = ["dpo"]
eval_points = 1
eval_prompts = 4
workers = 0
{generator}
[budget]
tokens = 8
[hparams.dpo]
batch_size = 4
[[tasks]]
name = "arithmetic"
model = "{model}"
knobs = {{ digits = 1, n_train = 40, n_eval = 10 }}
reward = "learned"
pipeline = {{ pairs = 8, heldout_pairs = 4, rm_steps = 2, rm_batch_size = 4 }}
"""


def test_a_suites_generator_samples_the_reward_models_pairs_and_is_recorded(digits, model_dir, tmp_path, capsys):
    suite, out = tmp_path / "s.toml", tmp_path / "out"
    suite.write_text(SUITE.format(generator='generator = "digits"', model=model_dir))
    assert cli.main(["bench", "--no-progress", "--suite", str(suite), "--out", str(out)]) == 0, capsys.readouterr()
    rm = out / "reward_models" / "arithmetic-N8-tau0.25" / "seed0"
    pairs = [json.loads(line) for line in (rm / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 8 and all(one_digit(p["chosen"]) and one_digit(p["rejected"]) for p in pairs)
    assert json.loads((rm / "result.json").read_text())["generator"] == "digits"
    assert json.loads((rm / "settings.json").read_text())["generator"] == "digits"
    cell = out / "runs" / "arithmetic" / "dpo" / "seed0"
    assert json.loads((cell / "config.json").read_text())["generator"] == "digits"
    capsys.readouterr()

    suite.write_text(SUITE.format(generator="", model=model_dir))  # the default generator: other pairs
    assert cli.main(["bench", "--no-progress", "--suite", str(suite), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "2 result(s) were made with other settings" in err
    assert "arithmetic-N8-tau0.25/reward_model/seed0 (generator 'digits' -> None)" in err
    # the cell: sampled by it, and trained on the pairs of a reward model it sampled
    assert "arithmetic/dpo/seed0 (generator 'digits' -> None, reward_model.generator 'digits' -> None)" in err


def test_best_of_n_samples_with_the_suites_generator(digits, model_dir, tmp_path, capsys):
    suite, out = tmp_path / "s.toml", tmp_path / "out"
    text = SUITE.format(generator='generator = "digits"', model=model_dir).replace('reward = "learned"\n', "")
    text = text.replace("pipeline = {", "pipeline = { best_of_n = 4, best_of_n_prompts = 3,").replace("dpo", "sft")
    text = text.replace(", heldout_pairs = 4, rm_steps = 2, rm_batch_size = 4", "").replace("pairs = 8, ", "")
    suite.write_text(text)
    assert cli.main(["bench", "--no-progress", "--suite", str(suite), "--out", str(out)]) == 0, capsys.readouterr()
    bon = out / "runs" / "arithmetic" / "best_of_n" / "seed0"
    assert json.loads((bon / "result.json").read_text())["generator"] == "digits"
    assert json.loads((bon / "settings.json").read_text())["generator"] == "digits"
    assert 3 * 4 in digits.BUILT  # one sampler for the 3 prompts × 4 samples


def test_the_generator_reaches_the_trl_baselines_pairs(monkeypatch):
    """``--baseline trl`` trains TRL's DPO on pairs drawn as our ``dpo`` draws them: by the suite's generator."""
    import sys
    import types

    from rlhf_env.bench import trl_baseline

    monkeypatch.setitem(sys.modules, "trl", types.SimpleNamespace(DPOConfig=None, DPOTrainer=None))  # not needed
    seen = {}

    class Task:
        def preference_pairs(self, *args, **kwargs):
            seen.update(kwargs)
            raise RuntimeError("stop here")

    cfg = types.SimpleNamespace(num_pairs=4, annotator_tau=0.25)
    with pytest.raises(RuntimeError, match="stop here"):
        trl_baseline.dpo_trainer(Task(), None, None, None, cfg, 1, 0, Path("."), "cpu", generator="digits")
    assert seen["generator"] == "digits"
