"""Chat templates and stop ids (``rlhf_env.prompt_format``): prompts as the template's user turn,
every stop id ending episodes and samplers, offline encodings equal to the env's ids."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from rlhf_env import TextGenEnv, VectorTextGenEnv
from rlhf_env.errors import SettingError
from rlhf_env.fastgen import HFGenerateSampler, obs_history, sample_completions
from rlhf_env.policy import SamplingPolicy
from rlhf_env.prompt_format import PromptFormat
from rlhf_env.rollout import EpisodeStream, collect, complete, first_episodes
from rlhf_env.scoring import encode_completion, next_token_logprobs, pad_batch, sft_loss
from rlhf_env.tiny import add_chatml_template, build_bpe_tokenizer, build_tiny_model

PROMPTS = ["The weather today", "Tell me a story"]


@pytest.fixture(scope="module")
def chatml():
    """A tiny GPT-2 on a BPE tokenizer with a ChatML template: EOS 0, ``<|im_end|>`` 301."""
    tok = add_chatml_template(build_bpe_tokenizer())
    model, _ = build_tiny_model(tok, seed=1)
    return model, tok


def im_end(tok) -> int:
    return tok.convert_tokens_to_ids("<|im_end|>")


class Recorder:
    """A reward that records what it was given and scores the completion's length in characters."""

    def __init__(self):
        self.seen: list[tuple[str, str]] = []

    def __call__(self, prompts, completions):
        self.seen += list(zip(prompts, completions))
        return [float(len(c)) for c in completions]


def test_the_envs_prompt_ids_are_the_templates_user_turn_with_the_generation_prompt(chatml):
    model, tok = chatml
    expected = [
        list(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)["input_ids"])
        for p in PROMPTS
    ]
    assert expected[0][-3:] == tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"][-3:]
    env = VectorTextGenEnv(tok, model, Recorder(), PROMPTS, num_envs=2, max_new_tokens=4, device="cpu")
    obs, _ = env.reset(seed=0, options={"prompts": PROMPTS})
    for r in range(2):
        assert obs["input_ids"][r, : obs["prompt_length"][r]].tolist() == expected[r]
    assert env.max_prompt_tokens == max(map(len, expected))  # the default limit counts the template's tokens
    assert env.prompt_format.uses_template and env.chat_template == "auto"
    assert env.stop_token_ids == (tok.eos_token_id, im_end(tok)) == (0, 301)
    single = TextGenEnv(tok, model, Recorder(), PROMPTS, max_new_tokens=4, device="cpu")
    obs, _ = single.reset(seed=0, options={"prompt": PROMPTS[1]})
    assert obs["input_ids"][: obs["prompt_length"]].tolist() == expected[1]
    with pytest.raises(SettingError, match=f"has {len(expected[1])} tokens in its chat template"):
        TextGenEnv(tok, model, Recorder(), PROMPTS, max_prompt_tokens=len(expected[1]) - 1, device="cpu")


def test_none_reproduces_todays_raw_prompt_ids_and_stop_ids(chatml):
    model, tok = chatml
    env = VectorTextGenEnv(tok, model, Recorder(), PROMPTS, num_envs=2, chat_template="none", device="cpu")
    obs, _ = env.reset(seed=0, options={"prompts": PROMPTS})
    for r, p in enumerate(PROMPTS):
        assert obs["input_ids"][r, : obs["prompt_length"][r]].tolist() == tok(p)["input_ids"]
    assert env.stop_token_ids == (0,) and not env.prompt_format.uses_template
    # A tokenizer without a template: auto is none.
    plain = build_bpe_tokenizer()
    assert PromptFormat(plain).encode_prompt(PROMPTS[0]) == plain(PROMPTS[0])["input_ids"]
    assert not PromptFormat(plain).uses_template and PromptFormat(plain).stop_ids == (plain.eos_token_id,)
    with pytest.raises(SettingError, match=r"chat_template must be one of \['auto', 'none'\], got 'always'"):
        VectorTextGenEnv(tok, model, Recorder(), PROMPTS, num_envs=2, chat_template="always", device="cpu")
    with pytest.raises(SettingError, match=r"stop_token_ids \[999\] are outside the vocabulary \[0, 302\)"):
        VectorTextGenEnv(tok, model, Recorder(), PROMPTS, num_envs=2, stop_token_ids=[999], device="cpu")


