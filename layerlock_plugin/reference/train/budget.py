"""A run's step budget: ``train.steps`` shapes the LR curve, so a resume keeps it unless extended
explicitly (``--extend N``), and an early stop (``--stop-after N``) lies within it."""

from __future__ import annotations

from ...errors import ConfigError
from ..config import OptimConfig
from .optim import cosine_with_warmup, lr_course


def check_resume_budget(steps: int, step: int, saved_steps: int, extend: bool, optim: OptimConfig) -> str | None:
    """Check ``train.steps = steps`` for a run resumed at ``step`` whose budget was ``saved_steps``.

    Returns what to say when the budget is extended (the LR at ``step`` before and after), None when it
    is kept; a budget that trains nothing, or changes without ``extend``, is a ConfigError."""
    if steps <= step:
        raise ConfigError("train.steps", f"{steps} is not above the resumed step {step}: nothing would be trained"
                                         + ("" if steps != saved_steps else
                                            f"; the run is finished (extend it with --extend N, N > {step})"))
    if steps == saved_steps:
        if extend:
            raise ConfigError("--extend", f"{steps} is the run's budget already; give a larger number of steps")
        return None
    if not extend:
        raise ConfigError("train.steps", f"the resumed run's budget is {saved_steps} steps and train.steps={steps} "
                                         f"would recompute its LR schedule; say --extend {steps} to do that "
                                         f"(or --stop-after N to stop early keeping the schedule)")
    if steps < saved_steps:
        raise ConfigError("--extend", f"{steps} is below the run's budget of {saved_steps} steps; to stop earlier "
                                      f"keeping the schedule use --stop-after {steps}")
    o = optim
    old_lr = o.lr * cosine_with_warmup(saved_steps, o.warmup_steps, o.min_lr_ratio)(step)
    new_lr = o.lr * cosine_with_warmup(steps, o.warmup_steps, o.min_lr_ratio)(step)
    return (f"extending the run from {saved_steps} to {steps} steps: the cosine LR schedule is recomputed for "
            f"{steps} steps, so at step {step} the LR goes from {old_lr:.3g} to {new_lr:.3g}, then "
            f"{lr_course(steps, step, o.lr, o.warmup_steps, o.min_lr_ratio)}; the freeze schedule (step-based) "
            "is unchanged")


def check_stop_after(stop_after: int | None, step: int, steps: int) -> None:
    """``stop_after`` must lie after the current ``step`` and within ``train.steps = steps`` (``None``: no
    early stop)."""
    if stop_after is not None and not (isinstance(stop_after, int) and step < stop_after <= steps):
        raise ConfigError("--stop-after", f"must be a step after the run's current step {step} and at most "
                                          f"train.steps={steps}, got {stop_after!r}")


__all__ = ["check_resume_budget", "check_stop_after"]
