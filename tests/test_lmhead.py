"""Log-probs a chunk of tokens at a time from the hidden states (``rlhf_env.lmhead``): equal to the plain
forward's, values and gradients, on every architecture of the matrix; fallbacks; a lower peak."""

from __future__ import annotations

import pytest
import torch
from tinyarch import ARCHITECTURES, build, loaded_tokenizer
from transformers import GPT2Config, GPT2LMHeadModel

from rlhf_env import lmhead
from rlhf_env.algorithms.run.memory import PeakMeter
from rlhf_env.algorithms.zoo.ppo import logprobs_and_values
from rlhf_env.kvcache import IncrementalLM
from rlhf_env.packing import packed_logprobs
from rlhf_env.scoring import next_token_logprobs

CHUNK = 5  # tokens per chunk when chunks are forced: several chunks per call


def force_chunks(monkeypatch, model, tokens: int | None):
    """``tokens`` per chunk (every call chunked), or None: one chunk never exceeded (the plain path)."""
    size = 10**12 if tokens is None else 4 * model.config.vocab_size * tokens
    monkeypatch.setattr(lmhead, "LOGPROB_CHUNK_BYTES", size)


def batch(vocab: int):
    """3 right-padded rows, rows 0 and 1 sharing a 4-token prompt, and their completion masks."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (3, 9), generator=g)
    ids[1, :4] = ids[0, :4]
    attn = torch.ones_like(ids)
    attn[2, 6:] = 0
    completion = torch.zeros(3, 8)
    completion[:2, 3:] = 1
    completion[2, 3:5] = 1
    return ids, attn, completion


def scored(model, vocab: int):
    """Padded and packed log-probs with the gradient of their sum (every parameter's, flattened)."""
    ids, attn, completion = batch(vocab)
    model.zero_grad()
    padded = next_token_logprobs(model, ids, attn, vocab)
    packed = packed_logprobs(model, ids, attn, completion, vocab)
    ((padded * attn[:, 1:]).sum() + packed.sum()).backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return padded * attn[:, 1:], packed, grads


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_chunked_logprobs_and_gradients_equal_the_plain_forward(arch, monkeypatch):
    model = build(arch, "qwen")  # the padded vocabulary: the chunks drop the extra logits too
    vocab = len(loaded_tokenizer(arch, "qwen"))
    force_chunks(monkeypatch, model, None)
    plain = scored(model, vocab)
    assert lmhead.chunked_head(model, 27) is None  # nothing chunked: the model's own forward
    force_chunks(monkeypatch, model, CHUNK)
    assert lmhead.output_head(model) is not None, f"{arch}: the probe refused it"
    chunked = scored(model, vocab)
    for a, b in zip(plain[:2], chunked[:2]):
        assert a.abs().max() > 1  # large log-probs (INIT_STD): a wrong position or head would show
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked[2], plain[2], atol=1e-5 * float(plain[2].abs().max()), rtol=1e-4)


def test_the_kv_cache_scores_a_chunk_in_chunks_as_in_one_piece(monkeypatch):
    model = build("llama", "llama")
    vocab = len(loaded_tokenizer("llama", "llama"))
    prompts = torch.tensor([[3, 4, 5, 6], [7, 8, 0, 0]])
    tokens = torch.tensor([[9, 10, 11, 12, 13], [14, 15, 16, 0, 0]])
    out = []
    for chunk in (None, 3):
        force_chunks(monkeypatch, model, chunk)
        lm = IncrementalLM(model, 2, vocab_size=vocab)
        lm.feed(prompts, torch.tensor([4, 2]), torch.tensor([True, True]))
        scores = lm.score(tokens, torch.tensor([5, 3]), torch.tensor([5, 2]))
        out.append((scores, lm.next_logprobs.clone()))
    torch.testing.assert_close(out[1][0], out[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1][1], out[0][1], atol=1e-5, rtol=1e-5)
    assert out[0][0][1, 3:].eq(0).all() and out[0][0][0].ne(0).all()


class DoubledLogits(GPT2LMHeadModel):
    """An architecture whose forward transforms the head's output in a way ``lmhead`` does not know."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2
        return out


def tiny_gpt2(cls=GPT2LMHeadModel, vocab: int = 50):
    torch.manual_seed(0)
    config = GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=vocab, n_positions=32, initializer_range=0.3)
    return cls(config).eval()


def test_models_the_chunks_cannot_reproduce_run_whole(monkeypatch):
    model = tiny_gpt2(DoubledLogits)
    force_chunks(monkeypatch, model, CHUNK)
    assert lmhead.output_head(model) is None  # the probe saw the doubled logits
    ids, attn, _ = batch(50)
    want = torch.log_softmax(model(input_ids=ids).logits[:, :-1], -1).gather(2, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(next_token_logprobs(model, ids, attn)[0], want[0], atol=1e-5, rtol=1e-5)
    # A forward replaced on the instance (LoRA's reference) or hooks on the root (FSDP2) are never split.
    wrapped = tiny_gpt2()
    wrapped.forward = wrapped.forward
    hooked = tiny_gpt2()
    hooked.register_forward_pre_hook(lambda module, args: None)
    assert lmhead.output_head(wrapped) is None and lmhead.output_head(hooked) is None
    assert lmhead.output_head(tiny_gpt2()) is not None


def test_chunks_lower_the_peak_of_a_training_forward_and_backward(monkeypatch):
    model = tiny_gpt2(vocab=4096)
    ids = torch.randint(0, 4096, (8, 32), generator=torch.Generator().manual_seed(1))
    peaks, grads = [], []
    for chunk in (None, 16):
        force_chunks(monkeypatch, model, chunk)
        model.zero_grad(set_to_none=True)
        meter = PeakMeter(torch.device("cpu"))
        meter.start()
        next_token_logprobs(model, ids, torch.ones_like(ids)).sum().backward()
        peaks.append(meter.stop())
        grads.append(model.transformer.wte.weight.grad.clone())
    # Plain: 8·31 positions × 4096 logits × 4 bytes = 3.9 MiB a copy, several alive at once; chunked:
    # 16 positions (0.25 MiB) a copy, plus the head's (4096, 16) weight gradient being built.
    assert peaks[1] < peaks[0] - 6, peaks
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-4)


def test_ppo_logprobs_and_values_in_chunks_equal_one_forward(monkeypatch):
    model = build("llama", "llama")
    value_head = torch.nn.Linear(model.config.hidden_size, 1)
    ids, attn, _ = batch(len(loaded_tokenizer("llama", "llama")))
    out = []
    for chunk in (None, CHUNK):
        force_chunks(monkeypatch, model, chunk)
        model.zero_grad()
        logp, values = logprobs_and_values(model, value_head, ids, attn)
        (logp.sum() + values.sum()).backward()
        out.append((logp, values, model.model.embed_tokens.weight.grad.clone()))
    for a, b in zip(*out):
        torch.testing.assert_close(b, a, atol=1e-5 * (1 + float(a.detach().abs().max())), rtol=1e-4)


def test_a_model_whose_head_was_probed_is_still_freed():
    """The probe's verdict is kept per model (weakly keyed): it must not keep the model alive, or every
    run in one process (a bench worker's cells) would hold on to its policy and reference."""
    import gc
    import weakref

    model = tiny_gpt2()
    accepted = lmhead.output_head(model) is not None  # probed and accepted: the verdict is stored
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert accepted and alive() is None
