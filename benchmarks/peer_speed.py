"""Training speed against TRL: our ``grpo`` and ``dpo`` iterations per second beside TRL 1.x's
``GRPOTrainer`` and ``DPOTrainer``, on the same model, data, batch, group size and lengths.

For each task: the task's base model (shipped or cached), the registered config's defaults
(GRPO: ``num_prompts × group_size`` completions of ``max_new_tokens`` per iteration, in
``num_minibatches`` optimizer steps; DPO: ``batch_size`` pairs per step from the same
annotated pairs), and TRL set up to match them exactly as ``rlhf bench --baseline trl``
does (``benchmarks/trl_baseline.py``: same hyperparameters, dropout off, positions from the
mask). The sides run one after the other in this process with the same torch threads:
ours, TRL, ours again (so a change of load on a shared machine biases neither side).
Timed: steady-state iterations after ``--warmup`` ones (set-up excluded on both sides: our
DPO's one-off reference pass over the pairs, TRL's dataset tokenisation); one of our GRPO
iterations is ``num_minibatches`` TRL optimizer steps, its generation included. ``ratio`` is
ours / TRL in iterations per second (medians). Prints a table, then one JSON line.

``--clock cpu`` times both sides by this process's CPU time instead of the wall clock: with
one torch thread that is the time the work ran, whatever else the machine was running (on a
shared machine the wall clock of a step can swing several-fold with its neighbours' load).

Equal work, and where ours does it differently: both sides score every completion token
of the same batch with the policy, in float32. Our DPO computes the reference log-probs
once at set-up (timed out, like TRL's tokenisation), TRL once per step; ours scores a pair
as one row whose prompt runs once for chosen and rejected, and our GRPO scores the rows of
a minibatch that share a prompt as one such tree, rows packed without padding
(``rlhf_env.packing``); TRL pads one row per completion. The log-probs are the same up to
float rounding (``tests/test_packing.py``).

``--model DIR`` (a local Hugging Face causal-LM folder, a ``.gguf`` file or ``package:NAME``)
trains that checkpoint instead of the task's base model, on the task's prompts and gold. When
its tokenizer has a chat template, our side renders prompts through it (``chat_template="auto"``)
and TRL gets the same rendered text as its prompts (standard format: the same prompt ids; TRL's
DPO then ends each completion with the EOS, as ours ends it with the end of turn, one id for
ChatML). With ``--model``, TRL's DPO precomputes its reference log-probs before training
(``precompute_ref_log_probs``), as ours does, and the pairs are just the timed steps' ones.
``--num-prompts``, ``--group-size``, ``--dpo-batch`` and ``--max-new-tokens`` set the batch
shape on both sides (default: the configs' and the task's). Completion tokens trained per
iteration are reported for both sides (``*_tokens_per_iteration``; sampled lengths differ).

    python benchmarks/peer_speed.py [--tasks arithmetic sentiment] [--algorithms grpo dpo]
        [--iterations 3] [--warmup 1] [--threads 1] [--clock wall|cpu] [--model DIR]
        [--num-prompts P] [--group-size G] [--dpo-batch N] [--max-new-tokens T] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

from rlhf_env import plugins
from rlhf_env.algorithms.run import metrics as M
from rlhf_env.bench.trl_baseline import dpo_trainer, grpo_trainer, mask_positions, require_trl
from rlhf_env.tasks import get_task
from rlhf_env.tasks.base_models import load_base_model

SEED = 0
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter  # set by --clock


def time_ours(task, model, algorithm: str, cfg, iterations: int, warmup: int) -> tuple[list[float], list[float]]:
    """Seconds and training tokens (``perf/tokens``) of each of our iterations after ``warmup`` (≥ 1) ones.

    The run is ``rlhf train``'s (``loop.train``: its stages, seeds and sinks) on ``model`` (None: the
    task's base model), in a scratch run folder with no evaluation and one checkpoint, after the last
    step; an iteration is the time between two steps' records, by ``clock``.
    """
    from rlhf_env.algorithms.run.loop import train

    ticks, tokens = [], []

    def tick(record, _done):
        ticks.append(clock())
        tokens.append(float(record.get(M.PERF_TOKENS, float("nan"))))

    with tempfile.TemporaryDirectory() as out:
        train(
            plugins.get_host().algorithms.get(algorithm),
            task,
            Path(out) / "run",
            steps=warmup + iterations,
            seed=SEED,
            model_path=model,
            config=dataclasses.asdict(cfg),  # every field: no pretrained preset changes the batch
            eval_every=0,
            checkpoint_every=warmup + iterations,
            device="cpu",
            dtype=torch.float32 if model else None,
            progress=False,
            algo_name=algorithm,
            callback=tick,
        )
    return [b - a for a, b in zip(ticks, ticks[1:])][warmup - 1 :], tokens[warmup:]


def time_trl(
    task, ref, tok, algorithm: str, cfg, iterations: int, warmup: int, real: bool = False
) -> tuple[list[float], list[float]]:
    """Seconds of each TRL iteration (``steps_per_iteration`` optimizer steps) after ``warmup`` ones, and
    (GRPO) its completion tokens (TRL's logged ``completions/mean_length`` × the generation batch).
    ``real``: a checkpoint (``--model``): prompts rendered as our env renders them, DPO reference precomputed."""
    from transformers import TrainerCallback

    per = cfg.num_minibatches * cfg.num_iterations if algorithm == "grpo" else 1
    stamps: list[float] = []
    lengths: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if not stamps:
                stamps.append(clock())

        def on_step_end(self, args, state, control, **kw):
            stamps.append(clock())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                lengths.append(float(logs["completions/mean_length"]))

    torch.manual_seed(SEED)
    model = mask_positions(copy.deepcopy(ref)).train()
    steps = warmup + iterations
    with tempfile.TemporaryDirectory() as out, open(os.devnull, "w") as quiet:
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            device = torch.device("cpu")
            render = _renderer(task, ref, tok) if real else None
            if algorithm == "grpo":
                trainer = grpo_trainer(task, model, tok, cfg, steps, SEED, Path(out), device, render)
                trainer.args.logging_steps = per  # one log (mean completion length) per iteration
            else:
                trainer = dpo_trainer(task, model, ref, tok, cfg, steps, SEED, Path(out), device, render, real)
            trainer.add_callback(Clock())
            trainer.train()
    ends = stamps[::per]  # iteration boundaries
    tokens = [n * cfg.num_prompts * cfg.group_size for n in lengths] if algorithm == "grpo" else []
    return [b - a for a, b in zip(ends, ends[1:])][warmup:], tokens[warmup:]


def _renderer(task, ref, tok):
    """Prompt text -> the text of the ids our env gives the policy (its chat template, if any), or None."""
    from rlhf_env.prompt_format import PromptFormat

    fmt = PromptFormat(tok, "auto", getattr(ref, "generation_config", None))
    if not fmt.uses_template:
        return None
    return lambda text: tok.decode(fmt.encode_prompt(text))


def shape_overrides(algorithm: str, args) -> dict:
    """The config fields that ``--num-prompts``, ``--group-size`` and ``--dpo-batch`` set (only those given)."""
    if algorithm == "grpo":
        given = {"num_prompts": args.num_prompts, "group_size": args.group_size}
    else:
        given = {"batch_size": args.dpo_batch}
        if args.model:  # only the timed steps' pairs: each is two samples of the real model at set-up
            given["num_pairs"] = (args.dpo_batch or 64) * (args.warmup + args.iterations)
    return {k: v for k, v in given.items() if v is not None}


def bench(task_name: str, algorithm: str, args) -> dict:
    knobs = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}
    task = get_task(task_name, **knobs)
    if args.model:
        from rlhf_env.models import load_pretrained, local_model_dir

        ref, tok = load_pretrained(local_model_dir(args.model), "cpu", torch.float32)
    else:
        ref, tok = load_base_model(task, device="cpu", progress=False)
    cfg = plugins.get_host().algorithms.get(algorithm).make_config(**shape_overrides(algorithm, args))
    n, w = args.iterations, args.warmup
    # Ours before and after TRL's run, so a change in the machine's load in between biases neither side.
    ours, ours_tokens = time_ours(task, args.model, algorithm, cfg, n, w)
    trl, trl_tokens = time_trl(task, ref, tok, algorithm, cfg, n, w, real=bool(args.model))
    more, more_tokens = time_ours(task, args.model, algorithm, cfg, n, w)
    ours, ours_tokens = ours + more, ours_tokens + more_tokens
    ours_rate, trl_rate = 1 / statistics.median(ours), 1 / statistics.median(trl)
    shape = (
        {"completions_per_iteration": cfg.num_prompts * cfg.group_size, "group_size": cfg.group_size}
        if algorithm == "grpo"
        else {"pairs_per_step": cfg.batch_size}
    )
    return {
        "task": task_name,
        "algorithm": algorithm,
        "params": sum(p.numel() for p in ref.parameters()),
        "max_new_tokens": task.max_new_tokens,
        **shape,
        "ours_iterations_per_s": round(ours_rate, 3),
        "trl_iterations_per_s": round(trl_rate, 3),
        "ratio": round(ours_rate / trl_rate, 3),
        "ours_runs_s": [round(t, 3) for t in ours],
        "trl_runs_s": [round(t, 3) for t in trl],
        "ours_tokens_per_iteration": ours_tokens,
        "trl_tokens_per_iteration": [round(t, 1) for t in trl_tokens],
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=["arithmetic", "sentiment"])
    p.add_argument("--algorithms", nargs="+", choices=["grpo", "dpo"], default=["grpo", "dpo"])
    p.add_argument("--iterations", type=int, default=3, help="timed iterations per side")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="wall clock, or this process's CPU time")
    p.add_argument("--model", help="a local HF causal-LM folder, .gguf file or package:NAME, trained instead")
    p.add_argument("--num-prompts", type=int, help="GRPO prompts per iteration (default: the config's)")
    p.add_argument("--group-size", type=int, help="GRPO completions per prompt (default: the config's)")
    p.add_argument("--dpo-batch", type=int, help="DPO pairs per step (default: the config's)")
    p.add_argument("--max-new-tokens", type=int, help="completion length limit (default: the task's)")
    p.add_argument("--out", help="also write the JSON summary to this file")
    args = p.parse_args(argv)
    if args.warmup < 1:
        p.error("--warmup must be >= 1: an iteration is timed from the end of the one before")
    return args


def main(argv=None) -> dict:
    global clock
    args = parse_args(argv)
    clock = CLOCKS[args.clock]
    trl = require_trl()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    t0 = time.perf_counter()
    rows = [bench(task, algo, args) for task in args.tasks for algo in args.algorithms]
    head = f"{'task':<11} {'algo':<5} {'params':>9} {'ours it/s':>10} {'TRL it/s':>9} {'ours/TRL':>8}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(
            f"{r['task']:<11} {r['algorithm']:<5} {r['params']:>9,} {r['ours_iterations_per_s']:>10.3f} "
            f"{r['trl_iterations_per_s']:>9.3f} {r['ratio']:>8.2f}"
        )
    print(
        f"medians of {args.iterations} iterations after {args.warmup} warm-up (ours twice: before and after TRL); "
        f"torch threads {torch.get_num_threads()}; {args.clock} clock; total {time.perf_counter() - t0:.0f}s"
    )
    summary = {
        "benchmark": "peer_speed",
        "threads": torch.get_num_threads(),
        "clock": args.clock,
        "iterations": args.iterations,
        "warmup": args.warmup,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "model": args.model,
        "results": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            f.write(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
