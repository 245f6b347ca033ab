"""LayerLock's V-JEPA adapter on the official V-JEPA modules (``pip install --no-deps vjepa==0.1.2``), tiny, CPU."""

from __future__ import annotations

import copy
import importlib.util
import io
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from conftest import perturbed_copy, stop_and_resume
import torch.nn.functional as F

from layerlock_plugin.adapters.vjepa import (
    LayerLockAdapter,
    NamedEMA,
    VJEPAEncoder,
    layer_targets,
    normalize_masks,
    require_vjepa,
)
from layerlock_plugin.controller import LayerLockConfig
from layerlock_plugin.errors import CheckpointError, ConfigError, EncoderStructureError
from layerlock_plugin.schedule import ScheduleConfig
from layerlock_plugin.targets import TargetConfig
from layerlock_plugin.warmup import WarmupConfig

require_vjepa()  # fails loudly (naming the install line) rather than skipping
from vjepa.masks.utils import apply_masks  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "vjepa" / "train_layerlock_vjepa.py"
_spec = importlib.util.spec_from_file_location("vjepa_example", EXAMPLE)
ex = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ex)

NUM_TOKENS = (ex.FRAMES // ex.TUBELET) * (ex.CROP // ex.PATCH) ** 2  # 32


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def tiny(seed: int = 0):
    """(encoder, predictor, teacher): V-JEPA's wrappers around tiny official modules; the teacher is a
    perturbed deep copy so that teacher and student outputs differ."""
    torch.manual_seed(seed)
    encoder, predictor = ex.init_video_model()
    return encoder, predictor, perturbed_copy(encoder)


def batch(seed: int = 0, b: int = 4):
    torch.manual_seed(seed)
    clips = torch.rand(b, 3, ex.FRAMES, ex.CROP, ex.CROP)
    (clips,), masks_enc, masks_pred = ex.make_mask_collator()([(c,) for c in clips])
    return clips, masks_enc, masks_pred


def config(**schedule) -> LayerLockConfig:
    sched = dict(pixel_steps=2, interval=2, max_frozen=3) | schedule
    return LayerLockConfig(schedule=ScheduleConfig(**sched), warmup=WarmupConfig(steps=2))


# ------------------------------------------------------------------------------------ targets
@pytest.mark.parametrize("teacher_norm", [False, True])
def test_targets_equal_teacher_layer_k_of_a_full_forward(teacher_norm):
    encoder, predictor, teacher = tiny()
    with torch.no_grad():  # a non-trivial final norm, so that teacher_norm makes a difference
        teacher.backbone.norm.weight.copy_(torch.linspace(0.5, 2.0, 48))
        teacher.backbone.norm.bias.copy_(torch.linspace(-0.3, 0.3, 48))
    clips, _, masks_pred = batch()
    adapter = LayerLockAdapter(encoder, teacher, predictor, None, config(), teacher_norm=teacher_norm)
    vit = teacher.backbone
    for k in range(1, 5):
        with torch.no_grad():
            if teacher_norm:  # V-JEPA's own intermediate outputs: out_layers gives norm(h_k)
                vit.out_layers = [k - 1]
                full = vit(clips)[0]
                vit.out_layers = None
            else:  # the raw output of block k, captured during a full forward
                seen = {}
                handle = vit.blocks[k - 1].register_forward_hook(lambda m, i, o: seen.setdefault("h", o))
                vit(clips)
                handle.remove()
                full = seen["h"]
        expected = apply_masks(F.layer_norm(full, (full.size(-1),)), masks_pred, concat=False)
        adapter.fixed_target_layer = k
        got = adapter.targets(clips, masks_pred)
        assert isinstance(got, list) and len(got) == len(masks_pred)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
            assert not g.requires_grad
    # the two conventions differ (so the parametrisation tests two different things)
    raw = layer_targets(VJEPAEncoder(vit), clips, masks_pred[0], 2)
    normed = layer_targets(VJEPAEncoder(vit, apply_norm=True), clips, masks_pred[0], 2)
    assert (raw - normed).abs().max() > 1e-2


def test_truncated_forward_never_runs_deeper_teacher_blocks():
    encoder, predictor, teacher = tiny()
    adapter = LayerLockAdapter(encoder, teacher, predictor, None, config())
    calls = [0] * 4
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, b in enumerate(teacher.backbone.blocks)]
    clips, _, masks_pred = batch()
    adapter.begin_step(0)  # target layer 1 before the first freeze
    adapter.targets(clips, masks_pred)
    assert calls == [1, 0, 0, 0]
    adapter.begin_step(4)  # 2 frozen -> target layer 2
    adapter.targets(clips, masks_pred)
    assert calls == [2, 1, 0, 0] and adapter.target_layer() == 2
    for h in hooks:
        h.remove()


