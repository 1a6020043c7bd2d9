"""Packed scoring: a prompt run once for all its completions, rows filled with several trees.

Every packed log-prob and gradient must equal those of one right-padded row per completion
(``next_token_logprobs``), within float rounding, on a model with learned positions and on
one with rotary positions and a sliding window shorter than the rows.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tinyarch import build
from tinyparts import tiny_pair

from rlhf_env.algorithms.base import TrainContext
from rlhf_env.algorithms.zoo import dpo
from rlhf_env.packing import branch_logprobs, pack_trees, packed_logprobs, shares_prompts
from rlhf_env.scoring import next_token_logprobs, pad_batch
from rlhf_env.tasks.base import Task

PAD = 0


def test_pack_trees_splits_long_trees_and_fills_rows_longest_first():
    trees = [([1, 2], [[3], [4, 5]]), ([6], [[7, 8, 9]])]
    ids, segments, tree_ids, places = pack_trees(trees, capacity=4, pad_token_id=PAD)
    # Tree 0 (2 + 1 + 2 = 5 columns) does not fit 4: it becomes [1, 2 | 3] and [1, 2 | 4, 5].
    # Longest first: [1 2 4 5] and [6 7 8 9] fill a row each; [1 2 3] takes the third.
    assert ids.tolist() == [[1, 2, 4, 5], [6, 7, 8, 9], [1, 2, 3, PAD]]
    assert segments.tolist() == [[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 1, -1]]
    assert tree_ids.tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, -1]]
    assert places == [[(2, 2), (0, 2)], [(1, 1)]]
    # Room for both trees in one row: tree 1 follows tree 0, its own tree id.
    ids, segments, tree_ids, places = pack_trees(trees, capacity=9, pad_token_id=PAD)
    assert ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9]]
    assert segments.tolist() == [[0, 0, 1, 2, 2, 0, 1, 1, 1]]
    assert tree_ids.tolist() == [[0, 0, 0, 0, 0, 1, 1, 1, 1]]
    assert places == [[(0, 2), (0, 3)], [(0, 6)]]


def completion_rows(seed: int, prompts: int, rows: int, vocab: int):
    """Right-padded rows: ``rows`` completions of ``prompts`` prompts (in turn), and their completion mask."""
    g = torch.Generator().manual_seed(seed)
    heads = [
        torch.randint(1, vocab, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g) for _ in range(prompts)
    ]
    seqs, starts = [], []
    for r in range(rows):
        tail = torch.randint(1, vocab, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g)
        seqs.append(heads[r % prompts].tolist() + tail.tolist())
        starts.append(len(heads[r % prompts]))
    ids, attn = pad_batch(seqs, PAD)
    mask = torch.zeros(rows, ids.shape[1] - 1)
    for r, (seq, start) in enumerate(zip(seqs, starts)):
        mask[r, start - 1 : len(seq) - 1] = 1
    return ids, attn, mask


def logprobs_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    logp = fn()
    weights = torch.linspace(0.1, 1.0, logp.shape[-1])  # every token's gradient counts, differently
    (logp * weights).sum().backward()
    return logp.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("arch", ["gpt2", "mistral"])  # learned positions; rotary with a window of 4
@pytest.mark.parametrize("prompts, rows", [(2, 12), (6, 9)])  # trees split across rows; two trees a row
def test_packed_rows_equal_one_padded_row_per_completion(arch, prompts, rows):
    model = build(arch, "gpt2")
    assert shares_prompts(model)
    ids, attn, mask = completion_rows(0, prompts=prompts, rows=rows, vocab=60)
    want, want_grads = logprobs_and_grads(model, lambda: next_token_logprobs(model, ids, attn, 60) * mask)
    got, got_grads = logprobs_and_grads(model, lambda: packed_logprobs(model, ids, attn, mask, 60))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def test_a_model_without_position_ids_is_scored_row_by_row():
    _, model, _ = tiny_pair()

    class NoPositions(torch.nn.Module):  # what shares_prompts refuses: no position_ids argument
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, input_ids=None, attention_mask=None, use_cache=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)

    wrapped = NoPositions(model)
    assert not shares_prompts(wrapped)
    ids, attn, mask = completion_rows(1, prompts=2, rows=4, vocab=20)
    with torch.no_grad():
        torch.testing.assert_close(
            packed_logprobs(wrapped, ids, attn, mask), next_token_logprobs(model, ids, attn) * mask, atol=0, rtol=0
        )


def test_a_later_branch_is_predicted_from_its_prompt_not_the_branch_before():
    _, model, tok = tiny_pair()
    prompt, a, b = tok("abc")["input_ids"], tok("xy", add_special_tokens=False)["input_ids"], [tok.eos_token_id]
    ids = torch.tensor([prompt + a + b])
    segments = torch.tensor([[0] * len(prompt) + [1] * len(a) + [2]])
    with torch.no_grad():
        lp = branch_logprobs(model, ids, segments)
        alone = next_token_logprobs(model, torch.tensor([prompt + b]), torch.ones(1, len(prompt) + 1, dtype=torch.long))
    assert lp[0, : len(prompt)].abs().sum() == 0  # prompt columns score nothing
    assert lp[0, -1].item() == pytest.approx(alone[0, -1].item(), abs=1e-5)  # EOS right after "abc"


def test_dpo_pair_rows_give_the_loss_and_gradients_of_separate_rows():
    _, ref, tok = tiny_pair()
    task = Task("tiny", ["ab", "cd", "ef", "gh"], ["ij"], lambda p, c: [0.0] * len(c), [("ab", "e")], max_new_tokens=4)
    policy, _, _ = tiny_pair(policy_seed=3)
    ctx = TrainContext(task, policy, ref, tok, torch.device("cpu"), seed=0)
    shared = dpo.Trainer(ctx, dpo.Config(num_pairs=12, batch_size=6))
    plain = copy.copy(shared)
    plain.rows = None  # one padded row per completion
    assert shared.rows is not None
    index = torch.tensor([3, 0, 7, 11, 5, 2])
    results = []
    for trainer in (shared, plain):
        policy.zero_grad(set_to_none=True)
        c, r, length_c, length_r = trainer.pair_batch(policy, index)
        loss, _, _ = trainer.pair_loss(c, r, trainer.ref_chosen[index], trainer.ref_rejected[index], length_c, length_r)
        loss.backward()
        results.append((loss.detach(), length_c, length_r, [p.grad.clone() for p in policy.parameters()]))
    (loss_s, lc_s, lr_s, grads_s), (loss_p, lc_p, lr_p, grads_p) = results
    assert loss_s.item() == pytest.approx(loss_p.item(), abs=1e-6)
    assert lc_s.tolist() == lc_p.tolist() and lr_s.tolist() == lr_p.tolist()
    for g, w in zip(grads_s, grads_p):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
    # The reference log-probs, computed once through shared rows, are those of separate rows.
    with torch.no_grad():
        torch.testing.assert_close(
            torch.stack(plain.reference_logprobs(4)),
            torch.stack([shared.ref_chosen, shared.ref_rejected]),
            atol=1e-5,
            rtol=0,
        )
