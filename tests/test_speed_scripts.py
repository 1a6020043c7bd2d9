"""The throughput scripts' ``--model`` path (``benchmarks/env_throughput.py``, ``peer_speed.py``) on tiny
checkpoints: the baseline encodes the env's prompt ids and stops on its stop ids, and TRL gets prompts
that tokenise to the env's ids."""

from __future__ import annotations

import pytest
import torch

from rlhf_env import VectorTextGenEnv
from rlhf_env.bench import env_throughput as et
from rlhf_env.bench import peer_speed as ps
from rlhf_env.models import load_pretrained, save_pretrained
from rlhf_env.tiny import add_chatml_template, build_bpe_tokenizer, build_tiny_model

PROMPTS = ["The weather today", "Tell me a story about a cat"]


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory):
    """A saved tiny GPT-2 whose BPE tokenizer has a ChatML template (``<|im_end|>`` a second stop id)."""
    tok = add_chatml_template(build_bpe_tokenizer())
    model, _ = build_tiny_model(tok, seed=1)
    return save_pretrained(model, tok, tmp_path_factory.mktemp("chatml") / "m")


def test_first_stop_masks_tokens_after_the_first_of_any_stop_id():
    completion = torch.tensor([[5, 7, 3, 9], [4, 4, 4, 4], [8, 9, 7, 3]])
    is_stop, mask = et.first_stop(completion, torch.tensor([7, 9]))
    assert is_stop.tolist() == [[0, 1, 0, 1], [0, 0, 0, 0], [0, 1, 1, 0]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]]


def test_the_baseline_encodes_the_envs_templated_prompt_ids_left_padded(chatml_dir):
    ref, _, reward, tok = et.load_models(str(chatml_dir), torch.device("cpu"), torch.float32)
    env = VectorTextGenEnv(tok, ref, reward, PROMPTS, num_envs=2, max_new_tokens=4, device="cpu")
    ids, mask = et.left_padded_batch(env, PROMPTS, torch.device("cpu"))
    rows = [
        tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)["input_ids"]
        for p in PROMPTS
    ]
    P = max(map(len, rows))
    assert ids.shape == (2, P) and len(rows[0]) < P  # the shorter prompt is padded
    for b, row in enumerate(rows):
        assert ids[b, P - len(row) :].tolist() == list(row)
        assert mask[b].tolist() == [0] * (P - len(row)) + [1] * len(row)
        assert set(ids[b, : P - len(row)].tolist()) <= {env.pad_token_id}
    assert tok.convert_tokens_to_ids("<|im_end|>") in env.stop_token_ids and tok.eos_token_id in env.stop_token_ids


def test_load_models_gives_the_reward_model_the_checkpoints_trunk(chatml_dir):
    ref, policy, reward, _ = et.load_models(str(chatml_dir), torch.device("cpu"), torch.float32)
    assert torch.equal(reward.model.transformer.wte.weight, ref.transformer.wte.weight)
    assert torch.equal(reward.model.transformer.h[-1].mlp.c_fc.weight, ref.transformer.h[-1].mlp.c_fc.weight)
    assert reward.model.score.weight.shape == (1, ref.config.n_embd)
    assert policy is not ref and torch.equal(policy.lm_head.weight, ref.lm_head.weight)


def test_the_baseline_stops_at_the_end_of_turn_and_matches_unpadded_rows(chatml_dir):
    ref, policy, reward, tok = et.load_models(str(chatml_dir), torch.device("cpu"), torch.float32)
    env = VectorTextGenEnv(tok, ref, reward, PROMPTS, num_envs=2, max_new_tokens=6, device="cpu")
    ids, mask = et.left_padded_batch(env, PROMPTS, torch.device("cpu"))
    stops = tuple(env.stop_token_ids)
    torch.manual_seed(0)
    _, parts = et.baseline_rollout(policy, ref, reward, ids, mask, 6, stops, env.pad_token_id)
    completion, keep = parts["sequences"][:, ids.shape[1] :], parts["completion_mask"]
    for b in range(2):  # no real token after a stop id
        real = completion[b][keep[b].bool()].tolist()
        assert not any(t in stops for t in real[:-1])
    err_lp, err_score = et.check_baseline(ref, reward, ids, mask, parts, stops)
    assert err_lp < 1e-4 and err_score < 1e-4


