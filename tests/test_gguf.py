"""GGUF paths (rlhf_env/gguf.py) as a user meets them without the real model: one-line errors."""

from __future__ import annotations

import pytest

from rlhf_env import gguf
from rlhf_env.plugins import cli


def last_error(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_a_missing_gguf_file_is_one_line_at_every_command(tmp_path, capsys):
    missing = str(tmp_path / "nope.gguf")
    assert cli.main(["convert", str(tmp_path / "out"), "--gguf", missing]) == 1
    assert last_error(capsys) == f"rlhf convert: error: GGUF file {missing!r} does not exist"
    args = ["train", "--algo", "sft", "--task", "arithmetic", "--model", missing, "--out", str(tmp_path / "r")]
    assert cli.main(args) == 1
    assert last_error(capsys) == f"rlhf train: error: GGUF file {missing!r} does not exist"


def test_convert_refuses_a_package_without_gguf_and_a_full_destination(tmp_path, capsys):
    assert cli.main(["convert", str(tmp_path / "out"), "--package", "json"]) == 1
    assert "package 'json' ships none" in last_error(capsys)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF")
    with pytest.raises(Exception, match="already exists and is not empty"):
        gguf.convert(src, tmp_path / "full")
    assert (tmp_path / "full" / "x").read_text() == "keep me"


def test_a_damaged_gguf_file_names_itself_and_leaves_no_folder(tmp_path, monkeypatch, capsys):
    pytest.importorskip("gguf")
    monkeypatch.setenv("RLHF_ENV_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all")
    assert cli.main(["rollout", "--task", "arithmetic", "--model", str(bad), "--episodes", "1"]) == 1
    line = last_error(capsys)
    assert line.startswith(f"rlhf rollout: error: {bad}: transformers cannot read this GGUF file")
    assert not any((tmp_path / "cache" / "gguf").glob("broken*"))  # nothing half-written in the cache


def test_package_references_and_suffixes():
    assert gguf.is_gguf("a/B.GGUF") and not gguf.is_gguf("a/b.safetensors")
    assert gguf.is_package_ref("package:x") and not gguf.is_package_ref("pkg/x")
    assert gguf.packaged("json") is None and gguf.packaged("no_such_package_anywhere") is None
