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
(:func:`build_schedule`); any :class:`~layerlock_plugin.schedule.Schedule` can be passed instead. The
controller drives it through the schedule protocol: ``observe(step)`` inside ``begin_step`` (the
adaptive schedule decides its events there, no new host call), ``plan``, ``reason``, ``metrics`` and
``state_dict`` (the adaptive schedule's decided events are part of :meth:`LayerLock.state_dict`).

What an integration needs beyond the loop above is public here or in :mod:`layerlock_plugin.integration`:
:attr:`LayerLock.optimizers`, :attr:`LayerLock.last_decision`, :attr:`LayerLock.last_targets`, :meth:`LayerLock.target_layers` (the
blocks a plan's targets need), :meth:`LayerLock.readout_layers` (every block the schedule can target:
one readout head each) and ``end_step`` on targets a host computed itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import _validate as v
from ._config import from_dict, to_dict
from .collapse import CollapseGuard, GuardConfig, GuardDecision
from .adaptive import AdaptiveSchedule
from .encoder import EncoderUnits, LayeredEncoder, accepts_token_idx, as_layered_encoder
from .errors import CheckpointError, ConfigError
from .freezing import Freezer
from .schedule import FreezeSchedule, Plan, RecordedSchedule, Schedule, ScheduleConfig
from .targets import TargetConfig, TargetSelector, target_loss
from .warmup import LRScaler, WarmupConfig, switch_warmup_factor, warn_if_warmup_outlasts_switches

#: The training methods of the paper's comparisons, as (freeze, target kind).
METHODS: dict[str, tuple[bool, str]] = {
    "layerlock": (True, "latent"),
    "mae": (False, "pixels"),
    "freeze-only": (True, "pixels"),
    "latent-naive": (False, "latent"),
}


def build_schedule(config: ScheduleConfig, units: EncoderUnits) -> Schedule:
    """The schedule ``config.kind`` asks for, for an encoder whose freezable units are ``units``
    (the adaptive schedule watches their parameters)."""
    if config.kind == "recorded":
        config.resolve_max_frozen(units.num_layers)
        return RecordedSchedule.from_events(config.events, units.num_layers, config.freeze_stem)
    if config.kind == "adaptive":
        return AdaptiveSchedule(config, units)
    return FreezeSchedule(config, units.num_layers)


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
        """Build from a plain (YAML) mapping; unknown keys and bad values name ``prefix.field``."""
        return from_dict(cls, data, prefix)

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML-friendly dict (the inverse of :meth:`from_dict`)."""
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
        """One line for a log, e.g. ``step 600: froze stem, block_1 (1 blocks frozen); target -> layer_1``."""
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
    """Drives LayerLock for one encoder and any number of optimizers (see the module docstring).

    Args:
        encoder: a layered encoder (:mod:`layerlock_plugin.encoder`); its blocks freeze from the input side.
        config: :class:`LayerLockConfig` (default: the paper's method with default knobs).
        optimizer: optional; same as :meth:`attach_optimizer` later.
        tubelet: patch size ``(pt, ph, pw)`` (``(1, p, p)`` for images) for pixel targets.
        schedule: a :class:`~layerlock_plugin.schedule.Schedule` instead of ``config.schedule``'s.
        total_steps: warns when the schedule would not finish within the run.
    """

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
        self.last_decision = GuardDecision()
        self.last_targets: dict[str, torch.Tensor] | None = None
        if optimizer is not None:
            self.attach_optimizer(optimizer)
        self._listeners: list[Callable[[LayerLockEvent], None]] = []
        self._heads: tuple[str, ...] = ()
        self.plan: Plan = self.plan_at(0)
        self.next_step = 0

    # -- wiring -----------------------------------------------------------------------------
    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Let LayerLock free frozen parameters' state in ``optimizer`` and scale its LR in warmups.
        Attaching an optimizer that is attached already does nothing."""
        if any(optimizer is o for o in self.optimizers):
            return
        self.freezer.attach_optimizer(optimizer)
        self._scalers.append(LRScaler(optimizer))  # its factor is set by the next begin_step

    @property
    def optimizers(self) -> tuple[torch.optim.Optimizer, ...]:
        """The attached optimizers, in the order they were attached."""
        return tuple(s.optimizer for s in self._scalers)

    def on_event(self, callback: Callable[[LayerLockEvent], None]) -> None:
        """Call ``callback(event)`` at every freeze event / target switch (also when re-applied on resume)."""
        self._listeners.append(callback)

    # -- the plan -----------------------------------------------------------------------------
    def plan_at(self, step: int) -> Plan:
        """The effective plan at ``step``: the schedule's, except that baselines with ``freeze=False``
        never freeze and those with pixel targets (``target.kind: pixels``) keep ``target_layer == 0``."""
        plan = self.schedule.plan(step)
        if not self.config.freeze:
            plan = dataclasses.replace(plan, num_frozen=0, stem_frozen=False)
        if self.config.target.kind == "pixels":
            plan = dataclasses.replace(plan, target_layer=0)
        return plan

    def begin_step(self, step: int) -> Plan:
        """Apply the plan of ``step``: freeze what is due, switch targets, set the warmup factor.

        An adaptive schedule first observes the encoder (parameters as after the previous optimizer
        step) and may decide that an event happens at ``step``; every rank decides the same."""
        self.schedule.observe(step)
        self.last_decision, self.last_targets = GuardDecision(), None  # nothing computed or checked yet this step
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
                                       self.schedule.reason(plan.stage))
                for cb in self._listeners:
                    cb(event)
        self.plan = plan
        factor = self.warmup_factor(plan)
        for s in self._scalers:
            s.factor = factor

    def warmup_factor(self, plan: Plan) -> float:
        """The switch-warmup LR multiplier of ``plan`` (1 outside a warmup and for pixel targets)."""
        return switch_warmup_factor(self.config.warmup, plan, switches_target=self.config.target.kind == "latent")

    def frozen_prefix(self, plan: Plan | None = None) -> int:
        """How many leading blocks the student may run without autograd (the stem must be frozen too)."""
        plan = plan or self.plan
        return plan.num_frozen if plan.stem_frozen else 0

    # -- targets and loss -------------------------------------------------------------------------
    def heads(self, plan: Plan | None = None) -> list[str]:
        """Head names of ``plan``'s targets (default: the current plan), e.g. ``["pixels"]`` or ``["layer_3"]``."""
        return self.selector.heads(plan or self.plan)

    def target_layers(self, plan: Plan | None = None) -> list[int]:
        """The blocks whose outputs are ``plan``'s targets (``[]``: pixels); the target pass runs to the deepest."""
        return self.selector.layers(plan or self.plan)

    def readout_layers(self) -> list[int]:
        """Every block the schedule can make a target, ascending: a host that pre-creates one readout per
        possible target builds one for each (``[]`` for pixel-target methods)."""
        depths = self.schedule.depths
        if self.config.target.kind == "pixels" or not depths:
            return []
        return list(range(1, depths[-1] + 1)) if self.config.target.mode == "multi" else list(depths)

    def targets(self, inputs: torch.Tensor, plan: Plan | None, query_idx: torch.Tensor,
                visible_idx: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Targets per head at ``query_idx [B, Q]``; ``visible_idx [B, V]`` (the student's visible tokens)
        joins the target pass's context when ``target.context`` is ``"sparse"`` and is ignored otherwise.
        The result is also kept as :attr:`last_targets` until the next ``begin_step``."""
        self.last_targets = self.selector.compute(self.encoder, inputs, plan or self.plan, query_idx, visible_idx)
        return self.last_targets

    @staticmethod
    def loss(predictions: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """MSE per head, ``{head: [B, Q, P]}`` each, averaged over heads: ``(loss, {head: detached scalar})``."""
        return target_loss(predictions, targets)

    def _latent(self, targets: dict[str, torch.Tensor] | torch.Tensor | Sequence[torch.Tensor] | None) -> torch.Tensor | None:
        """The latent target the guard checks: a dict's newest latent head (pixels are not checked), or
        latent targets a host computed itself (a ``[..., D]`` tensor or a list of them, checked together)."""
        if isinstance(targets, dict):
            return targets[self.heads(self.plan)[-1]] if targets and self.target_layers(self.plan) else None
        if targets is None:
            return None
        items = [targets] if isinstance(targets, torch.Tensor) else list(targets)
        return torch.cat([x.detach().reshape(-1, x.shape[-1]) for x in items]).unsqueeze(0)

    def guard_measure(self, loss: torch.Tensor,
                      targets: dict[str, torch.Tensor] | torch.Tensor | Sequence[torch.Tensor] | None = None
                      ) -> torch.Tensor | None:
        """The collapse guard's measures of this step as a ``[5]`` vector (see
        :data:`~layerlock_plugin.collapse.MEASURES`) on ``loss``'s device, from the scalar ``loss`` and the
        latent target ``[..., D]``, without a host sync or a collective (None when the guard is off). A host that all-reduces its own step
        scalars can append it, average over ranks and pass the host values to :meth:`end_step` as
        ``measured``: one collective and one host transfer per step for everything."""
        return self.guard.measure(self.plan.step, loss, self._latent(targets))

    def guard_measure_deferred(self, loss: torch.Tensor,
                               targets: dict[str, torch.Tensor] | torch.Tensor | Sequence[torch.Tensor] | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """:meth:`guard_measure` for a host that decides late (at its log steps): ``(measures [5], sample)``,
        the target statistics left for :meth:`~layerlock_plugin.collapse.CollapseGuard.complete` to compute
        from the token ``sample [S, D]`` then (None when not measured this step), so the step itself runs no
        spectrum (``svdvals``). None when the guard is off."""
        return self.guard.measure_deferred(self.plan.step, loss, self._latent(targets))

    def end_step(self, loss: torch.Tensor | None = None,
                 targets: dict[str, torch.Tensor] | torch.Tensor | Sequence[torch.Tensor] | None = None, *,
                 measured: Sequence[float] | None = None, step: int | None = None) -> GuardDecision:
        """Run the collapse guard on this step's scalar ``loss`` and latent target (``{head: [B, Q, D]}`` or
        host-computed ``[..., D]`` tensors, see :meth:`_latent`); the decision is kept as :attr:`last_decision` (see
        :func:`~layerlock_plugin.integration.skip_update`). With ``measured`` (the host values of
        :meth:`guard_measure`, averaged over ranks) the guard only decides: no collective, no sync. ``step``:
        the step those measures belong to, for a host that reads its step scalars only every few steps
        (PyTorch/XLA) and decides each past step in order at the read; such a decision can warn or raise,
        but no longer skip that step's update."""
        if measured is not None:
            self.last_decision = self.guard.decide(self.plan.step if step is None else step, measured)
        else:
            if loss is None:
                raise ValueError("end_step: give the step's loss (or measured=...)")
            self.last_decision = self.guard.check(self.plan.step, loss, self._latent(targets))
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
        out.update(self.schedule.metrics())
        return out

    # -- checkpointing -------------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        return {"schedule": self.schedule.describe(), "freeze": self.config.freeze, "target": to_dict(self.config.target)}

    def state_dict(self) -> dict[str, Any]:
        """Plain data (``weights_only`` loadable): the step, what must match on resume, the guard's and
        the schedule's state (the adaptive schedule's decided events and signal state)."""
        return {"format": "layerlock/1", "next_step": self.next_step, **self._identity(), "guard": self.guard.state_dict(),
                "schedule_state": self.schedule.state_dict()}

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
        self.schedule.load_state_dict(state.get("schedule_state"), int(state["next_step"]))
        self.guard.load_state_dict(state["guard"])
        self.next_step = int(state["next_step"])
        if self.next_step > 0:
            self._apply(self.plan_at(self.next_step - 1), resumed=True)


__all__ = ["METHODS", "LayerLock", "LayerLockConfig", "LayerLockEvent", "ConfigError", "build_schedule"]
