"""Data-parallel training under ``torchrun``: gloo on CPU, NCCL on CUDA.

A run started by ``torchrun --nproc-per-node N -m rlhf_env train ...`` has N ranks. Each
rank rolls out its share of the batch's groups (a group never splits), and the shares are
gathered so that every rank holds the whole batch, in the row order a 1-rank run has:
advantages, filters and metrics are computed on the global batch. Each minibatch is then
cut into W parts, one per rank; rank r backpropagates ``share_r · loss_r`` (``share_r``: its
part of the minibatch's rows) and the gradients are summed across ranks, which for a loss
that averages over rows is the gradient of the whole minibatch's loss. Rank 0 alone writes.

Seeds follow rows, not ranks: the prompts of a step are drawn once from the step's seed,
and row i samples its tokens from its own generator, seeded with (step seed, i). So
global row i is the same completion whichever rank draws it, and a run on 2 ranks makes
the update a run on 1 rank makes (up to float rounding of different batch shapes). That holds
for the default ``kv_cache`` generator; a run's other generator (``--generator``) samples each
rank's rows with one seed per rank, so its batch depends on the world size.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime
import os
from collections.abc import Iterator

import numpy as np
import torch

from rlhf_env.errors import SettingError

BACKENDS = ("gloo", "nccl")


@dataclasses.dataclass
class DataParallel:
    """This process's place in a data-parallel run (set once by ``setup``; it holds no per-minibatch state:
    a minibatch's weight travels with it, as a ``Part``)."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device
    sharded: bool = False  # FSDP: gradients are averaged over ranks by its reduce-scatter

    @property
    def lead(self) -> bool:
        return self.rank == 0

    def weight(self, weight: float | None) -> float:
        """The factor this rank's loss is multiplied by before the gradients are summed over ranks:
        a ``Part``'s ``weight``, or 1/W (None: every rank computed the whole minibatch)."""
        return weight if weight is not None else 1.0 / self.world_size

    def loss_scale(self, weight: float | None) -> float:
        """What the loss is multiplied by before backward: ``weight(weight)``, times W where FSDP averages."""
        return self.weight(weight) * (self.world_size if self.sharded else 1)


@dataclasses.dataclass(frozen=True)
class Part:
    """This rank's part of a minibatch and the weight its loss carries (``Optimizer.step(weight=)``, ``Means.add``).

    ``rows``: this rank's (b,) row indices; ``of``: the whole minibatch's rows; ``weight``: share_r, the part's
    share of the minibatch's rows (1 in a single-process run), so that Σ_r share_r ∇loss_r is the minibatch's
    gradient for a loss averaged over rows.
    """

    rows: torch.Tensor
    of: torch.Tensor
    weight: float

    def by_tokens(self, mask: torch.Tensor) -> Part:
        """The same part weighed by its share of the minibatch's tokens, for a loss averaged over tokens.

        Args:
            mask: (B, T) the whole batch's completion-token mask (the rows ``rows`` and ``of`` index).
        """
        if _current is None:
            return self
        total = float(mask[self.of.to(mask.device)].sum())
        share = float(mask[self.rows.to(mask.device)].sum()) / total if total else len(self.rows) / len(self.of)
        return dataclasses.replace(self, weight=share)


_current: DataParallel | None = None


def current() -> DataParallel | None:
    """The data-parallel run this process is part of (None: a single-process run)."""
    return _current


def launched() -> bool:
    """True when ``torchrun`` (or its environment variables) started this process."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def setup(device: torch.device, backend: str | None = None, config=None) -> DataParallel | None:
    """Join the ``torchrun`` process group (None when not launched by it and no backend asked).

    Raises ``ValueError`` before any work for a backend this machine cannot run (NCCL
    without CUDA, NCCL on a CPU device) or one that is unknown, and for a world size that
    does not divide ``config``'s batch.
    """
    if backend is not None and backend not in BACKENDS:
        raise SettingError(f"unknown distributed backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise SettingError("the NCCL backend needs CUDA GPUs and this machine has none; use --backend gloo on CPU")
        if device.type != "cuda":
            raise SettingError(f"the NCCL backend runs on CUDA devices, not {device}; use --backend gloo on CPU")
    if not launched():
        if backend is None:
            return None
        world, rank, local = 1, 0, 0  # a 1-rank data-parallel run: row seeds, no process group
    else:
        world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    if config is not None:
        check_batch(config, world)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        atexit.register(_leave)  # later runs in this process (API calls) reuse the group
    return DataParallel(rank, world, local, backend, device)


def _leave() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def active(dp: DataParallel | None) -> Iterator[DataParallel | None]:
    """Make ``dp`` the current run for the plumbing (optimizer step, minibatches, rollouts)."""
    global _current
    before, _current = _current, dp
    try:
        yield dp
    finally:
        _current = before


def follow(out) -> contextlib.AbstractContextManager:
    """The run folder as a rank other than 0 sees it: read, never locked or written."""
    from pathlib import Path

    return contextlib.nullcontext(Path(out).expanduser())


class NullWriter:
    """TensorBoard's writer on ranks other than 0: writes nothing."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


