"""The adaptive freezing schedule: decide *when* to freeze the next block from the training itself.

The paper freezes on a hand-set schedule (``pixel_steps``, ``interval``) found by watching parameter
norms in convergence runs, and names the missing adaptive mechanism as its main limitation. This
module watches two cheap per-block signals and freezes the next block when they say it converged:

* the **parameter norm** ``|theta|`` of the block(s) next in line: converged when its relative growth
  over a window of observations is at most ``norm_tolerance`` (a plateau, or a decrease under weight
  decay: the paper's heuristic);
* the **relative update** ``|theta_t - theta_{t-N}| / |theta_t| / N`` per step, smoothed over the window:
  converged when it fell to ``update_threshold`` x its peak since the block has been watched. Relative
  to the peak, so neither the learning rate nor the block size needs calibrating.

What is fixed in advance and what is decided: the *depths* are those of the explicit schedule
(``jump`` blocks per event up to ``max_frozen``), only the *steps* of the events are decided. So a
host that pre-creates a readout per possible target (the reference model, the lightly adapter) needs
nothing new, and the plan stays a pure function of (recorded events, step), like every schedule.

How it is driven: the :class:`~layerlock_plugin.controller.LayerLock` controller calls
:meth:`AdaptiveSchedule.observe` from ``begin_step(step)`` before it computes the plan of ``step``.
At that point the parameters are those after the previous optimizer step, so the update between two
observations is measured without any new host call. Observations happen every ``observe_every`` steps
and snapshot only the watched block(s) (one block's parameters, on the device they live on).

Distributed: the sums of squares are all-reduced (FSDP2 ``DTensor`` parameters contribute the sums of
their local shards; replicated parameters are averaged over the ranks), and the decision itself is
broadcast from rank 0, so every rank freezes at the same step even when their data differ.

Reproducibility: the decided events are part of the controller's ``state_dict`` (checkpoint), the
reference trainer's ``events.jsonl`` lists them, resume replays them exactly, and
:func:`recorded_schedule_config` turns a run folder or checkpoint into a ``schedule: {kind: recorded}``
section that replays them in a new run. ``python -m layerlock_plugin.adaptive RUN_DIR`` prints it.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .encoder import EncoderUnits
from .errors import CheckpointError, ConfigError
from .schedule import AdaptiveConfig, Schedule, ScheduleConfig

try:  # FSDP2 parameters are DTensors (torch >= 2.4 has the public module)
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - older torch or a build without distributed
    DTensor = None  # type: ignore[assignment,misc]

STATE_FORMAT = "layerlock-adaptive/1"

__all__ = [
    "AdaptiveSchedule",
    "Decision",
    "Observation",
    "global_sums_of_squares",
    "read_recorded_events",
    "recorded_schedule_config",
]


# -- distributed statistics ------------------------------------------------------------------------------
def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _local_and_copies(p: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(the locally held values of ``p``, on how many ranks each value is held).

    A plain tensor is replicated on every rank (DDP, or a single process). An FSDP2 ``DTensor`` holds a
    shard; along mesh dimensions with a ``Replicate`` placement (HSDP) the shard is held several times.
    """
    if DTensor is not None and isinstance(p, DTensor):
        mesh = p.device_mesh
        if _distributed() and mesh.size() != dist.get_world_size():
            raise ConfigError(
                "schedule.adaptive",
                f"the parameter norm cannot be computed for this host: a DTensor parameter lives on a device "
                f"mesh of {mesh.size()} ranks but the process group has {dist.get_world_size()}; the adaptive "
                f"schedule reduces over the whole default group",
            )
        copies = 1
        for dim, placement in enumerate(p.placements):
            if placement.is_replicate():
                copies *= mesh.size(dim)
        return p.to_local(), copies
    return p, dist.get_world_size() if _distributed() else 1


def _all_reduce_sums(local_sums: Sequence[torch.Tensor]) -> list[float]:
    """Sum ``local_sums`` (0-d tensors) over the ranks: one ``all_reduce`` of a float64 vector."""
    if not local_sums:
        return []
    device = local_sums[0].device
    vec = torch.stack([s.to(device=device, dtype=torch.float64) for s in local_sums])
    if _distributed():
        dist.all_reduce(vec, op=dist.ReduceOp.SUM)
    return [float(x) for x in vec.cpu()]


