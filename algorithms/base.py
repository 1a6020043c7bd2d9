"""What every algorithm shares: the registered spec, the training context, rollouts.

Rollouts come from the env layer's one rollout path (``rlhf_env.rollout``); ``RolloutBatch``,
``collect_rollouts`` and ``sequence_kl`` are re-exported here for the algorithms.

An algorithm module defines a ``Config`` dataclass, pure loss functions, and a
``Trainer(ctx, config)`` with ``step(step) -> metrics``; it registers
``AlgorithmSpec(Config, Trainer)`` through the ``rlhf_register_algorithms`` hook.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from rlhf_env.algorithms.maths import group_std, masked_sum, truncated_is_weights
from rlhf_env.algorithms.run.overrides import typed_overrides
from rlhf_env.algorithms.scale import distributed
from rlhf_env.generation import DEFAULT_GENERATOR, exact_logprobs
from rlhf_env.multiturn_env import MultiTurnVectorEnv
from rlhf_env.packing import packed_logprobs
from rlhf_env.prompt_format import PromptFormat
from rlhf_env.rollout import RolloutBatch, collect, env_attr, sequence_kl
from rlhf_env.tasks.base import Task
from rlhf_env.vector_env import VectorTextGenEnv


class BatchShape(NamedTuple):
    """A Config's batch as it declares it (``Config.batch_shape()``), read by the memory estimate
    (``rlhf_env.algorithms.run.memory``) and the data-parallel batch check instead of guessing from field names."""

    update_rows: int  # rows of the largest forward with gradients (one minibatch; a pair counts 2 rows)
    rollout_rows: int  # rows of one rollout (0: offline data, no rollout)
    split: str  # the field whose value data-parallel ranks divide: a multiple of the world size


@dataclass(frozen=True)
class AlgorithmSpec:
    """What a plugin registers: a config dataclass and a trainer class built from it."""

    Config: type
    Trainer: type
    description: str = ""
    trains_policy: bool = True  # False for e.g. a reward model: ``all`` in a bench suite skips it

    def make_config(self, **overrides: Any):
        """``Config(**overrides)``, each value checked against its field's type (``overrides.ConfigError``
        names the key: unknown keys list the known ones, a wrong type says the expected one)."""
        return self.Config(**typed_overrides(self.Config, overrides))


@dataclass
class TrainContext:
    """Models and data one training run works with.

    ``policy`` is trained; ``ref`` is the frozen reference (the starting policy). Both stay
    in eval mode (no dropout), so log-probs at sampling time and at training time agree.
    ``reward`` is the optimised (proxy) reward of training envs; None: the task's gold.
    Evaluation envs always score with the gold. ``chat_template`` (``"auto"``/``"none"``) is how
    every env of the run and every offline encoding (``prompt_format``) turns prompts into ids.
    """

    task: Task
    policy: torch.nn.Module
    ref: torch.nn.Module
    tokenizer: Any
    device: torch.device
    seed: int = 0
    generator: str = DEFAULT_GENERATOR  # the registered generation backend rollouts sample with
    reward: Any = None  # reward(prompts, completions) -> scores, or a RewardModel; None: gold
    chat_template: str = "auto"  # rlhf_env.prompt_format mode of the run's envs and offline data
    compute_dtype: torch.dtype | None = None  # mixed precision's autocast dtype (run.precision); None: none
    _envs: dict = field(default_factory=dict, repr=False)
    _format: Any = field(default=None, repr=False)

    @property
    def prompt_format(self) -> PromptFormat:
        """The envs' ``PromptFormat`` (same tokenizer, mode and reference): offline data encoded with it
        (``scoring.encode_completion(..., prompt_format=)``) has exactly the ids the env would hold."""
        if self._format is None:
            config = getattr(self.ref, "generation_config", None)
            self._format = PromptFormat(self.tokenizer, self.chat_template, config)
        return self._format

    def env(self, num_envs: int, group_size: int = 1, beta: float = 0.0, split: str = "train") -> VectorTextGenEnv:
        """A vector env on the task's ``split`` prompts and ``ref`` (cached): train envs score with
        ``reward`` (the gold when it is None), eval envs with the gold."""
        if split == "train":
            num_envs = distributed.shard_size(num_envs, group_size)  # data-parallel: this rank's groups
        key = (num_envs, group_size, beta, split)
        if key not in self._envs:
            prompts = self.task.train_prompts if split == "train" else self.task.eval_prompts
            options = self.task.env_options()  # a multi-turn task's interaction and limits
            make = MultiTurnVectorEnv if options else VectorTextGenEnv
            self._envs[key] = make(
                self.tokenizer,
                self.ref,
                self.task.gold_reward if split != "train" or self.reward is None else self.reward,
                prompts,
                num_envs=num_envs,
                group_size=group_size,
                beta=beta,
                max_new_tokens=self.task.max_new_tokens,
                device=self.device,
                chat_template=self.chat_template,
                **options,
            )
        return self._envs[key]


def collect_rollouts(ctx: TrainContext, env, seed: int, prompts: list[str] | None = None) -> RolloutBatch:
    """Run the policy until every row of ``env`` has finished one episode (``rlhf_env.rollout.collect``).

    ``prompts`` (one per group) fixes the prompts, as evaluation does; else they are drawn.
    In a data-parallel run this rank rolls out its groups and gets the whole batch back
    (``distributed.collect_shard``).
    """
    if distributed.current() is not None:
        batch = distributed.collect_shard(ctx, env, seed, prompts)
    else:
        batch = collect(env, ctx.policy, seed, prompts, device=ctx.device, generator=ctx.generator)
    if not exact_logprobs(ctx.generator):
        correct_sampler_logprobs(ctx.policy, batch, beta=float(env_attr(env, "beta")))
    return batch


def correct_sampler_logprobs(policy, batch: RolloutBatch, cap: float = 2.0, beta: float = 0.0) -> None:
    """For a generator without exact log-probs: π_θold from a training forward replaces the
    sampler's, ``logprob_diff`` reports the mismatch and ``is_weights`` (truncated importance
    sampling, ``core.truncated_is_weights``) correct the policy gradient for it (docs/maths.md §25).

    ``beta``: the env's β. Its KL-shaped token rewards −β (log π_sampler − log π_ref) took the
    sampler's log-probs; they are moved to π_θold's, −β (log π_θold − log π_ref).
    """
    with torch.no_grad():
        old = policy_logprobs(policy, batch) * batch.action_mask
    sampled, mask = batch.logprobs, batch.action_mask
    batch.logprob_diff = float(((old - sampled).abs() * mask).sum() / mask.sum().clamp(min=1))
    batch.is_weights = truncated_is_weights(old, sampled, mask, cap)
    if beta:
        batch.rewards = batch.rewards - beta * (old - sampled) * mask
    batch.logprobs = old


def sampler_metrics(batch: RolloutBatch) -> dict[str, float]:
    """``rollout/logprob_diff`` of a batch from a generator without exact log-probs; {} otherwise."""
    from rlhf_env.algorithms.run import metrics as M

    return {M.ROLLOUT_LOGPROB_DIFF: batch.logprob_diff} if batch.logprob_diff is not None else {}


def rollout_metrics(batch: RolloutBatch, *, group_size: int | None = None, returns: bool = False) -> dict[str, float]:
    """The metrics of a step's training rollouts, one definition for every online trainer.

    ``reward/score``, ``reward/group_std`` (with ``group_size``: the batch is groups of that size),
    ``objective/kl``, ``objective/return`` (with ``returns``: the env's rewards are KL-shaped, so the
    return differs from the score), ``perf/tokens`` and ``sampler_metrics``.
    """
    from rlhf_env.algorithms.run import metrics as M

    out = {M.REWARD_SCORE: batch.scores.mean().item()}
    if group_size is not None:
        out[M.REWARD_GROUP_STD] = group_std(batch.scores, group_size).mean().item()
    out[M.OBJECTIVE_KL] = sequence_kl(batch).mean().item()
    if returns:
        out[M.OBJECTIVE_RETURN] = masked_sum(batch.rewards, batch.action_mask, 1).mean().item()
    out[M.PERF_TOKENS] = batch.num_tokens
    return {**out, **sampler_metrics(batch)}


def is_weighted(logp: torch.Tensor, batch: RolloutBatch, rows: slice | torch.Tensor = slice(None)) -> torch.Tensor:
    """(b, T) ``w_t · log π_θ`` with the batch's truncated importance weights (``core.truncated_is_weights``),
    or ``logp`` itself for an exact generator: the score-function term of REINFORCE-style losses."""
    return logp if batch.is_weights is None else logp * batch.is_weights[rows]


def policy_logprobs(model, batch: RolloutBatch, rows: slice | torch.Tensor = slice(None)) -> torch.Tensor:
    """(b, L-1) log-probs of the batch's completion tokens under ``model`` (with gradients), 0 elsewhere.

    Rows of one group share their prompt: ``packed_logprobs`` runs it once for all of them
    and packs the rows without padding.
    """
    return packed_logprobs(
        model, batch.input_ids[rows], batch.attention_mask[rows], batch.action_mask[rows], batch.vocab_size
    )


__all__ = [
    "AlgorithmSpec",
    "BatchShape",
    "RolloutBatch",
    "TrainContext",
    "collect_rollouts",
    "is_weighted",
    "policy_logprobs",
    "rollout_metrics",
    "sampler_metrics",
    "sequence_kl",
]
