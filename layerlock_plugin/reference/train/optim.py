"""The reference trainer's optimizer pieces: AdamW parameter groups and the warmup + cosine LR curve."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norms and learned tokens (1-D or token-shaped parameters)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or name.endswith(("token", "pos_embed")) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_with_warmup(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """The LR factor of step ``step`` (0-based): linear warmup over ``warmup_steps``, then cosine decay to
    ``min_ratio`` at ``total_steps``. A warmup at least as long as the run never decays."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def lr_course(total_steps: int, start: int, lr: float, warmup_steps: int, min_ratio: float) -> str:
    """What the LR does from step ``start`` to the end of a ``total_steps`` run, in words (for messages)."""
    if start >= warmup_steps:
        return f"decays to {lr * min_ratio:.3g} at step {total_steps}"
    if total_steps <= warmup_steps:
        last = lr * cosine_with_warmup(total_steps, warmup_steps, min_ratio)(total_steps - 1)
        return (f"keeps rising (optim.warmup_steps={warmup_steps}) to {last:.3g} at step {total_steps}"
                + ("" if total_steps == warmup_steps else f", below optim.lr={lr:.3g}") + ", and never decays")
    return (f"rises (optim.warmup_steps={warmup_steps}) to {lr:.3g} at step {warmup_steps}, then decays to "
            f"{lr * min_ratio:.3g} at step {total_steps}")


def warn_if_warmup_outlasts_run(total_steps: int, lr: float, warmup_steps: int, min_ratio: float) -> None:
    """A linear LR warmup that is not shorter than the run leaves the LR rising throughout (no peak, no
    decay), which nobody asks for on purpose: warn once, saying what the LR will do."""
    if warmup_steps and total_steps <= warmup_steps:
        warnings.warn(f"optim.warmup_steps: the LR warmup ({warmup_steps} steps) is not shorter than the run "
                      f"(train.steps={total_steps}): the LR rises for the whole run: it starts at "
                      f"{lr / warmup_steps:.3g} and {lr_course(total_steps, 0, lr, warmup_steps, min_ratio)}. "
                      f"Set optim.warmup_steps below {total_steps} (e.g. {max(1, total_steps // 15)}).",
                      stacklevel=2)


__all__ = ["param_groups", "cosine_with_warmup", "lr_course", "warn_if_warmup_outlasts_run"]
