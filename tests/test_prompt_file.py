"""The ``prompt_file`` task: the user's prompts and fields as a Task; malformed files named with their row."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from rlhf_env.errors import DataFileError, SettingError
from rlhf_env.tasks import parse_task_spec, task_from_spec
from rlhf_env.tasks.base_models import build_base_model


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


QA = [{"prompt": f"{a}+{a}=", "answer": 2 * a} for a in range(10)]


def test_spec_parsing():
    assert parse_task_spec("arithmetic") == ("arithmetic", {})
    assert parse_task_spec("arithmetic:digits=1,operators=+-") == ("arithmetic", {"digits": "1", "operators": "+-"})
    assert parse_task_spec("sentiment:mix=1,0,0,0,seed=2") == ("sentiment", {"mix": "1,0,0,0", "seed": "2"})
    assert parse_task_spec("prompt_file:qa.jsonl,verifier=boxed") == (
        "prompt_file",
        {"": "qa.jsonl", "verifier": "boxed"},
    )
    with pytest.raises(SettingError, match="knob digits is given twice"):
        parse_task_spec("arithmetic:digits=1,digits=2")


def test_universal_max_new_tokens_is_recorded_but_keeps_the_base_model():
    plain = task_from_spec("arithmetic:digits=1,n_train=40,n_eval=10")
    longer = task_from_spec("arithmetic:digits=1,n_train=40,n_eval=10", max_new_tokens=9)
    assert (plain.max_new_tokens, longer.max_new_tokens) == (4, 9)  # digits * 2 + 2, then the knob
    assert longer.config == {**plain.config, "max_new_tokens": 9}
    assert longer.cache_key() == plain.cache_key()  # the same SFT data: the same base model
    with pytest.raises(SettingError, match="--max-new-tokens 9 and --task knob max_new_tokens=8 disagree"):
        task_from_spec("arithmetic:max_new_tokens=8", max_new_tokens=9)
    with pytest.raises(
        SettingError, match=r"unknown knobs \['digitz'\]; known: \['digits', 'max_new_tokens', 'model_size'"
    ):
        task_from_spec("arithmetic:digitz=1")


def test_a_prompt_file_is_a_task(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", QA + [QA[3]])  # a repeated identical row counts once
    task = task_from_spec(f"prompt_file:{path},verifier=final_number,eval_fraction=0.2")
    assert len(task.train_prompts) == 8 and len(task.eval_prompts) == 2  # round(0.2 * 10)
    assert sorted(task.train_prompts + task.eval_prompts) == sorted(r["prompt"] for r in QA)
    assert (
        task_from_spec(f"prompt_file:{path},verifier=final_number,eval_fraction=0.2").eval_prompts == task.eval_prompts
    )
    assert (
        task_from_spec(f"prompt_file:{path},verifier=final_number,eval_fraction=0.2,seed=1").eval_prompts
        != task.eval_prompts
    )
    assert task.fields["3+3="] == {"answer": 6}
    assert task.gold_reward(["3+3=", "4+4=", "4+4="], ["6", "The answer is 8.", "9"]) == [1.0, 1.0, 0.0]
    assert sorted(task.sft_data) == sorted((p, str(task.fields[p]["answer"])) for p in task.train_prompts)
    assert task.config["path"] == str(path) and task.max_new_tokens == 128 and len(task.config["sha256"]) == 16


def test_split_column_and_csv_text(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("prompt,answer,split\n1+1=,2,train\n2+2=,004,eval\n3+3=,6,train\n")
    task = task_from_spec(f"prompt_file:{path},verifier=exact_answer")
    assert task.train_prompts == ["1+1=", "3+3="] and task.eval_prompts == ["2+2="]
    assert task.fields["2+2="] == {"answer": "004"}  # CSV cells stay text
    assert task.gold_reward(["2+2=", "2+2="], ["004", "4"]) == [1.0, 0.0]


def test_a_file_without_answers_has_no_sft_data(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"{a}+1="} for a in range(5)])
    task = task_from_spec(f"prompt_file:{path},verifier=completion_length")
    assert task.sft_data == [] and task.fields == {f"{a}+1=": {} for a in range(5)}
    with pytest.raises(SettingError, match=f"task 'prompt_file' has no SFT data .*{path} has no completion or answer"):
        build_base_model(task)
    with pytest.raises(SettingError, match="verifier 'final_number' reads the field\\(s\\) answer, which task"):
        task_from_spec(f"prompt_file:{path},verifier=final_number")


def test_malformed_files_name_the_file_and_row(tmp_path):
    dup = write_jsonl(tmp_path / "dup.jsonl", [QA[0], QA[1], {"prompt": "1+1=", "answer": 3}])
    with pytest.raises(DataFileError, match=r"dup.jsonl: line 3: prompt '1\+1=' is also at line 2 with other fields"):
        task_from_spec(f"prompt_file:{dup},verifier=final_number")
    nocol = write_jsonl(tmp_path / "q.jsonl", [{"question": "1+1="}])
    with pytest.raises(DataFileError, match=r"q.jsonl: missing column\(s\) 'prompt'; found columns: \['question'\]"):
        task_from_spec(f"prompt_file:{nocol},verifier=final_number")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataFileError, match="empty.jsonl: the file is empty"):
        task_from_spec(f"prompt_file:{tmp_path / 'empty.jsonl'},verifier=final_number")
    (tmp_path / "qa.txt").write_text("1+1=\n")
    with pytest.raises(DataFileError, match=r"qa.txt: unsupported file type '\.txt'"):
        task_from_spec(f"prompt_file:{tmp_path / 'qa.txt'},verifier=final_number")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really parquet")
    with pytest.raises(DataFileError, match="bad.parquet: cannot parse as parquet"):
        task_from_spec(f"prompt_file:{tmp_path / 'bad.parquet'},verifier=final_number")
    split = tmp_path / "split.csv"
    split.write_text("prompt,split\n1+1=,train\n2+2=,dev\n")
    with pytest.raises(DataFileError, match="split.csv: line 3, column 'split': 'dev'; expected train, eval"):
        task_from_spec(f"prompt_file:{split},verifier=completion_length")
    one = write_jsonl(tmp_path / "one.jsonl", [QA[0]])
    with pytest.raises(DataFileError, match="one.jsonl: 1 distinct prompt; a task needs 2 or more"):
        task_from_spec(f"prompt_file:{one},verifier=final_number")


def test_parquet_fields_keep_their_types(tmp_path):
    path = tmp_path / "qa.parquet"
    pd.DataFrame(QA).to_parquet(path, index=False)
    task = task_from_spec(f"prompt_file:{path},verifier=final_number")
    assert task.fields["9+9="] == {"answer": 18}


def test_the_verifier_must_be_named(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", QA)
    with pytest.raises(SettingError, match="prompt_file needs verifier=NAME"):
        task_from_spec(f"prompt_file:{path}")
    with pytest.raises(SettingError, match="unknown verifier 'final_numbr'; a registered reward"):
        task_from_spec(f"prompt_file:{path},verifier=final_numbr")
    code = tmp_path / "mine.py"
    code.write_text("def half(prompts, completions, answer):\n    return [0.5 for _ in prompts]\n")
    task = task_from_spec(f"prompt_file:{path},verifier={code}:half")
    assert task.gold_reward(["1+1="], ["x"]) == [0.5]