# -- collectives (no-ops on one rank) ---------------------------------------------------------


def _many(dp: DataParallel | None) -> bool:
    return dp is not None and dp.world_size > 1


def barrier() -> None:
    if _many(_current):
        torch.distributed.barrier()


def all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum every parameter's gradient over ranks in one flat buffer (a missing gradient counts as 0)."""
    dp = _current
    if not _many(dp):
        return
    from torch.distributed.tensor import DTensor

    params = [p for p in params if not isinstance(p, DTensor)]  # FSDP reduces its shards' gradients itself
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any."""
    dp = _current
    if not _many(dp):
        return flag
    t = torch.tensor([float(flag)], device=dp.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


def from_lead(value: float) -> float:
    """Rank 0's ``value`` on every rank (e.g. whether a wall-clock budget is spent)."""
    dp = _current
    if not _many(dp):
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=dp.device)
    torch.distributed.broadcast(t, src=0)
    return float(t.item())


def mean_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Each metric averaged over ranks (those computed on the gathered batch are equal on all ranks)."""
    dp = _current
    if not _many(dp):
        return metrics
    keys = sorted(metrics)  # every rank's step returns the same keys
    t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=dp.device)
    torch.distributed.all_reduce(t)
    mean = dict(zip(keys, (v / dp.world_size for v in t.tolist())))
    return {k: mean[k] for k in metrics}


# -- who trains on which rows ------------------------------------------------------------------


def rank_part(rows: torch.Tensor) -> Part:
    """This rank's ``Part`` of a minibatch's (b,) row indices, weighed by its share of the rows."""
    dp = _current
    if dp is None:
        return Part(rows, rows, 1.0)
    if len(rows) < dp.world_size:
        raise SettingError(
            f"a minibatch of {len(rows)} rows cannot be split over {dp.world_size} ranks; "
            "use fewer minibatches or a larger batch"
        )
    part = rows.tensor_split(dp.world_size)[dp.rank]
    return Part(part, rows, len(part) / len(rows))


def shard_size(num_envs: int, group_size: int) -> int:
    """Rows of this rank's training env for a global batch of ``num_envs`` rows in groups of ``group_size``."""
    dp = _current
    if dp is None:
        return num_envs
    groups = num_envs // group_size
    if groups % dp.world_size:
        raise SettingError(
            f"world size {dp.world_size} does not divide the batch's {groups} prompts "
            f"({num_envs} rows in groups of {group_size}); a group never splits across ranks"
        )
    return num_envs // dp.world_size


def check_batch(config, world_size: int) -> None:
    """Before any work: the world size must divide the config's batch, the field its ``batch_shape()``
    names as the one the ranks split (prompts, envs or examples). A config that declares no
    ``batch_shape`` is not checked here; its env's ``shard_size`` still refuses a batch that does not split."""
    declared = getattr(config, "batch_shape", None)
    if declared is None:
        return
    name = declared().split
    value = getattr(config, name)
    if value % world_size:
        raise SettingError(
            f"world size {world_size} does not divide the batch ({name}={value}); "
            f"use a {name} that is a multiple of {world_size}"
        )


# -- rollouts: row seeds and gathering ---------------------------------------------------------


def row_seed(seed: int, row: int) -> int:
    """Row ``row``'s sampler seed: the ``"sampler"`` stream of the step's ``seed``, one per row."""
    from rlhf_env.seeding import derive

    return derive(seed, "sampler", row)


