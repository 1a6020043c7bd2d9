"""Scoring many completions in few rows: a prompt run once for all its completions, rows packed.

Training forwards spend most of their time on tokens, so ``branch_logprobs`` runs each
prompt once however many of its completions are scored, and fills a row with several such
trees instead of padding: a row is ``tree 1 ∘ tree 2 ∘ … ∘ padding``, a tree is
``prompt ∘ branch 1 ∘ branch 2 ∘ …``. Each branch sits at the positions it would have right
after its prompt and attends to that prompt and to itself only (an explicit 4-D mask), so
its log-probs are those of the row ``prompt ∘ branch`` alone (``next_token_logprobs``), up
to float rounding. DPO scores a pair as one tree (chosen and rejected share the prompt);
the online trainers score a minibatch's rollouts through ``packed_logprobs``.
"""

from __future__ import annotations

import torch

from rlhf_env.scoring import next_token_logprobs, token_logprobs


def shares_prompts(model) -> bool:
    """Whether ``branch_logprobs`` can run ``model``: explicit 4-D masks and ``position_ids``
    (the conditions of ``kvcache.layer_windows``)."""
    from rlhf_env.kvcache import UnsupportedModelError, layer_windows

    try:
        layer_windows(model)
    except UnsupportedModelError:
        return False
    return True


