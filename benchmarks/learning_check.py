"""Rerun every learning test under each CPU kernel and several seeds; print value vs floor.

A learning test trains a tiny model and asserts that a reward rose past a margin. Float
rounding differs between ATen's CPU kernels (``default``, ``avx2``, ``avx512``), and a run
that passes by 0.01 on one may fail on the next, so the margins are set from the spread over
kernels and seeds that this script measures::

    python benchmarks/learning_check.py                     # every available kernel, seeds 0 1 2
    python benchmarks/learning_check.py --kernels default --seeds 0 -k ppo
    python benchmarks/learning_check.py --kernels avx2 --blas compatible   # MKL's portable code path

Each (kernel, seed) is one ``pytest -m learning`` run with ``ATEN_CPU_CAPABILITY`` and
``RLHF_ENV_LEARNING_SEED`` set; the tests' ``learning.check(value, floor)`` calls append to a
JSON-lines log (``RLHF_ENV_LEARNING_LOG``, see tests/conftest.py), from which the table is
made. A kernel the CPU lacks is skipped: asked for one, torch dies on the first vector op.

``ATEN_CPU_CAPABILITY`` picks ATen's own vectorised kernels (element-wise ops, softmax,
reductions) but not the matrix products: MKL picks its code path from the CPU, so an AVX-512
machine also multiplies matrices differently. ``--blas compatible`` sets ``MKL_CBWR=COMPATIBLE``
(MKL's portable code path, other rounding again) to stand in for that on a machine without it.
Exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ("default", "avx2", "avx512")


# The CPU flags each kernel needs (ATen's own check). torch takes ATEN_CPU_CAPABILITY on trust:
# asked for avx512 on an AVX2 CPU it reports AVX512 and dies on the first vector op (SIGILL).
NEEDS = {"default": set(), "avx2": {"avx2", "fma"}, "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq"}}


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def kernel_runs(kernel: str, flags: set[str]) -> bool:
    """Whether this CPU can run ``kernel`` and torch, asked for it, uses it."""
    if not NEEDS[kernel] <= flags:
        return False
    probe = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": kernel}
    got = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True).stdout.strip()
    return got.lower() == kernel


def run(kernel: str, blas: str, seed: int, log: Path, workers: int, select: str | None) -> int:
    env = {**os.environ, "ATEN_CPU_CAPABILITY": kernel, "RLHF_ENV_LEARNING_SEED": str(seed)}
    env.pop("MKL_CBWR", None)
    if blas == "compatible":
        env["MKL_CBWR"] = "COMPATIBLE"
    env["RLHF_ENV_LEARNING_LOG"] = str(log)
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "learning", "-n", str(workers), "-p", "no:cacheprovider"]
    cmd += ["-k", select] if select else []
    print(f"== kernel {kernel}, BLAS {blas}, seed {seed}: {' '.join(cmd[1:])}", flush=True)
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


def table(rows: list[dict]) -> str:
    """Markdown: one line per (test, quantity), a column per (kernel, seed), the floor and the smallest margin."""
    col = lambda r: (r["kernel"] + ("" if r.get("blas", "native") == "native" else "+cbwr"), r["seed"])  # noqa: E731
    cols = sorted({col(r) for r in rows})
    cells: dict[tuple[str, str], dict] = defaultdict(dict)
    floors: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in rows:
        key = (r["test"].split("::", 1)[-1], r["what"])
        cells[key][col(r)] = r["value"] - r["floor"]
        floors[key].append(r["floor"])
    head = "| test | quantity | " + " | ".join(f"{k} s{s}" for k, s in cols) + " | floor | min margin |"
    lines = [head, "|" + "---|" * (len(cols) + 4)]
    for key in sorted(cells):
        fl = floors[key]
        floor = f"{min(fl):.3f}" if max(fl) - min(fl) < 1e-9 else f"{min(fl):.3f}-{max(fl):.3f}"
        values = [cells[key].get(c) for c in cols]
        shown = ["–" if v is None else f"{v:+.3f}" for v in values]
        worst = min(v for v in values if v is not None)
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(shown) + f" | {floor} | {worst:+.3f} |")
    return "\n".join(lines) + "\n\nEach cell is value − floor (positive: passed); +cbwr: MKL_CBWR=COMPATIBLE.\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--blas", nargs="+", choices=("native", "compatible"), default=["native"])
    ap.add_argument("-k", dest="select", help="pytest -k expression: a subset of the learning tests")
    ap.add_argument("-n", dest="workers", type=int, default=2, help="pytest-xdist workers (default 2)")
    ap.add_argument("--out", type=Path, help="also write the table (markdown) and the raw rows (.jsonl) here")
    args = ap.parse_args(argv)
    if not (ROOT / "tests" / "conftest.py").is_file():
        ap.error(f"the learning tests live in a source checkout; {ROOT} has no tests/ (run it from a clone)")
    flags = cpu_flags()
    kernels = [k for k in args.kernels if kernel_runs(k, flags)]
    skipped = sorted(set(args.kernels) - set(kernels))
    if skipped:
        print(f"not on this CPU, skipped: {', '.join(skipped)}")
    log = Path(tempfile.mkstemp(prefix="learning_", suffix=".jsonl")[1])
    runs = [(k, b, s) for k in kernels for b in args.blas for s in args.seeds]
    failed = [r for r in runs if run(*r, log, args.workers, args.select) != 0]
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    report = table(rows) if rows else "no learning check ran\n"
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(report)
        args.out.with_suffix(".jsonl").write_text(log.read_text())
    if failed:
        print("failed runs (kernel, BLAS, seed):", failed)
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