def collect_shard(ctx, env, seed: int, prompts: list[str] | None = None):
    """This rank's groups of the step's batch, sampled with row seeds, gathered into the global ``RolloutBatch``.

    ``env``: this rank's training env (``shard_size`` rows). ``prompts``: one per global group;
    default drawn uniformly from the task's training prompts with the ``"prompts"`` stream of ``seed``.
    """
    from rlhf_env.rollout import EpisodeStream, env_attr, first_episodes, to_batch

    dp = _current
    G = env_attr(env, "group_size")
    local_groups = env.num_envs // G
    groups = local_groups * dp.world_size
    if prompts is None:
        pool = ctx.task.train_prompts
        from rlhf_env.seeding import derive

        draw = np.random.default_rng(derive(seed, "prompts"))
        prompts = [pool[i] for i in draw.integers(len(pool), size=groups)]
    first = dp.rank * local_groups
    mine = list(prompts)[first : first + local_groups]
    pad, vocab = env_attr(env, "pad_token_id"), env_attr(env, "vocab_size")
    rows = range(first * G, (first + local_groups) * G)
    sampler = rank_sampler(ctx.generator, ctx.policy, env.num_envs, [row_seed(seed, r) for r in rows], pad, vocab)
    stream = EpisodeStream(env, sampler, seed, {"prompts": mine})
    return gather_batch(to_batch(first_episodes(stream, env.num_envs), pad, vocab, ctx.device), pad)


def rank_sampler(generator: str, model, batch_size: int, seeds: list[int], pad_token_id: int, vocab_size):
    """This rank's sampler from the registered ``generator``: ``kv_cache`` as ``RowSeededSampler`` (a row's
    tokens depend on its seed only, so any world size makes the same batch); any other generator is
    built through the seam with the rank's first row seed, so its rows depend on the world size."""
    from rlhf_env.generation import DEFAULT_GENERATOR, make_sampler

    if generator == DEFAULT_GENERATOR:
        return RowSeededSampler(model, batch_size, seeds, pad_token_id, vocab_size)
    seed = seeds[0]  # 31 bits (``rlhf_env.seeding``): generators may seed torch
    return make_sampler(generator, model, batch_size, pad_token_id=pad_token_id, vocab_size=vocab_size, seed=seed)


def gather_batch(batch, pad_token_id: int):
    """The ranks' ``RolloutBatch`` shares concatenated in rank order, right-padded to one length."""
    dp = _current
    if not _many(dp):
        return batch
    length = torch.tensor([batch.input_ids.shape[1]], device=dp.device)
    torch.distributed.all_reduce(length, op=torch.distributed.ReduceOp.MAX)
    extra = int(length.item()) - batch.input_ids.shape[1]
    fields = {}
    for f in dataclasses.fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, torch.Tensor):
            if value.dim() == 2 and extra:
                fill = pad_token_id if f.name == "input_ids" else 0
                value = torch.nn.functional.pad(value, (0, extra), value=fill)
            parts = [torch.empty_like(value) for _ in range(dp.world_size)]
            torch.distributed.all_gather(parts, value.contiguous())
            value = torch.cat(parts)
        elif isinstance(value, list):
            parts = [None] * dp.world_size
            torch.distributed.all_gather_object(parts, value)
            value = [x for part in parts for x in part]
        fields[f.name] = value
    return type(batch)(**fields)


class RowSeededSampler:
    """The ``kv_cache`` sampler with one generator per row: row r's tokens depend on its seed only.

    Tokens are drawn by inverse CDF from one uniform per row and step, so no row's draw
    depends on how many other rows share the batch.
    """

    def __init__(self, model, batch_size: int, seeds: list[int], pad_token_id: int, vocab_size: int | None):
        from rlhf_env.policy import SamplingPolicy

        self.policy = SamplingPolicy(model, batch_size, pad_token_id, vocab_size=vocab_size)
        self.policy.sample = self.sample
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]

    def sample(self, logprobs: torch.Tensor) -> torch.Tensor:
        """(B,) tokens from (B, V) log-probs."""
        u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in self.generators])
        cdf = logprobs.double().exp().cumsum(-1)
        target = (u.to(cdf.device) * cdf[:, -1])[:, None]
        return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=cdf.shape[1] - 1)

    def act(self, obs):
        return self.policy.act(obs)
