"""Rollout throughput: ``VectorTextGenEnv`` against Hugging Face ``generate`` + post-hoc scoring.

Both sides do the same work on the same models, batch and lengths (benchmarks/README.md):

* **env**: ``reset(seed)``, then the rollout path (``EpisodeStream``) until every row finished
  one episode, with the registered ``kv_cache`` generator: by default the chunked path, i.e.
  the sampler's ``generate`` (whole completions, static KV cache) and one ``step_chunk`` in
  which the env's KV-cached reference scores every completion token in one forward
  (KL, β = 0.05) and a ``RewardModel`` (a ``GPT2ForSequenceClassification``) scores the
  rows. Tokens counted = tokens the env applied (up to and including each row's EOS).
* **baseline**: ``policy.generate(do_sample=True, use_cache=True)`` on the same ``B``
  prompts, left-padded, with ``output_logits=True`` so the policy log-probs come from the
  logits generate already computed (no second policy pass: the cheaper honest way, and
  what the env gets from the agent too); then ONE reference forward over prompt ∘
  completion (mask-derived position ids) for per-token KL, and ONE reward-model forward.
  Tokens counted = completion tokens up to and including the first EOS.

``--model DIR`` (a local Hugging Face causal-LM folder, a ``.gguf`` file or ``package:NAME``,
as ``rlhf_env.models.local_model_dir`` resolves) measures that model instead of the tiny
configs: reference and policy are the checkpoint, the reward model its trunk under a seeded
random one-label head (a ``*ForSequenceClassification`` of the same config). Prompts go
through the tokenizer's chat template when it has one (the env's ``chat_template="auto"``);
the baseline encodes the same ids (``env.prompt_format``) and stops on ``env.stop_token_ids``.

``--clock cpu`` times by this process's CPU time (with ``--threads 1``, the time the work ran
whatever else a shared machine is running), as ``peer_speed.py`` does.

Sampling is from the full softmax on both sides (``top_k=0``: generate would otherwise
apply its default top-k of 50). The baseline's batched log-probs and scores are checked
against unpadded per-row ones first. Env and baseline runs are interleaved. Prints a
table, then one JSON line (the last line of stdout).

    python benchmarks/env_throughput.py [--batch 64] [--max-new-tokens 32] [--device cpu]
        [--group-size 1] [--dtype float32|bfloat16] [--repeats 5] [--warmup 2] [--configs ...] [--model DIR] [--threads N]
        [--clock wall|cpu] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import transformers

from rlhf_env import RewardModel, VectorTextGenEnv
from rlhf_env.bench.throughput_models import build_models, load_models
from rlhf_env.generation import DEFAULT_GENERATOR, make_sampler
from rlhf_env.prompts import DEFAULT_PROMPTS
from rlhf_env.rollout import EpisodeStream, first_episodes

BETA = 0.05
CONFIGS = {  # name -> build_tiny_model keyword arguments (``bpe_vocab``: a byte-level BPE tokenizer of that size)
    "tiny-2L-64d": dict(n_layer=2, n_head=2, n_embd=64),
    "small-4L-256d": dict(n_layer=4, n_head=4, n_embd=256),
    "base-6L-512d-bpe4k": dict(n_layer=6, n_head=8, n_embd=512, bpe_vocab=4096),
    # GPT-2 small's shape (~92M parameters with this vocabulary): for GPUs, not in the CPU default.
    "gpt2s-12L-768d-bpe8k": dict(n_layer=12, n_head=12, n_embd=768, bpe_vocab=8192),
}
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}  # cpu: this process's CPU time
CPU_CONFIGS = ["tiny-2L-64d", "small-4L-256d", "base-6L-512d-bpe4k"]


def make_env_side(
    ref,
    policy_model,
    reward,
    tokenizer,
    batch: int,
    n: int,
    device,
    dtype,
    cuda_graph: bool = False,
    group_size: int = 1,
):
    """A ``VectorTextGenEnv`` and its ``SamplingPolicy`` agent, ready for ``env_rollout`` (``group_size``
    rows per prompt, as GRPO and RLOO sample; the baseline generates for the same prompt list)."""
    env = VectorTextGenEnv(
        tokenizer,
        ref,
        reward,
        DEFAULT_PROMPTS,
        num_envs=batch,
        group_size=group_size,
        beta=BETA,
        max_new_tokens=n,
        device=device,
        dtype=dtype,
    )
    options = {"cuda_graph": True} if cuda_graph else {}
    agent = make_sampler(
        DEFAULT_GENERATOR,
        policy_model,
        batch,
        pad_token_id=env.pad_token_id,
        vocab_size=env.vocab_size,
        seed=0,
        stop_token_ids=env.stop_token_ids,
        **options,
    )  # the registered generation backend
    return env, agent


def env_rollout(env, agent, n: int, seed: int) -> int:
    """``reset(seed)``, then the rollout path until every row finished one episode (at most ``n`` steps,
    ``max_new_tokens`` = n); returns the number of generated tokens."""
    stream = EpisodeStream(env, agent, seed)
    first_episodes(stream, env.num_envs)
    return stream.tokens


def left_padded_batch(env, prompts: list[str], device):
    """``prompts`` encoded as the env encodes them (its chat template, if any), left-padded (as
    batched ``generate`` needs); returns (ids, mask), both (B, P)."""
    rows = env.prompt_format.encode_prompts(prompts)
    P = max(len(r) for r in rows)
    ids = torch.full((len(rows), P), env.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), P), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, P - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[b, P - len(r) :] = 1
    return ids.to(device), mask.to(device)


def first_stop(completion: torch.Tensor, stops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(is_stop, completion_mask)`` of (B, T) ``completion``: where a stop id is, and the real
    tokens (up to and including the first stop id)."""
    is_stop = torch.isin(completion, stops).long()
    done_before = (is_stop.cumsum(dim=1) - is_stop) > 0
    return is_stop, (~done_before).long()


