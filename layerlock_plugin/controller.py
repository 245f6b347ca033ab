"""The LayerLock controller: ties schedule, freezer, targets, switch warmup and collapse guard together.

Typical use in a host train step::

    ll = LayerLock(encoder, LayerLockConfig(), optimizer, tubelet=(2, 16, 16))
    for step in range(start, total):
        plan = ll.begin_step(step)                      # freezes on schedule, sets the LR warmup
        heads = ll.heads(plan)                          # e.g. ["pixels"] or ["layer_3"]
        targets = ll.targets(video, plan, query_idx)    # {head: [B, Q, P]}, no autograd
        preds = model(video, visible_idx, query_idx, heads, frozen_prefix=ll.frozen_prefix(plan))
        loss, parts = ll.loss(preds, targets)
        loss.backward()
        if not ll.end_step(loss, targets).skip:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

Resume: build model and optimizer, call ``ll.load_state_dict(...)`` (which re-applies the freezing of
the restored step), *then* load the optimizer state.

Schedules: ``config.schedule.kind`` picks the explicit, adaptive or recorded schedule
(:func:`~layerlock_plugin.schedule.build_schedule`). The adaptive one observes the encoder inside
``begin_step`` (no new host call); its decided events are part of :meth:`LayerLock.state_dict`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import _validate as v
from ._config import from_dict, to_dict
from .collapse import CollapseGuard, GuardConfig, GuardDecision
from .encoder import LayeredEncoder, accepts_token_idx, as_layered_encoder
from .errors import CheckpointError, ConfigError
from .freezing import Freezer
from .schedule import Plan, Schedule, ScheduleConfig, build_schedule
from .targets import TargetConfig, TargetSelector, target_loss
from .warmup import LRScaler, WarmupConfig, switch_warmup_factor, warn_if_warmup_outlasts_switches

#: The training methods of the paper's comparisons, as (freeze, target kind).
METHODS: dict[str, tuple[bool, str]] = {
    "layerlock": (True, "latent"),
    "mae": (False, "pixels"),
    "freeze-only": (True, "pixels"),
    "latent-naive": (False, "latent"),
}


@dataclass(frozen=True)
class LayerLockConfig:
    """Everything LayerLock needs. ``freeze=False`` keeps every block trainable (baselines)."""

    freeze: bool = True
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)

    def __post_init__(self) -> None:
        v.boolean("freeze", self.freeze)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, prefix: str = "layerlock") -> LayerLockConfig:
        return from_dict(cls, data, prefix)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def with_method(self, method: str) -> LayerLockConfig:
        """This config set up for one of :data:`METHODS`."""
        v.one_of("method", method, METHODS)
        freeze, kind = METHODS[method]
        return dataclasses.replace(self, freeze=freeze, target=dataclasses.replace(self.target, kind=kind))


@dataclass(frozen=True)
class LayerLockEvent:
    """A change of plan: blocks frozen and/or target switched (``resumed``: re-applied on resume)."""

    step: int
    num_frozen: int
    target_layer: int
    heads: tuple[str, ...]
    newly_frozen: tuple[str, ...]
    resumed: bool = False
    reason: str = ""  # why an adaptive schedule decided this event (converged / max_interval ...); "" otherwise

    def describe(self) -> str:
        if self.resumed:  # re-applied from the plan of the last completed step: the run continues at step + 1
            frozen = f"{', '.join(self.newly_frozen)} frozen ({self.num_frozen} blocks); " if self.newly_frozen else ""
            return f"resuming at step {self.step + 1}: {frozen}target {', '.join(self.heads)}"
        what = []
        if self.newly_frozen:
            what.append(f"froze {', '.join(self.newly_frozen)} ({self.num_frozen} blocks frozen)")
        what.append(f"target -> {', '.join(self.heads)}")
        tail = f" (adaptive: {self.reason})" if self.reason else ""
        return f"step {self.step}: " + "; ".join(what) + tail


def _shortest_switch_gap(config: ScheduleConfig, schedule: Schedule) -> int | None:
    """Fewest steps between two target switches (None with fewer than two); an adaptive schedule's events
    are not known ahead, but they are at least ``min_interval`` apart."""
    if config.kind == "adaptive":
        return config.adaptive.min_interval
    steps = list(schedule.event_steps)
    return min(b - a for a, b in zip(steps, steps[1:])) if len(steps) > 1 else None


class LayerLock:
    """Drives LayerLock for one encoder and (optionally) one optimizer."""

    def __init__(
        self,
        encoder: LayeredEncoder,
        config: LayerLockConfig | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        tubelet: tuple[int, int, int] | None = None,
        schedule: Schedule | None = None,
        total_steps: int | None = None,
    ):
        self.config = config or LayerLockConfig()
        self.encoder = as_layered_encoder(encoder)
        units = self.encoder.layerlock_units()
        self.schedule = schedule or build_schedule(self.config.schedule, units)
        if total_steps is not None and self.config.freeze:
            self.schedule.warn_if_longer_than(total_steps)
        if self.config.freeze and self.config.target.kind == "latent":
            warn_if_warmup_outlasts_switches(self.config.warmup, _shortest_switch_gap(self.config.schedule, self.schedule))
        self.freezer = Freezer(units)
        target = self.config.target
        if target.kind == "latent" and target.context == "sparse" and not accepts_token_idx(self.encoder):
            raise ConfigError(
                "target.context",
                f"'sparse' needs an encoder whose forward_prefix accepts token_idx (the reference VideoMAE and "
                f"TimmViTEncoder do); "
                f"{type(self.encoder).__name__}.forward_prefix does not. Use 'full'.",
            )
        self.selector = TargetSelector(self.config.target, tubelet)
        self.guard = CollapseGuard(self.config.guard)
        self._scalers: list[LRScaler] = []
        if optimizer is not None:
            self.attach_optimizer(optimizer)
        self._listeners: list[Callable[[LayerLockEvent], None]] = []
        self._heads: tuple[str, ...] = ()
        self.plan: Plan = self.plan_at(0)
        self.next_step = 0
        self.last_decision = GuardDecision()

    # -- wiring -----------------------------------------------------------------------------
    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Let LayerLock free frozen parameters' state in ``optimizer`` and scale its LR in warmups."""
        self.freezer.attach_optimizer(optimizer)
        self._scalers.append(LRScaler(optimizer))

    def on_event(self, callback: Callable[[LayerLockEvent], None]) -> None:
        self._listeners.append(callback)

    # -- the plan -----------------------------------------------------------------------------
    def plan_at(self, step: int) -> Plan:
        """The effective plan at ``step`` (baselines with ``freeze=False`` never freeze)."""
        plan = self.schedule.plan(step)
        if not self.config.freeze:
            plan = dataclasses.replace(plan, num_frozen=0, stem_frozen=False)
        return plan

    def begin_step(self, step: int) -> Plan:
        """Apply the plan of ``step``: freeze what is due, switch targets, set the warmup factor.

        An adaptive schedule first observes the encoder (parameters as after the previous optimizer
        step) and may decide that an event happens at ``step``; every rank decides the same."""
        observe = getattr(self.schedule, "observe", None)
        if observe is not None:
            observe(step)
        self._apply(self.plan_at(step), resumed=False)
        self.next_step = step + 1
        return self.plan

    def _apply(self, plan: Plan, resumed: bool) -> None:
        newly = self.freezer.apply(plan.num_frozen, plan.stem_frozen) if self.config.freeze else []
        heads = tuple(self.selector.heads(plan))
        if newly or heads != self._heads:
            first = not self._heads
            self._heads = heads
            if not (first and not newly and plan.stage == 0):  # the initial pixel target is no event
                event = LayerLockEvent(plan.step, plan.num_frozen, plan.target_layer, heads, tuple(newly), resumed,
                                       self._reason(plan))
                for cb in self._listeners:
                    cb(event)
        self.plan = plan
        factor = self.warmup_factor(plan)
        for s in self._scalers:
            s.factor = factor

    def _reason(self, plan: Plan) -> str:
        """The adaptive schedule's reason for the event in effect at ``plan`` ("" for other schedules)."""
        decisions = getattr(self.schedule, "decisions", None)
        return decisions[plan.stage - 1].reason if decisions and plan.stage else ""

    def warmup_factor(self, plan: Plan) -> float:
        return switch_warmup_factor(self.config.warmup, plan, switches_target=self.config.target.kind == "latent")

    def frozen_prefix(self, plan: Plan | None = None) -> int:
        """How many leading blocks the student may run without autograd (the stem must be frozen too)."""
        plan = plan or self.plan
        return plan.num_frozen if plan.stem_frozen else 0

    # -- targets and loss -------------------------------------------------------------------------
    def heads(self, plan: Plan | None = None) -> list[str]:
        return self.selector.heads(plan or self.plan)

    def targets(self, inputs: torch.Tensor, plan: Plan | None, query_idx: torch.Tensor,
                visible_idx: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Targets per head at ``query_idx [B, Q]``; ``visible_idx [B, V]`` (the student's visible tokens)
        joins the target pass's context when ``target.context`` is ``"sparse"`` and is ignored otherwise."""
        return self.selector.compute(self.encoder, inputs, plan or self.plan, query_idx, visible_idx)

    @staticmethod
    def loss(predictions: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        return target_loss(predictions, targets)

    def end_step(self, loss: torch.Tensor, targets: dict[str, torch.Tensor] | None = None) -> GuardDecision:
        """Run the collapse guard on this step's loss and newest latent target."""
        latent = None
        if targets and self.selector.layers(self.plan):
            latent = targets[self.selector.heads(self.plan)[-1]]
        self.last_decision = self.guard.check(self.plan.step, loss, latent)
        return self.last_decision

    def metrics(self) -> dict[str, float]:
        """Scalars namespaced ``layerlock/...`` for the host's logger."""
        out = {
            "layerlock/num_frozen": float(self.plan.num_frozen),
            "layerlock/target_layer": float(self.plan.target_layer),
            "layerlock/stage": float(self.plan.stage),
            "layerlock/warmup_factor": self.warmup_factor(self.plan),
            "layerlock/guard_trips": float(self.guard.trips),
        }
        out.update({f"layerlock/{k}": v for k, v in self.guard.last_stats.items()})
        schedule_metrics = getattr(self.schedule, "metrics", None)
        if schedule_metrics is not None:
            out.update(schedule_metrics())
        return out

    # -- checkpointing -------------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        return {"schedule": self.schedule.describe(), "freeze": self.config.freeze, "target": to_dict(self.config.target)}

    def state_dict(self) -> dict[str, Any]:
        state = {"format": "layerlock/1", "next_step": self.next_step, **self._identity(), "guard": self.guard.state_dict()}
        if hasattr(self.schedule, "state_dict"):  # the adaptive schedule's decided events and signal state
            state["schedule_state"] = self.schedule.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore and re-apply the freezing of the last completed step. Call before loading the
        optimizer state. Refuses a state saved with a different schedule or method, and (adaptive
        schedule) recorded decisions that the config's guards could not have taken."""
        if state.get("format") != "layerlock/1":
            raise CheckpointError(f"not a LayerLock state (format {state.get('format')!r}, expected 'layerlock/1')")
        ours = self._identity()
        diffs = [f"{k}: checkpoint {state.get(k)!r} vs config {ours[k]!r}" for k in ours if state.get(k) != ours[k]]
        if diffs:
            raise CheckpointError("LayerLock state was saved with a different config; " + "; ".join(diffs))
        if hasattr(self.schedule, "load_state_dict"):
            if "schedule_state" not in state:
                raise CheckpointError("LayerLock state has no 'schedule_state' (the adaptive schedule's decided events); "
                                      "it was not saved by an adaptive-schedule run")
            self.schedule.load_state_dict(state["schedule_state"], int(state["next_step"]))
        self.guard.load_state_dict(state["guard"])
        self.next_step = int(state["next_step"])
        if self.next_step > 0:
            self._apply(self.plan_at(self.next_step - 1), resumed=True)


__all__ = ["METHODS", "LayerLock", "LayerLockConfig", "LayerLockEvent", "ConfigError"]
