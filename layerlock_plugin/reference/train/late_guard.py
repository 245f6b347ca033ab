"""The collapse guard decided at log rows, so that a training step never waits for the device.

With ``guard.policy`` ``warn`` or ``raise`` nothing in the guard's decision changes the step's update, so
the step only measures, on the device: the loss's finiteness, on every ``guard.every``-th latent step the
target's relative loss and a small token sample of the target ``[S, D]``. The step's measures travel with
its other scalars in the log window (:class:`.run_log.RunLog`); at the next log row or checkpoint
:meth:`LateGuard.decide` computes the kept samples' spectra (``svdvals``, the costly part), averages them
over ranks in one all-reduce, writes them into their steps' entries of the window and decides every step
in order from the window's one host transfer, which the log row shares. A trip is therefore acted on up to
``train.log_every`` steps late (a warning or :class:`~layerlock_plugin.errors.CollapseError` names the
step it belongs to). ``skip`` must gate the very update it measured, so it measures, spectrum included,
and decides inside the step: one host read per step (refused on XLA, where a step's graph reads nothing).
"""

from __future__ import annotations

import torch

from ...collapse import MEASURES
from ...controller import LayerLock
from ..parallel.distributed import DistEnv, all_reduce_mean
from .run_log import RunLog

#: What a measured step leaves for the log row: this rank's measures ``[len(MEASURES)]`` and the token sample.
Pending = tuple[torch.Tensor, torch.Tensor]


class LateGuard:
    """The trainer's side of the collapse guard (module docstring). ``deferred``: decided at log rows."""

    def __init__(self, layerlock: LayerLock, env: DistEnv, policy: str):
        self.layerlock, self.env = layerlock, env
        self.deferred = policy in ("warn", "raise")
        self.decided = 0  # steps decided so far (deferred)
        self.pending: list[tuple[int, Pending]] = []  # (step, pending) of the log window's measured steps

    def measure(self, loss: torch.Tensor, targets: dict[str, torch.Tensor] | None
                ) -> tuple[torch.Tensor | None, Pending | None]:
        """This step's measures ``[len(MEASURES)]`` on the device (None: guard off) and, deferred, what its
        spectrum is computed from later (None on a step that is not measured). No sync, no collective."""
        if not self.deferred:
            return self.layerlock.guard_measure(loss, targets), None
        measures, sample = self.layerlock.guard_measure_deferred(loss, targets)
        return measures, (None if sample is None else (measures, sample))

    def keep(self, step: int, pending: Pending | None) -> None:
        """The loop keeps a logged step's pending sample until the next :meth:`decide`."""
        if pending is not None:
            self.pending.append((step, pending))

    def _complete(self, log: RunLog, step: int) -> None:
        """The kept samples' statistics, averaged over ranks (one all-reduce: every rank reaches this row or
        checkpoint at the same step with the same measured steps), written into the window's entries of
        their steps: the values each step would have reduced itself."""
        if not self.pending:
            return
        complete = self.layerlock.guard.complete
        full = all_reduce_mean(torch.stack([complete(m, s) for _, (m, s) in self.pending]), self.env)
        first = step - log.window_length
        names = tuple(f"_guard/{m}" for m in MEASURES)
        for (at, _), values in zip(self.pending, full):
            log.patch_step(at - first, names, values)
        self.pending = []

    def decide(self, log: RunLog, step: int) -> None:
        """Deferred: decide every step of the log window not decided yet, in order (``step``: the trainer's
        step count, the window's last step + 1)."""
        if not self.deferred:
            return
        self._complete(log, step)
        window = log.window_values()
        first = step - len(window)  # the step index of the window's first entry
        for i, values in enumerate(window):
            if first + i >= self.decided and "_guard/nonfinite" in values:
                self.layerlock.end_step(measured=[values[f"_guard/{m}"] for m in MEASURES], step=first + i)
        self.decided = step


__all__ = ["LateGuard", "Pending"]
