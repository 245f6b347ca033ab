"""V-JEPA 2 on transformers' modules (``VJEPA2Model``, tiny, CPU): LayerLock through ``LayerLockAdapter`` with an
EMA teacher copy of the encoder, and what transformers' own forward does with a context mask."""

from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

from transformers import VideoMAEConfig, VideoMAEModel, VJEPA2Config, VJEPA2Model  # noqa: E402

from layerlock_plugin.adapters.huggingface import HFVJEPA2Encoder, vjepa2_predict  # noqa: E402
from layerlock_plugin.adapters.vjepa import LayerLockAdapter  # noqa: E402
from layerlock_plugin.controller import LayerLockConfig  # noqa: E402
from layerlock_plugin.errors import ConfigError  # noqa: E402
from layerlock_plugin.schedule import ScheduleConfig  # noqa: E402
from layerlock_plugin.warmup import WarmupConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

N = 2 * 4 * 4  # (4 frames / tubelet 2) x (32 / 8)^2 tokens


def tiny_vjepa2(seed: int = 0) -> VJEPA2Model:
    torch.manual_seed(seed)
    return VJEPA2Model(VJEPA2Config(crop_size=32, frames_per_clip=4, tubelet_size=2, patch_size=8, hidden_size=48,
                                    num_hidden_layers=4, num_attention_heads=2, mlp_ratio=2.0, pred_hidden_size=24,
                                    pred_num_hidden_layers=1, pred_num_attention_heads=2, pred_mlp_ratio=2.0))


def clips(seed: int) -> torch.Tensor:
    return torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def masks(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A context of 12 and a disjoint target of 20 tokens per clip (index tensors ``[B, K]``, sorted)."""
    perm = torch.rand(2, N, generator=torch.Generator().manual_seed(seed)).argsort(dim=1)
    return perm[:, :12].sort(dim=1).values, perm[:, 12:].sort(dim=1).values


def test_truncated_and_context_forwards_match_transformers():
    model = tiny_vjepa2().eval()
    enc = HFVJEPA2Encoder(model)
    x = clips(0)
    with torch.no_grad():
        ref = model(x, skip_predictor=True, output_hidden_states=True)
        outs = enc.forward_prefix(x, [1, 3])
        assert torch.equal(outs[1], ref.hidden_states[1]) and torch.equal(outs[3], ref.hidden_states[3])
        every = torch.arange(N).repeat(2, 1)
        assert torch.equal(enc.forward_context(x, every), ref.last_hidden_state)
        # transformers' forward encodes every token and gathers the context afterwards: the context encodings
        # change when only target tokens change; the student (context tokens only) does not see them
        context = torch.arange(16, 28).repeat(2, 1)  # 12 tokens of the second tubelet slot (frames 2-3)
        target = torch.arange(0, 16).repeat(2, 1)  # the first slot (frames 0-1)
        y = x.clone()
        y[:, :2] += 1.0  # frames 0-1: target tokens only
        hf = lambda v: model(v, context_mask=[context], target_mask=[target]).masked_hidden_state  # noqa: E731
        assert (hf(y) - hf(x)).abs().max() > 1e-3
        assert torch.equal(enc.forward_context(y, context), enc.forward_context(x, context))


def test_layerlock_pretrains_vjepa2_through_the_adapter_across_freeze_events():
    model = tiny_vjepa2()
    teacher = copy.deepcopy(model.encoder).requires_grad_(False)
    student, target = HFVJEPA2Encoder(model.encoder), HFVJEPA2Encoder(teacher)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    config = LayerLockConfig(schedule=ScheduleConfig(pixel_steps=3, interval=3, max_frozen=2), warmup=WarmupConfig(steps=2))
    adapter = LayerLockAdapter(student, target, model.predictor, optimizer, config)
    events, snapshots = [], {}
    adapter.layerlock.on_event(lambda e: (events.append((e.step, e.num_frozen)),
                                          snapshots.setdefault(e.step, copy.deepcopy(model.encoder.state_dict()))))
    teacher_before = copy.deepcopy(teacher.state_dict())
    for step in range(9):
        adapter.begin_step(step)
        x, (context, tmask) = clips(100 + step), masks(step)
        h = adapter.targets(x, [tmask])  # teacher block k, affine-free layer norm, at the target tokens
        with torch.no_grad():
            k = adapter.target_layer()
            ref = torch.nn.functional.layer_norm(target.forward_prefix(x, [k])[k], (48,))
            assert torch.equal(h[0], ref.gather(1, tmask[..., None].expand(-1, -1, 48)))
        z = vjepa2_predict(model.predictor, student(x, context), context, tmask, N)
        loss = (z - h[0]).abs().mean()
        loss.backward()
        if not adapter.end_step(loss, h).skip:
            optimizer.step()
        optimizer.zero_grad()
        adapter.update_teacher(0.99)
        assert torch.isfinite(loss)
    assert events == [(3, 1), (6, 2)] and adapter.target_layer() == 2
    final = model.encoder.state_dict()
    for step, prefixes in {3: ("embeddings.", "layer.0."), 6: ("layer.1.",)}.items():
        keys = [k for k in final if k.startswith(prefixes)]
        assert keys and all(torch.equal(final[k], snapshots[step][k]) for k in keys), step
    for p in adapter.layerlock.freezer.frozen_parameters():
        assert not p.requires_grad and p not in optimizer.state
    assert not torch.equal(final["layer.3.mlp.fc1.weight"], snapshots[3]["layer.3.mlp.fc1.weight"])
    assert not torch.equal(teacher.state_dict()["layer.3.mlp.fc1.weight"], teacher_before["layer.3.mlp.fc1.weight"])


def test_transformers_predictor_takes_one_mask_pair_per_call():
    model = tiny_vjepa2().eval()
    pairs = [masks(0), masks(1)]
    with pytest.raises(RuntimeError, match="Sizes of tensors must match"):
        model(clips(0), context_mask=[pairs[0][0], pairs[1][0][:, :8]], target_mask=[pairs[0][1], pairs[1][1][:, :4]])


def test_other_models_are_refused_naming_the_layout():
    cfg = VideoMAEConfig(image_size=32, patch_size=8, num_frames=4, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=64)
    with pytest.raises(ConfigError, match="VJEPA2Model or its encoder") as info:
        HFVJEPA2Encoder(VideoMAEModel(cfg))
    assert info.value.field == "model"
