"""SFT, supervised fine-tuning: maximise log π_θ(y|x) on the task's demonstrations.

    L = −(1/N) Σ_i Σ_t log π_θ(y_t | x_i, y_<t)    (N: completion tokens in the batch)

The same loss that built the base models (``base_models.sft_loss``: completion + EOS,
prompt tokens masked), on random minibatches of the task's ``sft_data``. The baseline
every RLHF method should beat when demonstrations exist.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from algorithms.base import TrainContext, check_finite
from rlhf_env.tasks.base_models import sft_loss


@dataclass
class Config:
    lr: float = 5e-4  # 1e-3 made the loss jump on the first steps
    batch_size: int = 32  # (prompt, completion) pairs per step
    max_grad_norm: float = 1.0

    def __post_init__(self):
        if self.batch_size < 1 or not self.lr > 0 or not self.max_grad_norm > 0:
            raise ValueError(f"invalid SFT config (need batch_size >= 1, lr > 0, max_grad_norm > 0): {self}")


class Trainer:
    def __init__(self, ctx: TrainContext, config: Config):
        self.ctx, self.config = ctx, config
        self.data = list(ctx.task.sft_data)
        tok = ctx.tokenizer
        # Loss-bearing tokens per example: the completion and its EOS.
        self.target_tokens = [len(tok(c, add_special_tokens=False)["input_ids"]) + 1 for _, c in self.data]
        self.optimizer = torch.optim.Adam(ctx.policy.parameters(), lr=config.lr)

    def step(self, step: int, seed: int) -> dict[str, float]:
        c, policy = self.config, self.ctx.policy
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randint(len(self.data), (c.batch_size,), generator=gen).tolist()
        loss = sft_loss(policy, self.ctx.tokenizer, [self.data[i] for i in idx])
        check_finite(sft=loss)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), c.max_grad_norm)
        self.optimizer.step()
        return {"loss/sft": loss.item(), "perf/tokens": float(sum(self.target_tokens[i] for i in idx))}

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