def branch_logprobs(
    model,
    input_ids: torch.Tensor,
    segments: torch.Tensor,
    vocab_size: int | None = None,
    trees: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log-probs of the branch tokens of packed rows, each prompt run once.

    Args:
        input_ids: (B, W) int64.
        segments: (B, W) int64: 0 on a tree's prompt (at least one token, first in its tree),
            k >= 1 on its branch k (contiguous), -1 on padding (at the end of the row).
        vocab_size: see ``token_logprobs``.
        trees: (B, W) int64 tree of each column (contiguous, -1 on padding); None: one tree a row.
    Returns:
        (B, W) float32: at a branch column, log p(token | its prompt, its branch before it); 0 elsewhere.
        Logits larger than one chunk are computed at the branch columns' predictors only, a
        chunk at a time (``rlhf_env.lmhead``).
    """
    from rlhf_env.fastgen import attention_masks
    from rlhf_env.kvcache import layer_windows
    from rlhf_env.lmhead import chunked_head

    B, W = input_ids.shape
    cols = torch.arange(W, device=input_ids.device)[None, :].expand(B, -1)
    real, prompt, branch = segments >= 0, segments == 0, segments > 0
    if trees is None:
        trees = torch.where(real, 0, -1)
    edge = torch.full_like(segments[:, :1], -2)
    new_tree = real & (trees != torch.cat([edge, trees[:, :-1]], 1))
    tree_start = torch.where(new_tree, cols, 0).cummax(1).values
    starts = branch & (new_tree | (segments != torch.cat([edge, segments[:, :-1]], 1)))  # branches' first columns
    start_col = torch.where(starts, cols, 0).cummax(1).values
    # A tree's prompt precedes its branches: at a branch column, the prompt columns counted
    # since the tree began are its prompt's length P.
    seen = prompt.long().cumsum(1)
    before = torch.where(tree_start > 0, seen.gather(1, (tree_start - 1).clamp(min=0)), 0)
    P = seen - before
    positions = torch.where(branch, P + cols - start_col, torch.where(prompt, cols - tree_start, 0))
    key_seg, query_seg = segments[:, None, :], segments[:, :, None]
    related = (trees[:, None, :] == trees[:, :, None]) & ((key_seg == 0) | (key_seg == query_seg))
    # Padding queries see column 0 only (a query with no allowed key would be NaN).
    related = related | ((query_seg < 0) & (cols[:, None, :] == 0))
    kernel = model.config._attn_implementation
    mask = attention_masks(layer_windows(model), real, positions, positions, kernel, model.dtype, related)
    forward = {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions, "use_cache": False}
    # Column c predicts column c + 1, except a branch's first token when the column before is
    # not its prompt's last: those few are predicted by that prompt's last column.
    after_other = starts & (cols != tree_start + P)
    head = chunked_head(model, B * W)
    if head is not None:  # large vocabularies: the head at the branch tokens' predictors only, in chunks
        rows, at = torch.nonzero(branch, as_tuple=True)
        predictor = torch.where(after_other, tree_start + P - 1, cols - 1)[rows, at]
        lp = head.logprobs(head.hidden(**forward)[rows, predictor], input_ids[rows, at], vocab_size)
        return torch.zeros(B, W, dtype=torch.float32, device=input_ids.device).index_put((rows, at), lp)
    logits = model(**forward).logits
    logp = torch.cat(
        [
            torch.zeros_like(logits[:, :1, 0], dtype=torch.float32),
            token_logprobs(logits[:, :-1], input_ids[:, 1:], vocab_size),
        ],
        1,
    )
    rows, at = torch.nonzero(after_other, as_tuple=True)
    if len(rows):
        last = tree_start[rows, at] + P[rows, at] - 1
        logp = logp.index_put((rows, at), token_logprobs(logits[rows, last], input_ids[rows, at], vocab_size))
    return logp * branch


def pack_trees(trees: list[tuple[list[int], list[list[int]]]], capacity: int, pad_token_id: int):
    """Pack ``(prompt, [branch, …])`` trees into rows of at most ``capacity`` columns.

    A tree longer than ``capacity`` is split into trees of the same prompt (one branch at
    least each); rows are filled first-fit, longest tree first.

    Returns:
        ``(input_ids, segments, tree_ids, places)``: (R, W) tensors for ``branch_logprobs``,
        and for each input tree, for each branch, ``(row, first column)`` of its tokens.
    """
    pieces = []  # (length, tree index, prompt, [(branch index, tokens)])
    for t, (prompt, branches) in enumerate(trees):
        part, length = [], len(prompt)
        for k, ids in enumerate(branches):
            if part and length + len(ids) > capacity:
                pieces.append((length, t, prompt, part))
                part, length = [], len(prompt)
            part.append((k, ids))
            length += len(ids)
        if part:
            pieces.append((length, t, prompt, part))
    pieces.sort(key=lambda p: -p[0])
    rows: list[list] = []  # [used, [pieces]]
    for piece in pieces:
        for row in rows:
            if row[0] + piece[0] <= capacity:
                row[0] += piece[0]
                row[1].append(piece)
                break
        else:
            rows.append([piece[0], [piece]])
    W = max(r[0] for r in rows)
    flat_rows, seg_rows, tree_rows = [], [], []
    places: list[list] = [[None] * len(b) for _, b in trees]
    for r, (_, row) in enumerate(rows):
        flat, seg, tid = [], [], []
        for n, (_, t, prompt, part) in enumerate(row):
            flat += prompt
            seg += [0] * len(prompt)
            for j, (k, tokens) in enumerate(part):
                places[t][k] = (r, len(flat))
                flat += tokens
                seg += [j + 1] * len(tokens)
            tid += [n] * (len(seg) - len(tid))
        pad = W - len(flat)
        flat_rows.append(flat + [pad_token_id] * pad)
        seg_rows.append(seg + [-1] * pad)
        tree_rows.append(tid + [-1] * pad)
    ids, segments, tree_ids = (torch.tensor(x, dtype=torch.long) for x in (flat_rows, seg_rows, tree_rows))
    return ids, segments, tree_ids, places


def packed_logprobs(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor, vocab_size=None
) -> torch.Tensor:
    """``next_token_logprobs`` at the completion positions of right-padded rows, rows that share
    a prompt scored as one tree and trees packed into rows twice as long as the longest.

    Args:
        input_ids, attention_mask: (B, T) right-padded prompt ∘ completion rows.
        completion_mask: (B, T-1), 1 where token t+1 is a completion token the policy sampled (a
            multi-turn row's injected tokens are 0: holes inside the span scored from its first to its last 1).
    Returns:
        (B, T-1) float32: entry t is log p(input_ids[:, t+1] | input_ids[:, :t+1]) where
        ``completion_mask`` is 1, 0 elsewhere. Models ``shares_prompts`` refuses, or rows
        without completion tokens, take ``next_token_logprobs`` instead.
    """
    B, T = input_ids.shape
    mask = completion_mask.bool()
    counts = mask.sum(1)
    if not shares_prompts(model) or not bool((counts > 0).all()):
        width = int(attention_mask.sum(1).max())
        logp = next_token_logprobs(model, input_ids[:, :width], attention_mask[:, :width], vocab_size)
        return torch.nn.functional.pad(logp, (0, T - width)) * completion_mask
    starts = (mask.to(torch.int8).argmax(1) + 1).tolist()  # each row's first completion token
    # one past its last: a multi-turn row's injected spans inside are scored and masked out below
    ends = (T - mask.flip(1).to(torch.int8).argmax(1)).tolist()
    rows = input_ids.tolist()
    groups: dict[tuple, list[int]] = {}
    for r in range(B):
        groups.setdefault(tuple(rows[r][: starts[r]]), []).append(r)
    trees = [(list(prompt), [rows[r][starts[r] : ends[r]] for r in members]) for prompt, members in groups.items()]
    ids, segments, tree_ids, places = pack_trees(trees, 2 * max(ends), 0)
    device = input_ids.device
    lp = branch_logprobs(model, ids.to(device), segments.to(device), vocab_size, tree_ids.to(device))
    src, dst = [], []
    for members, where in zip(groups.values(), places):
        for r, (row, col) in zip(members, where):
            n = ends[r] - starts[r]
            src += range(row * ids.shape[1] + col, row * ids.shape[1] + col + n)
            dst += range(r * (T - 1) + starts[r] - 1, r * (T - 1) + ends[r] - 1)
    src_t, dst_t = torch.tensor(src, device=device), torch.tensor(dst, device=device)
    out = torch.zeros(B * (T - 1), dtype=lp.dtype, device=device).index_put((dst_t,), lp.flatten()[src_t])
    return out.view(B, T - 1) * completion_mask
