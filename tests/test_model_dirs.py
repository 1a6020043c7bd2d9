"""Local checkpoints of other architectures through the CLI and the trainers, and the edges:
directories that hold no usable model, models the env cannot serve exactly, bfloat16."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import transformers
from tinyarch import build, tokenizer
from tinyparts import count_e

from rlhf_env import IncrementalLM, VectorTextGenEnv, commands
from rlhf_env.errors import UnsupportedModelError
from rlhf_env.models import load_causal_lm, load_tokenizer, pad_token_id, save_pretrained
from rlhf_env.plugins import cli
from rlhf_env.policy import SamplingPolicy
from rlhf_env.prompts import DEFAULT_PROMPTS

# Three checkpoints between them cover: sliding and full layers alternating with a BOS
# tokenizer, GQA with a padded vocabulary (pad = EOS), partial rotary without a pad token.
CHECKPOINTS = [("gemma2", "llama"), ("qwen2", "qwen"), ("gpt_neox", "gpt2")]
ALGORITHMS = {  # algorithm -> (checkpoint, tiny config)
    "ppo": (("qwen2", "qwen"), ["num_envs=4", "num_minibatches=2", "ppo_epochs=1"]),
    "reinforce": (("gpt_neox", "gpt2"), ["num_envs=4"]),
    "grpo": (("qwen2", "qwen"), ["num_prompts=2", "group_size=2", "num_minibatches=1"]),
    "dr_grpo": (("gemma2", "llama"), ["num_prompts=2", "group_size=2", "num_minibatches=1"]),
    "dpo": (("gemma2", "llama"), ["num_pairs=8", "batch_size=4"]),
    "sft": (("gpt_neox", "gpt2"), ["batch_size=4"]),
    "ipo": (("qwen2", "qwen"), ["num_pairs=8", "batch_size=4"]),
    "simpo": (("gpt_neox", "gpt2"), ["num_pairs=8", "batch_size=4"]),
    "kto": (("gemma2", "llama"), ["num_pairs=8", "batch_size=4"]),
    "online_dpo": (("qwen2", "qwen"), ["num_prompts=2"]),
    "reward_model": (("gemma2", "llama"), ["num_pairs=8", "num_heldout_pairs=4", "batch_size=4", "heldout_every=1"]),
    "rloo": (("qwen2", "qwen"), ["num_prompts=2", "k=2"]),
    "reinforce_pp": (("gpt_neox", "gpt2"), ["num_prompts=4", "num_minibatches=2"]),
    "reinforce_pp_baseline": (("gemma2", "llama"), ["num_prompts=2", "group_size=2", "num_minibatches=1"]),
    "gspo": (("gpt_neox", "gpt2"), ["num_prompts=2", "group_size=2", "num_minibatches=1"]),
    "cispo": (("qwen2", "qwen"), ["num_prompts=2", "group_size=2", "num_minibatches=1"]),
    "dapo": (("gemma2", "llama"), ["num_prompts=2", "group_size=2", "num_minibatches=1"]),
}
HF_BARS = ("Loading weights", "Writing model shards")


def test_every_builtin_algorithm_is_run_here():
    from rlhf_env import plugins

    assert set(ALGORITHMS) == set(plugins.get_host().algorithms.names())


@pytest.mark.parametrize("algo", list(ALGORITHMS))
def test_train_runs_every_algorithm_on_a_model_dir(algo, arch_checkpoint, tmp_path, capsys):
    (arch, tok_kind), overrides = ALGORITHMS[algo]
    out = tmp_path / "run"
    argv = [
        "train",
        "--algo",
        algo,
        "--task",
        "arithmetic",
        "--model",
        str(arch_checkpoint(arch, tok_kind)),
        "--out",
        str(out),
        "--steps",
        "1",
        "--eval-every",
        "1",
        "--device",
        "cpu",
    ]
    assert cli.main(argv + [a for o in overrides for a in ("--set", o)]) == 0
    err = capsys.readouterr().err
    assert not any(bar in err for bar in HF_BARS)  # transformers' progress bars are silenced
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert 0.0 <= record["reward/gold"] <= 1.0 and np.isfinite(list(record.values())).all()
    # the checkpoint is the given architecture, with its tokenizer
    assert json.loads((out / "checkpoint" / "config.json").read_text())["model_type"] == arch
    assert len(load_tokenizer(out / "checkpoint")) == len(load_tokenizer(arch_checkpoint(arch, tok_kind)))
    if algo in ("grpo", "dr_grpo"):
        assert record["policy/clipfrac"] == 0.0  # one on-policy update: every ratio is 1


@pytest.mark.parametrize("arch,tok_kind", CHECKPOINTS)
def test_base_model_and_rollout_use_the_model_dir(arch, tok_kind, arch_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RLHF_ENV_CACHE", str(tmp_path / "cache"))
    path = str(arch_checkpoint(arch, tok_kind))
    assert cli.main(["base-model", "--task", "arithmetic", "--model", path, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["path"] == path and report["parameters"] == build(arch, tok_kind).num_parameters()
    for extra in (["--task", "arithmetic"], []):
        assert cli.main(["rollout", "--model", path, "--episodes", "2", "--num-envs", "2", *extra]) == 0
        out = capsys.readouterr()
        assert len([line for line in out.out.splitlines() if line.startswith("episode")]) == 2
        assert not any(bar in out.err for bar in HF_BARS)
    assert not (tmp_path / "cache").exists()  # --model replaced the base model: nothing built


def test_rollout_without_a_task_uses_the_model_it_is_given(arch_checkpoint, tmp_path, capsys):
    def run(model):
        eps = commands.run_rollout(episodes=4, num_envs=2, max_new_tokens=6, seed=0, model=model).episodes
        return [(e.prompt, e.completion) for e in eps]

    other = save_pretrained(build("llama", "gpt2", seed=5), tokenizer("gpt2"), tmp_path / "other")
    runs = [run(None), run(str(arch_checkpoint("llama", "gpt2"))), run(str(other))]
    assert all(p in DEFAULT_PROMPTS for r in runs for p, _ in r)  # the default env's prompts...
    assert runs[0] != runs[1] != runs[2] != runs[0]  # ...completed by the given model
    assert cli.main(["rollout", "--model", str(tmp_path / "missing")]) == 1
    assert "is not a local directory" in capsys.readouterr().err


def _bad_dirs(root, good):
    """name -> (directory, what the error must say)."""
    cases = {}

    def copy(name):
        d = root / name
        shutil.copytree(good, d)
        return d

    d = root / "empty"
    d.mkdir()
    cases["empty"] = (d, "has no config.json")
    d = copy("remote")
    config = json.loads((d / "config.json").read_text())
    config.update(model_type="my_private_lm", auto_map={"AutoModelForCausalLM": "modeling_mine.MyLM"})
    (d / "config.json").write_text(json.dumps(config))
    cases["remote code"] = (d, "needs remote code")
    d = root / "t5"
    transformers.T5Config(vocab_size=300, d_model=16, d_ff=16, num_layers=1, num_heads=2).save_pretrained(d)
    cases["not a causal LM"] = (d, "'t5' model, which has no causal-LM class")
    d = copy("bin")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    cases["pickled weights"] = (
        d,
        "holds only pickle weights (pytorch_model.bin); models are loaded from safetensors only",
    )
    d = copy("no_tokenizer")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (d / f).unlink()
    cases["no tokenizer"] = (d, "has no tokenizer")
    d = root / "small"
    small = transformers.LlamaConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
    )
    save_pretrained(transformers.LlamaForCausalLM(small), tokenizer("gpt2"), d)
    cases["tokenizer too large"] = (d, "tokenizer has 300 tokens but the model embeds only 100")
    return cases


def test_model_dirs_that_cannot_serve_get_an_error_naming_the_problem(arch_checkpoint, tmp_path, capsys):
    cases = _bad_dirs(tmp_path, arch_checkpoint("llama", "gpt2"))
    for name, (d, message) in cases.items():
        for argv in (["rollout", "--model", str(d)], ["base-model", "--task", "arithmetic", "--model", str(d)]):
            assert cli.main(argv) == 1, name
            err = capsys.readouterr().err
            assert message in err and "Traceback" not in err, (name, err)


def _with_layer_types(model, kinds):
    model.config.layer_types = kinds
    return model


def _flex_attention():
    model = build("llama", "gpt2")
    model.set_attn_implementation("flex_attention")
    return model


@pytest.mark.parametrize(
    "make,feature",
    [
        (
            lambda: transformers.BloomForCausalLM(
                transformers.BloomConfig(vocab_size=300, hidden_size=16, n_layer=1, n_head=2)
            ),
            "takes no position_ids",
        ),
        (
            lambda: _with_layer_types(build("qwen2", "gpt2"), ["linear_attention", "full_attention"]),
            "'linear_attention' layers",
        ),
        (
            lambda: transformers.FalconForCausalLM(
                transformers.FalconConfig(
                    vocab_size=300, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, alibi=True
                )
            ),
            "uses ALiBi position biases",
        ),
        (_flex_attention, "attention implementation 'flex_attention'"),
    ],
    ids=["bloom-no-positions", "linear-attention", "falcon-alibi", "flex-attention"],
)
def test_models_the_cache_cannot_serve_exactly_are_refused_at_construction(make, feature):
    model = make()
    with pytest.raises(UnsupportedModelError, match=feature):
        VectorTextGenEnv(tokenizer("gpt2"), model, count_e, ["Hello"], num_envs=2, device="cpu")
    with pytest.raises(UnsupportedModelError, match=feature):
        SamplingPolicy(model, 2)


def test_bfloat16_on_cpu_gives_float32_logprobs_near_float32(arch_checkpoint, capsys):
    path = arch_checkpoint("gemma2", "llama")
    tok = load_tokenizer(path)
    envs = [
        VectorTextGenEnv(
            tok, str(path), count_e, ["Hello there"], num_envs=2, beta=0.1, max_new_tokens=4, device="cpu", dtype=dt
        )
        for dt in (None, torch.bfloat16)
    ]
    assert envs[1].core.ref_model.dtype == torch.bfloat16
    ref_lps, policy_lps = [], []
    for env in envs:
        obs, _ = env.reset(seed=0)
        agent = SamplingPolicy(env.core.ref_model, 2, env.core.pad_token_id, vocab_size=env.core.vocab_size)
        action = agent.act(obs)
        action["token"][:] = [70, 80]
        action["logprob"][:] = agent.lm.next_logprobs[[0, 1], [70, 80]].numpy()
        info = env.step(action)[4]
        assert info["ref_logprob"].dtype == np.float32 and action["logprob"].dtype == np.float32
        ref_lps.append(info["ref_logprob"])
        policy_lps.append(action["logprob"])
    np.testing.assert_allclose(ref_lps[1], ref_lps[0], atol=0.1)
    np.testing.assert_allclose(policy_lps[1], policy_lps[0], atol=0.1)
    assert cli.main(["rollout", "--model", str(path), "--dtype", "bfloat16", "--episodes", "2", "--num-envs", "2"]) == 0
    assert "summary: episodes=2" in capsys.readouterr().out


@pytest.mark.parametrize("arch,tok_kind", CHECKPOINTS)
def test_training_recomputes_the_sampled_logprobs(arch, tok_kind, arch_checkpoint):
    """The first PPO/GRPO ratio is 1: the trainers' full forwards give the sampler's log-probs."""
    from rlhf_env.algorithms.base import TrainContext, collect_rollouts, policy_logprobs
    from rlhf_env.algorithms.zoo.ppo import logprobs_and_values
    from rlhf_env.tasks import get_task

    path = arch_checkpoint(arch, tok_kind)
    ref, tok = load_causal_lm(path, device="cpu"), load_tokenizer(path)
    ctx = TrainContext(get_task("arithmetic"), build(arch, tok_kind, seed=2), ref, tok, torch.device("cpu"))
    batch = collect_rollouts(ctx, ctx.env(4, group_size=2), seed=0)
    assert batch.vocab_size == len(tok)
    mask = batch.action_mask.bool()
    with torch.no_grad():
        for recomputed in (
            policy_logprobs(ctx.policy, batch),
            logprobs_and_values(
                ctx.policy, torch.nn.Linear(32, 1), batch.input_ids, batch.attention_mask, batch.vocab_size
            )[0],
        ):
            assert (recomputed - batch.logprobs)[mask].abs().max() < 1e-4


def test_one_pad_rule():
    assert pad_token_id(tokenizer("qwen")) == tokenizer("qwen").pad_token_id == tokenizer("qwen").eos_token_id
    for kind in ("gpt2", "llama"):  # no pad token: EOS pads
        assert tokenizer(kind).pad_token_id is None and pad_token_id(tokenizer(kind)) == tokenizer(kind).eos_token_id
    bare = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer("gpt2").backend_tokenizer)
    assert bare.pad_token_id is None and bare.eos_token_id is None and pad_token_id(bare) == 0


def test_incremental_lm_over_a_padded_vocabulary_scores_only_the_tokenizer_ids(arch_checkpoint):
    path = arch_checkpoint("qwen2", "qwen")
    model, tok = load_causal_lm(path, device="cpu"), load_tokenizer(path)
    assert model.get_output_embeddings().out_features > len(tok)
    lm = IncrementalLM(model, 1, pad_token_id(tok), vocab_size=len(tok))
    ids = tok("The cat")["input_ids"]
    lp = lm.feed(torch.tensor([ids]), torch.tensor([len(ids)]), torch.tensor([True]))
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    assert lp.shape == (1, len(tok)) and float(lp.exp().sum()) == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(lp[0], torch.log_softmax(logits[: len(tok)], -1), atol=1e-5, rtol=0)
