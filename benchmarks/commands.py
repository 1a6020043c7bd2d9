"""The benchmarks layer's ``rlhf bench`` command (registered in ``rlhf_env.bench.builtins``)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rlhf_env.errors import SettingError
from rlhf_env.plugins.cli import Command


# -- rlhf bench ---------------------------------------------------------------------------
def cmd_bench(args: argparse.Namespace) -> int:
    """Run a benchmark suite (algorithms × tasks × seeds, equal budgets); tables and plots in --out."""
    # The CLI is the top layer: the benchmark runner sits on the algorithms.
    from rlhf_env.algorithms.run.runfolder import claim_run_folder
    from rlhf_env.bench.report import write_report
    from rlhf_env.bench.runner import run_suite, suite_device
    from rlhf_env.bench.suite import load_suite

    if args.workers is not None and args.workers < 0:  # before the output folder is made
        raise SettingError(f"--workers must be >= 0 (0: cells run in this process), got {args.workers}")
    suite = load_suite(args.suite)
    if args.baseline:
        from rlhf_env.bench.trl_baseline import require_trl

        require_trl()  # before the suite runs, not after
    suite_device(suite.device)  # a device this machine lacks fails before the folder is touched
    executor = None
    if args.executor == "ray":
        from rlhf_env.bench.executors import RayExecutor

        # Ray missing, or no cluster answering at --address (a bounded wait): fail before the folder is claimed.
        executor = RayExecutor.for_suite(suite, args.address, args.connect_timeout)
    elif args.address is not None or args.connect_timeout is not None:
        raise SettingError("--address and --connect-timeout need --executor ray")
    out = Path(args.out or Path("runs") / "bench" / suite.name)
    print(f"rlhf bench: suite {suite.name!r} ({suite.path}) -> {out}")
    t0 = time.perf_counter()
    try:
        with claim_run_folder(out):  # one bench at a time writes a results folder
            try:
                results = run_suite(suite, out, workers=args.workers, progress=not args.no_progress, executor=executor)
            finally:
                if executor is not None:
                    executor.close()
            if args.baseline:
                from rlhf_env.bench.trl_baseline import run_trl_baseline

                run_trl_baseline(suite, out, progress=not args.no_progress)  # failures are recorded in the table
            paths = write_report(suite, out, total_s=time.perf_counter() - t0)
    finally:
        if executor is not None:
            executor.close()  # also when the folder could not be claimed (a joined cluster is left)
    print(Path(paths["markdown"]).read_text())
    failed = [r for r in results if r.get("status") != "ok"]
    print(
        f"{len(results) - len(failed)} of {len(results)} cells ok in {(time.perf_counter() - t0) / 60:.1f} min; "
        + ", ".join(str(p) for p in paths.values())
    )
    return 1 if failed else 0


def _bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--suite",
        default="default",
        help="a suite TOML file, or a shipped suite: default, quick, full, real, multiturn, gpu",
    )
    p.add_argument("--out", default=None, help="results directory (default: runs/bench/<suite>); rerun to resume")
    p.add_argument("--workers", type=int, default=None, help="cells at once (default: the suite's; 0: in-process)")
    p.add_argument(
        "--baseline", choices=["trl"], default=None, help="also run TRL's GRPO/DPO trainers (extra: compare)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress display")
    p.add_argument(
        "--executor", choices=["local", "ray"], default="local", help="local process pool, or Ray tasks (extra: ray)"
    )
    p.add_argument(
        "--address", default=None, help="with --executor ray: a running cluster's HOST:PORT (default: local)"
    )
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="with --address: how long to wait for the cluster's answer (default 10)",
    )


BENCH = Command(
    "compare algorithms on tasks over seeds at equal budgets",
    _bench_arguments,
    cmd_bench,
    lambda args: "interrupted; run the same command to resume",
)
