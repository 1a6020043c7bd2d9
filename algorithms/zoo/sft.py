"""SFT, supervised fine-tuning: maximise log π_θ(y|x) on the task's demonstrations.

    L = −(1/N) Σ_i Σ_t log π_θ(y_t | x_i, y_<t)    (N: completion tokens in the batch)

The same loss that built the base models (``rlhf_env.scoring.sft_loss``: completion + EOS,
prompt tokens masked; docs/maths.md §10), on random minibatches of the task's
``demonstrations`` (drawn with replacement; ``sft_data`` when a task has none). The baseline every RLHF method should beat when demonstrations exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from rlhf_env.algorithms.base import BatchShape, TrainContext
from rlhf_env.algorithms.run import metrics as M
from rlhf_env.algorithms.run.plumbing import Optimizer, Stateful, check_optimizer_settings, draw_part
from rlhf_env.errors import SettingError
from rlhf_env.scoring import sft_loss


@dataclass
class Config:
    # On a checkpoint the user gives (--model): algorithms/run/presets.py
    PRETRAINED: ClassVar[dict] = {"lr": 1e-5}
    PRETRAINED_LORA: ClassVar[dict] = {"lr": 1e-4}
    lr: float = 5e-4  # 1e-3 made the loss jump on the first steps
    batch_size: int = 32  # (prompt, completion) pairs per step
    max_grad_norm: float = 1.0

    def batch_shape(self) -> BatchShape:
        """batch_size demonstrations, one row each; no rollout; the ranks split them."""
        return BatchShape(self.batch_size, 0, "batch_size")

    def __post_init__(self):
        check_optimizer_settings(self, "invalid SFT config:")
        if self.batch_size < 1:
            raise SettingError(f"invalid SFT config (need batch_size >= 1): {self}")


class Trainer(Stateful):
    def __init__(self, ctx: TrainContext, config: Config):
        self.ctx, self.config = ctx, config
        self.data = list(ctx.task.demonstrations or ctx.task.sft_data)
        tok = ctx.tokenizer
        # Loss-bearing tokens per example: the completion and its EOS.
        self.target_tokens = [len(tok(c, add_special_tokens=False)["input_ids"]) + 1 for _, c in self.data]
        self.optimizer = Optimizer(ctx.policy.parameters(), config.lr, config.max_grad_norm)

    def step(self, step: int, seed: int) -> dict[str, float]:
        part = draw_part(len(self.data), self.config.batch_size, seed, replacement=True)
        idx = part.rows.tolist()
        batch = [self.data[i] for i in idx]
        loss = sft_loss(self.ctx.policy, self.ctx.tokenizer, batch, prompt_format=self.ctx.prompt_format)
        grad_norm = self.optimizer.step(loss, weight=part.weight, sft=loss)
        return {
            M.LOSS_SFT: loss.item(),
            M.OPTIM_GRAD_NORM: grad_norm,
            M.PERF_TOKENS: float(sum(self.target_tokens[i] for i in idx)),
        }
