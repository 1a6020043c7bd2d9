"""Any local Hugging Face causal LM, exactly: the architecture × tokenizer matrix.

For every pair, a vector env (groups, autoreset, rows ending at different steps, cache
repacking, sliding windows shorter than the sequences) is driven by ``SamplingPolicy``;
every finished episode is then recomputed with one plain full forward of each model
(float32, no cache) and must agree within ``ATOL``: the reference log-probs, KL terms and
rewards, the sampler's action log-probs, and the training-time recomputation of those
(the first PPO/GRPO ratio is 1).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tinyarch import ARCHITECTURES, TOKENIZERS, WINDOW, build
from tinyparts import count_e

from rlhf_env import VectorTextGenEnv
from rlhf_env.models import load_causal_lm, load_tokenizer, pad_token_id
from rlhf_env.policy import SamplingPolicy
from rlhf_env.prompts import DEFAULT_PROMPTS
from rlhf_env.rollout import EpisodeStream
from rlhf_env.scoring import next_token_logprobs, pad_batch

ATOL = 1e-4
BETA = 0.3
PROMPTS = list(DEFAULT_PROMPTS[:6])
MAX_ERRORS: dict[tuple[str, str], float] = {}  # largest |env - full forward| per case (read by the report)


def kernel_mask(model, allowed: torch.Tensor) -> torch.Tensor:
    """(T, T) bool -> the 4-D mask the model's attention kernel takes."""
    allowed = allowed[None, None]
    if model.config._attn_implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


