"""Progress of a training run: a tqdm bar in a terminal, one plain line per log step elsewhere.

In a cluster job log (stdout not a terminal) a bar would write thousands of carriage returns; there a
line ``step 600/1500 (40%) | 10.2 steps/s | ETA 1m28s | loss 0.8512 | frozen 0 | target pixels`` comes
every ``train.log_every`` steps instead. Messages (events, notes) go through :meth:`write`, above the bar.
"""

from __future__ import annotations

import sys
import time
from typing import Any


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
    """``mode``: ``bar`` (tqdm), ``lines`` or ``off``; ``auto`` picks ``bar`` on a terminal, else ``lines``."""

    def __init__(self, start: int, end: int, total: int, mode: str = "auto", echo=print):
        if mode == "auto":
            mode = "bar" if sys.stdout.isatty() else "lines"
        self.mode, self.start, self.end, self.total, self.echo = mode, start, end, total, echo
        self._t0 = time.perf_counter()
        self._bar = None
        if mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=start, desc="layerlock", unit="step", dynamic_ncols=True)

    def write(self, message: str) -> None:
        (self._bar.write if self._bar is not None else self.echo)(message)

    def step(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def row(self, step: int, loss: float, frozen: int, target: str) -> None:
        """At a log step: the bar's postfix, or one line."""
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.4f}", frozen=frozen, target=target)
        elif self.mode == "lines":
            rate = (step - self.start) / max(time.perf_counter() - self._t0, 1e-9)
            eta = (self.end - step) / rate if rate > 0 else float("nan")
            self.echo(f"step {step}/{self.total} ({100 * step / self.total:.0f}%) | {rate:.2f} steps/s | "
                      f"ETA {_duration(eta) if eta == eta else '?'} | loss {loss:.4f} | frozen {frozen} | target {target}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