def test_the_end_of_turn_token_terminates_in_step_and_step_chunk_and_the_reward_sees_the_assistant_text(chatml):
    model, tok = chatml
    text = tok(" sunny", add_special_tokens=False)["input_ids"]
    assert len(text) >= 2 and im_end(tok) not in text
    reward = Recorder()
    single = TextGenEnv(tok, model, reward, PROMPTS, beta=0.0, max_new_tokens=8, device="cpu")
    single.reset(seed=0, options={"prompt": PROMPTS[0]})
    for t in text:
        assert single.step(t)[2:4] == (False, False)
    _, r, terminated, truncated, info = single.step(im_end(tok))
    assert (terminated, truncated) == (True, False)
    assert info["prompt"] == PROMPTS[0] and info["completion"] == " sunny"
    assert r == info["score"] == 6.0  # len(" sunny"): the reward saw the assistant text, not "<|im_end|>"

    vec = VectorTextGenEnv(tok, model, reward, PROMPTS, num_envs=2, beta=0.0, max_new_tokens=16, device="cpu")
    vec.reset(seed=0, options={"prompts": PROMPTS})
    K = len(text) + 3
    chunk = np.array([[*text, im_end(tok), 5, 6], [*text, 5, 6, 7]])  # row 0 ends at im_end; row 1 goes on
    _, rew, term, trunc, info = vec.step_chunk(chunk)
    n = len(text) + 1
    assert info["applied"][0].tolist() == [True] * n + [False] * (K - n)
    assert term[0].tolist() == [False] * (n - 1) + [True] + [False] * (K - n) and not trunc.any()
    assert info["applied"][1].all() and not term[1].any()
    assert info["completion"][0] == " sunny" and info["prompt"][0] == PROMPTS[0] and rew[0, n - 1] == 6.0
    assert reward.seen == [(PROMPTS[0], " sunny")] * 2  # raw prompts, both envs


def test_a_generation_config_with_several_eos_ids_stops_the_env_and_every_sampler(chatml):
    """generation_config.eos_token_id = [EOS, b] (b an ordinary token, as Llama 3 lists two ids): the env
    ends episodes at b, and each sampler stops at b, taking the stop ids from the env even when its own
    model's generation config lists only the EOS."""
    tok = build_bpe_tokenizer()
    ref, _ = build_tiny_model(tok, seed=3)
    prompt = PROMPTS[0]
    ids = torch.tensor([tok(prompt)["input_ids"]])
    g = sample_completions(
        ref, ids, torch.tensor([ids.shape[1]]), 8, pad_token_id=0, eos_token_id=None, vocab_size=len(tok),
        generator=torch.Generator(), greedy=True,
    )[0][0].tolist()  # fmt: skip
    j = max(i for i in range(4) if g[i] not in g[:i])  # b first appears at index j
    b = g[j]
    assert b != tok.eos_token_id
    ref.generation_config.eos_token_id = [tok.eos_token_id, b]
    policy = copy.deepcopy(ref)
    policy.generation_config.eos_token_id = tok.eos_token_id  # the policy's own config does not know b
    env = VectorTextGenEnv(tok, ref, Recorder(), [prompt], num_envs=2, beta=0.1, max_new_tokens=8, device="cpu")
    assert env.stop_token_ids == (tok.eos_token_id, b)
    for generator in ("kv_cache", "kv_cache_graph", "hf_generate"):
        batch = collect(env, policy, seed=0, greedy=True, generator=generator)
        assert batch.action_mask.sum(1).tolist() == [j + 1, j + 1], generator
        assert batch.input_ids[0, batch.attention_mask[0].sum() - 1] == b
    token_path = first_episodes(EpisodeStream(env, SamplingPolicy(policy, env=env, greedy=True), 0, chunk=1), 2)
    assert [len(ep.tokens) for ep in token_path] == [j + 1, j + 1] and token_path[0].tokens[-1] == b
    # Without an env, the samplers read every id of their model's list.
    obs, _ = env.reset(seed=0)
    for sampler in (SamplingPolicy(ref, 2, 0, greedy=True), HFGenerateSampler(ref, 2, pad_token_id=0, vocab_size=len(tok), seed=0, greedy=True)):  # fmt: skip
        assert sampler.generate(obs, 8)["length"].tolist() == [j + 1, j + 1]
    assert obs_history(obs)[1].tolist() == [ids.shape[1]] * 2
    assert SamplingPolicy(policy, env=env).stop_token_ids == (tok.eos_token_id, b)
    # The completion's text (what the reward sees) drops the stop id b.
    assert batch.completions[0] == tok.decode(g[:j])