@torch.inference_mode()
def baseline_rollout(policy_model, ref, reward: RewardModel, input_ids, attention_mask, n: int, stops, pad: int):
    """HF generate, then one reference and one reward forward; ``stops``: the env's stop ids.

    Returns ``(generated tokens, parts)``; ``parts`` holds the sequences, completion mask,
    reference log-probs, per-token rewards and scores, for ``check_baseline``.
    """
    out = policy_model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        do_sample=True,
        top_k=0,
        max_new_tokens=n,
        use_cache=True,
        pad_token_id=pad,
        eos_token_id=list(stops),
        return_dict_in_generate=True,
        output_logits=True,
    )
    P = input_ids.shape[1]
    completion = out.sequences[:, P:]  # (B, T), T <= n; pad after a row's EOS
    # Real completion tokens: up to and including the first stop id.
    is_stop, completion_mask = first_stop(completion, torch.tensor(stops, device=completion.device))  # (B, T)

    logits = torch.stack(out.logits, dim=1).float()  # (B, T, V), raw (unwarped) policy logits
    policy_lp = torch.log_softmax(logits, dim=-1).gather(2, completion[..., None]).squeeze(2)

    mask = torch.cat([attention_mask, completion_mask], dim=1)  # (B, P + T)
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
    ref_logits = ref(input_ids=out.sequences, attention_mask=mask, position_ids=position_ids).logits
    ref_lp = torch.log_softmax(ref_logits[:, P - 1 : -1].float(), dim=-1)
    ref_lp = ref_lp.gather(2, completion[..., None]).squeeze(2)
    kl = (policy_lp - ref_lp) * completion_mask  # (B, T) per-token KL, 0 on padding
    token_reward = -BETA * kl

    # Reward model over prompt ∘ completion, the stop id excluded (as the env scores it): it
    # reads the last non-pad token, which left padding keeps at the right end of each row.
    keep = completion_mask * (1 - is_stop)
    rm_mask = torch.cat([attention_mask, keep], dim=1)
    rm_ids = out.sequences.masked_fill(rm_mask == 0, reward.pad_token_id)
    rm_pos = (rm_mask.cumsum(dim=1) - 1).clamp(min=0)
    scores = reward.model(input_ids=rm_ids, attention_mask=rm_mask, position_ids=rm_pos).logits[:, 0].float()
    last = (completion_mask.sum(dim=1) - 1).clamp(min=0)
    token_reward[torch.arange(len(last), device=last.device), last] += scores  # as the env's last step
    token_reward.sum().item()  # materialise (and sync on GPU)
    parts = dict(sequences=out.sequences, completion_mask=completion_mask, ref_lp=ref_lp, scores=scores)
    return int(completion_mask.sum()), parts


