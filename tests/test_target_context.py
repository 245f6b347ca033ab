"""``target.context: sparse``: the latent target pass runs on the queried + visible tokens only."""

import pytest
import torch

from layerlock_plugin.controller import LayerLock, LayerLockConfig
from layerlock_plugin.errors import ConfigError
from layerlock_plugin.masking import random_masking, subsample_indices
from layerlock_plugin.reference.model import ModelConfig, VideoMAE
from layerlock_plugin.schedule import ScheduleConfig
from layerlock_plugin.targets import TargetConfig
from test_trainer import _train, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _model_and_controller(**target):
    torch.manual_seed(0)
    model = VideoMAE(ModelConfig.tiny(), latent_target_layers=range(1, 4))
    cfg = LayerLockConfig(schedule=ScheduleConfig(pixel_steps=0, interval=1, max_frozen=3),
                          target=TargetConfig(**target))
    return model, LayerLock(model, cfg, tubelet=model.cfg.tubelet)


def test_sparse_context_over_every_token_equals_the_full_target():
    """With every token in the context (all masked positions queried), the sparse pass sees what the
    full one sees, in another order: attention with RoPE by position is permutation-equivariant."""
    model, full = _model_and_controller(mode="multi")
    _, sparse = _model_and_controller(mode="multi", context="sparse")
    video = torch.randn(2, 3, 8, 32, 32)
    g = torch.Generator().manual_seed(0)
    visible, masked = random_masking(2, model.num_patches, 0.9, generator=g)
    plan = full.begin_step(3)  # 3 blocks frozen, targets h_1..h_3
    sparse.begin_step(3)
    a = full.targets(video, plan, masked, visible)
    b = sparse.targets(video, plan, masked, visible)
    assert list(a) == list(b) == ["layer_1", "layer_2", "layer_3"]
    for head in a:
        torch.testing.assert_close(b[head], a[head], atol=2e-5, rtol=1e-4)


def test_sparse_context_is_the_prefix_run_on_queries_and_visible_tokens():
    """With a query subset the target is block k's output at the query in the context of the queries
    and the visible tokens only: it differs from the full-context target, and does not depend on tokens
    outside the context."""
    model, sparse = _model_and_controller(context="sparse")
    _, full = _model_and_controller()
    video = torch.randn(2, 3, 8, 32, 32)
    g = torch.Generator().manual_seed(1)
    visible, masked = random_masking(2, model.num_patches, 0.9, generator=g)
    query = subsample_indices(masked, 0.25, generator=g)
    plan = sparse.begin_step(1)  # 2 blocks frozen: target h_2
    full.begin_step(1)
    t = sparse.targets(video, plan, query, visible)["layer_2"]
    assert t.shape == (2, query.shape[1], model.cfg.embed_dim)
    assert not torch.allclose(t, full.targets(video, plan, query, visible)["layer_2"], atol=1e-3)
    # change the pixels of a token outside the context: the sparse target does not move
    context = torch.cat([query, visible], 1)
    outside = next(i for i in range(model.num_patches) if i not in context[0].tolist())
    t_idx, h_idx, w_idx = outside // 16, (outside // 4) % 4, outside % 4
    edited = video.clone()
    edited[0, :, 2 * t_idx:2 * t_idx + 2, 8 * h_idx:8 * h_idx + 8, 8 * w_idx:8 * w_idx + 8] += 5.0
    torch.testing.assert_close(sparse.targets(edited, plan, query, visible)["layer_2"][0], t[0])
    # without visible_idx the context is the queries alone
    alone = sparse.targets(video, plan, query)["layer_2"]
    assert alone.shape == t.shape and not torch.allclose(alone, t, atol=1e-3)


def test_sparse_context_refused_for_an_encoder_without_token_idx(toy_encoder):
    cfg = LayerLockConfig(target=TargetConfig(context="sparse"))
    with pytest.raises(ConfigError, match=r"^target\.context: 'sparse' needs an encoder whose forward_prefix accepts token_idx"):
        LayerLock(toy_encoder, cfg)
    # a pixel-target run never computes latent targets: nothing to refuse
    LayerLock(toy_encoder, LayerLockConfig(target=TargetConfig(kind="pixels", context="sparse")))
    with pytest.raises(ConfigError, match=r"^target\.context: must be one of"):
        TargetConfig(context="subset")


def test_trainer_with_sparse_context_resumes_exactly(tmp_path):
    """The reference trainer with a 25% query subset and the sparse context: finite losses through
    three freeze events and a resume mid-warmup equal to the uninterrupted run."""
    args = ("target.loss_fraction=0.25", "target.context=sparse", "train.log_every=1")
    full = _train(tiny_config(tmp_path / "full", *args))
    _train(tiny_config(tmp_path / "part", *args), stop_after=13)
    resumed = _train(tiny_config(tmp_path / "part", *args), resume=tmp_path / "part")
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert full.layerlock.plan.num_frozen == 3
    assert (tmp_path / "full" / "metrics.jsonl").read_text().count('"loss"') == 24