def _sum_sq(pairs: Sequence[tuple[torch.Tensor, int]]) -> torch.Tensor:
    """Local sum of squares of ``(local values, copies)`` pairs, each value counted once globally."""
    total = torch.zeros((), dtype=torch.float64, device=pairs[0][0].device if pairs else "cpu")
    for local, copies in pairs:
        total = total + local.detach().double().pow(2).sum().to(total.device) / copies
    return total


def global_sums_of_squares(parts: Sequence[Sequence[torch.Tensor]]) -> list[float]:
    """``[sum over tensors in part of sum(t ** 2)]`` over the *global* (unsharded) tensors, one per part.

    ``parts[i]`` is a list of parameters (plain tensors or FSDP2 ``DTensor`` s). One ``all_reduce`` of a
    ``[len(parts)]`` float64 vector when ``torch.distributed`` is initialised: shard sums add up to the
    global sum, and values held on ``c`` ranks are divided by ``c`` first so they count once (ranks
    whose replicated values differ are thereby averaged).
    """
    return _all_reduce_sums([_sum_sq([_local_and_copies(t) for t in tensors]) for tensors in parts])


def _agreed(flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every rank (the statistics agree already; this makes the decision agree
    even if a rank computed a different bit, e.g. from a non-deterministic reduction)."""
    if not _distributed():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


# -- records ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Observation:
    """One measurement of the watched block(s) ``first_block..last_block`` (1-based) at ``step``.

    ``update``: relative update per step since the previous observation (None for the first one);
    ``update_smoothed``: its mean over the window (None until the window is full), ``update_peak`` its
    maximum so far; ``norm_change``: relative norm change over the window (None until full).
    """

    step: int
    first_block: int
    last_block: int
    norm: float
    update: float | None
    update_smoothed: float | None
    update_peak: float
    norm_change: float | None
    update_converged: bool
    norm_converged: bool

    def as_dict(self) -> dict[str, Any]:
        """Plain data (the checkpoint's ``last`` observation)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class Decision:
    """A decided freeze event: at ``step`` the frozen depth becomes ``num_frozen``, because of ``reason``
    (``converged``, ``max_pixel_steps`` or ``max_interval``)."""

    step: int
    num_frozen: int
    reason: str

    def as_list(self) -> list[Any]:
        """``[step, num_frozen, reason]`` (the checkpoint's form)."""
        return [self.step, self.num_frozen, self.reason]


@dataclass
class _Watch:
    """The signal state of the block(s) being watched; reset when they change."""

    first_block: int
    last_block: int
    last_step: int
    snapshot: list[torch.Tensor]  # local values of the watched parameters at ``last_step``
    norms: list[float] = field(default_factory=list)  # the last window + 1 norms
    updates: list[float] = field(default_factory=list)  # the last window relative updates
    peak: float = 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"first_block": self.first_block, "last_block": self.last_block, "last_step": self.last_step,
                "snapshot": [t.detach().cpu().clone() for t in self.snapshot], "norms": list(self.norms),
                "updates": list(self.updates), "peak": self.peak}


# -- the schedule ----------------------------------------------------------------------------------------
class AdaptiveSchedule(Schedule):
    """A schedule whose event steps are decided during training (see the module docstring).

    ``depths`` is the full list of planned depths (as in the explicit schedule); ``event_steps`` the
    steps decided so far. ``plan(step)`` is a pure function of those, so the controller treats this
    schedule like any other; :meth:`observe` is the only thing that adds events.

    Args:
        config: the schedule config (``kind`` should be ``adaptive``; ``jump``, ``max_frozen``,
            ``freeze_stem`` and ``adaptive`` are used).
        units: the encoder's freezable units; the blocks' parameters are the ones watched.
    """

    def __init__(self, config: ScheduleConfig, units: EncoderUnits):
        super().__init__([], [], units.num_layers, config.freeze_stem)
        self.depths = tuple(config.planned_depths(units.num_layers))
        self.config = config
        self.adaptive: AdaptiveConfig = config.adaptive
        self.units = units
        self.decisions: list[Decision] = []
        self.history: list[Observation] = []  # this process's observations (for plots; not checkpointed)
        self.last: Observation | None = None
        self.last_observed = -1
        self._watch: _Watch | None = None

    # -- what is decided ------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        """Whether every planned event has been decided."""
        return len(self.decisions) == len(self.depths)

    def _record(self, decision: Decision) -> None:
        self.decisions.append(decision)
        self.event_steps = tuple(d.step for d in self.decisions)

    def describe(self) -> dict[str, Any]:
        """What must match between a checkpoint and the config that resumes it (the decided steps
        are state, checked by :meth:`load_state_dict` against the guards instead)."""
        a = self.adaptive
        return {"kind": "adaptive", "depths": list(self.depths), "num_layers": self.num_layers,
                "freeze_stem": self.freeze_stem, "observe_every": a.observe_every, "window": a.window}

    def warn_if_longer_than(self, total_steps: int) -> None:
        """Warn when even the earliest events the guards allow would not all fit in ``total_steps``."""
        a = self.adaptive
        earliest = _round_up(a.min_pixel_steps, a.observe_every) + (len(self.depths) - 1) * _round_up(a.min_interval, a.observe_every)
        if earliest >= total_steps:
            warnings.warn(
                f"schedule.adaptive: even if every block converged as early as the guards allow, the last freeze "
                f"event would be at step {earliest} but the run has {total_steps} steps; lower "
                f"schedule.adaptive.min_pixel_steps / min_interval or schedule.max_frozen.",
                stacklevel=2,
            )

    # -- observing --------------------------------------------------------------------------------------
    def _watched(self) -> tuple[int, int]:
        """1-based (first, last) block that the next event would freeze."""
        depth = self.decisions[-1].num_frozen if self.decisions else 0
        return depth + 1, self.depths[len(self.decisions)]

    def _params(self, first: int, last: int) -> list[torch.Tensor]:
        return [p for unit in self.units.blocks[first - 1 : last] for p in unit.params]

    def _start_watch(self, step: int) -> None:
        first, last = self._watched()
        params = self._params(first, last)
        if not params:
            raise ConfigError("schedule.adaptive",
                              f"the signals cannot be computed for this host: blocks {first}..{last} have no parameters")
        (sq,) = global_sums_of_squares([params])
        self._watch = _Watch(first, last, step, [_local_and_copies(p)[0].detach().clone() for p in params],
                             norms=[math.sqrt(sq)])

    def observe(self, step: int) -> Decision | None:
        """Measure the watched block(s) at ``step`` (parameters as after step ``step - 1``) and decide
        whether the next freeze event happens at ``step``. A no-op except on observation steps
        (multiples of ``observe_every``) not observed yet; returns the decision, if any."""
        a = self.adaptive
        if step % a.observe_every or step <= self.last_observed or self.done:
            return None
        self.last_observed = step
        w = self._watch
        first, last = self._watched()
        if w is None or (w.first_block, w.last_block) != (first, last):
            self._start_watch(step)
            return self._decide(step, None)
        pairs = [_local_and_copies(p) for p in self._params(first, last)]
        delta = [(t.detach() - s, c) for (t, c), s in zip(pairs, w.snapshot)]
        sq, dsq = _all_reduce_sums([_sum_sq(pairs), _sum_sq(delta)])
        norm = math.sqrt(sq)
        update = math.sqrt(dsq) / max(norm, 1e-30) / max(step - w.last_step, 1)
        w.snapshot = [t.detach().clone() for t, _ in pairs]
        w.last_step = step
        w.norms = (w.norms + [norm])[-(a.window + 1):]
        w.updates = (w.updates + [update])[-a.window:]
        return self._decide(step, update)

    def _decide(self, step: int, update: float | None) -> Decision | None:
        a, w = self.adaptive, self._watch
        assert w is not None
        smoothed = sum(w.updates) / len(w.updates) if len(w.updates) == a.window else None
        if smoothed is not None:
            w.peak = max(w.peak, smoothed)
        norm_change = (w.norms[-1] - w.norms[0]) / max(w.norms[0], 1e-30) if len(w.norms) == a.window + 1 else None
        update_ok = smoothed is not None and smoothed <= a.update_threshold * w.peak
        norm_ok = norm_change is not None and norm_change <= a.norm_tolerance
        converged = {"update": update_ok, "norm": norm_ok, "both": update_ok and norm_ok,
                     "either": update_ok or norm_ok}[a.signal]
        self.last = Observation(step, w.first_block, w.last_block, w.norms[-1], update, smoothed, w.peak,
                                norm_change, update_ok, norm_ok)
        self.history.append(self.last)
        since = step - (self.decisions[-1].step if self.decisions else 0)
        lo, hi = (a.min_pixel_steps, a.max_pixel_steps) if not self.decisions else (a.min_interval, a.max_interval)
        forced = hi is not None and since >= hi
        reason = "converged" if converged else ("max_pixel_steps" if not self.decisions else "max_interval")
        fire = _agreed(since >= lo and (converged or forced), w.snapshot[0].device)
        if not fire:
            return None
        decision = Decision(step, self.depths[len(self.decisions)], reason)
        self._record(decision)
        if not self.done:
            self._start_watch(step)  # the next block is watched from the step of the event on
        else:
            self._watch = None
        return decision

    def reason(self, stage: int) -> str:
        """The decided reason of the ``stage``-th event (1-based): converged, max_pixel_steps or max_interval."""
        return self.decisions[stage - 1].reason if 0 < stage <= len(self.decisions) else ""

    def metrics(self) -> dict[str, float]:
        """Signals of the latest observation, namespaced ``layerlock/adaptive/...``."""
        o = self.last
        if o is None:
            return {}
        out = {"layerlock/adaptive/watched_block": float(o.first_block), "layerlock/adaptive/norm": o.norm,
               "layerlock/adaptive/update_peak": o.update_peak}
        for key in ("update", "update_smoothed", "norm_change"):
            value = getattr(o, key)
            if value is not None:
                out[f"layerlock/adaptive/{key}"] = value
        return out

    # -- checkpointing ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The decided events and the signal state (the watched blocks' snapshot), ``weights_only`` loadable."""
        return {"format": STATE_FORMAT, "events": [d.as_list() for d in self.decisions],
                "last_observed": self.last_observed, "last": self.last.as_dict() if self.last else None,
                "watch": self._watch.state_dict() if self._watch is not None else None}

    def load_state_dict(self, state: dict[str, Any] | None, next_step: int) -> None:
        """Restore the decided events and the signal state. Refuses (``CheckpointError``) a missing state
        and events that disagree with the config's guards or depths, e.g. after a change of ``schedule.adaptive``."""
        if state is None:
            raise CheckpointError("LayerLock state has no 'schedule_state' (the adaptive schedule's decided events); "
                                  "it was not saved by an adaptive-schedule run")
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise CheckpointError(f"not an adaptive schedule state (format {getattr(state, 'get', lambda k: None)('format')!r}, "
                                  f"expected {STATE_FORMAT!r})")
        decisions = [Decision(int(s), int(d), str(r)) for s, d, r in state["events"]]
        problems = check_decisions(decisions, self.depths, self.adaptive, int(state["last_observed"]), next_step)
        if problems:
            raise CheckpointError("the recorded adaptive decisions disagree with the config: " + "; ".join(problems))
        self.decisions = []
        for d in decisions:
            self._record(d)
        self.last_observed = int(state["last_observed"])
        self.last = Observation(**state["last"]) if state.get("last") else None
        ws = state.get("watch")
        self._watch = None
        if ws is not None:
            params = self._params(ws["first_block"], ws["last_block"])
            locals_ = [_local_and_copies(p)[0] for p in params]
            snap = ws["snapshot"]
            if len(snap) != len(locals_) or any(s.shape != t.shape for s, t in zip(snap, locals_)):
                raise CheckpointError("the adaptive schedule's parameter snapshot does not match the watched blocks' "
                                      "parameters (another model, or another sharding)")
            self._watch = _Watch(int(ws["first_block"]), int(ws["last_block"]), int(ws["last_step"]),
                                 [s.to(device=t.device, dtype=t.dtype) for s, t in zip(snap, locals_)],
                                 [float(x) for x in ws["norms"]], [float(x) for x in ws["updates"]], float(ws["peak"]))


def _round_up(x: int, k: int) -> int:
    return -(-x // k) * k


def check_decisions(decisions: Sequence[Decision], depths: Sequence[int], a: AdaptiveConfig,
                    last_observed: int, next_step: int) -> list[str]:
    """Ways in which recorded decisions could not have been taken under config ``a`` (empty: agree)."""
    problems = []
    if len(decisions) > len(depths):
        problems.append(f"{len(decisions)} events recorded but the config plans only {len(depths)}")
    prev = None
    for i, d in enumerate(decisions):
        name = f"event {i + 1} (step {d.step}, {d.num_frozen} blocks)"
        if i < len(depths) and d.num_frozen != depths[i]:
            problems.append(f"{name}: the config's jump/max_frozen give depth {depths[i]}")
        if d.step % a.observe_every:
            problems.append(f"{name}: not a multiple of schedule.adaptive.observe_every ({a.observe_every})")
        if d.step >= next_step:
            problems.append(f"{name}: after the checkpoint's step {next_step}")
        lo, hi, lo_name, hi_name = ((a.min_pixel_steps, a.max_pixel_steps, "min_pixel_steps", "max_pixel_steps")
                                    if prev is None else (a.min_interval, a.max_interval, "min_interval", "max_interval"))
        since = d.step - (prev or 0)
        if since < lo:
            problems.append(f"{name}: {since} steps after the previous one, below schedule.adaptive.{lo_name} ({lo})")
        if hi is not None and since > _round_up(hi, a.observe_every):
            problems.append(f"{name}: {since} steps after the previous one, above schedule.adaptive.{hi_name} ({hi})")
        prev = d.step
    if len(decisions) < len(depths):
        hi, hi_name = (a.max_pixel_steps, "max_pixel_steps") if not decisions else (a.max_interval, "max_interval")
        since = last_observed - (decisions[-1].step if decisions else 0)
        if hi is not None and since > _round_up(hi, a.observe_every):
            problems.append(f"no event for {since} steps up to step {last_observed}, above schedule.adaptive.{hi_name} ({hi})")
    return problems


# -- replaying a recorded schedule -------------------------------------------------------------------------
def read_recorded_events(path: str | Path) -> list[tuple[int, int]]:
    """``[(step, num_frozen), ...]`` decided in an earlier run.

    ``path``: a run folder (its ``events.jsonl``, as the reference trainer writes it) or a
    ``events.jsonl`` file; rows re-applied on resume (``"resumed": true``) are skipped. The depth is the
    larger of ``num_frozen`` and ``target_layer``, so runs of the baselines that do not freeze
    (``latent-naive``) or keep pixel targets (``freeze-only``) replay too.
    """
    path = Path(path)
    file = path / "events.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError("schedule.events", f"no events file at {file} (a run folder holds events.jsonl)")
    events: list[tuple[int, int]] = []
    with open(file) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if row.get("resumed"):
                    continue
                step, depth = int(row["step"]), max(int(row["num_frozen"]), int(row["target_layer"]))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ConfigError("schedule.events", f"{file}:{n} is not an event row ({e})") from e
            if depth > 0 and (not events or depth > events[-1][1]):
                events.append((step, depth))
    if not events:
        raise ConfigError("schedule.events", f"{file} lists no freeze events")
    return events


def recorded_schedule_config(path: str | Path, base: ScheduleConfig | None = None) -> dict[str, Any]:
    """A ``schedule:`` config section that replays the events recorded at ``path`` (see
    :func:`read_recorded_events`): ``{"kind": "recorded", "events": [[step, n], ...], "freeze_stem": ...}``."""
    base = base or ScheduleConfig()
    events = read_recorded_events(path)
    return {"kind": "recorded", "events": [list(e) for e in events], "freeze_stem": base.freeze_stem}


def main(argv: Sequence[str] | None = None) -> int:
    """Print the ``--set`` options that replay a run's decided schedule (``python -m layerlock_plugin.adaptive RUN``)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m layerlock_plugin.adaptive",
                                     description="Print the schedule an adaptive run decided, as options that replay it.")
    parser.add_argument("run", help="run folder (or its events.jsonl)")
    args = parser.parse_args(argv)
    try:
        section = recorded_schedule_config(args.run)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    events = json.dumps(section["events"]).replace(" ", "")
    print(f"--set schedule.kind=recorded --set 'schedule.events={events}'")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