def test_env_throughput_main_measures_a_model_folder(chatml_dir, capsys):
    argv = ["--model", str(chatml_dir), "--batch", "2", "--max-new-tokens", "4", "--repeats", "1", "--warmup", "0"]
    summary = et.main([*argv, "--threads", "1", "--clock", "cpu"])
    (row,) = summary["configs"]
    assert row["model"] == "m" and row["chat_template"] is True and summary["clock"] == "cpu"
    saved = load_pretrained(chatml_dir)[0]
    assert row["params"] == sum(p.numel() for p in saved.parameters())
    assert 2 <= row["env_tokens_per_rollout"] <= 8 and 2 <= row["baseline_tokens_per_rollout"] <= 8
    grouped = et.main([*argv, "--group-size", "2", "--threads", "1"])  # both rows hold one prompt
    assert grouped["group_size"] == 2 and "B   G" in capsys.readouterr().out


def test_env_throughput_refuses_the_cpu_clock_on_another_device(capsys):
    with pytest.raises(SystemExit):
        et.parse_args(["--clock", "cpu", "--device", "cuda"])
    assert "--clock cpu times CPU work" in capsys.readouterr().err


def test_peer_speed_shape_flags_set_only_the_given_fields():
    args = ps.parse_args(["--num-prompts", "4", "--dpo-batch", "8", "--iterations", "2", "--model", "x"])
    assert ps.shape_overrides("grpo", args) == {"num_prompts": 4}
    assert ps.shape_overrides("dpo", args) == {"batch_size": 8, "num_pairs": 24}  # 8 pairs × (1 warm-up + 2)
    assert ps.shape_overrides("dpo", ps.parse_args([])) == {}  # the tiny benchmark keeps the config's


def test_peer_speed_renders_trl_prompts_to_the_envs_ids(chatml_dir):
    from rlhf_env.tasks import get_task

    ref, tok = load_pretrained(chatml_dir)
    render = ps._renderer(get_task("sentiment"), ref, tok)
    env = VectorTextGenEnv(tok, ref, lambda p, c: [0.0] * len(c), PROMPTS, num_envs=2, device="cpu")
    for p in PROMPTS:
        assert render(p).endswith("assistant\n")
        assert tok(render(p))["input_ids"] == env.prompt_format.encode_prompt(p)
    _, plain = build_tiny_model(seed=1)  # the character tokenizer has no template: TRL gets the raw text
    assert ps._renderer(get_task("sentiment"), ref, plain) is None


def test_peer_speed_times_the_training_loops_steps(chatml_dir, monkeypatch):
    """Our side is ``rlhf train``'s loop: its steps' tokens, one time per step after the warm-up,
    ticking with the chosen clock, on a ``--model`` checkpoint at the batch shape given."""
    from rlhf_env import plugins
    from rlhf_env.tasks import get_task

    ticks = iter(range(100))
    monkeypatch.setattr(ps, "clock", lambda: float(next(ticks)) ** 2)  # 0, 1, 4, 9: deltas 1, 3, 5
    task = get_task("arithmetic", max_new_tokens=4)
    cfg = plugins.get_host().algorithms.get("grpo").make_config(num_prompts=2, group_size=2)
    times, tokens = ps.time_ours(task, str(chatml_dir), "grpo", cfg, iterations=2, warmup=2)
    assert times == [3.0, 5.0]  # steps 2 and 3: the time since the record of the step before
    assert len(tokens) == 2 and all(1 <= t <= 2 * 2 * 4 for t in tokens)  # 4 completions of ≤ 4 tokens


def test_peer_speed_needs_a_warmup_iteration(capsys):
    with pytest.raises(SystemExit):
        ps.parse_args(["--warmup", "0"])
    assert "--warmup must be >= 1" in capsys.readouterr().err