def test_masks_index_lists_concatenated_and_boolean_agree():
    encoder, predictor, teacher = tiny()
    adapter = LayerLockAdapter(encoder, teacher, predictor, None, config())
    clips, _, masks_pred = batch()
    per_config = adapter.targets(clips, masks_pred)
    m = masks_pred[0]
    # several configs concatenated along the batch ([M*B, K], same K) = the list's outputs concatenated
    cat = adapter.targets(clips, torch.cat([m, m.flip(1)]))
    torch.testing.assert_close(cat, torch.cat(adapter.targets(clips, [m, m.flip(1)])))
    torch.testing.assert_close(cat[: len(m)], per_config[0])
    # boolean masks (True = predicted) select the same tokens, in token order
    bool_mask = torch.zeros(m.shape[0], NUM_TOKENS, dtype=torch.bool).scatter_(1, m, True)
    torch.testing.assert_close(adapter.targets(clips, bool_mask), adapter.targets(clips, m.sort(1).values))


def test_bad_masks_and_layers_give_clear_errors():
    encoder, predictor, teacher = tiny()
    adapter = LayerLockAdapter(encoder, teacher, predictor, None, config())
    clips, _, masks_pred = batch()
    bad = masks_pred[0].clone()
    bad[0, 0] = NUM_TOKENS + 8
    with pytest.raises(ValueError, match=r"masks_pred\[1\]: token index 40 is outside the encoder's 32 tokens \(allowed 0..31\)"):
        adapter.targets(clips, [masks_pred[0], bad])
    with pytest.raises(ValueError, match="token index -1"):
        adapter.targets(clips, masks_pred[0] - masks_pred[0] - 1)
    ragged = torch.zeros(4, NUM_TOKENS, dtype=torch.bool)
    ragged[0, :3] = True
    ragged[1:, :2] = True
    with pytest.raises(ValueError, match="same number of tokens"):
        adapter.targets(clips, ragged)
    with pytest.raises(ValueError, match=r"must be \[B, 32\]"):
        adapter.targets(clips, torch.ones(4, 31, dtype=torch.bool))
    with pytest.raises(ValueError, match="3 mask rows for a batch of 4"):
        adapter.targets(clips, masks_pred[0][:3])
    with pytest.raises(TypeError, match="integer tensor"):
        normalize_masks(masks_pred[0].float(), 4, NUM_TOKENS)
    # a target layer beyond the encoder's depth
    with pytest.raises(ConfigError, match=r"target_layer: 5 is beyond the target encoder's depth: it has 4 blocks"):
        layer_targets(adapter.teacher, clips, masks_pred, 5)
    with pytest.raises(ConfigError, match=r"fixed_target_layer: 9 is beyond the encoder's depth \(allowed 1..4\)"):
        LayerLockAdapter(encoder, teacher, predictor, None, config(), fixed_target_layer=9)
    with pytest.raises(ConfigError, match="schedule.max_frozen: must be smaller than the number of freezable encoder blocks \\(4\\)"):
        LayerLockAdapter(encoder, teacher, predictor, None, config(max_frozen=4))


def test_config_refusals_name_the_field():
    encoder, predictor, teacher = tiny()
    for target, field in [(TargetConfig(kind="pixels"), "target.kind"), (TargetConfig(mode="multi"), "target.mode"),
                          (TargetConfig(loss_fraction=0.5), "target.loss_fraction")]:
        with pytest.raises(ConfigError, match=field):
            LayerLockAdapter(encoder, teacher, predictor, None, LayerLockConfig(target=target))
    with pytest.raises(ConfigError, match="teacher_frozen: must be one of 'follow', 'stop'"):
        LayerLockAdapter(encoder, teacher, predictor, None, config(), teacher_frozen="freeze")
    _, wide_predictor = ex.init_video_model(embed_dim=96)
    with pytest.raises(ConfigError, match="predictor: outputs 96 channels but the encoder's tokens have 48"):
        LayerLockAdapter(encoder, teacher, wide_predictor, None, config())


# ------------------------------------------------------------------------------------ EMA
def test_ema_pairs_by_name_not_by_registration_order():
    encoder, _, teacher = tiny()
    vit_t = teacher.backbone
    # same names, different registration order: a zip over parameters() would pair wrong tensors
    vit_t._modules = OrderedDict(reversed(list(vit_t._modules.items())))
    s_names = [n for n, _ in encoder.backbone.named_parameters()]
    assert [n for n, _ in vit_t.named_parameters()] != s_names
    before = {n: p.detach().clone() for n, p in vit_t.named_parameters()}
    NamedEMA(encoder, teacher).update(0.9)
    student = dict(encoder.backbone.named_parameters())
    for n, p in vit_t.named_parameters():
        torch.testing.assert_close(p, 0.9 * before[n] + 0.1 * student[n], rtol=0, atol=1e-6)