def test_offline_encodings_equal_the_envs_ids_for_the_same_prompt_and_completion(chatml, tmp_path):
    """DPO, KTO, SFT and reward-model data under the template: prompt ids + completion ids + <|im_end|>,
    what the env holds once the policy sampled that completion and ended its turn."""
    from rlhf_env.algorithms.base import TrainContext
    from rlhf_env.algorithms.zoo import dpo
    from rlhf_env.tasks.arithmetic import make_arithmetic_task

    model, tok = chatml
    prompt, completion = PROMPTS[1], " Once upon a time"
    c_ids = tok(completion, add_special_tokens=False)["input_ids"]
    env = VectorTextGenEnv(tok, model, Recorder(), [prompt], num_envs=1, beta=0.0, max_new_tokens=32, device="cpu")
    env.reset(seed=0)
    obs, *_ = env.step_chunk(np.array([[*c_ids, im_end(tok)]]))
    env_ids = obs["input_ids"][0, : obs["length"][0]].tolist()
    fmt = env.prompt_format
    ids, p_len = encode_completion(tok, prompt, completion, prompt_format=fmt)
    assert ids == env_ids and p_len == obs["prompt_length"][0] and ids[-1] == 301
    assert encode_completion(tok, prompt, completion) == (
        tok(prompt)["input_ids"] + c_ids + [0],
        len(tok(prompt)["input_ids"]),
    )

    task = make_arithmetic_task(digits=1, n_train=8, n_eval=4)
    ctx = TrainContext(task, copy.deepcopy(model), model, tok, torch.device("cpu"))
    assert ctx.prompt_format.stop_ids == env.stop_token_ids and ctx.env(2).prompt_format.uses_template
    prefs = tmp_path / "pairs.jsonl"
    prefs.write_text(json.dumps({"prompt": prompt, "chosen": completion, "rejected": " No"}) + "\n")
    trainer = dpo.Trainer(ctx, dpo.Config(preference_file=str(prefs), batch_size=1))
    assert trainer.chosen[0] == (env_ids, p_len)
    no = tok(" No", add_special_tokens=False)["input_ids"]
    assert trainer.rejected[0][0] == fmt.encode_prompt(prompt) + no + [301]
    # SFT's loss under the template: the mean NLL of the completion and <|im_end|> in the env's sequence.
    ids_t, attn = pad_batch([env_ids], 0)
    with torch.no_grad():
        by_hand = -next_token_logprobs(model, ids_t, attn, len(tok))[0, p_len - 1 :].mean()
        assert torch.allclose(sft_loss(model, tok, [(prompt, completion)], prompt_format=fmt), by_hand, atol=1e-6)
    # Annotator samples (the offline pairs) are drawn on the same prompt ids: complete() is the env's rollout.
    assert complete(model, tok, [prompt], 32, seed=0) == collect(env, model, 0).completions
    raw = VectorTextGenEnv(
        tok, model, Recorder(), [prompt], num_envs=1, beta=0.0, max_new_tokens=32, chat_template="none"
    )
    raw_text = complete(model, tok, [prompt], 32, seed=0, chat_template="none")
    raw_batch = collect(raw, model, 0)
    raw_prompt = tok(prompt)["input_ids"]
    assert raw_text == raw_batch.completions and raw_batch.input_ids[0, : len(raw_prompt)].tolist() == raw_prompt


def test_check_env_passes_with_a_chat_template(chatml):
    model, tok = chatml
    env = TextGenEnv(tok, model, Recorder(), PROMPTS, max_new_tokens=4, device="cpu")
    check_env(env)