@torch.no_grad()
def full_logprobs(
    model, ids: list[int], vocab: int, *, gap: bool = False, window: bool = True, hide_first: bool = False
) -> torch.Tensor:
    """(T, vocab) log-probs of the token after each prefix of ``ids``, from one plain forward.

    The switches break it on purpose: ``gap`` skips 4 positions halfway, ``window=False``
    drops sliding windows, ``hide_first`` hides the first token from the later ones.
    """
    T = len(ids)
    # Positions always given: OPT would derive them from a 4-D mask.
    kwargs = {"position_ids": (torch.arange(T) + 4 * int(gap) * (torch.arange(T) >= T // 2))[None]}
    if not window or hide_first:
        allowed = torch.ones(T, T).tril().bool()
        if hide_first:
            allowed[1:, 0] = False
        kwargs["attention_mask"] = kernel_mask(model, allowed)
    logits = model(torch.tensor([ids]), **kwargs).logits[0, :, :vocab].float()
    return torch.log_softmax(logits, dim=-1)


def drive(env: VectorTextGenEnv, agent: SamplingPolicy, steps: int, seed: int) -> list[dict]:
    """Step ``env`` with ``agent``; some rows are ended early with EOS (so rows end at different
    steps). Returns the finished episodes with everything the env and the agent reported."""
    B, eos = env.num_envs, env.core.eos_token_id
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)

    def start(r):
        return {
            "prompt": obs["input_ids"][r, : obs["prompt_length"][r]].tolist(),
            "prompt_text": env.core.prompt_text[r],
            "tokens": [],
            "logprob": [],
            "ref_logprob": [],
            "kl": [],
            "reward": [],
        }

    episodes = [start(r) for r in range(B)]
    finished, ended = [], np.zeros(B, dtype=bool)
    for _ in range(steps):
        action = agent.act(obs)
        assert agent.lm.next_logprobs.shape[1] == env.core.vocab_size  # never an id the env rejects
        force = (rng.random(B) < 0.15) & ~ended
        action["token"][force] = eos
        action["logprob"][force] = agent.lm.next_logprobs[torch.from_numpy(force), eos].numpy()
        obs, reward, terminated, truncated, info = env.step(action)
        for r in range(B):
            if ended[r]:  # NEXT_STEP autoreset: this step started the row's next episode
                episodes[r] = start(r)
                continue
            ep = episodes[r]
            ep["tokens"].append(int(action["token"][r]))
            for key, value in (
                ("logprob", action["logprob"]),
                ("ref_logprob", info["ref_logprob"]),
                ("kl", info["kl"]),
                ("reward", reward),
            ):
                ep[key].append(float(value[r]))
            if terminated[r] or truncated[r]:
                ep["score"] = float(info["score"][r])
                finished.append(ep)
        ended = terminated | truncated
    return finished


@pytest.mark.parametrize("tok_kind", list(TOKENIZERS))
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_env_and_sampler_equal_full_forwards(arch, tok_kind, arch_checkpoint):
    path = arch_checkpoint(arch, tok_kind)
    ref, tok = load_causal_lm(path, device="cpu"), load_tokenizer(path)
    policy = build(arch, tok_kind, seed=1)
    V = len(tok)
    env = VectorTextGenEnv(
        tok, ref, count_e, PROMPTS, num_envs=4, group_size=2, beta=BETA, max_new_tokens=6, device="cpu"
    )
    agent = SamplingPolicy(policy, 4, env.core.pad_token_id, seed=0, vocab_size=env.core.vocab_size)
    episodes = drive(env, agent, steps=48, seed=0)

    assert len(episodes) >= 16 and len({len(ep["tokens"]) for ep in episodes}) >= 3  # rows end at different steps
    assert env.core.ref.compactions >= 1 and agent.lm.compactions >= 1  # the caches were repacked
    assert min(len(ep["prompt"]) + len(ep["tokens"]) for ep in episodes) > WINDOW + 1
    if tok_kind == "llama":
        assert all(ep["prompt"][0] == tok.bos_token_id for ep in episodes)
    worst = 0.0
    for ep in episodes:
        ids, n, start = ep["prompt"] + ep["tokens"], len(ep["tokens"]), len(ep["prompt"]) - 1
        rows, toks = torch.arange(start, start + n), torch.tensor(ep["tokens"])
        ref_lp = full_logprobs(ref, ids, V)[rows, toks]
        pol_lp = full_logprobs(policy, ids, V)[rows, toks]
        score = count_e([ep["prompt_text"]], [tok.decode(ep["tokens"], skip_special_tokens=True)])[0]
        expected_reward = -BETA * (pol_lp - ref_lp)
        expected_reward[-1] += score
        for got, want in (
            (ep["ref_logprob"], ref_lp),
            (ep["logprob"], pol_lp),
            (ep["kl"], pol_lp - ref_lp),
            (ep["reward"], expected_reward),
        ):
            worst = max(worst, float((torch.tensor(got) - want).abs().max()))
        assert ep["score"] == pytest.approx(score, abs=1e-6)

    # Training recomputes the sampler's log-probs from right-padded batches: ratio 1.
    ids, attn = pad_batch([ep["prompt"] + ep["tokens"] for ep in episodes], pad_token_id(tok))
    with torch.no_grad():
        recomputed = next_token_logprobs(policy, ids, attn, V)
    for i, ep in enumerate(episodes):
        start = len(ep["prompt"]) - 1
        got = recomputed[i, start : start + len(ep["tokens"])]
        worst = max(worst, float((got - torch.tensor(ep["logprob"])).abs().max()))
    MAX_ERRORS[arch, tok_kind] = worst
    assert worst < ATOL


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_a_wrong_position_mask_or_window_moves_logprobs_far_beyond_the_tolerance(arch, arch_checkpoint):
    """The matrix above could not catch a mistake that moves log-probs by less than ATOL."""
    model, tok = (
        load_causal_lm(arch_checkpoint(arch, "gpt2"), device="cpu"),
        load_tokenizer(arch_checkpoint(arch, "gpt2")),
    )
    ids = tok(PROMPTS[0] + " and the cat")["input_ids"]
    assert len(ids) > 2 * WINDOW
    right = full_logprobs(model, ids, len(tok))
    for broken in ({"gap": True}, {"hide_first": True}):
        assert (full_logprobs(model, ids, len(tok), **broken) - right).abs().max() > 1000 * ATOL, broken
    windowed = getattr(model.config, "sliding_window", None) is not None
    no_window = (full_logprobs(model, ids, len(tok), window=False) - right).abs().max()
    assert (no_window > 1000 * ATOL) == windowed


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_chunked_rollouts_equal_full_forwards(arch, arch_checkpoint):
    """The chunked path: ``generate`` (static cache) and ``step_chunk`` (the reference scoring
    3 tokens per forward), across chunks, restarts, sliding windows and groups (whose shared
    prompt both the sampler and the reference prefill once)."""
    path = arch_checkpoint(arch, "qwen")  # a model vocabulary larger than the tokenizer's
    ref, tok = load_causal_lm(path, device="cpu"), load_tokenizer(path)
    policy = build(arch, "qwen", seed=1)
    V = len(tok)
    env = VectorTextGenEnv(
        tok, ref, count_e, PROMPTS, num_envs=4, group_size=2, beta=BETA, max_new_tokens=7, device="cpu"
    )
    agent = SamplingPolicy(policy, 4, env.core.pad_token_id, seed=0, vocab_size=V)
    stream = EpisodeStream(env, agent, seed=0, chunk=3)
    assert stream.chunk == 3
    episodes = [ep for ep, _ in zip(stream, range(10))]
    assert min(len(ep.prompt_ids) + len(ep.tokens) for ep in episodes) > WINDOW + 1
    worst = 0.0
    for ep in episodes:
        ids, n, start = ep.prompt_ids + ep.tokens.tolist(), len(ep.tokens), len(ep.prompt_ids) - 1
        rows, toks = torch.arange(start, start + n), torch.from_numpy(ep.tokens)
        ref_lp, pol_lp = full_logprobs(ref, ids, V)[rows, toks], full_logprobs(policy, ids, V)[rows, toks]
        expected_reward = -BETA * (pol_lp - ref_lp)
        expected_reward[-1] += count_e([ep.prompt], [ep.completion])[0]
        for got, want in ((ep.ref_logprobs, ref_lp), (ep.logprobs, pol_lp), (ep.rewards, expected_reward)):
            worst = max(worst, float((torch.from_numpy(got) - want).abs().max()))
    assert worst < ATOL
