"""The freezing schedule: a pure function from the global step to a :class:`Plan`.

Paper schedule (ViT-G): predict pixels for ``pixel_steps`` = 160K steps, then every ``interval`` = 10K
steps freeze the next ``jump`` = 1 block and switch the target to the newest frozen block, until
``max_frozen`` = 32 blocks are frozen (the last event is at 160K + 31 x 10K = 470K).

Step convention: ``plan(s)`` is the plan for the training step with 0-based index ``s`` (before its
optimizer step). Steps ``0 .. pixel_steps-1`` are the pixel phase; the first freeze happens at
``s == pixel_steps``.

A schedule is described by its list of event steps. :class:`FreezeSchedule` derives that list from
the config; :class:`RecordedSchedule` replays any list (for example one an adaptive schedule
decided). Both give a plan for any step without any state, so resume only needs the step.
"""

from __future__ import annotations

import bisect
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from . import _validate as v
from .errors import ConfigError


@dataclass(frozen=True)
class Plan:
    """What LayerLock does at one training step.

    ``num_frozen`` blocks (1-based ``1..num_frozen``) are frozen; the stem too when ``stem_frozen``.
    ``target_layer`` is the block whose output is the latent target (0 means pixels).
    ``stage`` counts the freeze events so far; ``steps_since_switch`` counts steps since the latest
    one (since step 0 in the pixel phase); ``is_switch`` is true on the step of an event.
    """

    step: int
    num_frozen: int
    target_layer: int
    stage: int
    steps_since_switch: int
    stem_frozen: bool
    is_switch: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ScheduleConfig:
    """Config of the explicit schedule.

    ``max_frozen`` is a block count (int >= 1) or a fraction (float in (0, 1)) of the encoder's
    freezable blocks (blocks a decoder reuses are never freezable). ``freeze_stem``: the patch
    embedding (and learned positions) freeze together with the first block, as in the paper.
    """

    pixel_steps: int = 1000
    interval: int = 500
    jump: int = 1
    max_frozen: int | float = 0.75
    freeze_stem: bool = True

    def __post_init__(self) -> None:
        v.non_negative_int("schedule.pixel_steps", self.pixel_steps)
        v.positive_int("schedule.interval", self.interval)
        v.positive_int("schedule.jump", self.jump)
        v.boolean("schedule.freeze_stem", self.freeze_stem)
        m = self.max_frozen
        if isinstance(m, bool) or not isinstance(m, (int, float)):
            raise ConfigError("schedule.max_frozen", f"must be a block count or a fraction in (0, 1), got {m!r}")
        if isinstance(m, int) and m < 1:
            raise ConfigError("schedule.max_frozen", f"a block count must be >= 1, got {m}")
        if isinstance(m, float) and not 0.0 < m < 1.0:
            raise ConfigError("schedule.max_frozen", f"a fraction must be in (0, 1), got {m}")

    def resolve_max_frozen(self, num_layers: int) -> int:
        """The number of blocks that will be frozen at the end, checked against the encoder."""
        m = self.max_frozen
        count = int(math.floor(m * num_layers + 1e-9)) if isinstance(m, float) else m
        if count < 1:
            raise ConfigError(
                "schedule.max_frozen",
                f"{m} of {num_layers} freezable blocks rounds down to 0; freeze at least one block",
            )
        if count >= num_layers:
            raise ConfigError(
                "schedule.max_frozen",
                f"must be smaller than the number of freezable encoder blocks ({num_layers}); got {m} "
                f"(= {count} blocks). At least one encoder block must keep training.",
            )
        return count


class Schedule:
    """A schedule given by the sorted steps of its freeze events and the depth after each."""

    def __init__(self, event_steps: Sequence[int], depths: Sequence[int], num_layers: int, freeze_stem: bool):
        if len(event_steps) != len(depths):
            raise ValueError("event_steps and depths must have the same length")
        if any(b <= a for a, b in zip(event_steps, event_steps[1:])):
            raise ConfigError("schedule.event_steps", f"must be strictly increasing, got {list(event_steps)}")
        if any(b <= a for a, b in zip(depths, depths[1:])) or (depths and depths[0] < 1):
            raise ConfigError("schedule.depths", f"must be strictly increasing and >= 1, got {list(depths)}")
        if depths and depths[-1] >= num_layers:
            raise ConfigError(
                "schedule.max_frozen",
                f"must be smaller than the number of freezable encoder blocks ({num_layers}), got {depths[-1]}",
            )
        self.event_steps = tuple(int(s) for s in event_steps)
        self.depths = tuple(int(d) for d in depths)
        self.num_layers = num_layers
        self.freeze_stem = freeze_stem

    @property
    def max_frozen(self) -> int:
        return self.depths[-1] if self.depths else 0

    @property
    def last_event_step(self) -> int:
        return self.event_steps[-1] if self.event_steps else 0

    def plan(self, step: int) -> Plan:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        stage = bisect.bisect_right(self.event_steps, step)
        num_frozen = self.depths[stage - 1] if stage else 0
        since = step - self.event_steps[stage - 1] if stage else step
        return Plan(
            step=step,
            num_frozen=num_frozen,
            target_layer=num_frozen,
            stage=stage,
            steps_since_switch=since,
            stem_frozen=self.freeze_stem and num_frozen > 0,
            is_switch=stage > 0 and since == 0,
        )

    def events(self) -> list[tuple[int, int]]:
        """``[(step, num_frozen), ...]`` for every freeze event."""
        return list(zip(self.event_steps, self.depths))

    def warn_if_longer_than(self, total_steps: int) -> None:
        """Warn when the run ends before the schedule's last event (the schedule would be cut short)."""
        if self.event_steps and self.last_event_step >= total_steps:
            reached = self.plan(max(total_steps - 1, 0)).num_frozen
            warnings.warn(
                f"schedule: the last freeze event is at step {self.last_event_step} but the run has "
                f"{total_steps} steps; only {reached} of {self.max_frozen} blocks will be frozen. "
                f"Shorten schedule.pixel_steps / schedule.interval or lower schedule.max_frozen.",
                stacklevel=2,
            )

    def describe(self) -> dict[str, Any]:
        return {"event_steps": list(self.event_steps), "depths": list(self.depths),
                "num_layers": self.num_layers, "freeze_stem": self.freeze_stem}


class FreezeSchedule(Schedule):
    """The paper's explicit schedule built from a :class:`ScheduleConfig` for an encoder of ``num_layers``."""

    def __init__(self, config: ScheduleConfig, num_layers: int):
        v.positive_int("encoder.num_layers", num_layers)
        self.config = config
        max_frozen = config.resolve_max_frozen(num_layers)
        n_events = math.ceil(max_frozen / config.jump)
        steps = [config.pixel_steps + i * config.interval for i in range(n_events)]
        depths = [min((i + 1) * config.jump, max_frozen) for i in range(n_events)]
        super().__init__(steps, depths, num_layers, config.freeze_stem)


class RecordedSchedule(Schedule):
    """Replays recorded events, e.g. those an adaptive schedule decided in an earlier run."""

    @classmethod
    def from_events(cls, events: Sequence[Sequence[int]], num_layers: int, freeze_stem: bool = True) -> RecordedSchedule:
        steps = [int(e[0]) for e in events]
        depths = [int(e[1]) for e in events]
        return cls(steps, depths, num_layers, freeze_stem)


class NoFreezing(Schedule):
    """Never freezes: the plain MAE baseline."""

    def __init__(self, num_layers: int):
        super().__init__([], [], num_layers, False)
