"""Progress of the waits before training starts (preference pairs, reference log-probs, base-model SFT).

One mechanism for every such wait, on stderr and never in a metrics file: a tqdm bar when stderr
is a terminal, else a few plain lines (the first once the wait has lasted ``FIRST_LINE_S``, then
one a quarter and one at most every ``LINE_EVERY_S``, and the end), so a log file or CI output
says what is happening without a bar's carriage returns. ``shown(False)`` silences every
wait inside it: ``train(progress=False)`` and the bench's workers, whose parent has its own display.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator

FIRST_LINE_S = 2.0  # a quicker wait prints nothing on a non-terminal
LINE_EVERY_S = 60.0  # and a long one at least a line a minute
_shown = [True]  # a stack: the innermost ``shown`` decides


@contextlib.contextmanager
def shown(on: bool) -> Iterator[None]:
    """Show (or silence) the progress of every wait inside the block."""
    _shown.append(bool(on))
    try:
        yield
    finally:
        _shown.pop()


def enabled() -> bool:
    return _shown[-1]


def silence() -> None:
    """Silence progress for the rest of this process (a worker whose parent shows its own)."""
    _shown[0] = False


class Progress:
    """``done`` of ``total`` units of one wait, shown on stderr (see the module's docstring).

    ``with Progress(2048, "preference pairs", "pairs") as bar: ... bar.set(n)``; ``enabled``
    False (or an enclosing ``shown(False)``) shows nothing.
    """

    def __init__(self, total: float, desc: str, unit: str = "", enabled: bool = True):
        self.total, self.desc, self.unit = total, desc, unit
        self.on = enabled and _shown[-1]
        self.done, self.start, self.last_line, self.quarter = 0.0, time.monotonic(), None, 0
        self.bar = None
        if self.on and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=f" {unit}" if unit else "it", leave=False, file=sys.stderr)

    def set(self, done: float, **postfix: str) -> None:
        """``done`` units are done now (a fraction of a unit is fine)."""
        if not self.on:
            return
        self.done = min(float(done), self.total)
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(self.done - self.bar.n)  # redrawn at tqdm's own pace
            return
        now, quarter = time.monotonic(), int(4 * self.done / self.total) if self.total else 4
        due = self.last_line is None and now - self.start >= FIRST_LINE_S
        due = due or (self.last_line is not None and (quarter > self.quarter or now - self.last_line >= LINE_EVERY_S))
        if due and self.done < self.total:
            self._line(now)
        self.quarter = max(self.quarter, quarter)

    def update(self, n: float = 1, **postfix: str) -> None:
        self.set(self.done + n, **postfix)

    def _line(self, now: float, end: str = "") -> None:
        unit = f" {self.unit}" if self.unit else ""
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        print(
            f"{self.desc}: {self.done:.0f}/{self.total:.0f}{unit}{share}, {now - self.start:.0f} s{end}",
            file=sys.stderr,
            flush=True,
        )
        self.last_line = now

    def close(self) -> None:
        if not self.on:
            return
        if self.bar is not None:
            self.bar.close()
        elif self.last_line is not None:  # a wait that said it started says it ended
            self._line(time.monotonic(), ", done")
        self.on = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def forwards(self, model, on_forward: Callable[[int], None]) -> Iterator[None]:
        """``on_forward(k)`` after the k-th forward of ``model`` inside the block: progress within one
        long call (a generation's forward per token) without touching the generator; nothing when off."""
        if not self.on:
            yield
            return
        count = 0

        def hook(*_):
            nonlocal count
            count += 1
            on_forward(count)

        handle = model.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()
