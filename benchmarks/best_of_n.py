"""Best-of-n sampling against a reward: the training-free reference curve of RLHF.

Draw n completions per prompt from the base model, keep the one the proxy reward scores
highest. Its KL to the base model has a closed form (Stiennon et al. 2020; Gao et al. 2022):

    KL(π_bon ‖ π_ref) = log n − (n − 1) / n

(docs/maths.md §23). Reported for n = 1, 2, 4, ... up to ``n_max``: the gold and proxy rewards of
the chosen samples, against that KL, next to the trained policies' (gold, proxy, KL) points.
Every n is estimated from the same ``n_max`` samples per prompt, without bias (``best_of_n``).
"""

from __future__ import annotations

import math

import torch

from rlhf_env.algorithms.run import metrics as M
from rlhf_env.errors import SettingError
from rlhf_env.generation import DEFAULT_GENERATOR


def best_of_n_kl(n: int) -> float:
    """log n − (n − 1)/n, the KL of best-of-n sampling to the sampling distribution (nats)."""
    if n < 1:
        raise SettingError(f"best-of-n needs n >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def powers_of_two(n_max: int) -> list[int]:
    """1, 2, 4, ... up to ``n_max`` (which must be a power of two)."""
    if n_max < 1 or n_max & (n_max - 1):
        raise SettingError(f"best-of-n n_max must be a power of two >= 1, got {n_max}")
    return [2**k for k in range(n_max.bit_length())]


def best_of_n(proxy: torch.Tensor, gold: torch.Tensor, ns: list[int]) -> list[dict[str, float]]:
    """The best-of-n curve from scored samples (a pure function).

    For each n, the expected gold and proxy of the highest-proxy sample of n drawn without
    replacement from a prompt's N samples: with the samples sorted by proxy (ascending; ties keep
    sample order), rank i is the best of a random n-subset with probability C(i−1, n−1)/C(N, n)
    (the unbiased estimator of Nakano et al. 2021; n = 1 is the plain mean, n = N the maximum).

    Args:
        proxy, gold: (P, N) rewards of N samples for each of P prompts.
        ns: the n to report, each <= N.
    Returns:
        per n: ``{"n", objective/kl_best_of_n, reward/gold, reward/proxy}``, means over prompts.
    """
    if proxy.shape != gold.shape or proxy.dim() != 2:
        raise ValueError(
            f"proxy and gold must both be (prompts, samples), got {tuple(proxy.shape)}, {tuple(gold.shape)}"
        )
    N = proxy.shape[1]
    order = torch.sort(proxy, dim=1, stable=True).indices
    r, g = proxy.gather(1, order).double(), gold.gather(1, order).double()  # (P, N), ascending proxy
    below = torch.arange(N, dtype=torch.float64)  # i − 1 for ranks i = 1..N
    out = []
    for n in ns:
        if not 1 <= n <= N:
            raise ValueError(f"n = {n} but there are {N} samples per prompt")
        # log C(i−1, n−1) − log C(N, n), zero weight where i − 1 < n − 1
        log_w = _log_comb(below, n - 1) - _log_comb(torch.tensor(float(N), dtype=torch.float64), n)
        w = torch.where(below >= n - 1, log_w.exp(), torch.zeros_like(below))  # (N,), sums to 1
        out.append(
            {
                "n": n,
                M.OBJECTIVE_KL_BEST_OF_N: best_of_n_kl(n),
                M.REWARD_GOLD: (g @ w).mean().item(),
                M.REWARD_PROXY: (r @ w).mean().item(),
            }
        )
    return out


def _log_comb(a: torch.Tensor, k: int) -> torch.Tensor:
    """log C(a, k) elementwise for a >= k (other entries are not used)."""
    a = a.clamp(min=k)
    return torch.lgamma(a + 1) - math.lgamma(k + 1) - torch.lgamma(a - k + 1)


@torch.no_grad()
def evaluate_best_of_n(
    task,
    model,
    tokenizer,
    reward,
    prompts: list[str],
    n_max: int,
    *,
    seed: int = 0,
    chunk: int = 1024,
    chat_template: str = "auto",
    generator: str = DEFAULT_GENERATOR,
) -> list[dict[str, float]]:
    """Sample ``n_max`` completions of each prompt from ``model`` (by the registered ``generator``), score them with the gold and ``reward``
    (the proxy; None: the gold), and return ``best_of_n`` for n = 1, 2, 4, ..., ``n_max``."""
    from rlhf_env.algorithms.run.loop import proxy_scores
    from rlhf_env.rollout import complete

    ns = powers_of_two(n_max)
    rows = [p for p in prompts for _ in range(n_max)]  # prompt-major: row i*n_max + j is sample j of prompt i
    completions: list[str] = []
    for s in range(0, len(rows), chunk):
        part = rows[s : s + chunk]
        completions += complete(
            model, tokenizer, part, task.max_new_tokens, seed=seed + s, chat_template=chat_template, generator=generator
        )
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
