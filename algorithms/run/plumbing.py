"""The trainer's shared plumbing: one optimizer step, one minibatch order, one state format.

Every trainer of the zoo updates weights through ``Optimizer.step``, walks a rollout batch
with ``weighted_minibatches`` (offline trainers draw rows with ``draw_part``), averages its metrics
over updates with ``Means`` and checkpoints through ``Stateful``. These are the single call
sites data-parallel training hooks into: a gradient all-reduce between backward and clip in
``Optimizer.step``, this rank's part of each minibatch as a ``distributed.Part`` that carries its
weight (the trainer passes ``part.weight`` to ``Optimizer.step`` and ``Means.add``: no share
travels through module state), and rank-0 writes of ``Stateful.state_dict``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

import torch

from rlhf_env.algorithms.scale import distributed
from rlhf_env.errors import SettingError
from rlhf_env.seeding import derive


class NonFiniteLossError(FloatingPointError):
    """A loss or gradient became NaN or infinite; raised before the optimizer step it would poison."""


def check_finite(**losses: torch.Tensor) -> None:
    """Raise ``NonFiniteLossError`` naming every non-finite loss."""
    bad = {name: float(v.detach()) for name, v in losses.items() if not torch.isfinite(v).all()}
    if bad:
        raise NonFiniteLossError(f"non-finite loss: {bad}")


def check_optimizer_settings(config, who: str = "") -> None:
    """A Config's ``lr`` and ``max_grad_norm``, the two ``Optimizer`` fields every built-in trainer has:
    a ``SettingError`` (``who`` first, e.g. the algorithm) naming the values and the ones that are not > 0."""
    lr, max_grad_norm = config.lr, config.max_grad_norm
    bad = [name for name, value in (("lr", lr), ("max_grad_norm", max_grad_norm)) if not value > 0]
    if bad:
        raise SettingError(
            f"{who + ' ' if who else ''}lr and max_grad_norm must be > 0, got lr={lr}, max_grad_norm={max_grad_norm}: "
            f"{' and '.join(bad)} must be > 0"
        )


class Optimizer:
    """Adam on ``params`` with gradient clipping by global norm, behind one ``step(loss)`` (docs/maths.md §12).

    ``state_dict``/``load_state_dict`` are the torch optimizer's, so checkpoints hold
    exactly what ``torch.optim.Adam`` saves.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, max_grad_norm: float):
        if not max_grad_norm > 0:
            raise SettingError(f"max_grad_norm must be > 0, got {max_grad_norm}")
        self.params = [p for p in params if p.requires_grad]  # LoRA: the adapters only
        self.max_grad_norm = float(max_grad_norm)
        # The fused kernel: one pass over each tensor instead of a dozen ops per parameter (the
        # same update up to rounding). Plain CPU/CUDA tensors only (not FSDP's DTensors).
        self.fused = bool(self.params) and all(
            p.device.type in ("cpu", "cuda") and p.is_floating_point() and not hasattr(p, "full_tensor")
            for p in self.params
        )
        self.torch = torch.optim.Adam(self.params, lr=lr, fused=self.fused or None)
        self.scaler: torch.amp.GradScaler | None = None  # float16 autocast's loss scaling, made on first need

    def _loss_scaler(self) -> torch.amp.GradScaler | None:
        """A ``GradScaler`` when the step runs under float16 autocast (mixed precision, ``run.precision``),
        whose small gradients would underflow unscaled; None otherwise (bf16 has float32's range)."""
        device = self.params[0].device.type if self.params else "cpu"
        if not (torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16):
            return None
        if self.scaler is None:
            self.scaler = torch.amp.GradScaler(device)
        return self.scaler

    @property
    def param_groups(self) -> list[dict]:
        return self.torch.param_groups

    def step(self, loss: torch.Tensor, *, weight: float | None = None, **parts: torch.Tensor) -> float:
        """Check, zero-grad, backward, clip, step; returns the gradient norm before clipping.

        Args:
            loss: the scalar minimised.
            weight: data-parallel: this rank's share of the minibatch (``Part.weight``, from
                ``weighted_minibatches``/``draw_part``); None: every rank computed the whole batch (1/W).
            parts: named scalar parts of ``loss`` (``policy=…, value=…``): a non-finite one is
                named in the error. Without parts, ``loss`` itself is checked.
        Raises:
            NonFiniteLossError: a part or the gradient norm is NaN/inf; the weights and the
                optimizer state are left as they were. Under float16 autocast the loss is scaled
                and an infinite gradient norm is an overflow: the step is skipped, the scale
                halved, and the (non-finite) norm returned.
        """
        named = parts or {"loss": loss}
        if distributed.current() is None:
            check_finite(**named)
        elif distributed.any_rank(any(not torch.isfinite(v).all() for v in named.values())):
            check_finite(**named)  # names this rank's non-finite parts
            raise NonFiniteLossError("non-finite loss on another rank")
        self.torch.zero_grad(set_to_none=True)
        dp = distributed.current()
        # Data-parallel: Σ_r share_r ∇loss_r over ranks is the gradient of the whole minibatch's loss.
        scaler = self._loss_scaler()
        total = loss * dp.loss_scale(weight) if dp is not None else loss
        (scaler.scale(total) if scaler is not None else total).backward()
        distributed.all_reduce_grads(self.params)
        if scaler is not None:
            scaler.unscale_(self.torch)  # clip the true gradient
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor
        if scaler is not None:  # an overflow skips the step and halves the scale (GradScaler's rule)
            scaler.step(self.torch)
            scaler.update()
            return float(norm)
        if not torch.isfinite(norm):
            raise NonFiniteLossError(f"non-finite gradient norm {float(norm)} (the losses were finite)")
        self.torch.step()
        return float(norm)

    def state_dict(self) -> dict:
        return self.torch.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.torch.load_state_dict(state)
        for group in self.torch.param_groups:  # the saved groups carry the saver's kernel choice
            group["fused"], group["foreach"] = self.fused or None, None