def test_train_records_the_chat_template_and_a_resume_that_changes_it_is_refused(chatml, tmp_path, capsys):
    from rlhf_env.plugins import cli
    from rlhf_env.tiny import save_tiny

    model, tok = chatml
    ckpt = save_tiny(model, tok, tmp_path / "model")
    out = tmp_path / "run"
    argv = ["train", "--algo", "sft", "--task", "arithmetic", "--model", str(ckpt), "--out", str(out)]
    argv += ["--steps", "1", "--eval-every", "1", "--set", "batch_size=2", "--chat-template", "none"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["chat_template"] == "none"
    capsys.readouterr()
    assert cli.main([*argv[:-2], "--chat-template", "auto", "--resume", "--steps", "2"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rlhf train: ")]
    assert len(err) == 1 and "holds a run with other settings: chat_template 'none' -> 'auto'" in err[0], err
    assert cli.main([*argv[:-2], "--resume", "--steps", "2"]) == 0  # no flag: the run's own mode
    assert json.loads((out / "config.json").read_text())["chat_template"] == "none"


def test_base_model_evaluates_with_the_chat_template_it_is_given_and_reports_it(chatml, tmp_path, capsys):
    from rlhf_env.plugins import cli
    from rlhf_env.tasks import evaluate, get_task
    from rlhf_env.tiny import save_tiny

    model, tok = chatml
    ckpt = save_tiny(model, tok, tmp_path / "model")
    argv = ["base-model", "--task", "arithmetic", "--model", str(ckpt), "--eval-prompts", "6"]
    argv += ["--max-new-tokens", "4", "--json"]
    reports = {}
    for mode in ("auto", "none"):
        assert cli.main([*argv, "--chat-template", mode]) == 0
        reports[mode] = json.loads(capsys.readouterr().out)
    assert cli.main(argv) == 0  # the default is auto, as for rollout and train
    assert json.loads(capsys.readouterr().out) == reports["auto"]
    task = get_task("arithmetic", max_new_tokens=4)
    for mode, report in reports.items():
        assert (report["chat_template"], report["uses_chat_template"]) == (mode, mode == "auto")
        direct = evaluate(task, model, tok, n=6, chat_template=mode)  # the run's eval env in this mode
        assert report["examples"] == [list(e) for e in direct["examples"]]
        assert report["gold_mean_sampled"] == round(direct["gold_mean"], 4)
    assert reports["auto"]["examples"] != reports["none"]["examples"]  # other prompt ids, other samples


def test_a_suites_chat_template_key_reaches_each_task_entry_and_its_settings(tmp_path):
    from rlhf_env.bench.fingerprint import cell_settings
    from rlhf_env.bench.suite import SuiteError, load_suite

    body = 'seeds = [0]\nalgorithms = ["sft"]\nchat_template = "none"\n[budget]\ntokens = 10\n'
    body += '[[tasks]]\nname = "arithmetic"\n[[tasks]]\nname = "sentiment"\nchat_template = "auto"\n'
    suite = load_suite(write(tmp_path / "s.toml", body))
    assert [t.chat_template for t in suite.tasks] == ["none", "auto"]  # the top level, then a task's own
    settings = [cell_settings(suite, c) for c in suite.cells()]
    # Recorded only when not the default, so settings.json of folders made before the key still match.
    assert settings[0]["chat_template"] == "none" and "chat_template" not in settings[1]
    with pytest.raises(SuiteError, match=r"tasks\[0\]: chat_template must be one of \['auto', 'none'\], got 'chatml'"):
        load_suite(
            write(tmp_path / "s.toml", body.replace('"arithmetic"\n', '"arithmetic"\nchat_template = "chatml"\n'))
        )


def write(path, text: str):
    path.write_text(text)
    return path


def test_multi_turn_ids_are_the_templates_rendering_and_no_earlier_token_changes(chatml):
    """Turns that end with ``<|im_end|>`` get the env's reply as the template's next user turn and the
    generation prompt: the env's ids are ``apply_chat_template`` of the same conversation, and every
    step only appends (the history is never re-rendered)."""
    from rlhf_env import Interaction, MultiTurnVectorEnv, Reply

    model, tok = chatml
    replies = ["Try again", "Warmer"]

    class Game(Interaction):
        def start(self, prompt):
            return {"n": 0}

        def respond(self, state, turn):
            state["n"] += 1
            return Reply(done=True) if state["n"] > len(replies) else Reply(replies[state["n"] - 1])

    env = MultiTurnVectorEnv(
        tok, model, Recorder(), PROMPTS[:1], num_envs=1, max_new_tokens=80, beta=0.1, interaction=Game()
    )
    turns = ["It is sunny", "Maybe rain", "Snow then"]
    obs, _ = env.reset(seed=0)
    seen = obs["input_ids"][0, : obs["length"][0]].tolist()
    for text in turns:
        for t in tok(text, add_special_tokens=False)["input_ids"] + [im_end(tok)]:
            obs, _, term, _, info = env.step({"token": np.array([t]), "logprob": np.array([-1.0], np.float32)})
            now = obs["input_ids"][0, : obs["length"][0]].tolist()
            assert now[: len(seen)] == seen  # only appended
            seen = now
    assert term[0] and info["turns"][0] == 3
    conversation = [{"role": "user", "content": PROMPTS[0]}]
    for text, reply in zip(turns, [*replies, None]):
        conversation.append({"role": "assistant", "content": text})
        if reply is not None:
            conversation.append({"role": "user", "content": reply})
    rendered = tok.apply_chat_template(conversation, tokenize=True)
    rendered = list(rendered["input_ids"] if not isinstance(rendered, list) else rendered)
    assert seen == rendered[: len(seen)]  # the env's ids are the template's ...
    assert tok.decode(rendered[len(seen) :]).strip() == ""  # ... up to the newline after the last turn
    injected = obs["source"][0, : len(seen)] == 2
    assert "Try again" in tok.decode(np.array(seen)[injected]) and "Warmer" in tok.decode(np.array(seen)[injected])
