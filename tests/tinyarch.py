"""Tiny random-init checkpoints of the architectures users bring, on the tokenizers they ship.

Two layers, small dims, and a large init std (``INIT_STD``): positions, masks and windows
then move log-probs by far more than the tests' tolerance, so a mistake cannot hide in
near-uniform predictions (``tests/test_architectures.py`` checks that it moves them).
"""

from __future__ import annotations

import functools
import tempfile

import torch
import transformers

from rlhf_env.models import load_tokenizer
from rlhf_env.tiny import build_bpe_tokenizer

WINDOW = 4  # sliding window, shorter than every prompt ∘ completion of the tests
INIT_STD = 0.35
PADDED_VOCAB = 37  # extra embedding rows of the "qwen" models (Qwen pads its vocabulary)

# architecture -> what it exercises
ARCHITECTURES = {
    "gpt2": "learned absolute positions",
    "llama": "rotary, grouped-query attention",
    "qwen2": "grouped-query attention, q/k/v biases",
    "qwen3": "grouped-query attention, q/k norms",
    "mistral": f"sliding window {WINDOW} on every layer",
    "gemma2": f"eager attention, soft-capping, sliding ({WINDOW}) and full layers alternating",
    "gemma3": f"sliding ({WINDOW}, local rope) and full layers alternating",
    "phi3": f"partial rotary, fused qkv, sliding window {WINDOW}",
    "gpt_neox": "partial rotary (25%)",
    "opt": "learned positions with offset 2",
}
# tokenizer kind -> how the real ones ship
TOKENIZERS = {
    "gpt2": "no pad token, EOS doubles as BOS, nothing added",
    "llama": "BOS added to every text, no pad token",
    "qwen": f"pad = EOS, model embedding {PADDED_VOCAB} rows larger than the tokenizer",
}


@functools.cache
def tokenizer(kind: str):
    if kind == "gpt2":
        return build_bpe_tokenizer()
    if kind == "llama":
        return build_bpe_tokenizer(bos="<s>", eos="</s>")
    if kind == "qwen":
        return build_bpe_tokenizer(pad="<|endoftext|>")
    raise KeyError(kind)


@functools.cache
def loaded_tokenizer(arch: str, tok_kind: str):
    """``tokenizer(tok_kind)`` as transformers loads it from an ``arch`` directory.

    Not always the same: for a qwen2 directory transformers 5 picks its Qwen2 tokenizer
    class, which adds ``<|endoftext|>`` when the tokenizer lacks it.
    """
    with tempfile.TemporaryDirectory() as d:
        _config(arch, tok_kind, len(tokenizer(tok_kind))).save_pretrained(d)
        tokenizer(tok_kind).save_pretrained(d)
        return load_tokenizer(d)


def config(arch: str, tok_kind: str):
    """The ``arch`` config sized to the tokenizer it loads with (``PADDED_VOCAB`` more rows for "qwen")."""
    return _config(arch, tok_kind, len(loaded_tokenizer(arch, tok_kind)) + (PADDED_VOCAB if tok_kind == "qwen" else 0))


def _config(arch: str, tok_kind: str, vocab: int):
    tok = tokenizer(tok_kind)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    common = dict(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        initializer_range=INIT_STD,
        **ids,
    )
    gqa = {"num_key_value_heads": 2}
    window = {"sliding_window": WINDOW}
    alternating = dict(layer_types=["sliding_attention", "full_attention"], head_dim=8, **window, **gqa)
    t = transformers
    if arch == "gpt2":
        return t.GPT2Config(
            vocab_size=vocab, n_positions=128, n_embd=32, n_layer=2, n_head=4, initializer_range=INIT_STD, **ids
        )
    if arch == "llama":
        return t.LlamaConfig(**common, **gqa)
    if arch == "qwen2":
        return t.Qwen2Config(**common, **gqa)
    if arch == "qwen3":
        return t.Qwen3Config(**common, head_dim=8, **gqa)
    if arch == "mistral":
        return t.MistralConfig(**common, **gqa, **window)
    if arch == "gemma2":
        return t.Gemma2Config(**common, **alternating)
    if arch == "gemma3":
        return t.Gemma3TextConfig(**common, **alternating)
    if arch == "phi3":
        return t.Phi3Config(**common, partial_rotary_factor=0.5, **window)
    if arch == "gpt_neox":
        return t.GPTNeoXConfig(**common, rotary_pct=0.25)
    if arch == "opt":
        return t.OPTConfig(
            vocab_size=vocab,
            hidden_size=32,
            num_hidden_layers=2,
            ffn_dim=64,
            num_attention_heads=4,
            max_position_embeddings=128,
            word_embed_proj_dim=32,
            init_std=INIT_STD,
            **ids,
        )
    raise KeyError(arch)


def build(arch: str, tok_kind: str, seed: int = 0):
    """A random-init float32 causal LM of ``arch`` for ``tokenizer(tok_kind)``, in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config(arch, tok_kind))
    return model.eval()
