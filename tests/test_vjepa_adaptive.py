"""The adaptive freezing schedule (``schedule.kind: adaptive``) reaches the V-JEPA adapter by config alone:
the adapter drives the core controller's ``begin_step``, where the schedule observes the student."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

from conftest import vjepa_step
from layerlock_plugin.adapters.vjepa import LayerLockAdapter, require_vjepa
from layerlock_plugin.controller import LayerLockConfig

require_vjepa()
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "vjepa" / "train_layerlock_vjepa.py"
_spec = importlib.util.spec_from_file_location("vjepa_example_adaptive", EXAMPLE)
ex = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ex)

ADAPTIVE = {"kind": "adaptive", "max_frozen": 2, "adaptive": {
    "observe_every": 2, "window": 2, "min_pixel_steps": 4, "max_pixel_steps": 8, "min_interval": 4, "max_interval": 8}}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _adapter():
    torch.manual_seed(0)
    encoder, predictor = ex.init_video_model()
    optimizer = torch.optim.AdamW(list(encoder.parameters()) + list(predictor.parameters()), lr=1e-3)
    config = LayerLockConfig.from_dict({"schedule": ADAPTIVE})
    return LayerLockAdapter(encoder, copy.deepcopy(encoder), predictor, optimizer, config), encoder, predictor, optimizer


def test_adaptive_schedule_drives_the_vjepa_adapter_and_resumes():
    adapter, encoder, predictor, optimizer = _adapter()
    events = []
    adapter.layerlock.on_event(events.append)
    collator = ex.make_mask_collator()
    for step in range(20):
        adapter.begin_step(step)
        vjepa_step(ex, adapter, encoder, predictor, optimizer, collator, seed=step)  # guard policy warn: always steps
        adapter.update_teacher(0.99)
    assert [e.num_frozen for e in events] == [1, 2] and all(4 <= e.step <= 16 for e in events)
    assert adapter.target_layer() == 2 and not encoder.backbone.blocks[1].attn.qkv.weight.requires_grad
    # resume: the decided events travel in the adapter's state and are replayed in a fresh adapter
    fresh, fresh_encoder, _, _ = _adapter()
    fresh.load_state_dict(adapter.state_dict())
    assert fresh.plan.num_frozen == 2 and fresh.target_layer() == 2
    assert not fresh_encoder.backbone.blocks[1].attn.qkv.weight.requires_grad
    assert [fresh.layerlock.plan_at(e.step).stage for e in events] == [1, 2]