def weighted_minibatches(
    num_rows: int, num_minibatches: int, epochs: int, seed: int, device=None
) -> Iterator[distributed.Part]:
    """``epochs`` passes over a batch of ``num_rows`` rows, each minibatch as this rank's ``Part``.

    Each epoch is a fresh permutation from one generator seeded with the ``"minibatches"`` stream of
    ``seed`` (``rlhf_env.seeding``: not the state the rollout's prompts and samples drew from), cut into
    exactly ``num_minibatches`` parts whose sizes differ by at most one: every row once per
    epoch, the same order for the same seed. A ``Part`` carries this rank's (b,) int64 row
    indices (``rows``, on ``device``) and the weight its loss and metrics carry
    (``Optimizer.step(weight=part.weight)``, ``Means.add(..., weight=part.weight)``; ``part.by_tokens(mask)``
    for a loss averaged over tokens).
    """
    if not 1 <= num_minibatches <= num_rows:
        raise ValueError(f"num_minibatches must be in [1, {num_rows}] (the rows), got {num_minibatches}")
    generator = torch.Generator().manual_seed(derive(seed, "minibatches"))
    for _ in range(epochs):
        for rows in torch.randperm(num_rows, generator=generator).tensor_split(num_minibatches):
            part = distributed.rank_part(rows)  # data-parallel: this rank's part
            yield dataclasses.replace(part, rows=part.rows.to(device))


def minibatches(num_rows: int, num_minibatches: int, epochs: int, seed: int, device=None) -> Iterator[torch.Tensor]:
    """``weighted_minibatches``' row indices alone: (b,) int64 on ``device`` (data-parallel: this rank's
    rows, whose updates then weigh 1/W unless given the part's weight)."""
    for part in weighted_minibatches(num_rows, num_minibatches, epochs, seed, device):
        yield part.rows


def draw_part(num_rows: int, size: int, seed: int, replacement: bool = False) -> distributed.Part:
    """``size`` random row indices of ``num_rows`` (distinct, at most ``num_rows`` of them, unless
    ``replacement``) as this rank's ``Part`` (its ``rows`` a (b,) int64 CPU tensor, its ``weight`` for
    ``Optimizer.step``); drawn from the ``"rows"`` stream of ``seed`` (``rlhf_env.seeding``)."""
    generator = torch.Generator().manual_seed(derive(seed, "rows"))
    if replacement:
        rows = torch.randint(num_rows, (size,), generator=generator)
    else:
        rows = torch.randperm(num_rows, generator=generator)[: min(size, num_rows)]
    return distributed.rank_part(rows)  # data-parallel: this rank's part


def draw_rows(num_rows: int, size: int, seed: int, replacement: bool = False) -> list[int]:
    """``draw_part``'s row indices alone, as a list."""
    return draw_part(num_rows, size, seed, replacement).rows.tolist()


class Means:
    """Running means of scalar metrics over a step's updates."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, values: dict[str, torch.Tensor | float], weight: float | None = None) -> None:
        """``weight``: data-parallel, this rank's share of the minibatch (``Part.weight``; None: 1/W)."""
        dp = distributed.current()
        # Data-parallel: the loop averages over ranks, so W·share_r·value_r sums to the minibatch's value.
        weight = dp.weight(weight) * dp.world_size if dp is not None else 1.0
        for name, value in values.items():
            value = (value.item() if isinstance(value, torch.Tensor) else float(value)) * weight
            self.sums[name] = self.sums.get(name, 0.0) + value
            self.counts[name] = self.counts.get(name, 0) + 1

    def means(self) -> dict[str, float]:
        return {name: total / self.counts[name] for name, total in self.sums.items()}


class Stateful:
    """Default ``state_dict``/``load_state_dict`` of a trainer: ``{key: attribute.state_dict()}``.

    ``state`` maps checkpoint keys to the attributes holding state (an ``Optimizer``, an
    ``nn.Module``, anything with ``state_dict``). Random number state is not saved: the loop
    seeds torch from ``(seed, step)`` before every step and trainers draw from generators
    seeded with the step's seed, so a resumed step draws what an uninterrupted one would.
    """

    state: dict[str, str] = {"optimizer": "optimizer"}

    def state_dict(self) -> dict:
        return {key: getattr(self, attr).state_dict() for key, attr in self.state.items()}

    def load_state_dict(self, state: dict) -> None:
        missing = sorted(set(self.state) - set(state))
        if missing:
            raise SettingError(f"{type(self).__module__} trainer state lacks {missing}; it has {sorted(state)}")
        for key, attr in self.state.items():
            getattr(self, attr).load_state_dict(state[key])


class PolicyTrainer(Stateful):
    """A trainer whose one trained module is the policy: ``ctx``, ``config`` (with ``lr`` and
    ``max_grad_norm``) and one ``Optimizer`` over the policy's parameters."""

    def __init__(self, ctx, config):
        self.ctx, self.config = ctx, config
        self.optimizer = Optimizer(ctx.policy.parameters(), config.lr, config.max_grad_norm)
