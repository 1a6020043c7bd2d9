"""Where a suite's cells run: the local process pool (``rlhf_env.bench.runner``, the default) or Ray.

``rlhf bench --executor ray [--address ADDR]`` runs each cell as a Ray task asking for the
suite's resources: ``threads`` CPUs, and on a CUDA suite 1/``workers`` of a GPU (``workers``
cells share a GPU, as they do locally). The semantics are the local executor's: a cell that
fails is recorded and the rest go on, a rerun skips finished cells (the runner decides which
to submit), and a worker that dies fails only its own cell. Without ``--address`` a local
Ray instance is started (and stopped at the end); with one, the cluster there is joined.
Ray is an optional extra: ``pip install 'rlhf_env[ray]'``.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from rlhf_env.errors import UserError

EXECUTORS = ("local", "ray")


class ExecutorError(UserError, RuntimeError):
    """An executor that cannot run here: Ray missing, or a cluster address that does not answer."""


CONNECT_TIMEOUT_S = 10.0


def check_address(address: str, timeout: float = 3.0, answer_timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail fast unless ``host:port`` (or ``ray://host:port``) accepts a connection and speaks gRPC,
    as a Ray head (GCS) or Ray Client server does, within ``answer_timeout`` seconds."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ExecutorError(f"--address {address!r} is not HOST:PORT (or ray://HOST:PORT)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ExecutorError(
            f"no Ray cluster answers at {address} ({reason}); start one with `ray start --head`"
        ) from None
    _check_answers(address, f"{host}:{port}", answer_timeout)


def _check_answers(address: str, target: str, timeout: float) -> None:
    """A port that accepts but never answers (not Ray) would make ``ray.init`` wait for ever: wait for
    the gRPC handshake instead, for ``timeout`` seconds."""
    import grpc  # Ray's own dependency

    channel = grpc.insecure_channel(target)
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
    except grpc.FutureTimeoutError:
        raise ExecutorError(
            f"something at {address} accepts connections but gave no Ray handshake within {timeout:g}s "
            "(not a Ray cluster?); give the head's address as `ray start --head` prints it, or a longer --connect-timeout"
        ) from None
    finally:
        channel.close()


class RayExecutor:
    """Runs the runner's jobs ``(key, fn, args)`` as Ray tasks; call with the runner's executor arguments."""

    def __init__(
        self, address: str | None = None, num_gpus_per_cell: float = 0.0, connect_timeout: float = CONNECT_TIMEOUT_S
    ):
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ExecutorError("--executor ray needs Ray: pip install 'rlhf_env[ray]'") from None
        if not connect_timeout > 0:
            raise ExecutorError(f"--connect-timeout must be > 0, got {connect_timeout}")
        self.address, self.num_gpus = address, num_gpus_per_cell
        self.started = False
        if address is not None:  # join now: a cluster that is not there fails before the output folder is claimed
            check_address(address, answer_timeout=connect_timeout)
            self._connect()

    @classmethod
    def for_suite(cls, suite, address: str | None = None, connect_timeout: float | None = None) -> RayExecutor:
        from rlhf_env.bench.cells import suite_device

        gpus = 1.0 / max(suite.workers, 1) if suite_device(suite.device).type == "cuda" else 0.0
        return cls(address, gpus, CONNECT_TIMEOUT_S if connect_timeout is None else connect_timeout)

    def _connect(self) -> None:
        import ray

        if ray.is_initialized():
            return
        if self.address is None:
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        else:
            try:
                ray.init(address=self.address, log_to_driver=False, configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:  # answered, but not as a usable cluster
                raise ExecutorError(f"cannot join the Ray cluster at {self.address}: {exc}") from None
        self.started = True

    def close(self) -> None:
        import ray

        if self.started:
            ray.shutdown()
            self.started = False

    def __call__(self, jobs, display, workers: int, threads: int, out: Path) -> None:
        if not jobs:
            return
        import ray

        from rlhf_env.bench.display import summary
        from rlhf_env.bench.runner import _crashed

        self._connect()
        task = ray.remote(_run_job).options(num_cpus=threads, num_gpus=self.num_gpus, max_retries=0)
        running = {}
        for key, fn, args in jobs:
            running[task.remote(fn, args, threads, sys.path)] = (key, fn, args)
            display.start(key)
        while running:
            done, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
            for ref in done:
                key, fn, args = running.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as exc:  # the worker died (or the task could not run): this cell fails alone
                    result = _crashed(key, fn, args, out, exc)
                display.finish(key, summary(result))


def _run_job(fn, args, threads: int, paths: list[str]):
    """Inside a Ray worker: the runner's job with the suite's torch threads and the driver's import
    path (plugins installed beside the driver are found, as spawned pool workers find them)."""
    sys.path.extend(p for p in paths if p not in sys.path)
    from rlhf_env.bench.cells import _init_worker

    _init_worker(None, threads)
    return fn(*args)
