"""The checks every action meets before an env applies it: a token in the vocabulary, a log-prob
that is one (finite, <= 0), and a log-prob at all when beta > 0. ``batch``: the ``EpisodeBatch``."""

from __future__ import annotations

import torch

from rlhf_env.errors import InvalidActionError


def check_action(batch, tokens: torch.Tensor, logprobs: torch.Tensor | None, rows: torch.Tensor) -> None:
    if not len(rows):
        return
    tok = tokens[rows]
    bad = ((tok < 0) | (tok >= batch.vocab_size)).nonzero().flatten()
    if len(bad):
        r = int(rows[bad[0]])
        raise InvalidActionError(f"token {int(tokens[r])} (env {r}) is outside the vocabulary [0, {batch.vocab_size})")
    if logprobs is None:
        if batch.beta > 0:
            raise InvalidActionError(
                f"beta={batch.beta} > 0 needs the acting policy's log-prob: pass "
                "{'token': t, 'logprob': lp} (a bare token is accepted only when beta == 0)"
            )
        return
    lp = logprobs[rows]
    bad = (torch.isnan(lp) | (lp > 0) | torch.isinf(lp)).nonzero().flatten()
    if len(bad):
        r = int(rows[bad[0]])
        raise InvalidActionError(
            f"log-prob {float(logprobs[r])} (env {r}) is not a log-probability: it must be finite and <= 0"
        )


def check_chunk(batch, tokens: torch.Tensor, logprobs: torch.Tensor | None, applied: torch.Tensor) -> None:
    """``check_action`` for the applied tokens of a chunk (ignored ones are not checked)."""
    bad = (applied & ((tokens < 0) | (tokens >= batch.vocab_size))).nonzero()
    if len(bad):
        r, j = bad[0].tolist()
        raise InvalidActionError(
            f"token {int(tokens[r, j])} (env {r}, position {j}) is outside the vocabulary [0, {batch.vocab_size})"
        )
    if logprobs is None:
        if batch.beta > 0 and bool(applied.any()):
            raise InvalidActionError(
                f"beta={batch.beta} > 0 needs the acting policy's log-probs: pass "
                "{'token': (B, K), 'logprob': (B, K)} (bare tokens are accepted only when beta == 0)"
            )
        return
    lp = logprobs
    bad = (applied & (torch.isnan(lp) | (lp > 0) | torch.isinf(lp))).nonzero()
    if len(bad):
        r, j = bad[0].tolist()
        raise InvalidActionError(
            f"log-prob {float(lp[r, j])} (env {r}, position {j}) is not a log-probability: it must be finite and <= 0"
        )
