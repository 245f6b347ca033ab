"""The collapse control. On raw [0, 1] clips, predicting the model's own layer-k output without freezing
collapses and the guard sees it; LayerLock in the packaged setting (standardised clips) on the same budget
never trips the guard and its targets keep their spread.

Why two settings: on standardised clips latent-naive keeps its spread (feature std ~0.5 after 1500 steps,
benchmarks/RESULTS.md), so it is no control there; on raw clips LayerLock's targets from blocks frozen after
50 pixel steps are themselves nearly constant (feature std ~0.03) and the guard rightly flags them.
"""

import json
import logging

import pytest

from layerlock_plugin.reference.config import load_config
from layerlock_plugin.reference.train import Trainer

# latent-naive's targets fall below the guard's threshold by step ~110 on raw clips (the guard trips at ~110,
# measured with torch 2.14 on CPU): 200 steps leave room and cross three freeze events (50, 100, 150)
STEPS = 200
BUDGET = [
    f"train.steps={STEPS}", "train.batch_size=16", "data.num_videos=256", "schedule.pixel_steps=50",
    "schedule.interval=50", "guard.every=5", "guard.policy=warn", "train.progress=false", "probe.enabled=false",
    "train.ckpt_every=1000", "train.log_every=5",
]


def _run(tmp_path, method, *sets):
    cfg = load_config(None, [f"out_dir={tmp_path / method}", f"method={method}", *BUDGET, *sets])
    trainer = Trainer(cfg, echo=lambda s: None)
    trainer.fit()
    rows = [json.loads(x) for x in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
    return trainer, rows


@pytest.mark.slow
def test_the_guard_sees_latent_naive_collapse_on_raw_clips(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="layerlock")
    naive, naive_rows = _run(tmp_path, "latent-naive", "data.standardize=false")
    trips = [r["step"] for r in naive_rows if r["layerlock/guard_trips"] > 0]
    assert trips and trips[0] <= STEPS, "the guard must see latent-naive collapse within the budget"
    assert any("collapse guard tripped" in m for m in caplog.messages)
    assert min(r["layerlock/feature_std"] for r in naive_rows if "layerlock/feature_std" in r) < 0.05


@pytest.mark.slow
def test_layerlock_in_the_packaged_setting_never_trips_the_guard(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="layerlock")
    layerlock, ll_rows = _run(tmp_path, "layerlock")
    assert layerlock.layerlock.guard.trips == 0 and not any("collapse" in m for m in caplog.messages)
    stds = [r["layerlock/feature_std"] for r in ll_rows if "layerlock/feature_std" in r]
    assert stds and min(stds) > 0.2, f"LayerLock targets kept their spread (min feature_std {min(stds):.3f})"
