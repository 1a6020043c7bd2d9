"""The models ``env_throughput.py`` times: tiny configs built offline (``build_models``) or a local
checkpoint (``load_models``), each as (reference, policy, reward model, tokenizer)."""

from __future__ import annotations

import copy
import os

import torch
from transformers import GPT2ForSequenceClassification

from rlhf_env import RewardModel, build_tiny_model
from rlhf_env.prompts import DEFAULT_PROMPTS
from rlhf_env.tiny import build_bpe_tokenizer


def offline_corpus(max_chars: int = 3_000_000) -> list[str]:
    """Text to train a BPE tokenizer on without a network: the Python standard library's
    sources (the same files on every machine with this Python), in sorted order."""
    root, texts, total = os.path.dirname(os.__file__), [], 0
    for name in sorted(os.listdir(root)):
        if name.endswith(".py") and total < max_chars:
            with open(os.path.join(root, name), encoding="utf-8", errors="replace") as f:
                texts.append(f.read())
            total += len(texts[-1])
    return texts + list(DEFAULT_PROMPTS)


def build_models(shape: dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Reference LM, policy (a deep copy of it, as at the start of RLHF), reward model, tokenizer."""
    shape = dict(shape)
    tokenizer = None
    if "bpe_vocab" in shape:
        tokenizer = build_bpe_tokenizer(offline_corpus(), vocab_size=shape.pop("bpe_vocab"), pad="<pad>")
    ref, tokenizer = build_tiny_model(tokenizer, seed=seed, **shape)
    ref = ref.to(device=device, dtype=dtype)
    policy = copy.deepcopy(ref)
    rm_config = copy.deepcopy(ref.config)
    rm_config.num_labels = 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        rm = GPT2ForSequenceClassification(rm_config).eval()
    reward = RewardModel(rm, tokenizer, device=device, dtype=dtype)
    return ref, policy, reward, tokenizer


def load_models(path: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """``build_models`` for a local checkpoint: reference and policy loaded from ``path``, the
    reward model the same trunk under a seeded random one-label head."""
    from transformers import AutoModelForSequenceClassification

    from rlhf_env.models import load_pretrained, local_model_dir

    ref, tokenizer = load_pretrained(local_model_dir(path), device, dtype)
    policy = copy.deepcopy(ref)
    rm_config = copy.deepcopy(ref.config)
    rm_config.num_labels = 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        rm = AutoModelForSequenceClassification.from_config(rm_config)
    # The trunk's weights (same prefix in both classes); only the score head stays random.
    missing, _ = rm.load_state_dict(ref.state_dict(), strict=False)
    if any(not k.startswith("score") for k in missing):
        raise ValueError(f"{path}: the reward trunk did not take the checkpoint's weights (missing {missing[:3]})")
    reward = RewardModel(rm.eval(), tokenizer, device=device, dtype=dtype)
    return ref, policy, reward, tokenizer
