"""Tiny offline models: a GPT-2-shaped causal LM, a character-level tokenizer, and
byte-level BPE tokenizers shaped like the ones real checkpoints ship.

Everything here is built from code, so tests and the embedded default never touch a
model hub. The pair round-trips through ``save_pretrained``/``from_pretrained`` like any
Hugging Face checkpoint (weights as safetensors, tokenizer as ``tokenizer.json``).
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from rlhf_env.models import save_pretrained
from rlhf_env.prompts import DEFAULT_PROMPTS

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
# Printable ASCII without the rarely useful control whitespace.
DEFAULT_CHARS = "".join(c for c in string.printable if c not in "\t\n\r\x0b\x0c")


def build_char_tokenizer(chars: str = DEFAULT_CHARS) -> PreTrainedTokenizerFast:
    """One token per character of ``chars`` plus ``<pad>``, ``<eos>`` and ``<unk>``.

    ``<eos>`` doubles as the BOS token, as in GPT-2. Decoding concatenates characters.
    """
    specials = [PAD, EOS, UNK]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in dict.fromkeys(chars):  # de-duplicate, keep order
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        eos_token=EOS,
        bos_token=EOS,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
    )


def build_bpe_tokenizer(
    texts: list[str] | None = None,
    *,
    vocab_size: int = 300,
    eos: str = "<|endoftext|>",
    bos: str | None = None,
    pad: str | None = None,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts`` (default: the embedded prompts).

    Byte-level, so any text encodes. Specials come first: ``eos``, then ``bos`` and ``pad``
    when given. The shapes real checkpoints ship:

    - GPT-2: ``bos=None, pad=None``: no pad token, ``<|endoftext|>`` is both BOS and EOS and
      nothing is added to the text;
    - Llama: ``bos="<s>", eos="</s>"``: BOS prepended to every encoded text, no pad token;
    - Qwen: ``pad=eos``: the pad token is EOS.
    """
    specials = list(dict.fromkeys(t for t in (eos, bos, pad) if t is not None))
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts or list(DEFAULT_PROMPTS), trainer=trainer)
    if bos is not None:
        core.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, core.token_to_id(bos))]
        )
    else:
        core.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=eos,
        bos_token=bos if bos is not None else eos,
        pad_token=pad,
        clean_up_tokenization_spaces=False,
    )


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast | None = None,
    *,
    n_layer: int = 2,
    n_head: int = 2,
    n_embd: int = 64,
    n_positions: int = 256,
    seed: int = 0,
) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast]:
    """A randomly initialised GPT-2-shaped causal LM sized to ``tokenizer``.

    Returns ``(model, tokenizer)``; the model is in eval mode, float32, on the CPU.
    """
    tokenizer = tokenizer or build_char_tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def save_tiny(model, tokenizer, path: str | Path) -> Path:
    """Save a model/tokenizer pair as a local Hugging Face checkpoint (safetensors)."""
    return save_pretrained(model, tokenizer, path)


# ChatML, as SmolLM2 and Qwen ship it (without a default system turn): a user turn, then the
# assistant's header when ``add_generation_prompt``; each turn ends with ``<|im_end|>``.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def add_chatml_template(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """``tokenizer`` given ``CHATML_TEMPLATE`` and its ``<|im_start|>``/``<|im_end|>`` special tokens
    (appended to the vocabulary; the EOS stays what it was, so ``<|im_end|>`` is a second stop id)."""
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer
