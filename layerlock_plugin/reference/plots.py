"""PNG plots of a LayerLock run: loss with freeze events, the freezing schedule with the LR, collapse
statistics, and the adaptive schedule's per-block signals with its decided events next to an explicit
schedule (:func:`write_run_plots` draws every figure of a finished run).

Every function creates the parent directory of ``path`` and returns ``path`` as a :class:`pathlib.Path`;
the shared pieces (an Agg figure outside pyplot, event and resume marks) are in :mod:`.plot_kit`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .plot_kit import (_figure, _layer_name, _no_data, _number, _save, _series, _smoothing_window, log_spacing,
                       mark_events, mark_sessions, running_mean)

if TYPE_CHECKING:
    from ..collapse import GuardConfig
    from ..controller import LayerLock
    from .config import RunConfig

__all__ = ["plot_loss", "plot_schedule", "plot_collapse_stats", "plot_adaptive_signals", "running_mean",
           "write_run_plots", "COLLAPSE_KEYS", "ADAPTIVE_KEYS"]

COLLAPSE_KEYS = ("layerlock/feature_std", "layerlock/effective_rank", "layerlock/relative_loss")
#: What each statistic is, for its panel (the definitions: :mod:`layerlock_plugin.collapse`).
COLLAPSE_MEANING = {
    "layerlock/feature_std": "spread of the target features over tokens / their RMS: 1 varied, 0 all tokens alike",
    "layerlock/effective_rank": "effective rank / min(tokens, channels): 1 isotropic, 0 one direction",
    "layerlock/relative_loss": "latent loss / target variance: 1 = no better than predicting the mean",
}
#: The guard's thresholds (trip if below, ``patience`` checks in a row), by statistic.
GUARD_THRESHOLDS = {"layerlock/feature_std": "min_feature_std", "layerlock/effective_rank": "min_effective_rank"}


def _segments_by_target(steps: np.ndarray, vals: np.ndarray, events: Sequence[Mapping[str, Any]],
                        window: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` smoothed within each target's stretch (running mean of ``window`` rows) with a NaN gap at
    every target switch, so one line never joins (or averages) two targets' losses."""
    cuts = sorted(float(e["step"]) for e in events if _number(e.get("step")) is not None and not e.get("resumed"))
    # a row at step c logs the steps up to c, all before the switch at c
    bounds = [0, *(int(np.searchsorted(steps, c, side="right")) for c in cuts), len(steps)]
    xs, ys = [], []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi > lo:
            xs += [*steps[lo:hi], np.nan]
            ys += [*running_mean(vals[lo:hi], window), np.nan]
    return np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)


def _one_head_per_row(rows: Sequence[Mapping[str, Any]]) -> bool:
    """Every row's ``loss`` is its only head's loss (one target at a time): the total adds no curve."""
    for r in rows:
        heads = [v for k, v in r.items() if str(k).startswith("loss/")]
        if "loss" in r and (len(heads) != 1 or abs(float(r["loss"]) - float(heads[0])) > 1e-9 * abs(float(r["loss"]))):
            return False
    return True


