"""PNG plots of a LayerLock run: loss with freeze events, the freezing schedule, collapse statistics,
and the adaptive schedule's per-block signals with its decided events next to an explicit schedule
(:func:`write_run_plots` draws every figure of a finished run).

Figures are drawn with matplotlib's Agg canvas directly (``matplotlib.figure.Figure`` +
``FigureCanvasAgg``): nothing needs a display, pyplot's global state and the user's backend are
left alone, and no figure stays registered after a call returns. Every function creates the
parent directory of ``path`` and returns ``path`` as a :class:`pathlib.Path`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from ..controller import LayerLock
    from .config import RunConfig

__all__ = ["plot_loss", "plot_schedule", "plot_collapse_stats", "plot_adaptive_signals", "running_mean",
           "write_run_plots", "COLLAPSE_KEYS", "ADAPTIVE_KEYS"]

COLLAPSE_KEYS = ("layerlock/feature_std", "layerlock/effective_rank", "layerlock/relative_loss")


def _figure(width: float = 8.0, height: float = 4.5) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    fig.clear()
    return path


def _number(x: Any) -> float | None:
    if isinstance(x, bool) or x is None:
        return None
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the rows that have a finite ``key`` and ``step``, sorted by step."""
    pts = []
    for r in rows:
        s, y = _number(r.get("step")), _number(r.get(key))
        if s is not None and y is not None:
            pts.append((s, y))
    pts.sort(key=lambda p: p[0])
    if not pts:
        return np.zeros(0), np.zeros(0)
    arr = np.asarray(pts, dtype=float)
    return arr[:, 0], arr[:, 1]


