"""Peak memory of DPO, RLOO and GRPO steps on a real model, measured against the analytic estimate.

    python -m rlhf_env.bench.real_memory --model DIR [--algos dpo,rloo,grpo --steps 2 --dtype bfloat16
        --set rloo:num_prompts=4 --out benchmarks/results/real_memory.md]

Each algorithm trains in a fresh process (peaks do not mix) on the arithmetic task, a full
fine-tune from ``--model`` with its defaults but ``lr=1e-6`` and the ``--set`` overrides, for
``--steps`` steps (the loop's ``measure_memory``: the peak tensor memory of the first two steps,
``memory/peak_mb``, and the estimate, ``memory/estimate_mb``, docs/maths.md §24). The table also
gives the process's peak resident set (CPU) and the estimate's parts. Appends the table to the
``--out`` markdown file (a heading per model and dtype).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ALGOS = ("dpo", "rloo", "grpo")
MIB = 2**20


def run_one(args: argparse.Namespace) -> dict:
    """Train ``args.algo`` in this process; its memory figures."""
    import torch

    torch.set_num_threads(args.threads)
    from rlhf_env import lmhead
    from rlhf_env.algorithms.run import loop, memory
    from rlhf_env.algorithms.run import metrics as M
    from rlhf_env.algorithms.run.loop import train
    from rlhf_env.algorithms.run.overrides import split_assignments, typed_overrides
    from rlhf_env.commands import torch_dtype
    from rlhf_env.plugins import get_host
    from rlhf_env.tasks import get_task

    spec = get_host().algorithms.get(args.algo)
    config = typed_overrides(spec.Config, split_assignments(["lr=1e-6", *args.set]), from_text=True, where="--set")
    parts: dict = {}
    real_estimate = memory.estimate

    def recording_estimate(*a, **k):  # the parts, beside the total the loop records
        est = real_estimate(*a, **k)
        if est is not None:
            parts.update({key: round(v / MIB, 1) for key, v in est.parts.items()})
        return est

    memory.estimate = recording_estimate
    loop._save_checkpoint = lambda *a, **k: None  # memory only (and a GGUF-dequantised config cannot be saved)
    if args.no_chunks:  # the plain path for every size: the figures before chunked log-probs
        lmhead.LOGPROB_CHUNK_BYTES = 2**62
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        records = train(
            spec,
            get_task("arithmetic"),
            out,
            steps=args.steps,
            model_path=args.model,
            config=config,
            eval_every=10**6,
            eval_prompts=1,
            checkpoint_every=10**6,
            device=torch.device(args.device),
            dtype=torch_dtype(args.dtype),
            progress=False,
            measure_memory=True,
        )
    rec = next(r for r in records if M.MEMORY_PEAK_MB in r)
    return {
        "algo": args.algo,
        "config": {k: v for k, v in config.items()},
        "peak_mb": round(rec[M.MEMORY_PEAK_MB], 1),
        "estimate_mb": round(rec.get(M.MEMORY_ESTIMATE_MB, float("nan")), 1),
        "no_chunks": bool(args.no_chunks),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "step0_kl_loss": records[0].get(M.LOSS_KL),
        "step0_grad_norm": records[0].get(M.OPTIM_GRAD_NORM),
        "wall_s": round(time.perf_counter() - t0, 1),
        "parts": parts,
    }


def table(model: str, dtype: str, rows: list[dict]) -> str:
    lines = [
        f"## {model}, dtype {dtype}",
        "",
        f"{platform.machine()} CPU, {rows[0]['steps']} steps, arithmetic task, lr 1e-6; "
        "peak = `memory/peak_mb` (tensor memory of the first two steps), RSS = the process's peak resident set.",
        "",
        "| algorithm | overrides | peak MiB | estimate MiB | peak / estimate | peak RSS MiB | estimate parts (MiB) | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["peak_mb"] / r["estimate_mb"] if r["estimate_mb"] == r["estimate_mb"] else float("nan")
        parts = ", ".join(f"{k} {v}" for k, v in r["parts"].items())
        sets = " ".join(f"{k}={v}" for k, v in r["config"].items() if k != "lr") or "defaults"
        lines.append(
            f"| {r['algo']} | {sets} | {r['peak_mb']:.0f} | {r['estimate_mb']:.0f} | {ratio:.2f} | "
            f"{r['peak_rss_mb']:.0f} | {parts} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a local Hugging Face causal LM folder")
    p.add_argument("--algos", default=",".join(ALGOS))
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--dtype", default=None, help="bfloat16 or float16: mixed precision (default: as saved)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="ALGO:KEY=VALUE", help="a config override")
    p.add_argument("--out", default=None, help="markdown file the table is appended to")
    p.add_argument("--no-chunks", action="store_true", help="log-probs from whole logits (the figures before chunking)")
    p.add_argument("--algo", default=None, help=argparse.SUPPRESS)  # a child: one algorithm
    args = p.parse_args(argv)
    if args.algo:
        print(json.dumps(run_one(args)))
        return
    rows = []
    for algo in args.algos.split(","):
        sets = [s.split(":", 1)[1] for s in args.set if s.split(":", 1)[0] == algo]
        cmd = [sys.executable, "-m", "rlhf_env.bench.real_memory", "--algo", algo, "--model", args.model]
        cmd += [f"--{k}={getattr(args, k)}" for k in ("steps", "device", "threads") if getattr(args, k) is not None]
        cmd += [f"--dtype={args.dtype}"] if args.dtype else []
        cmd += ["--no-chunks"] if args.no_chunks else []
        cmd += [f"--set={s}" for s in sets]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{algo} failed:\n{done.stderr[-3000:]}")
        out = done.stdout
        row = json.loads(out.strip().splitlines()[-1])
        row["steps"] = args.steps
        print(json.dumps(row), flush=True)
        rows.append(row)
    text = table(
        args.model, (args.dtype or "as saved") + (", whole logits" if args.no_chunks else ", chunked log-probs"), rows
    )
    print(text)
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(("\n" if path.exists() and path.stat().st_size else "") + text)


if __name__ == "__main__":
    main()