def plot_loss(
    rows: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]],
    path: str | Path,
    title: str | None = None,
    sessions: Sequence[Mapping[str, Any]] = (),
) -> Path:
    """Training loss vs step (log y), with the freeze / target-switch events and the resume / extension
    points (``sessions``: ``sessions.jsonl`` rows) marked.

    ``rows``: dicts with ``step`` and ``loss``; any other key starting with ``loss`` (``loss/pixels``,
    ``loss/layer_k``) is drawn as its own curve. ``loss`` is the loss the step optimised: the current
    target's (mean over heads with several targets), so its scale changes at every target switch; it is
    drawn with a gap at each switch. Noisy curves are smoothed by a running mean over log rows (the raw
    values stay visible faintly). ``events``: dicts with ``step``, ``num_frozen`` and ``target_layer``.
    """
    fig = _figure(8.0, 4.8)
    ax = fig.add_subplot(1, 1, 1)
    heads = sorted({k for r in rows for k in r if k != "loss" and str(k).startswith("loss")})
    # with one target at a time the total is the current head's loss: drawn once, as that head's curve
    keys = heads if heads and _one_head_per_row(rows) else ["loss", *heads]
    colors = ["C1", "C2", "C3", "C4", "C5", "C6", "C8", "C9", "C0"]
    all_positive, drawn, smoothed = True, False, ""
    window = _smoothing_window(len(rows))  # one window for every curve, so the note below holds for all
    for i, key in enumerate(keys):
        steps, vals = _series(rows, key)
        if steps.size == 0:
            continue
        drawn = True
        all_positive &= bool(np.all(vals > 0))
        if key == "loss":  # the mean over the heads trained at once: a gap at each switch (the scales differ)
            color, label = "black", "loss (mean over the targets trained at once)"
            (x, curve), (raw_x, raw_y) = (_segments_by_target(steps, vals, events, w) for w in (window, 1))
        else:
            color, label = colors[i % len(colors)], key
            x, curve, raw_x, raw_y = steps, running_mean(vals, window), steps, vals
        if window > 1:
            ax.plot(raw_x, raw_y, color=color, alpha=0.2, linewidth=0.8)
            smoothed = (f"curves: running mean of {window} log rows ({window * log_spacing(_series(rows, 'loss')[0])} "
                        "steps), raw faint")
        ax.plot(x, curve, color=color, linewidth=1.6, label=label, marker="." if steps.size < 50 else None)
    if drawn and all_positive:
        ax.set_yscale("log")
    if not drawn:
        _no_data(ax, "no loss values")
    mark_events(ax, events)
    mark_sessions(ax, sessions)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    note = ("one curve per target, each on its own scale: a jump at a switch is a new target, not divergence"
            if any(not e.get("resumed") for e in events) else "")
    ax.set_title("\n".join(t for t in (title, note, smoothed) if t), fontsize=9, pad=26 if events else 6)
    if drawn:
        ax.legend(loc="upper right", fontsize=8)
    ax.grid(True, which="both", alpha=0.2)
    return _save(fig, path)


def plot_schedule(
    steps: Sequence[int],
    num_frozen: Sequence[int],
    target_layer: Sequence[int],
    path: str | Path,
    total_steps: int | None = None,
    lr: tuple[Sequence[float], Sequence[float]] | None = None,
    sessions: Sequence[Mapping[str, Any]] = (),
) -> Path:
    """The plan over the run: frozen blocks vs step (a step function), each stretch labelled with its
    target (0 = ``pixels``, k = ``layer_k``), and, with ``lr = (steps, values)``, the LR the optimizer
    applied (cosine schedule times the switch warmup) below it.

    Each value holds from its step until the next one (and until ``total_steps`` for the last one
    when given).
    """
    if not len(steps) == len(num_frozen) == len(target_layer):
        raise ValueError(
            f"steps, num_frozen and target_layer must have equal lengths, got "
            f"{len(steps)}, {len(num_frozen)}, {len(target_layer)}"
        )
    fig = _figure(8.0, 5.2 if lr is not None else 3.4)
    ax = fig.add_subplot(2, 1, 1) if lr is not None else fig.add_subplot(1, 1, 1)
    order = np.argsort(np.asarray(steps, dtype=float), kind="stable")
    x = np.asarray(steps, dtype=float)[order]
    nf = np.asarray(num_frozen, dtype=float)[order]
    tl = np.asarray(target_layer, dtype=float)[order]
    end = float(total_steps) if total_steps is not None else (float(x[-1]) if x.size else 1.0)
    if x.size:
        ax.step(np.append(x, max(end, x[-1])), np.append(nf, nf[-1]), where="post", color="C0", linewidth=1.8)
        # one label per stretch of constant (frozen, target)
        change = np.flatnonzero(np.r_[True, (np.diff(nf) != 0) | (np.diff(tl) != 0)])
        bounds = np.append(x[change], end)
        for j, i in enumerate(change):
            mid = (bounds[j] + bounds[j + 1]) / 2
            ax.annotate(f"target {_layer_name(int(tl[i]))}", xy=(mid, nf[i]), xytext=(0, 4), textcoords="offset points",
                        ha="center", va="bottom", fontsize=8, color="C1")
        top = int(max(nf.max(), 1))
        ax.set_ylim(-0.3, top + 0.8)
        ax.set_yticks(np.unique(np.linspace(0, top, min(top, 8) + 1).round().astype(int)))
    else:
        _no_data(ax, "no schedule points")
    ax.set_ylabel("frozen blocks")
    ax.set_title("LayerLock schedule: frozen blocks and the target", fontsize=10)
    ax.grid(True, alpha=0.2)
    ax.set_xlim(min(0.0, float(x[0]) if x.size else 0.0), end)
    mark_sessions(ax, sessions)
    if lr is not None:
        ax_lr = fig.add_subplot(2, 1, 2, sharex=ax)
        lx, ly = np.asarray(lr[0], dtype=float), np.asarray(lr[1], dtype=float)
        if lx.size:
            ax_lr.plot(lx, ly, color="C2", linewidth=1.4)
        else:
            _no_data(ax_lr, "no LR logged")
        ax_lr.set_ylabel("LR applied")
        ax_lr.set_title("learning rate: warmup + cosine, times the switch warmup after each target switch",
                        fontsize=9)
        ax_lr.grid(True, alpha=0.2)
        mark_sessions(ax_lr, sessions)
        ax_lr.set_xlabel("step")
    else:
        ax.set_xlabel("step")
    return _save(fig, path)


