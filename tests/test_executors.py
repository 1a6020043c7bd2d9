"""``rlhf bench --executor ray``: the local executor's results from Ray tasks; a dead worker fails its cell only."""

from __future__ import annotations

import csv

import pytest
from tinyparts import TOY_ALGO_SOURCE

from rlhf_env.plugins import cli

pytest.importorskip("ray")  # the `ray` extra (part of `test`)

GOLD = ("task", "algorithm", "seed", "status", "reward/gold", "objective/kl_eval", "perf/tokens_total", "time/steps")
TASK = '[[tasks]]\nname = "arithmetic"\nknobs = { digits = 1, n_train = 80, n_eval = 20, sft_steps = 100 }\n'


def suite(algorithms: str, hparams: str = "") -> str:
    head = f'name = "tiny"\nseeds = [0]\nalgorithms = {algorithms}\nworkers = 2\nthreads = 1\n'
    return f"{head}eval_points = 1\neval_prompts = 8\n[budget]\ntokens = 40\n{hparams}{TASK}"


def rows(out) -> dict[str, dict[str, str]]:
    with (out / "results.csv").open() as f:
        return {r["algorithm"]: {k: r[k] for k in GOLD} for r in csv.DictReader(f)}


def test_ray_executor_gives_the_local_rows_and_a_dead_worker_fails_only_its_cell(
    plugin_path, write_dist, tmp_path, capsys
):
    write_dist(plugin_path, "rlhf_demo_ray", {"ray_toys": "rlhf_demo_ray"}, {"rlhf_demo_ray": TOY_ALGO_SOURCE})
    (tmp_path / "local.toml").write_text(suite('["toy"]'))
    (tmp_path / "ray.toml").write_text(suite('["toy", "toy_crash"]', "[hparams.toy_crash]\ndie_at = 0\n"))
    local, ray = tmp_path / "local", tmp_path / "ray"
    argv = ["bench", "--no-progress", "--suite"]
    assert cli.main([*argv, str(tmp_path / "local.toml"), "--out", str(local), "--workers", "0"]) == 0
    assert cli.main([*argv, str(tmp_path / "ray.toml"), "--out", str(ray), "--executor", "ray"]) == 1
    got, want = rows(ray), rows(local)
    assert set(want) == {"base", "toy"} and {k: got[k] for k in want} == want  # the local executor's figures
    assert got["toy_crash"]["status"] == "failed"  # its worker died; the other cells went on
    assert "toy_crash/seed0`: WorkerCrashedError" in capsys.readouterr().out


def test_a_ray_address_that_does_not_answer_fails_before_any_work(tmp_path, capsys):
    (tmp_path / "s.toml").write_text(suite('["sft"]'))
    argv = ["bench", "--suite", str(tmp_path / "s.toml"), "--out", str(tmp_path / "o"), "--executor", "ray"]
    assert cli.main([*argv, "--address", "127.0.0.1:9"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "rlhf bench: error: no Ray cluster answers at 127.0.0.1:9 (Connection refused); start one with `ray start --head`"
    ]
    assert not (tmp_path / "o").exists()


def test_a_ray_address_that_accepts_but_never_answers_fails_in_bounded_time(tmp_path, capsys):
    """Something (not Ray) listens on loopback and says nothing: a one-line error, the folder untouched."""
    import socket
    import threading
    import time

    server = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def accept():
        while True:
            try:
                accepted.append(server.accept()[0])  # hold the connection open, send nothing
            except OSError:  # the server was closed
                return

    threading.Thread(target=accept, daemon=True).start()
    address = f"127.0.0.1:{server.getsockname()[1]}"
    (tmp_path / "s.toml").write_text(suite('["sft"]'))
    argv = ["bench", "--suite", str(tmp_path / "s.toml"), "--out", str(tmp_path / "o"), "--executor", "ray"]
    t0 = time.perf_counter()
    try:
        assert cli.main([*argv, "--address", address, "--connect-timeout", "1"]) == 1
    finally:
        server.close()
        for conn in accepted:
            conn.close()
    assert time.perf_counter() - t0 < 30
    assert accepted  # it did answer TCP
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"rlhf bench: error: something at {address} accepts connections but gave no Ray handshake within 1s "
        "(not a Ray cluster?); give the head's address as `ray start --head` prints it, or a longer --connect-timeout"
    ]
    assert not (tmp_path / "o").exists()  # nothing claimed
