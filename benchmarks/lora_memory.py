"""LoRA against full fine-tuning on one model: peak memory and steps/s of GRPO, printed as one JSON line.

    python -m rlhf_env.bench.lora_memory [--layers 6 --width 512 --steps 6 --rank 8 --device cpu]

Each mode runs in a fresh process (peaks do not mix): a GPT-2-shaped model of the given size,
GRPO on the arithmetic task for ``--steps`` steps. Memory: on CUDA the peak of allocated
memory; on CPU the growth of the process's peak resident set over its size once the model
is loaded (weights, gradients, Adam state and activations). Speed: steps/s over the steps
after the first (which pays one-off costs).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_mode(args: argparse.Namespace) -> dict:
    """Train in this process; the measurements of one mode."""
    import torch

    torch.set_num_threads(args.threads)
    from rlhf_env.algorithms.run import metrics as M
    from rlhf_env.algorithms.run.loop import train
    from rlhf_env.algorithms.scale.lora import LoraSettings
    from rlhf_env.plugins import get_host
    from rlhf_env.tasks import get_task

    spec = get_host().algorithms.get("grpo")
    task = get_task("arithmetic")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = _rss_mb()
    settings = LoraSettings(args.rank) if args.mode == "lora" else None
    config = {"num_prompts": 8, "group_size": 4, "num_minibatches": 2}
    with tempfile.TemporaryDirectory() as out:
        records = train(
            spec,
            task,
            out,
            steps=args.steps,
            model_path=args.model,
            config=config,
            eval_every=10**6,
            eval_prompts=8,
            checkpoint_every=10**6,
            device=device,
            progress=False,
            lora_settings=settings,
        )
    times = [r[M.PERF_STEP_TIME_S] for r in records[1:]]
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else _rss_mb() - before
    return {"peak_memory_mb": round(peak, 1), "steps_per_s": round(len(times) / sum(times), 3)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--mode", choices=("full", "lora"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.mode:  # a child: one mode
        print(json.dumps(run_mode(args)))
        return
    from rlhf_env.tiny import build_char_tokenizer, build_tiny_model, save_tiny

    with tempfile.TemporaryDirectory() as tmp:
        n_head = max(1, args.width // 64)
        model, tok = build_tiny_model(
            build_char_tokenizer("0123456789+-*= "), n_layer=args.layers, n_head=n_head, n_embd=args.width
        )
        path = save_tiny(model, tok, Path(tmp) / "model")
        result: dict = {"parameters": model.num_parameters(), "device": args.device, "steps": args.steps}
        result["lora_rank"] = args.rank
        for mode in ("full", "lora"):
            cmd = [sys.executable, "-m", "rlhf_env.bench.lora_memory", "--mode", mode, "--model", str(path)]
            cmd += [f"--{k}={getattr(args, k)}" for k in ("steps", "rank", "device", "threads")]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            result[mode] = json.loads(out.strip().splitlines()[-1])
    result["memory_ratio_lora_to_full"] = round(result["lora"]["peak_memory_mb"] / result["full"]["peak_memory_mb"], 3)
    result["speed_ratio_lora_to_full"] = round(result["lora"]["steps_per_s"] / result["full"]["steps_per_s"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
