"""Multi-turn exactness on every architecture of the matrix: the worst |env − full forward| per model.

Runs ``tests/test_multiturn_architectures.py`` (multi-turn episodes with groups, autoreset and rows
ending at different turns, recomputed by one plain full forward over their final ids) with
``RLHF_ENV_EXACTNESS_LOG`` set, and prints (or writes, ``--out FILE.md``) the table of its worst
errors per architecture: reference log-probs, sampler log-probs, KL terms and returns.

    python benchmarks/multiturn_exactness.py [--out benchmarks/results/multiturn_exactness.md]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

TEST = Path(__file__).resolve().parent.parent / "tests" / "test_multiturn_architectures.py"
COLUMNS = ("ref_logprobs", "sampler_logprobs", "kl", "returns")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="also write the table (markdown) here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "errors.jsonl"
        env = {**os.environ, "RLHF_ENV_EXACTNESS_LOG": str(log)}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TEST)]
        rc = subprocess.run(cmd, env=env, cwd=tmp).returncode
        rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    lines = [
        "| architecture | path | episodes | injections | " + " | ".join(COLUMNS) + " |",
        "|---|---|---|---|" + "---|" * len(COLUMNS),
    ]
    for r in rows:
        lines.append(
            f"| {r['arch']} | {r['path']} | {r['episodes']} | {r['injections']} | "
            + " | ".join(f"{r[c]:.1e}" for c in COLUMNS)
            + " |"
        )
    worst = max((max(r[c] for c in COLUMNS) for r in rows), default=float("nan"))
    lines.append("")
    archs = len({r["arch"] for r in rows})
    lines.append(f"Worst over {archs} architectures, both rollout paths: {worst:.1e} (the test's tolerance: 1e-4).")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