def plot_collapse_stats(
    rows: Sequence[Mapping[str, Any]],
    path: str | Path,
    events: Sequence[Mapping[str, Any]] = (),
    guard: GuardConfig | None = None,
    total_steps: int | None = None,
) -> Path:
    """One panel per collapse statistic present in ``rows`` (see :data:`COLLAPSE_KEYS`) vs step, each with
    what it means, the guard's threshold (``guard``) and the freeze / switch ``events``. The guard
    measures latent targets only, so the statistics start at the first switch; the x-axis still spans
    the run (``total_steps``) and says so. Keys absent from every row are skipped; with none present the
    figure says so."""
    present = [(k, *_series(rows, k)) for k in COLLAPSE_KEYS]
    present = [p for p in present if p[1].size]
    fig = _figure(8.0, 2.5 * max(1, len(present)) + 0.8)
    if not present:
        _no_data(fig.add_subplot(1, 1, 1), "no collapse statistics logged (the guard measures latent targets only)")
        return _save(fig, path)
    first = min(float(p[1][0]) for p in present)
    switches = [float(e["step"]) for e in events if _number(e.get("step")) is not None and not e.get("resumed")]
    first = min([first, *switches])  # the first switch, where the latent targets begin
    end = float(total_steps) if total_steps is not None else max(float(p[1][-1]) for p in present)
    for i, (key, steps, vals) in enumerate(present):
        ax = fig.add_subplot(len(present), 1, i + 1)
        ax.plot(steps, vals, linewidth=1.4, marker="." if steps.size < 50 else None)
        if guard is not None and key in GUARD_THRESHOLDS:
            threshold = getattr(guard, GUARD_THRESHOLDS[key])
            ax.axhline(threshold, color="C3", linestyle="--", linewidth=1.0,
                       label=f"guard trips below {threshold:g} ({guard.patience} checks in a row)")
            ax.legend(loc="center right", fontsize=7)
        if np.all(vals > 0) and vals.max() / vals.min() > 100:  # e.g. a feature std collapsing
            ax.set_yscale("log")
        if first > 0:
            ax.axvspan(0, first, color="0.93")
            if i == 0:
                ax.text(first / 2, 0.5, "pixel target:\nnothing to measure", transform=ax.get_xaxis_transform(),
                        ha="center", va="center", fontsize=8, color="gray")
        mark_events(ax, events, labels=i == 0)
        ax.set_xlim(0, end)
        ax.set_ylabel(key.split("/", 1)[-1])
        ax.set_title(COLLAPSE_MEANING[key], fontsize=8, loc="left", pad=24 if i == 0 and switches else 4)
        ax.grid(True, alpha=0.2)
        if i == len(present) - 1:
            ax.set_xlabel("step")
    every = f"every {guard.every} steps" if guard is not None else "at the guard's checks"
    fig.suptitle(f"collapse-guard statistics of the latent targets (measured {every}, logged per row)", fontsize=10)
    return _save(fig, path)


