"""The run plots are written as real PNG files, with or without events / optional keys."""

from __future__ import annotations

import math

import matplotlib
import numpy as np
import pytest

from layerlock_plugin.reference.plots import plot_collapse_stats, plot_loss, plot_schedule, running_mean

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path) -> None:
    assert path.is_file()
    data = path.read_bytes()
    assert len(data) > 1000
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 100 and height > 100


def loss_rows(n: int = 300):
    rng = np.random.default_rng(0)
    rows = []
    for s in range(n):
        base = 2.0 * math.exp(-s / 80) + 0.1
        row = {"step": s, "loss": base * (1 + 0.3 * rng.standard_normal() ** 2)}
        if s < 100:
            row["loss_pixels"] = row["loss"]
        else:
            row["loss_latent"] = row["loss"] * 0.5
        rows.append(row)
    return rows


EVENTS = [
    {"step": 100, "num_frozen": 1, "target_layer": 1},
    {"step": 200, "num_frozen": 2, "target_layer": 2},
]


def test_plot_loss_with_events(tmp_path):
    out = plot_loss(loss_rows(), EVENTS, tmp_path / "nested" / "dir" / "loss.png", title="tiny run")
    assert out == tmp_path / "nested" / "dir" / "loss.png"
    assert_png(out)


def test_plot_loss_without_events_and_edge_rows(tmp_path):
    assert_png(plot_loss(loss_rows(10), [], tmp_path / "a.png"))
    # rows without a loss (e.g. eval rows), a NaN, a string path, zero loss (falls back to linear y)
    rows = [{"step": 0, "loss": 1.0}, {"step": 1}, {"step": 2, "loss": float("nan")}, {"step": 3, "loss": 0.0}]
    assert_png(plot_loss(rows, [], str(tmp_path / "b.png")))
    assert_png(plot_loss([], [], tmp_path / "c.png"))


def test_plot_schedule(tmp_path):
    steps = [0, 100, 200, 300]
    out = plot_schedule(steps, [0, 1, 2, 3], [0, 1, 2, 3], tmp_path / "s" / "schedule.png", total_steps=500)
    assert_png(out)
    assert_png(plot_schedule([], [], [], tmp_path / "empty.png"))
    assert_png(plot_schedule([0], [0], [0], tmp_path / "one.png", total_steps=10))
    with pytest.raises(ValueError, match="equal lengths"):
        plot_schedule([0, 1], [0], [0, 1], tmp_path / "bad.png")


def test_plot_collapse_stats(tmp_path):
    rows = [
        {"step": s, "layerlock/feature_std": 1.0 / (1 + s), "layerlock/effective_rank": 30 - s / 10}
        for s in range(0, 200, 10)
    ]
    rows.append({"step": 200, "loss": 1.0})  # a row without any stat
    assert_png(plot_collapse_stats(rows, tmp_path / "c" / "collapse.png"))
    only_rel = [{"step": s, "layerlock/relative_loss": 0.5} for s in range(5)]
    assert_png(plot_collapse_stats(only_rel, tmp_path / "rel.png"))
    assert_png(plot_collapse_stats([{"step": 0, "loss": 1.0}], tmp_path / "none.png"))


def _drawn(monkeypatch, draw) -> list:
    """The figures ``draw()`` makes, instead of their PNG files: their axes' texts and lines."""
    from layerlock_plugin.reference import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    draw()
    return figures


def _texts(fig) -> str:
    return " | ".join([t.get_text() for ax in fig.axes for t in [*ax.texts, ax.title, ax._left_title]]
                      + [t.get_text() for t in fig.texts] + [h.get_label() for ax in fig.axes for h in ax.lines])


def test_loss_plot_marks_switches_above_the_curves_resumes_and_says_what_smoothing_and_scales_are(monkeypatch):
    rows = [{"step": s, "loss": 1.0 / s, **({"loss/pixels": 1.0 / s} if s <= 100 else {"loss/layer_1": 1.0 / s})}
            for s in range(1, 300)]
    sessions = [{"step": 0, "kind": "start", "train_steps": 300}, {"step": 150, "kind": "resume", "train_steps": 300},
                {"step": 250, "kind": "extend", "train_steps": 400}]
    fig, = _drawn(monkeypatch, lambda: plot_loss(rows, EVENTS[:1], "x.png", sessions=sessions))
    text = _texts(fig)
    assert "1 frozen\n-> layer_1" in text and "h_1" not in text
    assert "resumed" in text and "extended to 400" in text
    assert "running mean of 5 log rows (5 steps)" in text and "a jump at a switch is a new target" in text
    ax = fig.axes[0]
    label = next(t for t in ax.texts if t.get_text().startswith("1 frozen"))
    assert label.xy[1] == 1.0 and label.get_va() == "bottom"  # above the axes (axes fraction 1), not under a curve
    # one target at a time: the total is that target's curve, drawn once
    assert sorted(h.get_label() for h in ax.lines if not h.get_label().startswith("_")) == ["loss/layer_1", "loss/pixels"]


def test_schedule_plot_has_one_plan_panel_named_like_the_logs_and_the_lr(monkeypatch):
    steps = list(range(0, 500))
    frozen = [0 if s < 200 else 1 if s < 300 else 2 for s in steps]
    lr = ([10, 20, 30], [1e-3, 2e-3, 1e-3])
    fig, = _drawn(monkeypatch, lambda: plot_schedule(steps, frozen, frozen, "s.png", total_steps=500, lr=lr))
    text = _texts(fig)
    assert "target pixels" in text and "target layer_2" in text and "h_" not in text
    assert len(fig.axes) == 2 and fig.axes[1].get_ylabel() == "LR applied"


def test_collapse_plot_has_a_title_thresholds_events_and_says_why_it_starts_late(monkeypatch):
    from layerlock_plugin.collapse import GuardConfig

    rows = [{"step": s, "layerlock/feature_std": 0.8, "layerlock/effective_rank": 0.3, "layerlock/relative_loss": 0.6}
            for s in range(110, 300, 10)]
    fig, = _drawn(monkeypatch, lambda: plot_collapse_stats(rows, "c.png", events=EVENTS, guard=GuardConfig(),
                                                           total_steps=300))
    text = _texts(fig)
    assert "collapse-guard statistics" in text and "nothing to measure" in text
    assert "guard trips below 0.05" in text and "guard trips below 0.02" in text
    assert "1 = no better than predicting the mean" in text and "1 isotropic" in text
    assert fig.axes[0].get_xlim() == (0.0, 300.0)


def test_plots_leave_pyplot_alone(tmp_path):
    backend = matplotlib.get_backend()
    plot_loss(loss_rows(30), EVENTS, tmp_path / "x.png")
    assert matplotlib.get_backend() == backend
    import matplotlib.pyplot as plt

    assert plt.get_fignums() == []


def test_running_mean():
    y = np.array([1.0, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(running_mean(y, 2), [1.0, 1.5, 2.5, 3.5])
    np.testing.assert_allclose(running_mean(y, 1), y)