@torch.inference_mode()
def check_baseline(ref, reward: RewardModel, input_ids, attention_mask, parts: dict, stops) -> tuple[float, float]:
    """Max |difference| of the baseline's batched, left-padded reference log-probs and
    scores from the same quantities computed row by row without padding."""
    P, err_lp, err_score = input_ids.shape[1], 0.0, 0.0
    for b in range(input_ids.shape[0]):
        prompt = input_ids[b][attention_mask[b].bool()]
        keep = parts["completion_mask"][b].bool()
        comp = parts["sequences"][b, P:][keep]
        full = torch.cat([prompt, comp])[None]
        lp = torch.log_softmax(ref(full).logits[0, len(prompt) - 1 : -1].float(), dim=-1)
        lp = lp.gather(1, comp[:, None]).squeeze(1)
        err_lp = max(err_lp, float((lp - parts["ref_lp"][b][keep]).abs().max()))
        scored = full[0, : full.shape[1] - int(len(comp) > 0 and int(comp[-1]) in stops)]
        score = reward.score_ids([scored.tolist()])[0]
        err_score = max(err_score, abs(float(score) - float(parts["scores"][b])))
    return err_lp, err_score


def timed(
    fns: dict, warmup: int, repeats: int, device: torch.device, clock=time.perf_counter
) -> dict[str, list[tuple[int, float]]]:
    """(tokens, seconds) of each ``fn() -> tokens`` in ``fns``, ``repeats`` times after ``warmup`` runs.

    The sides are interleaved (env, baseline, env, ...) so that a busy machine slows both
    alike; the caller takes medians.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    runs: dict[str, list[tuple[int, float]]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = clock()
            tokens = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            runs[name].append((tokens, clock() - t0))
    return runs


def bench_config(name: str, shape: dict | str, args, device, dtype) -> dict:
    """Measure env and baseline tokens/s for one model shape (a ``CONFIGS`` entry) or checkpoint path."""
    models = load_models if isinstance(shape, str) else build_models
    ref, policy_model, reward, tokenizer = models(shape, device, dtype)
    sizes = dict(group_size=args.group_size)
    env, agent = make_env_side(
        ref, policy_model, reward, tokenizer, args.batch, args.max_new_tokens, device, dtype, **sizes
    )
    _, info = env.reset(seed=args.seed)
    input_ids, attention_mask = left_padded_batch(env, list(info["prompt"]), device)
    pad, stops = env.pad_token_id, tuple(env.stop_token_ids)
    n = args.max_new_tokens

    baseline_args = (policy_model, ref, reward, input_ids, attention_mask, n, stops, pad)
    parts = baseline_rollout(*baseline_args)[1]
    err_lp, err_score = check_baseline(ref, reward, input_ids, attention_mask, parts, stops)

    sides = {
        "env": lambda: env_rollout(env, agent, n, args.seed),
        "baseline": lambda: baseline_rollout(*baseline_args)[0],
    }
    if args.cuda_graph:  # the same env, its sampler's decode forward replayed as a CUDA graph
        g_env, g_agent = make_env_side(
            ref, policy_model, reward, tokenizer, args.batch, n, device, dtype, True, **sizes
        )
        sides["env_graph"] = lambda: env_rollout(g_env, g_agent, n, args.seed)
    torch.manual_seed(args.seed)
    runs = timed(sides, args.warmup, args.repeats, device, CLOCKS[args.clock])
    env_rates, base_rates = ([t / s for t, s in runs[k]] for k in ("env", "baseline"))
    env_rate, base_rate = statistics.median(env_rates), statistics.median(base_rates)
    params = sum(p.numel() for p in ref.parameters())
    row = {
        "model": name,
        "params": params,
        "env_tokens_per_s": round(env_rate, 1),
        "baseline_tokens_per_s": round(base_rate, 1),
        "ratio": round(env_rate / base_rate, 3),
        "env_runs_tokens_per_s": [round(r, 1) for r in env_rates],
        "baseline_runs_tokens_per_s": [round(r, 1) for r in base_rates],
        "env_tokens_per_rollout": statistics.median(t for t, _ in runs["env"]),
        "baseline_tokens_per_rollout": statistics.median(t for t, _ in runs["baseline"]),
        "baseline_check_max_abs_err": {"ref_logprob": err_lp, "score": err_score},
        "chat_template": env.prompt_format.uses_template,
        "stop_token_ids": list(stops),
        "prompt_tokens_max": int(input_ids.shape[1]),
    }
    if "env_graph" in runs:
        graph_rate = statistics.median(t / s for t, s in runs["env_graph"])
        row.update(env_graph_tokens_per_s=round(graph_rate, 1), ratio_graph=round(graph_rate / base_rate, 3))
    return row


def print_table(rows: list[dict], args, device) -> None:
    """A readable fixed-width table of the results."""
    head = f"{'model':<15} {'params':>9} {'device':<6} {'dtype':<8} {'B':>4} {'G':>3} {'N':>4} {'env tok/s':>11} {'HF tok/s':>11} {'env/HF':>7}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['model']:<15} {r['params']:>9,} {device.type:<6} {args.dtype:<8} {args.batch:>4} {args.group_size:>3} "
            f"{args.max_new_tokens:>4} {r['env_tokens_per_s']:>11,.0f} {r['baseline_tokens_per_s']:>11,.0f} {r['ratio']:>7.2f}"
        )
    for r in rows:
        if "ratio_graph" in r:
            print(
                f"{r['model']}: env with CUDA-graph decode {r['env_graph_tokens_per_s']:,.0f} tok/s, {r['ratio_graph']:.2f}x HF"
            )
    for r in rows:
        env, base, err = r["env_runs_tokens_per_s"], r["baseline_runs_tokens_per_s"], r["baseline_check_max_abs_err"]
        print(
            f"{r['model']}: runs env {min(env):,.0f}-{max(env):,.0f}, HF {min(base):,.0f}-{max(base):,.0f} tok/s; "
            f"tokens/rollout env {r['env_tokens_per_rollout']:.0f}, HF {r['baseline_tokens_per_rollout']:.0f}; "
            f"HF-side check vs unpadded rows: ref logprob {err['ref_logprob']:.1e}, score {err['score']:.1e}"
        )


def _loadavg() -> float | None:
    """The 1-minute load average, where the OS reports one."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument(
        "--group-size", type=int, default=1, help="rows per prompt (GRPO's G; the baseline generates each copy)"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: the cores available)")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=CPU_CONFIGS)
    p.add_argument(
        "--model", help="a local HF causal-LM folder, .gguf file or package:NAME, measured instead of --configs"
    )
    p.add_argument("--cuda-graph", action="store_true", help="also time the env with CUDA-graph decoding (CUDA)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="wall clock, or this process's CPU time")
    p.add_argument("--out", help="also write the JSON summary to this file")
    args = p.parse_args(argv)
    if args.clock == "cpu" and args.device != "cpu":
        p.error("--clock cpu times CPU work; use it with --device cpu")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(args.threads or cores or 1)
    transformers.logging.set_verbosity_error()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    t0, load0 = time.perf_counter(), _loadavg()
    if args.model:
        rows = [bench_config(os.path.basename(os.path.normpath(args.model)), args.model, args, device, dtype)]
    else:
        rows = [bench_config(name, CONFIGS[name], args, device, dtype) for name in args.configs]
    print_table(rows, args, device)
    load = (load0, _loadavg())
    print(
        f"medians of {args.repeats} interleaved runs after {args.warmup} warm-up; {args.clock} clock; torch threads "
        f"{torch.get_num_threads()}; total {time.perf_counter() - t0:.1f}s; 1-min load average "
        f"{load[0]} at start, {load[1]} at end (other work on the machine makes CPU timings noisy)"
    )
    summary = {
        "benchmark": "env_throughput",
        "batch": args.batch,
        "group_size": args.group_size,
        "max_new_tokens": args.max_new_tokens,
        "device": str(device),
        "dtype": args.dtype,
        "beta": BETA,
        "repeats": args.repeats,
        "clock": args.clock,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "load_average_start_end": load,
        "configs": rows,
    }
    if args.model:
        summary["model"] = args.model
    if device.type == "cuda":
        summary["gpu"] = torch.cuda.get_device_name(device)
    line = json.dumps(summary)
    if args.out:
        with open(args.out, "w") as f:
            f.write(json.dumps(summary, indent=2) + "\n")
    print(line)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
