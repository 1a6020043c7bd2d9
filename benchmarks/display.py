"""What ``rlhf bench`` prints while it works: one progress line, and a line per finished cell or stage."""

from __future__ import annotations

import sys
import time
from typing import Any

from tqdm.auto import tqdm

from rlhf_env.algorithms.run import metrics as M
from rlhf_env.bench import pipeline


class Display:
    """One line: cells done of total, and each running cell with how far it is."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = tqdm(
            total=total,
            desc=desc,
            unit="cell",
            disable=not enabled,
            dynamic_ncols=True,
            bar_format="{l_bar}{bar}| {n:.1f}/{total} cells [{elapsed}<{remaining}] {postfix}",
        )
        self.done, self.running = 0, {}
        # A terminal redraws twice a second; a log file gets a line every 30 s.
        self.interval = 0.5 if sys.stderr.isatty() else 30.0
        self.last = 0.0

    def start(self, key: str) -> None:
        self.running[key] = (0.0, None)
        self._refresh()

    def update(self, key: str, fraction: float, gold) -> None:
        if key in self.running:
            self.running[key] = (fraction, gold if gold is not None else self.running[key][1])
            if time.monotonic() - self.last >= self.interval:
                self._refresh()

    def finish(self, key: str, line: str) -> None:
        self.running.pop(key, None)
        self.done += 1
        self.bar.write(line)
        self._refresh()

    def _refresh(self) -> None:
        self.bar.n = self.done + sum(f for f, _ in self.running.values())
        parts = [
            f"{k} {100 * f:.0f}%" + (f" gold {g:.2f}" if g is not None else "") for k, (f, g) in self.running.items()
        ]
        self.bar.set_postfix_str(" | ".join(parts) or "", refresh=False)
        self.bar.refresh()
        self.last = time.monotonic()

    def close(self) -> None:
        self.bar.close()


def summary(result: dict[str, Any]) -> str:
    if "stage" in result:  # a pipeline stage: reward model, best-of-n
        return pipeline.summary(result)
    key = f"{result['task']}/{result['algorithm']}" + (f"/seed{result['seed']}" if "seed" in result else "")
    if result["status"] != "ok":
        return f"  FAILED {key}: {result['error']}"
    gold, wall = result[M.REWARD_GOLD], result[M.TIME_WALL_S]
    if result["algorithm"] == "base":
        return f"  base   {key}: gold {gold:+.3f} ({result[M.MODEL_PARAMS]:,} params, {wall:.0f} s)"
    kl, tokens, rate = result[M.OBJECTIVE_KL_EVAL], result[M.PERF_TOKENS_TOTAL], result[M.PERF_MEAN_TOKENS_PER_S]
    lora = f"  LoRA r{result['lora']['rank']}" if result.get("lora") else ""
    return f"  done   {key}: gold {gold:+.3f}  KL {kl:.2f}  {tokens:,.0f} tokens  {rate:,.0f} tok/s  {wall:.0f} s{lora}"
