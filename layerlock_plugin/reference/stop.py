"""Stopping a run cleanly at a step boundary when the user (or a scheduler) asks.

Inside ``with StopRequest() as stop:`` the first SIGINT (Ctrl-C) only sets ``stop.requested``: the
training loop finishes the optimizer step it is in, all ranks agree (the flag travels with the step's
one all-reduce), a checkpoint is written and the loop returns. A second Ctrl-C restores Python's
default and interrupts at once, as users expect of a second Ctrl-C.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

#: Exit code of a run stopped by a signal after its checkpoint (128 + SIGINT, the shell's convention).
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT


class StopRequest:
    """Records a stop signal; installs handlers only in the main thread (where Python delivers signals)."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGINT,)):
        self.signals = signals
        self.requested = False
        self.signal_name = ""
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:  # the second one: stop now, the default way
            previous = self._previous.get(signum, signal.SIG_DFL)
            signal.signal(signum, previous)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.raise_signal(signum)
            return
        self.requested = True
        self.signal_name = signal.Signals(signum).name
