"""LayerLock's V-JEPA adapter on V-JEPA 2's modules (the registry package cc-vjepa2, imported as ``vjepa2``):
a ViT with 3D RoPE inside attention, the RoPE predictor, the multi-sequence wrappers and mask collator;
tiny, CPU. The 2-process DDP run is in tests/test_vjepa_ddp.py."""

from __future__ import annotations

import copy
import importlib.util
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import perturbed_copy, stop_and_resume
import torch.nn.functional as F
from torch import nn

from layerlock_plugin.adapters.vjepa import LayerLockAdapter, NamedEMA, VJEPA2Encoder, as_layered, require_vjepa2

require_vjepa2()  # fails loudly (naming the extra) rather than skipping
from vjepa2.masks.utils import apply_masks  # noqa: E402
from vjepa2.models.vision_transformer import VisionTransformer  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "vjepa" / "train_layerlock_vjepa2.py"
_spec = importlib.util.spec_from_file_location("vjepa2_example", EXAMPLE)
ex = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ex)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def tiny(seed: int = 0):
    """(encoder, predictor, teacher) in V-JEPA 2's wrappers; the teacher is a perturbed copy."""
    torch.manual_seed(seed)
    encoder, predictor = ex.init_video_model()
    return encoder, predictor, perturbed_copy(encoder)


def batch(seed: int = 0, b: int = 4):
    torch.manual_seed(seed)
    return ex.collate(ex.make_mask_collator(), list(torch.rand(b, 3, ex.FRAMES, ex.CROP, ex.CROP)))


def full_forward_block_output(vit: nn.Module, clip: torch.Tensor, k: int) -> torch.Tensor:
    """Block k's output during V-JEPA 2's own full forward (RoPE positions of the whole clip)."""
    seen = {}
    handle = vit.blocks[k - 1].register_forward_hook(lambda m, i, o: seen.setdefault("h", o))
    with torch.no_grad():
        vit(clip)
    handle.remove()
    return seen["h"]


def test_v_jepa_2_vits_get_the_rope_wrapper():
    encoder, _, _ = tiny()
    layered = as_layered(encoder)  # MultiSeqWrapper looked through
    assert isinstance(layered, VJEPA2Encoder) and layered.model is encoder.backbone and encoder.backbone.use_rope
    units = layered.layerlock_units()
    assert [u.name for u in units.blocks] == ["block_1", "block_2", "block_3", "block_4"]
    assert units.stem.extra_params == ()  # RoPE: no pos_embed parameter


@pytest.mark.parametrize("size", [(32, 32), (32, 48)], ids=["square", "non_square"])
def test_targets_equal_the_teachers_block_k_output_of_a_full_forward(size):
    """Also on a non-square clip, where the blocks need the clip's grid (T, H, W) for their RoPE positions."""
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=size, patch_size=ex.PATCH, num_frames=ex.FRAMES, tubelet_size=ex.TUBELET,
                            embed_dim=48, depth=4, num_heads=2, use_rope=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    teacher = copy.deepcopy(vit)
    adapter = LayerLockAdapter(vit, teacher, None, None, ex.layerlock_config(12))
    clip = torch.rand(2, 3, ex.FRAMES, *size)
    n = (ex.FRAMES // ex.TUBELET) * (size[0] // ex.PATCH) * (size[1] // ex.PATCH)
    masks = [torch.stack([torch.randperm(n)[:5].sort().values for _ in range(2)]) for _ in range(2)]
    for k in range(1, 5):
        adapter.fixed_target_layer = k
        h = full_forward_block_output(teacher, clip, k)
        expected = F.layer_norm(h, (h.size(-1),))
        got = adapter.targets([clip])  # V-JEPA 2's forward_target: all tokens, per clip tensor
        assert isinstance(got, list) and len(got) == 1
        torch.testing.assert_close(got[0], expected, rtol=1e-5, atol=1e-5)
        for g, e in zip(adapter.targets(clip, masks), apply_masks(expected, masks, concat=False)):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    assert not got[0].requires_grad


def test_truncated_forward_never_runs_deeper_teacher_blocks():
    encoder, predictor, teacher = tiny()
    adapter = LayerLockAdapter(encoder, teacher, predictor, None, ex.layerlock_config(12))
    calls = [0] * 4
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, b in enumerate(teacher.backbone.blocks)]
    clips, _, _ = batch()
    adapter.begin_step(0)  # target block 1 before the first freeze
    adapter.targets(clips)
    adapter.begin_step(8)  # 2 frozen: target block 2
    adapter.targets(clips)
    assert calls == [2, 1, 0, 0]
    for h in hooks:
        h.remove()


def test_masks_are_v_jepa_2s_index_lists_per_clip_tensor():
    encoder, predictor, teacher = tiny()
    adapter = LayerLockAdapter(encoder, teacher, predictor, None, ex.layerlock_config(12))
    clips, masks_enc, masks_pred = batch()
    assert len(clips) == len(masks_pred) == 1 and len(masks_pred[0]) == len(ex.CFGS_MASK)
    gathered = adapter.targets(clips, masks_pred)
    full = adapter.targets(clips)
    for g, m in zip(gathered[0], masks_pred[0]):
        torch.testing.assert_close(g, apply_masks(full[0], [m]))
    with pytest.raises(ValueError, match="masks_pred: 2 entries for 1 clip tensors"):
        adapter.targets(clips, masks_pred * 2)
    decision = adapter.end_step(torch.tensor(0.5), full)  # nested lists are what the guard gets
    assert not decision.tripped and decision.stats["feature_std"] > 0.05


def test_ema_by_name_through_the_multi_sequence_wrapper():
    encoder, _, teacher = tiny()
    before = {n: p.detach().clone() for n, p in teacher.backbone.named_parameters()}
    NamedEMA(encoder, teacher).update(0.99925)
    student = dict(encoder.backbone.named_parameters())
    for n, p in teacher.backbone.named_parameters():
        torch.testing.assert_close(p, 0.99925 * before[n] + 0.00075 * student[n], rtol=0, atol=1e-7)


def test_two_switches_frozen_bitwise_and_resume_bitwise(tmp_path):
    """V-JEPA 2's train step (the example) crosses two freeze events; frozen units stay bitwise as they were;
    a run stopped inside the second switch warmup and resumed ends bitwise equal to the uninterrupted one."""
    full, second, mid = stop_and_resume(ex.main, tmp_path / "vj2.pt", 24, 17)  # events at 8 and 16, 2-step warmups
    losses = full["losses"]
    assert len(losses) == 24 and all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    ll = full["layerlock"]
    assert ll.plan.num_frozen == 2 and ll.target_layer() == 2 and second["layerlock"].state_dict() == ll.state_dict()
    end = full["encoder"].state_dict()
    for k, val in mid["encoder"].items():  # stem and blocks 1-2 as at step 17, the rest moved
        frozen = k.startswith(("backbone.patch_embed", "backbone.blocks.0.", "backbone.blocks.1."))
        assert torch.equal(end[k], val) == frozen, k
    assert all(p not in full["optimizer"].state for p in ll.layerlock.freezer.frozen_parameters())


def test_example_runs_v_jepa_2s_original_lines_too():
    out = ex.main(["--steps", "6", "--method", "vjepa2", "--quiet"])
    assert out["layerlock"] is None and len(out["losses"]) == 6 and all(torch.isfinite(torch.tensor(out["losses"])))
