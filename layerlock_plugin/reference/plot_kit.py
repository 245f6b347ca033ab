"""Shared pieces of the run plots (:mod:`.plots`): an Agg figure outside pyplot, saving, series from log rows,
smoothing, and the marks every run figure carries (freeze / switch events, resumes and extensions).

Figures are drawn with matplotlib's Agg canvas directly (``matplotlib.figure.Figure`` +
``FigureCanvasAgg``): nothing needs a display, pyplot's global state and the user's backend are
left alone, and no figure stays registered after a call returns.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["running_mean", "mark_events", "mark_sessions", "event_label", "log_spacing"]


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
    """The target's name as every other output writes it (``pixels``, ``layer_k``; ``head_name``)."""
    return "pixels" if layer == 0 else f"layer_{layer}"


def _no_data(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")


def log_spacing(steps: np.ndarray) -> int:
    """Steps between two log rows (the most common gap; 1 when unknown)."""
    gaps = np.diff(np.unique(steps))
    return int(np.bincount(gaps.astype(int)).argmax()) if gaps.size else 1


def event_label(ev: Mapping[str, Any]) -> str:
    """``1 frozen -> layer_1`` for a freeze / target-switch event row."""
    return f"{ev.get('num_frozen', '?')} frozen\n-> {_layer_name(ev.get('target_layer', '?'))}"


def mark_events(ax: Any, events: Sequence[Mapping[str, Any]], labels: bool = True) -> None:
    """A dashed vertical line per freeze / target-switch event; with ``labels``, its label above the axes
    (where no curve runs under it)."""
    for ev in events:
        s = _number(ev.get("step"))
        if s is None or ev.get("resumed"):
            continue
        ax.axvline(s, color="gray", linestyle="--", linewidth=0.8, alpha=0.8)
        if labels:
            ax.annotate(event_label(ev), xy=(s, 1.0), xycoords=("data", "axes fraction"), xytext=(0, 3),
                        textcoords="offset points", ha="center", va="bottom", fontsize=7, color="dimgray")


#: How a run session (``sessions.jsonl``) other than the first is marked: its kind -> label.
SESSION_LABELS = {"resume": "resumed", "extend": "extended to {train_steps}", "fork": "forked here"}


def mark_sessions(ax: Any, sessions: Sequence[Mapping[str, Any]]) -> None:
    """A dotted purple line where the run was resumed, extended or forked (the first session, the start, is
    not marked), labelled inside the axes at the bottom."""
    for row in sessions:
        s, kind = _number(row.get("step")), row.get("kind")
        if s is None or kind not in SESSION_LABELS:
            continue
        ax.axvline(s, color="purple", linestyle=":", linewidth=1.2)
        ax.annotate(SESSION_LABELS[kind].format(**row), xy=(s, 0.0), xycoords=("data", "axes fraction"),
                    xytext=(3, 3), textcoords="offset points", rotation=90, ha="left", va="bottom", fontsize=7,
                    color="purple")
