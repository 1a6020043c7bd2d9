"""Tiny offline models, local checkpoints, reward models and the incremental KV cache."""

from __future__ import annotations

import copy

import pytest
import torch
from tinyparts import count_e, next_logprobs
from transformers import GPT2Config, GPT2ForSequenceClassification

from rlhf_env import IncrementalLM, RewardModel, TextGenEnv
from rlhf_env.tiny import build_char_tokenizer, build_tiny_model, save_tiny


def test_char_tokenizer_round_trips_text_and_marks_specials():
    tok = build_char_tokenizer()
    text = "Hi, 37+48=85!"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text
    assert len({tok.pad_token_id, tok.eos_token_id, tok.unk_token_id}) == 3


def test_tiny_model_saves_and_loads_as_a_local_checkpoint(tmp_path):
    model, tok = build_tiny_model(seed=3)
    path = save_tiny(model, tok, tmp_path / "tiny")
    assert (path / "model.safetensors").exists() and (path / "tokenizer.json").exists()
    # the env takes the paths as any local Hugging Face checkpoint
    env = TextGenEnv(str(path), str(path), count_e, ["Hello"], beta=0.1, device="cpu")
    obs, _ = env.reset(seed=0)
    ids = obs["input_ids"][: obs["prompt_length"]].tolist()
    lp = next_logprobs(model, ids)
    y = int(lp.argmax())
    _, _, _, _, info = env.step({"token": y, "logprob": float(lp[y])})
    assert info["ref_logprob"] == pytest.approx(float(lp[y]), abs=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_incremental_lm_matches_full_forwards_under_restarts_and_waits(attn):
    model, _ = build_tiny_model(n_positions=512, seed=4)
    model.set_attn_implementation(attn)  # the cache builds each kernel's own mask format
    gen = torch.Generator().manual_seed(0)
    B = 4
    lm = IncrementalLM(model, B, pad_token_id=0)
    seqs: list[list[int]] = [[] for _ in range(B)]
    for step in range(50):
        kinds = torch.randint(0, 6, (B,), generator=gen).tolist() if step else [0] * B
        pieces, restart = [], []
        for r, kind in enumerate(kinds):
            if kind == 0:  # restart with a new prompt of 1..5 tokens
                piece = torch.randint(3, 90, (int(torch.randint(1, 6, (1,), generator=gen)),), generator=gen).tolist()
                seqs[r] = piece
            elif kind == 1:  # wait
                piece = []
            else:  # continue with one token
                piece = [int(torch.randint(3, 90, (1,), generator=gen))]
                seqs[r] = seqs[r] + piece
            pieces.append(piece)
            restart.append(kind == 0)
        width = max(1, max(map(len, pieces)))
        chunk = torch.zeros(B, width, dtype=torch.long)
        for r, piece in enumerate(pieces):
            chunk[r, : len(piece)] = torch.tensor(piece, dtype=torch.long)
        out = lm.feed(chunk, torch.tensor([len(p) for p in pieces]), torch.tensor(restart))
        for r in range(B):
            torch.testing.assert_close(out[r], next_logprobs(model, seqs[r]), atol=1e-5, rtol=0)
        assert torch.isfinite(torch.stack([layer.keys for layer in lm.cache.layers])).all()
    # columns no row can see are squeezed out: the cache stays near the longest live row
    assert lm.cache_len <= 2 * max(map(len, seqs)) + 64 + 5


def tiny_reward_model(tok, seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tok),
        n_positions=128,
        n_embd=32,
        n_layer=1,
        n_head=2,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
    )
    return GPT2ForSequenceClassification(config).eval()


@torch.no_grad()
def direct_score(model, tok, text):
    return float(model(torch.tensor([tok(text)["input_ids"]])).logits[0, 0])


@pytest.mark.parametrize("own_tokenizer", [False, True])
def test_reward_model_scores_last_token_and_retokenizes_when_tokenizers_differ(own_tokenizer):
    _, tok = build_tiny_model()
    # a reward tokenizer with a different vocabulary order forces re-tokenisation from text
    rm_tok = build_char_tokenizer("".join(reversed(build_char_tokenizer().convert_ids_to_tokens(list(range(3, 98))))))
    rm_tok = rm_tok if own_tokenizer else tok
    rm = tiny_reward_model(rm_tok)
    ref, _ = build_tiny_model(tok)
    env = TextGenEnv(
        tok, ref, rm, ["Good day", "Bad"], beta=0.0, max_new_tokens=3, reward_tokenizer=rm_tok, device="cpu"
    )
    assert env.core._score_ids == (not own_tokenizer)
    for prompt in ["Good day", "Bad"]:
        env.reset(options={"prompt": prompt})
        for ch in "ok":
            env.step(tok.convert_tokens_to_ids(ch))
        *_, info = env.step(tok.eos_token_id)
        assert info["score"] == pytest.approx(direct_score(rm, rm_tok, prompt + "ok"), abs=1e-5)


def test_reward_model_batches_padded_sequences_like_single_ones():
    _, tok = build_tiny_model()
    rm = RewardModel(tiny_reward_model(tok, seed=2), tok, device="cpu")
    texts = ["a", "hello world", "xyz"]
    scores = rm(texts, ["", "", "!"])
    expected = [direct_score(rm.model, tok, t) for t in ["a", "hello world", "xyz!"]]
    torch.testing.assert_close(scores, torch.tensor(expected), atol=1e-5, rtol=0)


def test_reward_model_needs_one_label():
    _, tok = build_tiny_model()
    config = GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, num_labels=3)
    with pytest.raises(ValueError, match="exactly one label"):
        RewardModel(GPT2ForSequenceClassification(config), tok, device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_vector_env_on_cuda_bf16_matches_cpu_float32():
    from rlhf_env import VectorTextGenEnv

    _, tok = build_tiny_model()
    ref, _ = build_tiny_model(tok)
    # One model object each: an env moves the model it is given to its device (in place).
    envs = [
        VectorTextGenEnv(tok, m, count_e, ["Hi there"], num_envs=4, beta=0.1, max_new_tokens=4, device=d, dtype=dt)
        for m, d, dt in [(ref, "cpu", None), (copy.deepcopy(ref), "cuda", torch.bfloat16)]
    ]
    outs = []
    for env in envs:
        env.reset(seed=0)
        act = {"token": torch.tensor([5, 6, 7, 8]), "logprob": torch.full((4,), -2.0)}
        outs.append(env.step(act)[4]["ref_logprob"])
    torch.testing.assert_close(torch.tensor(outs[1]), torch.tensor(outs[0]), atol=0.1, rtol=0.05)
