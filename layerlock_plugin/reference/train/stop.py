"""Stopping a run cleanly at a step boundary when the user or the cluster asks.

Inside ``with StopRequest() as stop:`` a SIGINT (Ctrl-C), SIGTERM (preemption) or SIGUSR1 (SLURM's
warning before the time limit, ``--signal=USR1@120``) only sets ``stop.requested``: the training loop
finishes the optimizer step it is in, every rank agrees (the flag travels with the step's all-reduce,
so a signal that reached one rank stops all of them at the same step), an atomic checkpoint is written
and the loop returns. The process then exits with :data:`INTERRUPTED_EXIT_CODE` (Ctrl-C) or
:data:`PREEMPTED_EXIT_CODE` (TERM / USR1), which a requeue script can test.

A second Ctrl-C restores Python's default and interrupts at once, as users expect; a repeated TERM or
USR1 is ignored (the run is already stopping: killing it then could only lose the checkpoint), also after
the ``with`` block ends, until the process exits.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

#: Exit code after a Ctrl-C stop with its checkpoint (128 + SIGINT, the shell's convention).
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT
#: Exit code after a SIGTERM / SIGUSR1 stop with its checkpoint: EX_TEMPFAIL ("try again"), for requeueing.
PREEMPTED_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Records a stop signal; installs handlers only in the main thread (where Python delivers signals)."""

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS):
        self.signals = signals
        self.requested = False
        self.signal_name = ""
        self._previous: dict[int, Any] = {}
        self._depth = 0

    @property
    def exit_code(self) -> int:
        return INTERRUPTED_EXIT_CODE if self.signal_name in ("", "SIGINT") else PREEMPTED_EXIT_CODE

    def __enter__(self) -> StopRequest:
        """Install the handlers (re-entrant: the CLI enters before it builds the trainer, so a signal
        during start-up also stops at the first step boundary; ``fit`` enters again)."""
        self._depth += 1
        if self._depth == 1 and threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth:
            return
        for sig, handler in self._previous.items():
            # once a stop was requested the process is on its way out; a scheduler's repeated TERM / USR1
            # arriving after the loop returned (a fast step and checkpoint) must not kill it mid-summary
            stopping = self.requested and sig != signal.SIGINT
            signal.signal(sig, signal.SIG_IGN if stopping else handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            if signum == signal.SIGINT:  # the second Ctrl-C: stop now, the default way
                signal.signal(signum, self._previous.get(signum, signal.default_int_handler))
                raise KeyboardInterrupt
            return
        self.requested = True
        self.signal_name = signal.Signals(signum).name
