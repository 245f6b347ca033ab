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

``ScheduleConfig.kind`` picks the schedule a host gets from its config: ``explicit`` (the paper's,
above), ``adaptive`` (:class:`layerlock_plugin.adaptive.AdaptiveSchedule`: the event steps are decided
during training from per-block convergence signals, configured by ``ScheduleConfig.adaptive``) or
``recorded`` (replays ``ScheduleConfig.events``, e.g. the events an adaptive run decided).
:func:`layerlock_plugin.controller.build_schedule` turns a config into a schedule.

The schedule protocol is the :class:`Schedule` base class: ``plan(step)``, ``observe(step)``,
``metrics()``, ``reason(stage)``, ``state_dict()`` / ``load_state_dict(state, next_step)``,
``describe()`` and ``warn_if_longer_than(total_steps)``. The controller calls every one of them on
any schedule; the explicit and recorded schedules keep the base class's stateless defaults.
"""

from __future__ import annotations

import bisect
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from . import _validate as v
from .errors import ConfigError


@dataclass(frozen=True)
class Plan:
    """What LayerLock does at one training step.

    ``num_frozen`` blocks (1-based ``1..num_frozen``) are frozen; the stem too when ``stem_frozen``.
    ``target_layer`` is the deepest block whose output is a latent target (0 means pixels). A schedule's
    plans follow LayerLock's rule, the target is the newest frozen block (``target_layer == num_frozen``);
    the controller's effective plan differs for the baselines: ``target.kind: pixels`` has
    ``target_layer == 0`` (MAE, freeze-only), ``freeze: false`` has ``num_frozen == 0`` (latent-naive).
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
        """Plain data, for logs."""
        return asdict(self)


#: The schedules a config can ask for (``schedule.kind``).
SCHEDULE_KINDS = ("explicit", "adaptive", "recorded")
#: The convergence signals of the adaptive schedule (``schedule.adaptive.signal``).
ADAPTIVE_SIGNALS = ("update", "norm", "both", "either")


def _optional_limit(field: str, value: Any, lower: int, lower_name: str) -> int | None:
    """None (no limit) or a positive integer >= ``lower``."""
    if value is None:
        return None
    v.positive_int(field, value)
    if value < lower:
        raise ConfigError(field, f"must be >= {lower_name} ({lower}) or null (no limit), got {value}")
    return value


@dataclass(frozen=True)
class AdaptiveConfig:
    """Config of the adaptive schedule (``schedule.kind: adaptive``); see :mod:`layerlock_plugin.adaptive`.

    Observation: every ``observe_every`` steps the block(s) next in line to freeze are measured:
    their parameter norm ``|theta|`` and their relative update ``|theta_t - theta_{t-N}| / |theta_t| / N``
    (per step, ``N = observe_every``). Both are smoothed over the last ``window`` observations.

    Convergence (``signal``):
      * ``update``: the smoothed relative update fell to ``update_threshold`` x its peak since the block
        has been watched (scale-free: the peak absorbs learning rate and block size);
      * ``norm``: the norm's relative growth over the window, ``(|theta_t| - |theta_{t-W}|) / |theta_{t-W}|``,
        is at most ``norm_tolerance`` (a plateau, or a decrease under weight decay: the paper's heuristic);
      * ``both`` / ``either``: both signals / at least one of them.

    Guards (steps): no event before ``min_pixel_steps``; a first event at the latest at ``max_pixel_steps``;
    consecutive events at least ``min_interval`` and at most ``max_interval`` apart (``null`` = no upper
    limit). ``schedule.jump`` and ``schedule.max_frozen`` keep their meaning.
    """

    observe_every: int = 10
    window: int = 5
    signal: str = "both"
    update_threshold: float = 0.5
    norm_tolerance: float = 0.01
    min_pixel_steps: int = 100
    max_pixel_steps: int | None = None
    min_interval: int = 50
    max_interval: int | None = None

    def __post_init__(self) -> None:
        p = "schedule.adaptive."
        v.positive_int(p + "observe_every", self.observe_every)
        v.positive_int(p + "window", self.window)
        if self.window < 2:
            raise ConfigError(p + "window", f"must be >= 2 observations (a trend needs two points), got {self.window}")
        v.one_of(p + "signal", self.signal, ADAPTIVE_SIGNALS)
        if isinstance(self.update_threshold, bool) or not isinstance(self.update_threshold, (int, float)) \
                or not 0.0 < float(self.update_threshold) < 1.0:
            raise ConfigError(p + "update_threshold",
                              f"must be a fraction of the peak relative update in (0, 1), got {self.update_threshold!r}")
        if isinstance(self.norm_tolerance, bool) or not isinstance(self.norm_tolerance, (int, float)) \
                or not -1.0 < float(self.norm_tolerance) < 1.0:
            raise ConfigError(p + "norm_tolerance",
                              f"must be a relative norm change per window in (-1, 1), got {self.norm_tolerance!r}")
        v.non_negative_int(p + "min_pixel_steps", self.min_pixel_steps)
        v.positive_int(p + "min_interval", self.min_interval)
        _optional_limit(p + "max_pixel_steps", self.max_pixel_steps, max(self.min_pixel_steps, 1), "min_pixel_steps")
        _optional_limit(p + "max_interval", self.max_interval, self.min_interval, "min_interval")
        need = self.observe_every * self.window
        if self.min_interval < self.observe_every:
            raise ConfigError(p + "min_interval",
                              f"must be >= observe_every ({self.observe_every}): decisions are taken on observation "
                              f"steps only, got {self.min_interval}")
        if self.max_interval is not None and self.max_interval < need:
            raise ConfigError(p + "max_interval",
                              f"must be >= observe_every * window ({need}), the steps a block's window needs to "
                              f"fill, or null; got {self.max_interval}")


