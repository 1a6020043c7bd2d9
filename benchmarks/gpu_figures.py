"""The device's measured ceilings, and how near the training update and decoding come to them.

The formulas: docs/maths.md §26. Measured in one run, on one device (CUDA; ``--device cpu`` runs the same code at toy sizes,
what the tests do):

* **peak**: a bf16 ``n × n × n`` matrix product on random data (mean of ``--repeats`` after
  warm-ups), in TFLOP/s; **bandwidth**: a device-to-device copy, bytes read plus written per
  second. These are the ceilings every figure below is a fraction of.
* **update MFU**: one policy-gradient update as the trainers run it: the policy's forward
  over ``B × T`` tokens under bf16 autocast, token log-probs in float32
  (``rlhf_env.scoring.next_token_logprobs``), a REINFORCE loss, and the shared
  ``rlhf_env.algorithms.run.plumbing.Optimizer`` step (backward, clipping, Adam). Model FLOPs per token
  are ``6 N + 12 L d T`` (N: parameters without the position table, the tied head counted
  once; the attention term uncausal, as in PaLM's MFU); MFU = model FLOP/s / peak.
* **decode**: the ``kv_cache`` generator's sampler (``rlhf_env.fastgen.sample_completions``)
  at batch ``B``, bf16 weights, ``K`` new tokens after ``P``-token prompts, no EOS (every
  row runs all ``K``). Each decode step must read every weight once and the KV cache written
  so far, so at the measured bandwidth it cannot take less than
  ``(2 N + 4 L d B (P + K/2)) / bandwidth`` seconds; ``of_floor`` = that floor over the
  measured time per token (1.0 = at the memory roofline). Prefill is included in the
  measured time, not in the floor. On CUDA each shape runs eagerly and with the decode
  forward replayed as a CUDA graph (``cuda_graph=True``).

    python benchmarks/gpu_figures.py [--device cuda] [--sizes gpu-8L-512d gpt2-small] [--out FILE]

Prints a table, then one JSON line (the last line of stdout).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from rlhf_env.algorithms.run.plumbing import Optimizer
from rlhf_env.fastgen import sample_completions
from rlhf_env.scoring import next_token_logprobs
from rlhf_env.tasks.base import GPU_SHAPE

SIZES = {  # name -> GPT-2 shape and vocabulary
    "gpu-8L-512d": dict(**GPU_SHAPE, vocab=128),  # the gpu suite's base models (a character vocabulary)
    "gpt2-small": dict(n_layer=12, n_head=12, n_embd=768, vocab=50257),  # GPT-2's 124M shape and vocabulary
    "toy": dict(n_layer=2, n_head=2, n_embd=64, vocab=96),  # for the CPU tests
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int, warmup: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup`` ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak(device, n: int, repeats: int, warmup: int = 3) -> float:
    """bf16 ``n³`` matrix products per second × 2n³, in TFLOP/s."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * n**3 / timed(lambda: a @ b, device, repeats, warmup) / 1e12