#: Metric keys the adaptive schedule logs (``LayerLock.metrics()``), and the Observation field of each.
ADAPTIVE_KEYS = {
    "layerlock/adaptive/watched_block": "first_block",
    "layerlock/adaptive/update": "update",
    "layerlock/adaptive/update_smoothed": "update_smoothed",
    "layerlock/adaptive/update_peak": "update_peak",
    "layerlock/adaptive/norm": "norm",
    "layerlock/adaptive/norm_change": "norm_change",
}


def _observations(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, float]]:
    """Rows in the Observation form (``step``, ``first_block``, ``norm`` ...), from either observation
    dicts (``AdaptiveSchedule.history``) or metrics rows (``layerlock/adaptive/*`` keys); duplicates
    of one observation logged on several steps are kept once per (block, value) change."""
    out: list[dict[str, float]] = []
    for r in rows:
        if "first_block" in r:
            obs = {k: _number(r.get(k)) for k in ("step", "first_block", *ADAPTIVE_KEYS.values())}
        else:
            obs = {"step": _number(r.get("step"))}
            obs.update({field: _number(r.get(key)) for key, field in ADAPTIVE_KEYS.items()})
        if obs["step"] is None or obs.get("first_block") is None:
            continue
        if out and all(out[-1].get(k) == obs.get(k) for k in ADAPTIVE_KEYS.values()):
            continue  # the same observation logged again
        out.append(obs)
    out.sort(key=lambda o: o["step"])
    return out