def _recorded_events(value: Any) -> tuple[tuple[int, int], ...]:
    """``schedule.events`` as ``((step, num_frozen), ...)``; accepts lists from YAML."""
    name = "schedule.events"
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
        raise ConfigError(name, f"must be a list of [step, num_frozen] pairs, got {value!r}")
    out = []
    for i, e in enumerate(value):
        if (not isinstance(e, Sequence) or isinstance(e, (str, bytes)) or len(e) != 2
                or any(isinstance(x, bool) or not isinstance(x, int) for x in e)):
            raise ConfigError(f"{name}[{i}]", f"must be a [step, num_frozen] pair of integers, got {e!r}")
        if e[0] < 0 or e[1] < 1:
            raise ConfigError(f"{name}[{i}]", f"needs step >= 0 and num_frozen >= 1, got {list(e)}")
        out.append((int(e[0]), int(e[1])))
    if any(b[0] <= a[0] or b[1] <= a[1] for a, b in zip(out, out[1:])):
        raise ConfigError(name, f"steps and num_frozen must both be strictly increasing, got {[list(e) for e in out]}")
    return tuple(out)


@dataclass(frozen=True)
class ScheduleConfig:
    """Config of the freezing schedule.

    ``kind``: ``explicit`` (``pixel_steps``, ``interval``), ``adaptive`` (``adaptive``: when to freeze is
    decided during training) or ``recorded`` (``events``: ``[[step, num_frozen], ...]`` replayed as
    given, e.g. from an adaptive run's ``events.jsonl``; ``max_frozen`` is then the last event's depth).
    ``max_frozen`` is a block count (int >= 1) or a fraction (float in (0, 1)) of the encoder's
    freezable blocks (blocks a decoder reuses are never freezable). ``freeze_stem``: the patch
    embedding (and learned positions) freeze together with the first block, as in the paper.
    """

    pixel_steps: int = 1000
    interval: int = 500
    jump: int = 1
    max_frozen: int | float = 0.75
    freeze_stem: bool = True
    kind: str = "explicit"
    adaptive: AdaptiveConfig = field(default_factory=AdaptiveConfig)
    events: tuple = ()

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
        v.one_of("schedule.kind", self.kind, SCHEDULE_KINDS)
        if not isinstance(self.adaptive, AdaptiveConfig):
            raise ConfigError("schedule.adaptive", f"must be a mapping of AdaptiveConfig fields, got {self.adaptive!r}")
        events = _recorded_events(self.events)
        object.__setattr__(self, "events", events)  # normalised: tuples compare equal to the YAML lists' form
        if self.kind == "recorded" and not events:
            raise ConfigError("schedule.events", "schedule.kind is 'recorded' but no events are given; list "
                              "[[step, num_frozen], ...] or read them with layerlock_plugin.adaptive.recorded_schedule_config")
        if self.kind != "recorded" and events:
            raise ConfigError("schedule.events", f"is only used with schedule.kind: recorded (kind is {self.kind!r})")

    def planned_depths(self, num_layers: int) -> list[int]:
        """Frozen depth after each freeze event: ``jump`` more blocks per event up to ``max_frozen``."""
        max_frozen = self.resolve_max_frozen(num_layers)
        return [min((i + 1) * self.jump, max_frozen) for i in range(math.ceil(max_frozen / self.jump))]

    def resolve_max_frozen(self, num_layers: int) -> int:
        """The number of blocks that will be frozen at the end, checked against the encoder."""
        if self.kind == "recorded":
            count = self.events[-1][1]
            if count >= num_layers:
                raise ConfigError(
                    "schedule.events",
                    f"the last event freezes {count} blocks; must be smaller than the number of freezable "
                    f"encoder blocks ({num_layers})",
                )
            return count
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
    """A schedule given by the sorted steps of its freeze events and the depth after each.

    This base class is the schedule protocol the controller drives (module docstring). ``plan`` is a
    pure function of the event list and the step; the hooks below are no-ops for schedules whose events
    are fixed in advance and are overridden by schedules that decide them during training.
    """

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
        """Blocks frozen after the last event (0: never freezes)."""
        return self.depths[-1] if self.depths else 0

    @property
    def last_event_step(self) -> int:
        """Step of the last freeze event (0 without events)."""
        return self.event_steps[-1] if self.event_steps else 0

    def plan(self, step: int) -> Plan:
        """The :class:`Plan` of the training step with 0-based index ``step``: a pure function of the events."""
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

    def observe(self, step: int) -> Any:
        """Called by the controller at the start of every step, before ``plan(step)``; may add events."""
        return None

    def reason(self, stage: int) -> str:
        """Why the ``stage``-th event (1-based) happens ("" when the schedule fixed it in advance)."""
        return ""

    def metrics(self) -> dict[str, float]:
        """Scalars about the schedule's own signals, namespaced ``layerlock/...`` (none here)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """State beyond the config (none: the plan is recomputed from the step on resume)."""
        return {}

    def load_state_dict(self, state: dict[str, Any] | None, next_step: int) -> None:
        """Restore :meth:`state_dict` of a run that stopped before ``next_step`` (nothing to restore)."""

    def warn_if_longer_than(self, total_steps: int) -> None:
        """Warn when the run ends before the schedule's last event (the schedule would be cut short)."""
        if self.event_steps and self.last_event_step >= total_steps:
            reached = self.plan(max(total_steps - 1, 0)).num_frozen
            warnings.warn(f"schedule: the last freeze event is at step {self.last_event_step} but the run has "
                          f"{total_steps} steps; only {reached} of {self.max_frozen} blocks will be frozen. Shorten "
                          f"schedule.pixel_steps / schedule.interval or lower schedule.max_frozen.", stacklevel=2)

    def describe(self) -> dict[str, Any]:
        """What must match between a checkpoint and the config that resumes it."""
        return {"event_steps": list(self.event_steps), "depths": list(self.depths),
                "num_layers": self.num_layers, "freeze_stem": self.freeze_stem}


class FreezeSchedule(Schedule):
    """The paper's explicit schedule built from a :class:`ScheduleConfig` for an encoder of ``num_layers``."""

    def __init__(self, config: ScheduleConfig, num_layers: int):
        v.positive_int("encoder.num_layers", num_layers)
        self.config = config
        depths = config.planned_depths(num_layers)
        steps = [config.pixel_steps + i * config.interval for i in range(len(depths))]
        super().__init__(steps, depths, num_layers, config.freeze_stem)


class RecordedSchedule(Schedule):
    """Replays recorded events, e.g. those an adaptive schedule decided in an earlier run."""

    @classmethod
    def from_events(cls, events: Sequence[Sequence[int]], num_layers: int, freeze_stem: bool = True) -> RecordedSchedule:
        """From ``[(step, num_frozen), ...]`` (e.g. ``schedule.events`` of a config)."""
        steps = [int(e[0]) for e in events]
        depths = [int(e[1]) for e in events]
        return cls(steps, depths, num_layers, freeze_stem)


class NoFreezing(Schedule):
    """Never freezes: the plain MAE baseline."""

    def __init__(self, num_layers: int):
        super().__init__([], [], num_layers, False)