def running_mean(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing running mean (shorter windows at the start), same length as ``y``."""
    y = np.asarray(y, dtype=float)
    if window <= 1 or y.size == 0:
        return y.copy()
    c = np.cumsum(np.insert(y, 0, 0.0))
    idx = np.arange(1, y.size + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def _smoothing_window(n: int) -> int:
    return max(1, n // 50) if n > 20 else 1


def _layer_name(layer: Any) -> str:
    return "pixels" if layer == 0 else f"h_{layer}"


def _no_data(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")


def plot_loss(
    rows: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]],
    path: str | Path,
    title: str | None = None,
) -> Path:
    """Training loss vs step (log y), with a vertical line per freeze / target-switch event.

    ``rows``: dicts with ``step`` and ``loss``; any other key starting with ``loss`` (e.g.
    ``loss_pixels``, ``loss_latent``) is drawn as an extra curve. Long or noisy curves are smoothed
    by a running mean, the raw values stay visible faintly. ``events``: dicts with ``step``,
    ``num_frozen`` and ``target_layer``; each is annotated ``freeze k / target h_k``.
    """
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    keys = ["loss"] + sorted({k for r in rows for k in r if k != "loss" and str(k).startswith("loss")})
    colors = ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C8", "C9"]
    all_positive, drawn = True, False
    for i, key in enumerate(keys):
        steps, vals = _series(rows, key)
        if steps.size == 0:
            continue
        drawn = True
        all_positive &= bool(np.all(vals > 0))
        color = colors[i % len(colors)]
        window = _smoothing_window(steps.size)
        if window > 1:
            ax.plot(steps, vals, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(steps, running_mean(vals, window), color=color, linewidth=1.6, label=f"{key} (mean of {window})")
        else:
            ax.plot(steps, vals, color=color, linewidth=1.6, marker="." if steps.size < 50 else None, label=key)
    if drawn and all_positive:
        ax.set_yscale("log")
    if not drawn:
        _no_data(ax, "no loss values")
    for ev in events:
        s = _number(ev.get("step"))
        if s is None:
            continue
        ax.axvline(s, color="gray", linestyle="--", linewidth=0.8, alpha=0.8)
        label = f"freeze {ev.get('num_frozen', '?')} / target {_layer_name(ev.get('target_layer', '?'))}"
        ax.annotate(
            label,
            xy=(s, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(2, -4),
            textcoords="offset points",
            rotation=90,
            va="top",
            ha="left",
            fontsize=7,
            color="dimgray",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if title:
        ax.set_title(title)
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
) -> Path:
    """Step plot of the number of frozen blocks and the target layer (0 = pixels) vs step.

    Each value holds from its step until the next one (and until ``total_steps`` for the last one
    when given).
    """
    if not len(steps) == len(num_frozen) == len(target_layer):
        raise ValueError(
            f"steps, num_frozen and target_layer must have equal lengths, got "
            f"{len(steps)}, {len(num_frozen)}, {len(target_layer)}"
        )
    fig = _figure(8.0, 4.5)
    ax_frozen = fig.add_subplot(2, 1, 1)
    ax_target = fig.add_subplot(2, 1, 2, sharex=ax_frozen)
    order = np.argsort(np.asarray(steps, dtype=float), kind="stable")
    x = np.asarray(steps, dtype=float)[order]
    nf = np.asarray(num_frozen, dtype=float)[order]
    tl = np.asarray(target_layer, dtype=float)[order]
    if total_steps is not None and x.size and total_steps > x[-1]:
        x, nf, tl = np.append(x, total_steps), np.append(nf, nf[-1]), np.append(tl, tl[-1])
    panels = ((ax_frozen, nf, "frozen blocks", "C0"), (ax_target, tl, "target layer", "C1"))
    for ax, y, label, color in panels:
        if x.size:
            ax.step(x, y, where="post", color=color, linewidth=1.8)
            top = int(max(y.max(), 1))
            ax.set_ylim(-0.3, top + 0.5)
            ticks = np.unique(np.linspace(0, top, min(top, 8) + 1).round().astype(int))
            ax.set_yticks(ticks)
            if ax is ax_target:
                ax.set_yticklabels(["pixels" if t == 0 else f"h_{t}" for t in ticks])
        else:
            _no_data(ax, "no schedule points")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.2)
    if total_steps is not None:
        ax_frozen.set_xlim(left=min(0.0, float(x[0]) if x.size else 0.0), right=float(total_steps))
    ax_target.set_xlabel("step")
    ax_frozen.set_title("LayerLock schedule")
    return _save(fig, path)


def plot_collapse_stats(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """One subplot per collapse statistic present in ``rows`` (see :data:`COLLAPSE_KEYS`) vs step.

    Keys absent from every row are skipped; with none present the figure says so.
    """
    present = [(k, *_series(rows, k)) for k in COLLAPSE_KEYS]
    present = [p for p in present if p[1].size]
    fig = _figure(8.0, 2.6 * max(1, len(present)))
    if not present:
        _no_data(fig.add_subplot(1, 1, 1), "no collapse statistics logged")
        return _save(fig, path)
    for i, (key, steps, vals) in enumerate(present):
        ax = fig.add_subplot(len(present), 1, i + 1)
        ax.plot(steps, vals, linewidth=1.4, marker="." if steps.size < 50 else None)
        if np.all(vals > 0) and vals.max() / vals.min() > 100:  # e.g. a feature std collapsing
            ax.set_yscale("log")
        ax.set_ylabel(key.split("/", 1)[-1])
        ax.grid(True, alpha=0.2)
        if i == len(present) - 1:
            ax.set_xlabel("step")
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
                    config: RunConfig, layerlock: LayerLock) -> None:
    """A finished run's figures in ``folder``: ``loss.png`` (from the metrics ``rows`` and freeze
    ``events``), ``schedule.png`` (the plan of every step of ``train.steps``), ``collapse.png`` and, for an
    adaptive schedule, ``adaptive_signals.png``."""
    plot_loss(rows, events, folder / "loss.png", title=f"{config.method}: training loss")
    steps = list(range(config.train.steps))
    plans = [layerlock.plan_at(s) for s in steps]
    plot_schedule(steps, [p.num_frozen for p in plans],
                  [0 if layerlock.heads(p) == ["pixels"] else p.target_layer for p in plans],
                  folder / "schedule.png", total_steps=config.train.steps)
    plot_collapse_stats(rows, folder / "collapse.png")
    if config.schedule.kind == "adaptive":
        from ..schedule import FreezeSchedule

        # the decided events next to what the explicit schedule with the same fields would have done
        explicit = FreezeSchedule(config.schedule, layerlock.schedule.num_layers).events()
        plot_adaptive_signals(rows, events, folder / "adaptive_signals.png", explicit_events=explicit,
                              total_steps=config.train.steps)
