"""Best-of-n sampling against a reward: the training-free reference curve of RLHF.

Draw n completions per prompt from the base model, keep the one the proxy reward scores
highest. Its KL to the base model has a closed form (Stiennon et al. 2020; Gao et al. 2022):

    KL(π_bon ‖ π_ref) = log n − (n − 1) / n

(docs/maths.md §23). Reported for n = 1, 2, 4, ... up to ``n_max``: the gold and proxy rewards of
the chosen samples, against that KL, next to the trained policies' (gold, proxy, KL) points.
Each n uses the first n of the same ``n_max`` samples per prompt, so the curve is nested.
"""

from __future__ import annotations

import math

import torch

from algorithms import metrics as M


def best_of_n_kl(n: int) -> float:
    """log n − (n − 1)/n, the KL of best-of-n sampling to the sampling distribution (nats)."""
    if n < 1:
        raise ValueError(f"best-of-n needs n >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def powers_of_two(n_max: int) -> list[int]:
    """1, 2, 4, ... up to ``n_max`` (which must be a power of two)."""
    if n_max < 1 or n_max & (n_max - 1):
        raise ValueError(f"best-of-n n_max must be a power of two >= 1, got {n_max}")
    return [2**k for k in range(n_max.bit_length())]


def best_of_n(proxy: torch.Tensor, gold: torch.Tensor, ns: list[int]) -> list[dict[str, float]]:
    """The best-of-n curve from scored samples (a pure function).

    Args:
        proxy, gold: (P, N) rewards of N samples for each of P prompts.
        ns: the n to report, each <= N; n uses samples ``[:n]`` of every prompt.
    Returns:
        per n: ``{"n", objective/kl_best_of_n, reward/gold, reward/proxy}``, the means over
        prompts of the gold and proxy of the sample with the highest proxy (the first on ties).
    """
    if proxy.shape != gold.shape or proxy.dim() != 2:
        raise ValueError(
            f"proxy and gold must both be (prompts, samples), got {tuple(proxy.shape)}, {tuple(gold.shape)}"
        )
    out = []
    for n in ns:
        if not 1 <= n <= proxy.shape[1]:
            raise ValueError(f"n = {n} but there are {proxy.shape[1]} samples per prompt")
        pick = proxy[:, :n].argmax(dim=1, keepdim=True)  # (P, 1)
        out.append(
            {
                "n": n,
                M.OBJECTIVE_KL_BEST_OF_N: best_of_n_kl(n),
                M.REWARD_GOLD: gold.gather(1, pick).double().mean().item(),
                M.REWARD_PROXY: proxy.gather(1, pick).double().mean().item(),
            }
        )
    return out


@torch.no_grad()
def evaluate_best_of_n(
    task, model, tokenizer, reward, prompts: list[str], n_max: int, *, seed: int = 0, chunk: int = 1024
) -> list[dict[str, float]]:
    """Sample ``n_max`` completions of each prompt from ``model``, score them with the gold and ``reward``
    (the proxy; None: the gold), and return ``best_of_n`` for n = 1, 2, 4, ..., ``n_max``."""
    from algorithms.loop import proxy_scores
    from rlhf_env.rollout import complete

    ns = powers_of_two(n_max)
    rows = [p for p in prompts for _ in range(n_max)]  # prompt-major: row i*n_max + j is sample j of prompt i
    completions: list[str] = []
    for s in range(0, len(rows), chunk):
        completions += complete(model, tokenizer, rows[s : s + chunk], task.max_new_tokens, seed=seed + s)
    gold = torch.tensor(task.gold_reward(rows, completions), dtype=torch.float32)
    if reward is None:
        proxy = gold
    else:
        parts = [
            proxy_scores(reward, rows[s : s + chunk], completions[s : s + chunk]) for s in range(0, len(rows), chunk)
        ]
        proxy = torch.cat(parts)
    shape = (len(prompts), n_max)
    return best_of_n(proxy.reshape(shape), gold.reshape(shape), ns)
