"""A suite's ``lora`` key: checked like the other keys, reaching each cell's training, recorded and reported."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

from rlhf_env.plugins import cli
from rlhf_env.tiny import build_char_tokenizer, build_tiny_model, save_tiny

HEAD = 'seeds = [0]\nalgorithms = ["sft"]\n[budget]\ntokens = 10\n'


def suite_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "s.toml"
    path.write_text(text)
    return path


def load(tmp_path: Path, text: str):
    from rlhf_env.bench.suite import load_suite

    return load_suite(suite_file(tmp_path, text))


@pytest.mark.parametrize(
    "top, task, message",
    [
        ("lora = { rank = 0 }", "", "{path}: lora.rank must be an integer >= 1, got 0"),
        (
            "lora = { rnak = 4 }",
            "",
            "{path}: unknown lora keys ['rnak']; known: ['rank', 'alpha', 'dropout', 'target_modules']",
        ),
        ("lora = { alpha = 8 }", "", "{path}: lora needs a rank (lora = { rank = 16 })"),
        ("lora = 16", "", "{path}: lora must be a table like { rank = 16, alpha = 32 }, or false, got 16"),
        (
            "",
            "lora = { rank = 4, alpha = 0 }",
            "{path}: tasks[0]: lora.alpha must be a number > 0 (default 2 × rank), got 0",
        ),
        (
            "",
            "lora = { rank = 4, dropout = 1.0 }",
            "{path}: tasks[0]: lora.dropout must be a number in [0, 1), got 1.0",
        ),
        (
            "",
            'lora = { rank = 4, target_modules = "c_attn" }',
            '{path}: tasks[0]: lora.target_modules must be a non-empty list of module names, like ["c_attn"], '
            "got 'c_attn'",
        ),
    ],
)
def test_a_bad_lora_table_is_one_line_naming_the_file_and_key(tmp_path, capsys, top, task, message):
    path = suite_file(tmp_path, f'{top}\n{HEAD}[[tasks]]\nname = "arithmetic"\n{task}\n')
    assert cli.main(["bench", "--no-progress", "--suite", str(path), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "rlhf bench: error: " + message.replace("{path}", str(path))
    assert not (tmp_path / "out").exists()  # refused before any work


def test_lora_without_peft_says_which_extra_to_install(tmp_path, monkeypatch):
    from rlhf_env.bench.suite import SuiteError

    monkeypatch.setitem(sys.modules, "peft", None)  # import peft raises ImportError
    with pytest.raises(
        SuiteError, match=r"s\.toml: lora needs PEFT, which is not installed: pip install 'rlhf_env\[lora\]'"
    ):
        load(tmp_path, f'lora = {{ rank = 4 }}\n{HEAD}[[tasks]]\nname = "arithmetic"\n')


def test_the_top_level_lora_reaches_every_task_unless_a_task_replaces_or_drops_it(tmp_path):
    from rlhf_env.bench.fingerprint import cell_settings

    body = f"lora = {{ rank = 8, alpha = 16 }}\n{HEAD}"
    body += '[[tasks]]\nname = "arithmetic"\nlabel = "a"\n'
    body += '[[tasks]]\nname = "arithmetic"\nlabel = "b"\nlora = { rank = 2, target_modules = ["c_attn"] }\n'
    body += '[[tasks]]\nname = "arithmetic"\nlabel = "c"\nlora = false\n'
    suite = load(tmp_path, body)
    assert [t.lora for t in suite.tasks] == [
        {"rank": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": None},
        {"rank": 2, "alpha": None, "dropout": 0.0, "target_modules": ["c_attn"]},  # replaced whole, not merged
        None,
    ]
    settings = [cell_settings(suite, c) for c in suite.cells()]
    assert settings[0]["lora"]["rank"] == 8 and settings[1]["lora"]["rank"] == 2
    assert "lora" not in settings[2]  # full fine-tuning records nothing: folders from before the key still match


SUITE = """seeds = [0]
algorithms = ["sft"]
eval_points = 1
eval_prompts = 4
workers = 0
lora = {{ rank = {rank}, alpha = 8 }}
[budget]
tokens = 8
[hparams.sft]
batch_size = 4
[[tasks]]
name = "arithmetic"
label = "adapters"
model = "{model}"
knobs = {{ digits = 1, n_train = 40, n_eval = 10 }}
[[tasks]]
name = "arithmetic"
label = "full"
model = "{model}"
knobs = {{ digits = 1, n_train = 40, n_eval = 10 }}
lora = false
"""


def test_a_suites_lora_cells_train_adapters_with_the_lora_presets_and_say_so(tmp_path, monkeypatch, capsys):
    from rlhf_env.algorithms.run import presets
    from rlhf_env.algorithms.zoo import sft

    model, tok = build_tiny_model(build_char_tokenizer("0123456789+-*= "), seed=0)
    ckpt = save_tiny(model, tok, tmp_path / "ckpt")
    monkeypatch.setattr(presets, "PRETRAINED_MIN_PARAMETERS", model.num_parameters())  # it counts as pretrained
    suite, out = tmp_path / "s.toml", tmp_path / "out"
    suite.write_text(SUITE.format(rank=4, model=ckpt))
    assert cli.main(["bench", "--no-progress", "--suite", str(suite), "--out", str(out)]) == 0, capsys.readouterr()
    done = [line for line in capsys.readouterr().out.splitlines() if "done" in line]
    assert [line.endswith("LoRA r4") for line in done] == [True, False], done

    lora_cell, full_cell = (out / "runs" / label / "sft" / "seed0" for label in ("adapters", "full"))
    run = json.loads((lora_cell / "config.json").read_text())
    assert run["lora"] == {"rank": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": None}
    assert (lora_cell / "checkpoint" / "adapter_config.json").exists()  # adapters, not a whole model
    # the presets train applies: PRETRAINED_LORA for adapters, PRETRAINED for every weight
    assert run["config"]["lr"] == pytest.approx(sft.Config.PRETRAINED_LORA["lr"])
    full = json.loads((full_cell / "config.json").read_text())
    assert "lora" not in full and full["config"]["lr"] == pytest.approx(sft.Config.PRETRAINED["lr"])
    assert not (full_cell / "checkpoint" / "adapter_config.json").exists()

    assert json.loads((lora_cell / "result.json").read_text())["lora"]["rank"] == 4
    assert "lora" not in json.loads((full_cell / "result.json").read_text())
    md = (out / "results.md").read_text()
    sections = {s.split(" ", 1)[0]: s for s in md.split("\n## ")[1:]}
    line = (
        "*LoRA*: each trained cell trains adapters (rank 4, α 8, dropout 0, on every linear layer but the output head)"
    )
    assert line in sections["adapters"] and "LoRA" not in sections["full"]
    with (out / "results.csv").open() as f:
        rows = {(r["task"], r["algorithm"]): r["lora"] for r in csv.DictReader(f)}
    assert rows[("adapters", "sft")].startswith("rank 4, α 8") and rows[("full", "sft")] == ""

    suite.write_text(SUITE.format(rank=8, model=ckpt))  # other adapters: the finished cell is not theirs
    assert cli.main(["bench", "--no-progress", "--suite", str(suite), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "1 result(s) were made with other settings" in err and "adapters/sft/seed0 (lora.rank 4 -> 8)" in err