def copy_bandwidth(device, mbytes: int, repeats: int, warmup: int = 3) -> float:
    """Device-to-device copy of ``mbytes`` MB: bytes read plus written per second."""
    src = torch.empty(mbytes * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / timed(lambda: dst.copy_(src), device, repeats, warmup)


def build(size: str, device, dtype=None, seed: int = 0) -> GPT2LMHeadModel:
    s = SIZES[size]
    config = GPT2Config(
        vocab_size=s["vocab"],
        n_positions=1024,
        n_embd=s["n_embd"],
        n_layer=s["n_layer"],
        n_head=s["n_head"],
        bos_token_id=0,
        eos_token_id=0,
    )
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0  # the trainers' policies run without dropout
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    return model.to(device=device, dtype=dtype)


def matmul_params(model) -> int:
    """N: every parameter but the position table (a lookup; the tied token table is the head's matmul)."""
    return sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()


def update_figures(size: str, device, B: int, T: int, peak: float, repeats: int, warmup: int) -> dict:
    """Seconds per update of ``B × T`` tokens, model TFLOP/s and MFU against ``peak``."""
    model = build(size, device).train()
    opt = Optimizer(model.parameters(), lr=1e-5, max_grad_norm=1.0)
    c = model.config
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(c.vocab_size, (B, T), generator=gen).to(device)
    mask = torch.ones_like(ids)
    adv = torch.randn(B, T - 1, generator=gen).to(device)

    def update():
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logp = next_token_logprobs(model, ids, mask)
        opt.step(-(logp * adv).mean())

    seconds = timed(update, device, repeats, warmup)
    N = matmul_params(model)
    flops = (6 * N + 12 * c.n_layer * c.n_embd * T) * B * T
    tflops = flops / seconds / 1e12
    return dict(size=size, params_m=N / 1e6, B=B, T=T, seconds=seconds, tflops=tflops, mfu=tflops / peak)


def decode_figures(
    size: str, device, B: int, P: int, K: int, bandwidth: float, repeats: int, warmup: int, cuda_graph: bool = False
) -> dict:
    """Decode tokens/s of the kv_cache sampler and its fraction of the weight-and-cache bandwidth floor."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build(size, device, dtype).eval()
    c = model.config
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(1, c.vocab_size, (B, P), generator=gen).to(device)
    lengths = torch.full((B,), P, device=device)
    g = torch.Generator(device=device).manual_seed(0)

    def decode():
        sample_completions(
            model,
            ids,
            lengths,
            K,
            pad_token_id=0,
            eos_token_id=None,
            vocab_size=c.vocab_size,
            generator=g,
            cuda_graph=cuda_graph,
        )

    seconds = timed(decode, device, repeats, warmup)
    width = torch.finfo(dtype).bits // 8
    N = matmul_params(model)
    step_bytes = width * (N + 2 * c.n_layer * c.n_embd * B * (P + K / 2))  # weights + the mean KV cache read
    floor = K * step_bytes / bandwidth
    return dict(
        size=size,
        params_m=N / 1e6,
        B=B,
        P=P,
        K=K,
        seconds=seconds,
        tokens_per_s=B * K / seconds,
        of_floor=floor / seconds,
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--sizes", nargs="+", default=["gpu-8L-512d", "gpt2-small"], choices=list(SIZES))
    p.add_argument("--matmul-n", type=int, default=8192)
    p.add_argument("--copy-mb", type=int, default=2048)
    p.add_argument("--update", nargs="+", default=["256x64", "32x1024"], help="B x T shapes of the update")
    p.add_argument("--decode", nargs="+", default=["256x32x32", "64x32x256"], help="B x P x K decode shapes")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = matmul_peak(device, args.matmul_n, args.repeats)
    bandwidth = copy_bandwidth(device, args.copy_mb, args.repeats)
    print(f"{name}: bf16 matmul {peak:.1f} TFLOP/s (n={args.matmul_n}), copy {bandwidth / 1e9:.0f} GB/s")
    updates, decodes = [], []
    for size in args.sizes:
        for shape in args.update:
            B, T = map(int, shape.split("x"))
            updates.append(update_figures(size, device, B, T, peak, args.repeats, args.warmup))
            u = updates[-1]
            print(
                f"update  {size:12s} {u['params_m']:6.1f}M B={B:4d} T={T:5d}: {u['seconds'] * 1e3:8.1f} ms "
                f"{u['tflops']:7.1f} TFLOP/s  MFU {u['mfu']:.3f}",
                flush=True,
            )
        for shape in args.decode:
            B, P, K = map(int, shape.split("x"))
            for graph in [False, True] if device.type == "cuda" else [False]:
                decodes.append(decode_figures(size, device, B, P, K, bandwidth, args.repeats, args.warmup, graph))
                d = decodes[-1]
                print(
                    f"decode  {size:12s} {d['params_m']:6.1f}M B={B:4d} P={P:4d} K={K:4d} "
                    f"{'graph' if graph else 'eager'}: {d['tokens_per_s']:10.0f} tok/s "
                    f"{d['of_floor']:.3f} of the bandwidth floor",
                    flush=True,
                )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result = dict(
        device=name,
        torch=torch.__version__,
        matmul_tflops=peak,
        copy_gbps=bandwidth / 1e9,
        update=updates,
        decode=decodes,
    )
    line = json.dumps(result)
    if args.out:
        with open(args.out, "w") as f:
            f.write(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
