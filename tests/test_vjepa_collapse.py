"""Collapse control on the official V-JEPA modules and the embedded moving-digits data: predicting the
student's own layer-3 output without an EMA teacher and without freezing collapses (the guard trips),
LayerLock-V-JEPA (EMA teacher, progressive freezing up to block 3) on the same budget does not."""

from __future__ import annotations

import copy
import importlib.util
import logging
from pathlib import Path

import pytest
import torch

from layerlock_plugin.adapters.vjepa import LayerLockAdapter, require_vjepa
from layerlock_plugin.collapse import GuardConfig
from layerlock_plugin.controller import LayerLockConfig
from layerlock_plugin.reference.data import DigitsVideoConfig, DigitsVideoDataset
from layerlock_plugin.schedule import ScheduleConfig
from layerlock_plugin.warmup import WarmupConfig

require_vjepa()
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "vjepa" / "train_layerlock_vjepa.py"
_spec = importlib.util.spec_from_file_location("vjepa_example_collapse", EXAMPLE)
ex = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ex)

STEPS, BATCH, LR, LAYER = 60, 8, 3e-3, 3
GUARD = GuardConfig(every=5, policy="warn")


def _train(method: str) -> tuple[LayerLockAdapter, list[float]]:
    """``method``: "naive" (own layer-3 target, no teacher, no freezing) or "layerlock"; returns the adapter
    and the target feature_std measured every GUARD.every steps."""
    torch.manual_seed(0)
    encoder, predictor = ex.init_video_model()
    optimizer = torch.optim.AdamW(list(encoder.parameters()) + list(predictor.parameters()), lr=LR, weight_decay=0.04)
    if method == "naive":
        adapter = LayerLockAdapter(encoder, None, predictor, optimizer, LayerLockConfig(freeze=False, guard=GUARD),
                                   fixed_target_layer=LAYER)
    else:
        teacher = copy.deepcopy(encoder)
        config = LayerLockConfig(schedule=ScheduleConfig(pixel_steps=STEPS // 4, interval=STEPS // 4, max_frozen=LAYER),
                                 warmup=WarmupConfig(steps=5), guard=GUARD)
        adapter = LayerLockAdapter(encoder, teacher, predictor, optimizer, config)
    data = DigitsVideoDataset(DigitsVideoConfig(num_videos=256, num_frames=ex.FRAMES, size=ex.CROP), "train", cache=True)
    collator = ex.make_mask_collator()
    stds = []
    for step in range(STEPS):
        index = torch.randint(len(data), (BATCH,), generator=torch.Generator().manual_seed(step))
        torch.manual_seed(step)
        (clips,), masks_enc, masks_pred = collator([(data[int(i)]["video"],) for i in index])
        adapter.begin_step(step)
        h = adapter.targets(clips, masks_pred)
        z = predictor(encoder(clips, masks_enc), h, masks_enc, masks_pred)
        loss = sum((zi - hi).abs().mean() for zi, hi in zip(z, h)) / len(z)
        loss.backward()
        decision = adapter.end_step(loss, h)
        if not decision.skip:
            optimizer.step()
        optimizer.zero_grad()
        if method != "naive":
            adapter.update_teacher(0.998)  # V-JEPA's starting momentum
        if decision.stats:
            stds.append(decision.stats["feature_std"])
    return adapter, stds


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.mark.slow
def test_own_layer_target_collapses_and_layerlock_vjepa_does_not(caplog):
    caplog.set_level(logging.WARNING, logger="layerlock")
    naive, naive_stds = _train("naive")
    assert naive.layerlock.guard.trips > 0, f"own-layer target should collapse (feature_std {naive_stds})"
    assert min(naive_stds) < GUARD.min_feature_std
    assert any("collapse guard tripped" in m for m in caplog.messages)

    caplog.clear()
    layerlock, ll_stds = _train("layerlock")
    assert layerlock.plan.num_frozen == LAYER and layerlock.target_layer() == LAYER  # all switches crossed
    assert layerlock.layerlock.guard.trips == 0 and not any("collapse" in m for m in caplog.messages)
    assert min(ll_stds) > 2 * GUARD.min_feature_std, f"LayerLock targets kept their spread (min {min(ll_stds):.3f})"
