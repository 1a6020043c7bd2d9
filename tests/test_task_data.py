"""Loading prompts and preference pairs from local files: exact round-trips and clear errors."""

from __future__ import annotations

import json
import re
import socket

import pandas as pd
import pytest

from rlhf_env.errors import DataFileError
from rlhf_env.tasks.base import PreferencePair
from rlhf_env.tasks.data import load_preferences, load_prompts

ROWS = [
    {"prompt": "Say hi", "chosen": "hi!", "rejected": "go away"},
    # commas, quotes, a newline and unicode survive every format
    {"prompt": 'He said "yes", then', "chosen": "left.\nThe end", "rejected": "café ☕"},
    # texts pandas would treat as missing must stay texts
    {"prompt": "NA", "chosen": "None", "rejected": "null"},
]
PAIRS = [PreferencePair(**r) for r in ROWS]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def err(path, rest):
    """A regex for a DataFileError message: the file's name, then ``rest`` (a regex)."""
    return re.escape(path.name) + r".*" + rest


@pytest.fixture
def no_network(monkeypatch):
    """Record (and refuse) any DNS lookup or socket connect; yields the list of attempts."""
    attempts = []

    def refuse(kind):
        def _refuse(*args, **kwargs):
            attempts.append((kind, args[1:] if kind == "connect" else args))
            raise OSError(f"network disabled in test ({kind})")

        return _refuse

    monkeypatch.setattr(socket, "getaddrinfo", refuse("dns"))
    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("connect"))
    return attempts


# ---------------------------------------------------------------- round trips


def test_jsonl_round_trip(tmp_path, no_network):
    path = write_jsonl(tmp_path / "prefs.jsonl", ROWS)
    assert load_preferences(path) == PAIRS
    assert load_prompts(path) == [r["prompt"] for r in ROWS]
    assert no_network == []


def test_json_list_of_records_round_trip(tmp_path):
    path = tmp_path / "prefs.json"
    path.write_text(json.dumps(ROWS, indent=2), encoding="utf-8")
    assert load_preferences(path) == PAIRS
    assert load_prompts(str(path)) == [r["prompt"] for r in ROWS]


def test_csv_round_trip(tmp_path):
    path = tmp_path / "prefs.csv"
    pd.DataFrame(ROWS).to_csv(path, index=False)
    assert load_preferences(path) == PAIRS


def test_parquet_round_trip(tmp_path):
    path = tmp_path / "prefs.parquet"
    pd.DataFrame(ROWS).to_parquet(path, index=False)
    assert load_preferences(path) == PAIRS


def test_prompts_ignore_extra_columns_and_keep_order(tmp_path):
    path = write_csv(tmp_path / "prompts.csv", "id,prompt\n1,The sky is\n2,Once upon a time\n3,NA\n")
    assert load_prompts(path) == ["The sky is", "Once upon a time", "NA"]


def test_uppercase_suffix_and_glob_characters_in_the_name(tmp_path):
    path = write_jsonl(tmp_path / "run[1]*?.JSONL", ROWS[:1])
    assert load_preferences(path) == PAIRS[:1]


def test_loading_is_offline_quiet_and_leaves_datasets_settings_alone(tmp_path, no_network, capfd):
    from datasets import config
    from datasets.utils import are_progress_bars_disabled
    from datasets.utils import logging as ds_logging

    def settings():
        flags = (config.HF_HUB_OFFLINE, config.HF_UPDATE_DOWNLOAD_COUNTS)
        return flags, are_progress_bars_disabled(), ds_logging.get_verbosity()

    before = settings()
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    assert load_prompts(path) == ["a", "b"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(DataFileError, match="bad.jsonl"):  # a failure restores the settings too
        load_prompts(bad)
    assert no_network == []  # not even the download-count ping
    captured = capfd.readouterr()
    assert "Generating train split" not in captured.err + captured.out  # no progress bar
    assert "Failed to load JSON" not in captured.err + captured.out  # no log chatter
    assert settings() == before


# ---------------------------------------------------------------- file-level errors


def test_missing_file_is_file_not_found_naming_it(tmp_path):
    path = tmp_path / "nowhere.jsonl"
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl") as info:
        load_preferences(path)
    assert info.value.filename == str(path)


def test_unknown_suffix_lists_the_supported_ones(tmp_path):
    path = tmp_path / "prefs.txt"
    path.write_text("prompt\nhello\n")
    with pytest.raises(DataFileError, match=err(path, r"'\.txt'.*\.csv, \.json, \.jsonl, \.parquet")):
        load_prompts(path)


def test_empty_file(tmp_path):
    path = write_csv(tmp_path / "empty.csv", "")
    with pytest.raises(DataFileError, match=err(path, "empty")):
        load_prompts(path)


@pytest.mark.parametrize(
    "name, text",
    [("header_only.csv", "prompt,chosen,rejected\n"), ("blank.jsonl", "\n\n"), ("nothing.json", "[]")],
)
def test_zero_rows(tmp_path, name, text):
    path = write_csv(tmp_path / name, text)
    with pytest.raises(DataFileError, match=err(path, "no rows")):
        load_preferences(path)


def test_missing_column_lists_the_columns_found(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "p", "chosen": "a", "answer": "b"}])
    expected = r"missing column\(s\) 'rejected'; found columns: \['prompt', 'chosen', 'answer'\]"
    with pytest.raises(DataFileError, match=err(path, expected)):
        load_preferences(path)