def test_ema_refuses_different_architectures_naming_the_first_mismatch():
    encoder, _ = ex.init_video_model(depth=4)
    deeper, _ = ex.init_video_model(depth=5)
    with pytest.raises(EncoderStructureError, match=r"'blocks.4.norm1.weight' is in the target encoder but not in the encoder"):
        NamedEMA(encoder, deeper)
    wider, _ = ex.init_video_model(embed_dim=96)
    with pytest.raises(EncoderStructureError, match=r"'pos_embed' is \(1, 32, 48\) torch.float32 in the encoder but \(1, 32, 96\)"):
        NamedEMA(encoder, wider)
    with pytest.raises(EncoderStructureError, match="share the parameter 'pos_embed'.*copy.deepcopy"):
        NamedEMA(encoder, encoder)
    with pytest.raises(EncoderStructureError, match="'blocks.4.norm1.weight' is in the target encoder"):
        LayerLockAdapter(encoder, deeper, None, None, config())


@pytest.mark.parametrize("rule", ["follow", "stop"])
def test_ema_rule_for_teacher_copies_of_frozen_student_units(rule):
    encoder, predictor, teacher = tiny()
    adapter = LayerLockAdapter(encoder, teacher, predictor, None, config(), teacher_frozen=rule)
    adapter.begin_step(4)  # stem + blocks 1-2 frozen
    frozen = {n for n, p in encoder.backbone.named_parameters() if not p.requires_grad and not n.startswith("norm")}
    assert any(n.startswith("blocks.1.") for n in frozen) and not any(n.startswith("blocks.2.") for n in frozen)
    t0 = {n: p.detach().clone() for n, p in teacher.backbone.named_parameters()}
    s = dict(encoder.backbone.named_parameters())
    m = 0.9
    adapter.update_teacher(m)
    for n, p in teacher.backbone.named_parameters():
        moved = m * t0[n] + (1 - m) * s[n]
        if n in frozen and rule == "stop":
            assert torch.equal(p, t0[n]), f"{n}: the teacher copy of a frozen unit must stop moving"
        else:
            torch.testing.assert_close(p, moved, rtol=0, atol=1e-6)
    if rule == "follow":  # with the student frozen, the gap to it shrinks by exactly m per update
        n = "blocks.0.attn.qkv.weight"
        gap0 = (t0[n] - s[n]).norm()
        adapter.update_teacher(m)
        torch.testing.assert_close((teacher.backbone.get_parameter(n) - s[n]).norm(), m * m * gap0, rtol=1e-4, atol=0)
    assert adapter.metrics()["layerlock/ema_momentum"] == m


# ------------------------------------------------------------------------------- training runs
def test_two_switches_freezing_resume_bitwise(tmp_path):
    """The example (V-JEPA's train step) crosses two freeze events with a finite loss; the student's frozen
    units do not change after their event; a run stopped inside the second switch warmup and resumed
    from its checkpoint ends bitwise equal to the uninterrupted run."""
    full, second, mid = stop_and_resume(ex.main, tmp_path / "vj.pt", 24, 17)  # events at 8 and 16; 17: in the warmup
    losses = full["losses"]
    assert len(losses) == 24 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    ll = full["layerlock"]
    assert ll.plan.num_frozen == 2 and ll.target_layer() == 2 and ll.layerlock.guard.trips == 0
    assert second["layerlock"].state_dict() == ll.state_dict()

    # frozen means frozen: stem and blocks 1-2 as they were when block 2 froze (step 16), the rest moved
    end = full["encoder"].state_dict()
    for k, val in mid["encoder"].items():
        frozen = k.startswith(("backbone.patch_embed", "backbone.pos_embed", "backbone.blocks.0.", "backbone.blocks.1."))
        assert torch.equal(end[k], val) == frozen, k
    opt_state = full["optimizer"].state
    assert all(p not in opt_state for p in ll.layerlock.freezer.frozen_parameters())


def test_example_runs_vjepas_original_lines_too():
    out = ex.main(["--steps", "6", "--method", "vjepa", "--quiet"])
    assert out["layerlock"] is None and len(out["losses"]) == 6 and all(torch.isfinite(torch.tensor(out["losses"])))