def _depth_steps(events: Sequence[Sequence[int]], total_steps: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Step-function points (x, frozen blocks) of ``[(step, num_frozen), ...]``."""
    x, y = [0.0], [0.0]
    for step, depth in events:
        x.append(float(step))
        y.append(float(depth))
    end = float(total_steps) if total_steps is not None else (x[-1] * 1.05 + 1)
    if end > x[-1]:
        x.append(end)
        y.append(y[-1])
    return np.asarray(x), np.asarray(y)


def plot_adaptive_signals(
    rows: Sequence[Mapping[str, Any]],
    events: Sequence[Any],
    path: str | Path,
    explicit_events: Sequence[Sequence[int]] | None = None,
    total_steps: int | None = None,
    title: str | None = None,
) -> Path:
    """The adaptive schedule's per-block signals with its decided freeze events.

    Panels: the smoothed relative update ``|dtheta| / |theta|`` per step of each watched block (log y),
    the block's parameter norm, and the frozen-block count of the decided events next to an explicit
    schedule (``explicit_events``: ``[(step, num_frozen), ...]``, e.g. ``FreezeSchedule(...).events()``).

    ``rows``: metrics rows with ``layerlock/adaptive/*`` keys (the reference trainer's metrics.jsonl)
    or observation dicts (``[o.as_dict() for o in schedule.history]``). ``events``: ``(step, num_frozen)``
    pairs or dicts with ``step`` and ``num_frozen`` (events.jsonl rows; ``resumed`` rows are skipped).
    """
    decided: list[tuple[int, int]] = []
    for e in events:
        if isinstance(e, Mapping):
            if e.get("resumed"):
                continue
            step, depth = _number(e.get("step")), _number(e.get("num_frozen"))
        else:
            step, depth = _number(e[0]), _number(e[1])
        if step is not None and depth is not None:
            decided.append((int(step), int(depth)))
    obs = _observations(rows)
    fig = _figure(8.0, 7.5)
    ax_up, ax_norm, ax_depth = (fig.add_subplot(3, 1, i) for i in (1, 2, 3))
    ax_norm.sharex(ax_up)
    ax_depth.sharex(ax_up)
    blocks = sorted({int(o["first_block"]) for o in obs})
    for i, block in enumerate(blocks):
        color = f"C{i % 10}"
        mine = [o for o in obs if int(o["first_block"]) == block]
        pts = [(o["step"], o["update_smoothed"]) for o in mine if o.get("update_smoothed") is not None and o["update_smoothed"] > 0]
        if pts:
            arr = np.asarray(pts)
            ax_up.plot(arr[:, 0], arr[:, 1], color=color, linewidth=1.5, label=f"block {block}")
        raw = [(o["step"], o["update"]) for o in mine if o.get("update") is not None and o["update"] > 0]
        if raw:
            arr = np.asarray(raw)
            ax_up.plot(arr[:, 0], arr[:, 1], color=color, linewidth=0.8, alpha=0.3)
        norms = [(o["step"], o["norm"]) for o in mine if o.get("norm") is not None]
        if norms:
            arr = np.asarray(norms)
            ax_norm.plot(arr[:, 0], arr[:, 1], color=color, linewidth=1.5, label=f"block {block}")
    if blocks:
        if ax_up.get_legend_handles_labels()[0]:
            ax_up.set_yscale("log")
            ax_up.legend(loc="upper right", fontsize=7, ncol=min(4, len(blocks)))
    else:
        _no_data(ax_up, "no adaptive signals logged")
        _no_data(ax_norm, "no adaptive signals logged")
    x, y = _depth_steps(decided, total_steps)
    ax_depth.step(x, y, where="post", color="C3", linewidth=1.8, label="adaptive (decided)")
    if explicit_events is not None:
        if total_steps is not None:  # the run's span: explicit events after its end never happen
            explicit_events = [(st, d) for st, d in explicit_events if st < total_steps]
        ex, ey = _depth_steps(explicit_events, total_steps)
        ax_depth.step(ex, ey, where="post", color="gray", linestyle="--", linewidth=1.4, label="explicit")
    ax_depth.legend(loc="lower right", fontsize=8)
    if not decided:
        span = f" in {total_steps} steps" if total_steps is not None else ""
        ax_depth.text(0.5, 0.5, f"no freeze event decided{span}", transform=ax_depth.transAxes, ha="center",
                      va="center", fontsize=9, color="C3")
    if total_steps is not None:
        ax_depth.set_xlim(0, total_steps)
    for ax in (ax_up, ax_norm, ax_depth):
        for step, _ in decided:
            ax.axvline(step, color="C3", linestyle=":", linewidth=0.9, alpha=0.8)
        ax.grid(True, alpha=0.2)
    ax_up.set_ylabel("|dθ|/|θ| per step")
    ax_norm.set_ylabel("|θ| of block")
    ax_depth.set_ylabel("frozen blocks")
    ax_depth.set_xlabel("step")
    ax_up.set_title(title or "adaptive schedule: signals of the watched block and decided events")
    return _save(fig, path)


def write_run_plots(folder: Path, rows: Sequence[Mapping[str, Any]], events: Sequence[Mapping[str, Any]],
                    config: RunConfig, layerlock: LayerLock, sessions: Sequence[Mapping[str, Any]] = ()) -> None:
    """A finished run's figures in ``folder``: ``loss.png`` (from the metrics ``rows``, the freeze
    ``events`` and the run's ``sessions``), ``schedule.png`` (the plan of every step of ``train.steps`` and
    the logged LR), ``collapse.png`` and, for an adaptive schedule, ``adaptive_signals.png``."""
    plot_loss(rows, events, folder / "loss.png", title=f"{config.method}: training loss", sessions=sessions)
    steps = list(range(config.train.steps))
    plans = [layerlock.plan_at(s) for s in steps]
    plot_schedule(steps, [p.num_frozen for p in plans],
                  [0 if layerlock.heads(p) == ["pixels"] else p.target_layer for p in plans],
                  folder / "schedule.png", total_steps=config.train.steps, lr=_series(rows, "lr"), sessions=sessions)
    plot_collapse_stats(rows, folder / "collapse.png", events=events, guard=config.guard,
                        total_steps=config.train.steps)
    if config.schedule.kind == "adaptive":
        from ..schedule import FreezeSchedule

        # the decided events next to what the explicit schedule with the same fields would have done
        explicit = FreezeSchedule(config.schedule, layerlock.schedule.num_layers).events()
        plot_adaptive_signals(rows, events, folder / "adaptive_signals.png", explicit_events=explicit,
                              total_steps=config.train.steps)
