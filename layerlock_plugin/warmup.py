"""LR warmup after each target switch, as a multiplier on top of whatever schedule the host runs.

The multiplier is applied around ``optimizer.step()`` through the optimizer's own step hooks
(pre-hook scales every group's ``lr``, post-hook restores it). The host's LR scheduler therefore
never sees the multiplied value and keeps its own schedule exactly, chainable schedulers included.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from . import _validate as v
from .schedule import Plan


@dataclass(frozen=True)
class WarmupConfig:
    """``steps`` of linear LR ramp from ``start_factor`` to 1 after every target switch (0 = off)."""

    steps: int = 50
    start_factor: float = 0.01

    def __post_init__(self) -> None:
        v.non_negative_int("warmup.steps", self.steps)
        v.fraction("warmup.start_factor", self.start_factor, allow_zero=True)


def switch_warmup_factor(config: WarmupConfig, plan: Plan, switches_target: bool = True) -> float:
    """The LR multiplier for ``plan``: 1 outside a warmup, else a linear ramp ``start_factor -> 1``."""
    if not switches_target or plan.stage == 0 or config.steps == 0 or plan.steps_since_switch >= config.steps:
        return 1.0
    s = config.start_factor
    return s + (1.0 - s) * plan.steps_since_switch / config.steps


def warn_if_warmup_outlasts_switches(config: WarmupConfig, shortest_gap: int | None) -> None:
    """Warn once when a switch warmup is longer than the steps between two target switches: the next
    switch restarts the ramp, so such a warmup never reaches the full LR."""
    if shortest_gap is not None and config.steps > shortest_gap:
        warnings.warn(f"warmup.steps: the switch warmup ({config.steps} steps) is longer than the {shortest_gap} steps "
                      f"between two target switches, so it never finishes before the next switch restarts it; use "
                      f"warmup.steps <= {shortest_gap}", UserWarning, stacklevel=3)


class LRScaler:
    """Multiplies every param group's ``lr`` by ``factor`` during ``optimizer.step()`` only."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.factor = 1.0
        self._saved: list | None = None
        self._handles = [
            optimizer.register_step_pre_hook(self._scale),
            optimizer.register_step_post_hook(self._restore),
        ]

    def _scale(self, optimizer, args, kwargs) -> None:
        if self.factor == 1.0:
            return
        self._saved = [g["lr"] for g in optimizer.param_groups]
        for g in optimizer.param_groups:
            g["lr"] = g["lr"] * self.factor

    def _restore(self, optimizer, args, kwargs) -> None:
        if self._saved is not None:
            for g, lr in zip(optimizer.param_groups, self._saved):
                g["lr"] = lr
            self._saved = None

    def remove(self) -> None:
        """Remove the optimizer step hooks (the LR is no longer scaled)."""
        for h in self._handles:
            h.remove()
        self._handles = []