def test_broken_json_line_reports_the_parser_message(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "d", chosen\n')
    with pytest.raises(DataFileError, match=err(path, "cannot parse as json: JSON parse error")):
        load_preferences(path)


def test_broken_csv_reports_the_parser_message(tmp_path):
    path = write_csv(tmp_path / "broken.csv", "prompt,chosen,rejected\na,b,c\nd,e,f,g,h\n")
    with pytest.raises(DataFileError, match=err(path, "cannot parse as csv: .*Expected 3 fields")):
        load_preferences(path)


def test_not_a_parquet_file(tmp_path):
    path = tmp_path / "fake.parquet"
    path.write_bytes(b"this is not parquet")
    with pytest.raises(DataFileError, match=err(path, "cannot parse as parquet")):
        load_prompts(path)


# ---------------------------------------------------------------- field-level errors


def test_csv_cells_are_text_even_where_they_look_like_numbers(tmp_path):
    # Arithmetic preferences: pandas alone would read the answers as ints (and "09" as 9).
    path = write_csv(tmp_path / "prefs.csv", "prompt,chosen,rejected\n12+7=,19,18\n3*3=,09,9.0\n")
    assert load_preferences(path) == [PreferencePair("12+7=", "19", "18"), PreferencePair("3*3=", "09", "9.0")]
    prompts = write_csv(tmp_path / "prompts.csv", "prompt\n1.5\n2.50\n")
    assert load_prompts(prompts) == ["1.5", "2.50"]


@pytest.mark.parametrize(
    "name, text, where",
    [
        ("prefs.csv", b"prompt,chosen,rejected\na,b,c\nx,y,caf\xe9\n", "line 3, column 8"),
        ("prefs.jsonl", b'{"prompt": "caf\xe9", "chosen": "b", "rejected": "c"}\n', "line 1, column 16"),
    ],
)
def test_invalid_utf8_names_the_file_line_and_byte(tmp_path, name, text, where):
    path = tmp_path / name
    path.write_bytes(text)  # "café" saved as Latin-1
    with pytest.raises(DataFileError, match=err(path, f"not UTF-8 text: byte 0xe9 at {where}")):
        load_preferences(path)


def test_number_among_strings_in_jsonl_names_its_row(tmp_path):
    rows = [dict(ROWS[0]), dict(ROWS[0]), dict(ROWS[0], chosen=42)]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    with pytest.raises(DataFileError, match=err(path, r"line 3, column 'chosen': expected a string, got int 42")):
        load_preferences(path)


def test_number_among_strings_in_json_list_names_its_row(tmp_path):
    path = tmp_path / "prefs.json"
    path.write_text(json.dumps([ROWS[0], dict(ROWS[1], rejected=True)]))
    with pytest.raises(
        DataFileError, match=err(path, r"record 2, column 'rejected': expected a string, got bool True")
    ):
        load_preferences(path)


def test_numbers_in_a_parquet_column(tmp_path):
    path = tmp_path / "prefs.parquet"
    pd.DataFrame({"prompt": ["a", "b"], "chosen": [1.0, 2.0], "rejected": ["c", "d"]}).to_parquet(path)
    expected = r"record 1, column 'chosen': expected a string, got float 1.0 \(column read as float64\)"
    with pytest.raises(DataFileError, match=err(path, expected)):
        load_preferences(path)


def test_list_instead_of_string(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [dict(ROWS[0], rejected=["x", "y"])])
    with pytest.raises(DataFileError, match=err(path, r"line 1, column 'rejected': expected a string, got list")):
        load_preferences(path)


def test_null_in_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [ROWS[0], dict(ROWS[1], chosen=None)])
    with pytest.raises(DataFileError, match=err(path, r"line 2, column 'chosen': null or missing value")):
        load_preferences(path)


def test_key_missing_from_one_jsonl_row(tmp_path):
    incomplete = {"prompt": "p", "chosen": "c"}
    path = write_jsonl(tmp_path / "prefs.jsonl", [ROWS[0], ROWS[1], incomplete])
    with pytest.raises(DataFileError, match=err(path, r"line 3, column 'rejected': null or missing value")):
        load_preferences(path)


def test_empty_cell_in_csv(tmp_path):
    path = write_csv(tmp_path / "prefs.csv", "prompt,chosen,rejected\na,b,c\nd,,f\n")
    expected = r"line 3, column 'chosen': null or missing value.*empty CSV cell"
    with pytest.raises(DataFileError, match=err(path, expected)):
        load_preferences(path)


def test_null_in_parquet(tmp_path):
    path = tmp_path / "prompts.parquet"
    pd.DataFrame({"prompt": ["a", None, "c"]}).to_parquet(path)
    with pytest.raises(DataFileError, match=err(path, r"record 2, column 'prompt': null or missing value")):
        load_prompts(path)


def test_empty_string_prompt(tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "ok"}, {"prompt": "fine"}, {"prompt": ""}])
    with pytest.raises(DataFileError, match=err(path, r"line 3, column 'prompt': empty prompt")):
        load_prompts(path)


def test_a_bad_second_row_is_named_as_line_2_not_row_0(tmp_path):
    # issue 20 §3g: a mixed column read as Json decoded row 0's "2" as 2 and blamed it.
    path = write_jsonl(tmp_path / "prefs.jsonl", [dict(ROWS[0], chosen="2"), dict(ROWS[1], chosen=4)])
    with pytest.raises(DataFileError, match=err(path, r"line 2, column 'chosen': expected a string, got int 4$")):
        load_preferences(path)
