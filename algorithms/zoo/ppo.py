"""PPO, RLHF style (Ouyang et al. 2022; Ziegler et al. 2019), with a value head on the policy.

One iteration:

1. ``num_envs`` episodes from the env. Its token rewards are already KL-shaped,
   ``r_t = −β (log π_old(y_t|s_t) − log π_ref(y_t|s_t))``, plus the score on the last token,
   with β = ``kl_coef`` (or the adaptive controller's β, see below).
2. One no-grad forward of the batch gives ``log π_old`` and ``V_old(s_t)`` at every action
   position; GAE gives ``Â_t = Σ_l (γλ)^l δ_{t+l}``, ``δ_t = r_t + γ V(s_{t+1}) − V(s_t)``
   with ``V = 0`` after the last token, and the value targets ``R̂_t = Â_t + V_old(s_t)``.
   ``Â`` is then whitened over the batch's completion tokens (``whiten_advantages``).
   ``log π_old`` is recomputed there rather than taken from sampling: the same weights, but
   the same full-sequence forward as training, so ρ starts at exactly 1.
3. ``ppo_epochs`` passes over ``num_minibatches`` shuffled minibatches, each one Adam step
   on ``policy_loss + vf_coef · value_loss`` (``−E[min(ρÂ, clip(ρ, 1−ε, 1+ε)Â)]`` and
   ``½ E[(V − R̂)²]``, clipped around ``V_old`` when ``clip_value`` is set).
4. With ``adaptive_kl``, β follows Ziegler et al.'s proportional controller towards
   ``target_kl`` (the sampled sequence KL) and is set on the env for the next rollout.

The value model is a scalar head, ``nn.Linear(hidden, 1)``, on the policy's own trunk: the
forward that gives the policy's log-probs also returns the last hidden state
(``output_hidden_states=True``), so one forward gives both ``log π_θ`` and ``V(s_t)``. A
separate value model (the tutorial's "same architecture as the reward model") would double
the trained weights, their Adam moments and the activations of every training forward;
the head costs ``hidden + 1`` parameters. The price is that the value gradient also moves
the shared trunk, which ``vf_coef`` keeps small. The head starts at zero (``V ≡ 0``, so the
first advantages are plain returns and the first value gradient leaves the trunk alone),
is trained by the same optimizer, and lives in the trainer's ``state_dict``: checkpoints
carry it with the optimizer and the KL controller's β, so a resumed run continues exactly.

The formulas, with their papers: docs/maths.md §2 (token reward), §4 (GAE), §5 (losses and
``policy/clipfrac``), §6 (the KL controller).

Coordinates: tensors are ``(B, L-1)`` "action" tensors (see ``RolloutBatch``); a row's
completion is a contiguous run of ``action_mask`` that starts after its prompt, not at
column 0. ``core.gae`` zeroes its running sum outside the mask and never bootstraps past
the run's last token, so it is exact on such runs (tested in ``tests/test_ppo.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from rlhf_env.algorithms.base import BatchShape, TrainContext, collect_rollouts, rollout_metrics
from rlhf_env.algorithms.maths import (
    clipped,
    clipped_surrogate,
    gae,
    kl_k3,
    masked_mean,
    masked_whiten,
)
from rlhf_env.algorithms.run import metrics as M
from rlhf_env.algorithms.run.plumbing import Means, Optimizer, Stateful, check_optimizer_settings, weighted_minibatches
from rlhf_env.errors import SettingError
from rlhf_env.lmhead import chunked_head
from rlhf_env.rollout import set_env_attr
from rlhf_env.scoring import token_logprobs


@dataclass
class Config:
    # On a checkpoint the user gives (--model): algorithms/run/presets.py
    PRETRAINED: ClassVar[dict] = {"lr": 1e-6}
    PRETRAINED_LORA: ClassVar[dict] = {"lr": 1e-5}
    num_envs: int = 64  # episodes per rollout
    num_minibatches: int = 4  # minibatches per epoch (rows, so at most num_envs)
    ppo_epochs: int = 4  # passes over each rollout
    lr: float = 1e-4  # 3e-4 moved π 0.1-0.24 nats a rollout and swung gold ±0.1 (docs/maths.md §5)
    kl_coef: float = 0.05  # β of the KL-shaped env reward (the initial β when adaptive)
    adaptive_kl: bool = False  # Ziegler et al. 2019's proportional controller on β
    target_kl: float = 6.0  # KL_target (nats per completion) of the adaptive controller
    kl_horizon: int = 10_000  # K_β = episodes per update / horizon
    gamma: float = 1.0  # discount γ
    gae_lambda: float = 0.95  # GAE λ
    clip_eps: float = 0.2  # ε of the clipped ratio
    clip_value: float | None = 0.2  # clip V around V_old by ±this (None: unclipped loss)
    vf_coef: float = 0.5  # α, weight of the value loss
    whiten_advantages: bool = True
    max_grad_norm: float = 1.0

    def batch_shape(self) -> BatchShape:
        """Minibatches of num_envs / num_minibatches rows; the ranks split the envs."""
        return BatchShape(self.num_envs // self.num_minibatches, self.num_envs, "num_envs")

    def __post_init__(self):
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise SettingError(f"invalid PPO config: {what}")

        need(self.num_envs >= 1, f"num_envs must be >= 1, got {self.num_envs}")
        need(
            1 <= self.num_minibatches <= self.num_envs,
            f"num_minibatches must be in [1, num_envs={self.num_envs}], got {self.num_minibatches}",
        )
        need(self.ppo_epochs >= 1, f"ppo_epochs must be >= 1, got {self.ppo_epochs}")
        check_optimizer_settings(self, "PPO")
        need(self.kl_coef >= 0, f"kl_coef must be >= 0, got {self.kl_coef}")
        need(0 <= self.gamma <= 1, f"gamma must be in [0, 1], got {self.gamma}")
        need(0 <= self.gae_lambda <= 1, f"gae_lambda must be in [0, 1], got {self.gae_lambda}")
        need(self.clip_eps > 0, f"clip_eps must be > 0, got {self.clip_eps}")
        need(self.clip_value is None or self.clip_value > 0, f"clip_value must be > 0 or None, got {self.clip_value}")
        need(self.vf_coef >= 0, f"vf_coef must be >= 0, got {self.vf_coef}")
        need(self.target_kl > 0, f"target_kl must be > 0, got {self.target_kl}")
        need(self.kl_horizon > 0, f"kl_horizon must be > 0, got {self.kl_horizon}")
        need(not self.adaptive_kl or self.kl_coef > 0, "adaptive_kl needs kl_coef > 0 (β is scaled multiplicatively)")


# -- pure maths ------------------------------------------------------------------------------


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps: float, tis=None):
    """Clipped surrogate: −masked_mean(min(ρ Â, clip(ρ, 1−ε, 1+ε) Â)), ρ = exp(log π − log π_old).

    Args:
        logprobs: (B, T) log π_θ of the taken tokens (with gradients).
        old_logprobs: (B, T) log π_θold (no gradient).
        advantages: (B, T) Â (no gradient).
        mask: (B, T) 1 on completion tokens.
        clip_eps: ε > 0.
        tis: (B, T) truncated importance weights multiplying the surrogate (an inexact generator), or None.
    Returns:
        (loss, clipfrac): scalar loss; the share of masked tokens where clipping changed the
        objective (``core.clipped``: the gradient through ρ is cut there).
    """
    surrogate, ratio = clipped_surrogate(logprobs, old_logprobs, advantages, clip_eps)
    if tis is not None:
        surrogate = surrogate * tis
    loss = -masked_mean(surrogate, mask)
    clipfrac = masked_mean(clipped(ratio, advantages, clip_eps).float(), mask)
    return loss, clipfrac


def value_loss(values, old_values, returns, mask, clip_value: float | None):
    """½ masked_mean((V − R̂)²), or with ``clip_value`` c the pessimistic clipped variant (docs/maths.md §5)
    ½ masked_mean(max((V − R̂)², (clip(V, V_old − c, V_old + c) − R̂)²)).

    Args:
        values: (B, T) V(s_t) (with gradients).
        old_values: (B, T) V_old(s_t) at rollout time (no gradient).
        returns: (B, T) targets R̂ (no gradient).
        mask: (B, T) 1 on completion tokens.
    Returns:
        scalar loss.
    """
    returns = returns.detach()
    err = (values - returns) ** 2
    if clip_value is not None:
        old_values = old_values.detach()
        clipped = old_values + torch.clamp(values - old_values, -clip_value, clip_value)
        err = torch.max(err, (clipped - returns) ** 2)
    return 0.5 * masked_mean(err, mask)


def advantages_and_returns(rewards, values, mask, gamma: float, gae_lambda: float, whiten: bool = True):
    """GAE advantages and value targets on action coordinates.

    Args:
        rewards, values: (B, T) token rewards r_t and V_old(s_t).
        mask: (B, T) 1 on completion tokens: a contiguous run per row (not necessarily a prefix).
        whiten: whiten Â over the masked tokens (the targets R̂ = Â + V use the raw Â).
    Returns:
        (advantages, returns), each (B, T) and 0 outside the mask.
    """
    advantages, returns = gae(rewards, values, mask, gamma, gae_lambda)
    if whiten:
        advantages = masked_whiten(advantages, mask)
    return advantages, returns


class FixedKLController:
    """A constant β."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. 2019, §2.2: e = clip(KL / KL_target − 1, −0.2, 0.2); β ← β (1 + e · n / horizon).

    The formulas: docs/maths.md §6.

        ``n`` is the number of episodes behind the observed ``KL`` (the sampled sequence KL).
    """

    def __init__(self, kl_coef: float, target: float, horizon: int):
        super().__init__(kl_coef)
        self.target, self.horizon = float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


# -- the trainer -------------------------------------------------------------------------------


def logprobs_and_values(
    policy, value_head: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, vocab_size: int | None = None
):
    """One forward: (B, L-1) log π of ``input_ids[:, 1:]`` (over the first ``vocab_size`` ids) and (B, L-1)
    V(s_t) from the last hidden state."""
    forward = {"input_ids": input_ids, "attention_mask": attention_mask, "output_hidden_states": True}
    head = chunked_head(policy, input_ids.numel())
    if head is not None:  # large vocabularies: the head and log-softmax a chunk of tokens at a time
        out = head.decoder(**forward)
        logprobs = head.logprobs(out.last_hidden_state[:, :-1], input_ids[:, 1:], vocab_size)
    else:
        out = policy(**forward)
        logprobs = token_logprobs(out.logits[:, :-1], input_ids[:, 1:], vocab_size)
    values = value_head(out.hidden_states[-1][:, :-1].float()).squeeze(-1)
    return logprobs, values


class Trainer(Stateful):
    """Rollout, GAE, then ``ppo_epochs`` × ``num_minibatches`` Adam steps on policy + value head."""

    state = {"optimizer": "optimizer", "value_head": "value_head", "kl_ctl": "kl_ctl"}  # checkpoint key -> attribute

    def __init__(self, ctx: TrainContext, config: Config):
        self.ctx, self.config = ctx, config
        self.value_head = nn.Linear(ctx.policy.config.hidden_size, 1).to(ctx.device)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        params = [*ctx.policy.parameters(), *self.value_head.parameters()]
        self.optimizer = Optimizer(params, config.lr, config.max_grad_norm)
        if config.adaptive_kl:
            self.kl_ctl = AdaptiveKLController(config.kl_coef, config.target_kl, config.kl_horizon)
        else:
            self.kl_ctl = FixedKLController(config.kl_coef)
        self.env = ctx.env(config.num_envs, beta=config.kl_coef)  # its β is set before each rollout

    def step(self, step: int, seed: int) -> dict[str, float]:
        c, policy = self.config, self.ctx.policy
        beta = self.kl_ctl.value
        set_env_attr(self.env, "beta", beta)
        batch = collect_rollouts(self.ctx, self.env, seed)
        mask = batch.action_mask
        with torch.no_grad():
            old_logprobs, old_values = logprobs_and_values(
                policy, self.value_head, batch.input_ids, batch.attention_mask, batch.vocab_size
            )
            old_values = old_values * mask
            advantages, returns = advantages_and_returns(
                batch.rewards, old_values, mask, c.gamma, c.gae_lambda, c.whiten_advantages
            )

        B = mask.shape[0]
        means = Means()
        for part in weighted_minibatches(B, c.num_minibatches, c.ppo_epochs, seed, mask.device):
            part = part.by_tokens(mask)  # data-parallel: the losses average over tokens
            rows = part.rows
            m = mask[rows]
            ids, attn = batch.input_ids[rows], batch.attention_mask[rows]
            logprobs, values = logprobs_and_values(policy, self.value_head, ids, attn, batch.vocab_size)
            tis = batch.is_weights[rows] if batch.is_weights is not None else None
            pg_loss, clipfrac = policy_loss(logprobs, old_logprobs[rows], advantages[rows], m, c.clip_eps, tis)
            vf_loss = value_loss(values, old_values[rows], returns[rows], m, c.clip_value)
            loss = pg_loss + c.vf_coef * vf_loss
            grad_norm = self.optimizer.step(loss, weight=part.weight, policy=pg_loss, value=vf_loss)
            with torch.no_grad():  # KL(π_old ‖ π_θ) by k3 on π_old's samples (docs/maths.md §3)
                approx_kl = masked_mean(kl_k3(old_logprobs[rows], logprobs), m)
            means.add(
                {
                    M.LOSS_POLICY: pg_loss,
                    M.LOSS_VALUE: vf_loss,
                    M.LOSS_TOTAL: loss,
                    M.POLICY_CLIPFRAC: clipfrac,
                    M.POLICY_APPROX_KL: approx_kl,
                    M.OPTIM_GRAD_NORM: grad_norm,
                },
                weight=part.weight,
            )

        rollout = rollout_metrics(batch, returns=True)
        self.kl_ctl.update(rollout[M.OBJECTIVE_KL], B)
        return {**means.means(), **rollout, M.OBJECTIVE_KL_COEF: beta}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        set_env_attr(self.env, "beta", self.kl_ctl.value)
