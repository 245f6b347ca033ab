"""The collapse control: predicting the model's own layer-k output without freezing collapses on the
embedded data and the guard sees it; LayerLock on the same budget never trips the guard."""

import json
import logging

import pytest

from layerlock_plugin.reference.config import load_config
from layerlock_plugin.reference.trainer import Trainer

BUDGET = [
    "train.steps=300", "train.batch_size=16", "data.num_videos=256", "schedule.pixel_steps=50",
    "schedule.interval=50", "guard.every=5", "guard.policy=warn", "train.progress=false", "probe.enabled=false",
    "train.ckpt_every=1000", "train.log_every=5",
]


def _run(tmp_path, method):
    cfg = load_config(None, [f"out_dir={tmp_path / method}", f"method={method}", *BUDGET])
    trainer = Trainer(cfg, echo=lambda s: None)
    trainer.fit()
    rows = [json.loads(x) for x in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
    return trainer, rows


@pytest.mark.slow
def test_latent_naive_collapses_and_layerlock_does_not(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="layerlock")
    naive, naive_rows = _run(tmp_path, "latent-naive")
    trips = [r["step"] for r in naive_rows if r["layerlock/guard_trips"] > 0]
    assert trips and trips[0] <= 300, "the guard must see latent-naive collapse within the budget"
    assert any("collapse guard tripped" in m for m in caplog.messages)
    assert min(r["layerlock/feature_std"] for r in naive_rows if "layerlock/feature_std" in r) < 0.05

    caplog.clear()
    layerlock, ll_rows = _run(tmp_path, "layerlock")
    assert layerlock.layerlock.guard.trips == 0 and not any("collapse" in m for m in caplog.messages)
    stds = [r["layerlock/feature_std"] for r in ll_rows if "layerlock/feature_std" in r]
    assert stds and min(stds) > 0.2, f"LayerLock targets kept their spread (min feature_std {min(stds):.3f})"
