"""Every registered algorithm on every embedded task: base vs final gold reward, KL, time.

A quick check that each algorithm improves its base model (one seed; ``rlhf bench`` is the
careful comparison). Prints a table and, as the last line, one JSON object.

    python benchmarks/zoo_check.py [--steps 60] [--tasks arithmetic sentiment] [--algos ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time

import torch

from rlhf_env import plugins
from rlhf_env.algorithms.base import TrainContext
from rlhf_env.algorithms.run import metrics as M
from rlhf_env.algorithms.run.loop import evaluate_policy, train
from rlhf_env.tasks import get_task
from rlhf_env.tasks.base_models import load_base_model


def base_gold(task, n: int) -> dict[str, float]:
    ref, tok = load_base_model(task, device="cpu")
    return evaluate_policy(TrainContext(task, copy.deepcopy(ref), ref, tok, torch.device("cpu")), n)


def main() -> None:
    host = plugins.get_host()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--tasks", nargs="+", default=["arithmetic", "sentiment"])
    parser.add_argument("--algos", nargs="+", default=host.algorithms.names())
    parser.add_argument("--eval-prompts", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = []
    for task_name in args.tasks:
        task = get_task(task_name)
        base = base_gold(task, args.eval_prompts)
        for algo in args.algos:
            with tempfile.TemporaryDirectory() as out:
                start = time.perf_counter()
                records = train(
                    host.algorithms.get(algo),
                    task,
                    out,
                    steps=args.steps,
                    seed=args.seed,
                    eval_every=args.steps,
                    eval_prompts=args.eval_prompts,
                    progress=False,
                    device="cpu",
                    algo_name=algo,
                )
                seconds = time.perf_counter() - start
            final = records[-1]
            rows.append(
                {
                    "task": task_name,
                    "algorithm": algo,
                    "base_gold": base[M.REWARD_GOLD],
                    "final_gold": final[M.REWARD_GOLD],
                    "kl": final[M.OBJECTIVE_KL_EVAL],
                    "steps": args.steps,
                    "seconds": round(seconds, 1),
                    **{k: final[k] for k in (M.RM_HELDOUT_ACCURACY,) if k in final},
                }
            )
            r = rows[-1]
            print(
                f"{task_name:<11} {algo:<13} base {r['base_gold']:+.3f}  final {r['final_gold']:+.3f}  "
                f"KL {r['kl']:6.2f}  {r['steps']} steps  {r['seconds']:6.1f}s",
                flush=True,
            )
    print(json.dumps({"benchmark": "zoo_check", "eval_prompts": args.eval_prompts, "rows": rows}))


if __name__ == "__main__":
    main()
