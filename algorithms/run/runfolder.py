"""A run's folder: who owns it (a lock), its checkpoint written so a crash never loses it, its metrics file.

Used by the training loop (one folder per run) and the benchmark runner (one folder per suite
output). Every crash point leaves a folder that resumes:

- the lock is an OS lock on ``.lock`` (``flock``), so the kernel drops it when its process dies:
  a lock left by a killed process is stale and simply taken; ``.lock`` tells who holds it;
- a checkpoint is written to ``.checkpoint-*`` and renamed into place; the old one is first
  renamed to ``.old-<pid>``, and a resume that finds no ``checkpoint/`` puts that one back;
- a torn last line of ``metrics.jsonl`` (power cut, full disk) is dropped with a warning; a bad
  line before it is an error naming the file and the line.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rlhf_env.errors import RunWarning, UserError

CHECKPOINT = "checkpoint"
LOCK = ".lock"
_held: dict[str, int] = {}  # folders this process has locked -> nesting depth (the runner locks, then its cells)


class RunFolderError(UserError, ValueError):
    """An output folder that cannot be used: a file, owned by another process, damaged, or holding another run."""


class RunLockedError(RunFolderError):
    """Another live process owns the folder."""


# -- the lock -------------------------------------------------------------------------------


@contextlib.contextmanager
def claim_run_folder(out: str | os.PathLike) -> Iterator[Path]:
    """Create ``out`` if needed and own it for the duration (nested claims by this process are free)."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"{out} is a file; the output path must be a folder (it holds the run's files)")
    out.mkdir(parents=True, exist_ok=True)
    key = str(out.resolve())
    if key in _held:
        _held[key] += 1
        try:
            yield out
        finally:
            _held[key] -= 1
        return
    fd = _acquire(out)
    _held[key] = 1
    try:
        yield out
    finally:
        del _held[key]
        with contextlib.suppress(OSError):
            os.unlink(out / LOCK)  # still holding it: nobody can take the file we remove
        os.close(fd)


def _acquire(out: Path) -> int:
    path = out / LOCK
    for _ in range(20):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):
            holder = _describe_holder(path)
            os.close(fd)
            raise RunLockedError(
                f"{out} is in use by {holder}; one process at a time writes a run folder: wait for it to "
                "finish (or stop it), or use another output folder"
            )
        try:
            current = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            current = False
        if current:
            since = time.strftime("%Y-%m-%d %H:%M:%S")
            info = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv), "since": since}
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(info).encode())
            return fd
        os.close(fd)  # the holder removed the file as we opened it: lock the new one
    raise RunFolderError(f"{out}: could not take the folder's lock {path}")


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def lock_holder(out: str | os.PathLike) -> str | None:
    """Who holds ``out``'s lock when another process does; None when it is free or this process's."""
    out = Path(out).expanduser()
    path = out / LOCK
    if not path.exists() or str(out.resolve()) in _held:
        return None
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        return None if _try_lock(fd) else _describe_holder(path)
    finally:
        os.close(fd)  # releases the probe's lock, if it took one


def _describe_holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        where = "" if info.get("host") == socket.gethostname() else f" on {info.get('host')}"
        return f"pid {info['pid']}{where} ({info.get('command') or '?'}, since {info.get('since', '?')})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


# -- checkpoints ----------------------------------------------------------------------------


class CheckpointWriteError(RunFolderError):
    """A checkpoint could not be written (a full disk, say); the previous one is kept."""


def write_checkpoint(out: Path, save: Callable[[Path], None], resumes_from: int | None = None) -> None:
    """``save(folder)`` into a temporary folder, then swap it in as ``out/checkpoint``.

    Between the two renames ``checkpoint/`` is missing and the previous one is ``.old-<pid>``;
    ``recover_checkpoint`` puts it back. Files are synced before the renames, so after a power
    cut the renamed folder holds complete files. A failed write (``OSError``, or torch's
    ``RuntimeError`` from its zip writer) leaves the previous checkpoint in place and raises a
    ``CheckpointWriteError`` that says so (``resumes_from``: that checkpoint's step, None: none yet).
    """
    try:
        _write_checkpoint(out, save)
    except (OSError, RuntimeError) as exc:
        if resumes_from is not None:
            kept = f"the run folder still resumes from step {resumes_from}"
        elif (out / CHECKPOINT / "trainer_state.pt").exists():
            kept = "the run folder still resumes from its previous checkpoint"
        else:
            kept = "no earlier checkpoint: the run starts again"
        raise CheckpointWriteError(f"could not write checkpoint to {out / CHECKPOINT}: {_why(exc)} ({kept})") from exc


def _why(exc: BaseException) -> str:
    """A write failure in words: ``no space left on device``, not ``[enforce fail at inline_container.cc:672] ...``."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return os.strerror(exc.errno).lower()
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = text.split("] ", 1)[-1].strip(" .")  # drop torch's "[enforce fail at file:line]" prefix
    return f"{text} (is the disk full?)"


def _write_checkpoint(out: Path, save: Callable[[Path], None]) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=".checkpoint-", dir=out))
    try:
        save(tmp)
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
        final = out / CHECKPOINT
        if final.exists():
            trash = out / f".old-{os.getpid()}"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
            os.replace(tmp, final)
            _fsync(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
            _fsync(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def holds_checkpoint(out: str | os.PathLike) -> bool:
    """Whether ``out`` holds a checkpoint to resume from (counting one ``recover_checkpoint`` would put back)."""
    out = Path(out)
    return any((p / "trainer_state.pt").exists() for p in [out / CHECKPOINT, *out.glob(".old-*")])


def recover_checkpoint(out: Path) -> None:
    """Put back a checkpoint a crash left in ``.old-<pid>``; remove leftovers of interrupted writes.

    Call it while owning the folder: no other process is writing these.
    """
    final = out / CHECKPOINT
    olds = sorted(out.glob(".old-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    if not (final / "trainer_state.pt").exists():
        good = [p for p in olds if (p / "trainer_state.pt").exists()]
        if good:
            if final.exists():
                shutil.rmtree(final)
            os.replace(good[0], final)
            message = f"{out}: the last checkpoint write was interrupted; restored the previous one from {good[0].name}"
            warnings.warn(message, RunWarning, stacklevel=3)
    for leftover in [*out.glob(".old-*"), *out.glob(".checkpoint-*")]:
        shutil.rmtree(leftover, ignore_errors=True)


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk; skipped where the OS cannot open folders."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- files ----------------------------------------------------------------------------------


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename: a crash leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``; a torn last line is dropped with a ``RunWarning``."""
    if not path.exists():
        return []
    lines = [(i, line) for i, line in enumerate(path.read_bytes().split(b"\n"), 1) if line.strip()]
    records = []
    for n, (i, raw) in enumerate(lines):
        try:
            record = json.loads(raw.decode("utf-8"))
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a metrics record with a step")
        except ValueError as exc:
            if n == len(lines) - 1:
                message = f"{path}: line {i} is incomplete (the run stopped while writing it); dropped it"
                warnings.warn(message, RunWarning, stacklevel=3)
                break
            raise RunFolderError(f"{path}: line {i} is not a metrics record ({exc}); the file is damaged") from exc
        records.append(record)
    return records


def read_run_config(out: Path) -> dict[str, Any] | None:
    """The run's ``config.json`` (its algorithm, task, model, seed and config), or None if there is none."""
    path = out / "config.json"
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise RunFolderError(f"{path}: not valid JSON ({exc}); the run's settings are lost") from exc
    if not isinstance(saved, dict):
        raise RunFolderError(f"{path}: expected a JSON object with the run's settings")
    return saved
