import warnings

import pytest
import torch

from layerlock_plugin.collapse import CollapseGuard, GuardConfig, feature_stats
from layerlock_plugin.errors import CollapseError, ConfigError
from layerlock_plugin.schedule import FreezeSchedule, ScheduleConfig
from layerlock_plugin.targets import TargetConfig, TargetSelector, patchify, pixel_targets
from layerlock_plugin.warmup import LRScaler, WarmupConfig, switch_warmup_factor


def test_patchify_layout():
    video = torch.arange(2 * 3 * 4 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 4, 6)
    p = patchify(video, (2, 2, 3))
    assert p.shape == (2, 2 * 2 * 2, 2 * 2 * 3 * 3)
    # token 1 = (t=0, h=0, w=1): pixel (c=0, t=0, h=0, w=3) comes first
    assert p[0, 1, 0] == video[0, 0, 0, 0, 3]
    # channel is the fastest axis inside a patch
    assert p[0, 0, 1] == video[0, 1, 0, 0, 0]
    t = pixel_targets(video, (2, 2, 3))
    assert torch.allclose(t.mean(-1), torch.zeros(2, 8), atol=1e-4)


def test_latent_targets_equal_intermediate_and_stop_early(toy_encoder):
    sched = FreezeSchedule(ScheduleConfig(pixel_steps=2, interval=2, max_frozen=3), 4)
    x = torch.randn(2, 6, 8)
    q = torch.tensor([[0, 2, 5], [1, 3, 4]])
    toy_encoder.train()
    for mode in ("single", "multi"):
        sel = TargetSelector(TargetConfig(mode=mode, layer_norm=False))
        plan = sched.plan(4)  # 2 blocks frozen, target h_2
        for b in toy_encoder.blocks:
            b.calls = 0
        t = sel.compute(toy_encoder, x, plan, q)
        assert [b.calls for b in toy_encoder.blocks] == [1, 1, 0, 0, 0], "never run deeper blocks"
        toy_encoder.eval()
        with torch.no_grad():
            h = toy_encoder.stem(x) + toy_encoder.pos
            ref = {}
            for i, blk in enumerate(toy_encoder.blocks[:2], 1):
                h = blk(h)
                ref[f"layer_{i}"] = torch.stack([h[b, q[b]] for b in range(2)])
        toy_encoder.train()
        assert sorted(t) == (["layer_2"] if mode == "single" else ["layer_1", "layer_2"])
        for k, v in t.items():
            assert torch.allclose(v, ref[k]) and not v.requires_grad
        assert toy_encoder.blocks[0].training, "train mode restored after the target pass"


def test_pixel_kind_keeps_pixels_after_freezing():
    sched = FreezeSchedule(ScheduleConfig(pixel_steps=0, interval=1, max_frozen=2), 4)
    assert TargetSelector(TargetConfig(kind="pixels")).heads(sched.plan(5)) == ["pixels"]


@pytest.mark.parametrize("kw, field", [(dict(kind="depth"), "target.kind"), (dict(loss_fraction=0.0), "target.loss_fraction"),
                                        (dict(loss_fraction=1.5), "target.loss_fraction"), (dict(mode="all"), "target.mode")])
def test_target_config_errors(kw, field):
    with pytest.raises(ConfigError, match=f"^{field}"):
        TargetConfig(**kw)


def test_warmup_factor_ramp_and_scaler_composes_with_scheduler():
    sched = FreezeSchedule(ScheduleConfig(pixel_steps=10, interval=100, max_frozen=2), 4)
    cfg = WarmupConfig(steps=4, start_factor=0.2)
    assert switch_warmup_factor(cfg, sched.plan(9)) == 1.0
    assert [round(switch_warmup_factor(cfg, sched.plan(s)), 3) for s in range(10, 16)] == [0.2, 0.4, 0.6, 0.8, 1.0, 1.0]
    assert switch_warmup_factor(cfg, sched.plan(11), switches_target=False) == 1.0

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    host = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)  # chainable: reads group['lr']
    scaler = LRScaler(opt)
    moves = []
    for factor in (0.1, 0.1, 1.0):
        scaler.factor = factor
        before = p.detach().clone()
        p.grad = torch.ones(1)
        opt.step()
        moves.append(float(before - p.detach()))
        host.step()
    assert moves == pytest.approx([0.1, 0.05, 0.25])  # host schedule 1, .5, .25 untouched by the warmup
    assert opt.param_groups[0]["lr"] == pytest.approx(0.125)


def test_feature_stats_detect_collapse():
    g = torch.Generator().manual_seed(0)
    healthy = feature_stats(torch.randn(4, 64, 32, generator=g))
    collapsed = feature_stats(torch.ones(4, 64, 32) + 1e-4 * torch.randn(4, 64, 32, generator=g))
    rank1 = feature_stats(torch.randn(256, 1, generator=g) * torch.randn(1, 32, generator=g))
    assert healthy["feature_std"] > 0.9 and healthy["effective_rank"] > 0.5
    assert collapsed["feature_std"] < 1e-3
    assert rank1["effective_rank"] < 0.05


def test_guard_policies_and_patience():
    ok = torch.randn(2, 64, 32)
    bad = torch.ones(2, 64, 32)
    loss = torch.tensor(0.5)
    g = CollapseGuard(GuardConfig(policy="skip", every=1, patience=2))
    assert not g.check(0, loss, ok).tripped
    assert not g.check(1, loss, bad).tripped  # patience 2
    d = g.check(2, loss, bad)
    assert d.tripped and d.skip and "feature_std" in d.reasons[0]
    assert not g.check(3, loss, ok).tripped and g.below == 0
    nan = CollapseGuard(GuardConfig(policy="skip"))
    assert nan.check(1, torch.tensor(float("nan"))).skip  # non-finite loss trips at once, every step
    with pytest.raises(CollapseError, match="step 0"):
        CollapseGuard(GuardConfig(policy="raise", patience=1)).check(0, loss, bad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not CollapseGuard(GuardConfig(policy="off")).check(0, torch.tensor(float("inf")), bad).tripped
    with pytest.raises(ConfigError, match="^guard.policy"):
        GuardConfig(policy="ignore")


def test_guard_policy_off_survives_yaml():
    import yaml

    from layerlock_plugin.reference.config import load_config

    assert yaml.safe_load("off") is False  # why the special case exists
    assert GuardConfig(policy=False).policy == "off"
    assert load_config(None, ["guard.policy=off"]).guard.policy == "off"
    with pytest.raises(ConfigError, match="guard.policy"):
        GuardConfig(policy=True)