def test_baseline_vjepa_step_matches_adapter_before_any_freeze():
    """With the official target (full forward, final norm, layer norm) the adapter reproduces V-JEPA's
    forward_target exactly: fixed_target_layer=depth, teacher_norm=True, freeze=False."""
    encoder, predictor, teacher = tiny()
    adapter = LayerLockAdapter(encoder, teacher, predictor, None, LayerLockConfig(freeze=False),
                               fixed_target_layer=4, teacher_norm=True)
    clips, _, masks_pred = batch()
    with torch.no_grad():
        h = teacher(clips)
        official = apply_masks(F.layer_norm(h, (h.size(-1),)), masks_pred, concat=False)
    for g, e in zip(adapter.targets(clips, masks_pred), official):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_switch_warmup_rides_on_the_trainers_lr_schedule():
    encoder, predictor, teacher = tiny()
    opt = torch.optim.AdamW(list(encoder.parameters()) + list(predictor.parameters()), lr=1.0)
    adapter = LayerLockAdapter(encoder, teacher, predictor, opt, config())
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(o.param_groups[0]["lr"]))  # runs after LayerLock's
    clips, masks_enc, masks_pred = batch()
    for step, sched_lr in [(1, 0.5), (2, 0.4), (3, 0.3), (4, 0.2)]:
        adapter.begin_step(step)
        for g in opt.param_groups:
            g["lr"] = sched_lr  # what V-JEPA's WarmupCosineSchedule.step() does
        h = adapter.targets(clips, masks_pred)
        z = predictor(encoder(clips, masks_enc), h, masks_enc, masks_pred)
        sum((zi - hi).abs().mean() for zi, hi in zip(z, h)).backward()
        opt.step()
        opt.zero_grad()
        assert opt.param_groups[0]["lr"] == sched_lr  # the trainer's value is restored after the step
    # events at 2 and 4 (warmup 2 steps from 0.01): factor 1 at step 1 and 3 (= 0.01 + 0.99 / 2 at 3)
    assert seen == pytest.approx([0.5, 0.4 * 0.01, 0.3 * 0.505, 0.2 * 0.01])


def test_guard_metrics_and_state_dict_roundtrip():
    encoder, predictor, teacher = tiny()
    adapter = LayerLockAdapter(encoder, teacher, predictor, None, config())
    clips, _, masks_pred = batch()
    adapter.begin_step(0)
    h = adapter.targets(clips, masks_pred)
    decision = adapter.end_step(torch.tensor(0.5), h)
    assert not decision.tripped and 0.05 < decision.stats["feature_std"]  # latent targets are watched from step 0
    assert adapter.end_step(torch.tensor(float("nan")), h).tripped
    adapter.begin_step(5)
    metrics = adapter.metrics()
    assert metrics["layerlock/num_frozen"] == 2 and metrics["layerlock/target_layer"] == 2
    buf = io.BytesIO()
    torch.save(adapter.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    encoder2, predictor2, teacher2 = tiny()
    fresh = LayerLockAdapter(encoder2, teacher2, predictor2, None, config())
    fresh.load_state_dict(state)
    assert fresh.plan.num_frozen == 2 and not encoder2.backbone.blocks[1].norm1.weight.requires_grad
    other = LayerLockAdapter(*tiny()[::2], None, None, config(), teacher_frozen="stop")
    with pytest.raises(CheckpointError, match="teacher_frozen: checkpoint 'follow' vs adapter 'stop'"):
        other.load_state_dict(state)
    with pytest.raises(CheckpointError, match="not a LayerLock V-JEPA adapter state"):
        other.load_state_dict({"format": "layerlock/1"})


def test_timm_vit_works_as_a_vjepa_style_encoder():
    import timm
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=3,
                            embed_dim=48, num_heads=3, num_classes=0)
    teacher = copy.deepcopy(vit)
    opt = torch.optim.AdamW(vit.parameters(), lr=1e-3)
    adapter = LayerLockAdapter(vit, teacher, None, opt, config(max_frozen=2))
    images = torch.rand(2, 3, 32, 32)
    masks = torch.tensor([[0, 5, 9], [1, 2, 15]])
    adapter.begin_step(2)  # stem + block 1 frozen, target layer 1
    got = adapter.targets(images, masks)
    with torch.no_grad():
        full = teacher.forward_intermediates(images, indices=[0], norm=False, output_fmt="NLC", intermediates_only=True)[0]
    torch.testing.assert_close(got, torch.gather(F.layer_norm(full, (48,)), 1, masks[..., None].expand(-1, -1, 48)))
    assert not vit.blocks[0].attn.qkv.weight.requires_grad and vit.blocks[1].attn.qkv.weight.requires_grad
    before = teacher.blocks[2].mlp.fc1.weight.clone()
    adapter.update_teacher(0.5)
    torch.testing.assert_close(teacher.blocks[2].mlp.fc1.weight, 0.5 * before + 0.5 * vit.blocks[2].mlp.fc1.weight)
    with pytest.raises(ConfigError, match="teacher_norm"):
        LayerLockAdapter(vit, teacher, None, None, config(max_frozen=2), teacher_norm=True)
