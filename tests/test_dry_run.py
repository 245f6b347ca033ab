"""``layerlock-train --dry-run``: meta-device build, the paper's freeze timeline, and a cost model that
agrees with torch's own FLOP counter on a real training step."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from layerlock_plugin.controller import LayerLock
from layerlock_plugin.masking import random_masking, subsample_indices
from layerlock_plugin.reference.cli import main
from layerlock_plugin.reference.config import load_config
from layerlock_plugin.reference.dryrun import build_meta, dry_run, step_flops
from layerlock_plugin.reference.model import VideoMAE


def test_vit_g_dry_run_prints_the_paper_timeline(capsys):
    assert main(["--config", "vit_g", "--dry-run", "--world-size", "256"]) == 0
    out = capsys.readouterr().out
    assert "first freeze at step 160000; 32 blocks frozen at step 470000 (32 events)" in out
    assert "built on the meta device (nothing allocated)" in out
    params = int(out.split("parameters: ")[1].split(" ")[0].replace(",", ""))
    assert 1.8e9 < params < 2.0e9  # ViT-G/14 widths, 48 blocks, plus 32 latent readouts
    for step in ("160000..169999", "470000..499999"):
        assert step in out


@pytest.mark.parametrize("name, depth, frozen", [("vit_b", 12, 5), ("vit_l", 24, 13), ("vit_4ds_e", 56, 34)])
def test_packaged_configs_build_on_meta(name, depth, frozen):
    lines = []
    report = dry_run(_config(name), world_size=8, echo=lines.append)
    assert report["events"][-1][1] == frozen and len(report["phases"]) == frozen + 1
    assert report["phases"][0]["vs_mae_step"] == pytest.approx(1.0)
    # freezing only ever removes student work; per-device memory shrinks with every frozen block
    student = [p["student_vs_mae"] for p in report["phases"]]
    memory = [p["memory_per_device"]["total"] for p in report["phases"]]
    assert all(b < a for a, b in zip(student, student[1:])) and all(b < a for a, b in zip(memory, memory[1:]))
    model = build_meta(_config(name))
    assert len(model.blocks) == depth and all(p.is_meta for p in model.parameters())
    if name == "vit_4ds_e":
        assert 3.5e9 < report["params"] < 4.5e9


def _config(name):
    from layerlock_plugin.reference.config import apply_overrides, build_config, load_yaml

    raw = apply_overrides(load_yaml(name), [])
    raw["data"] = {"source": "digits", "num_videos": 1}  # what --dry-run does: the cost needs no video folder
    return build_config(raw)


def test_design_cost_model_anchor():
    """DESIGN.md's token-layer estimate: with 32 of ViT-G's blocks frozen the student step costs ~0.83 of MAE."""
    cfg = _config("vit_g").model
    ratio = step_flops(cfg, 32, [32])["student"] / step_flops(cfg, 0, [])["student"]
    assert ratio == pytest.approx(0.83, abs=0.02)


@pytest.mark.parametrize("target_sets", [[], ["target.loss_fraction=0.25", "target.context=sparse"]],
                         ids=["full-context", "sparse-context"])
def test_step_flops_match_torch_flop_counter(tmp_path, target_sets):
    """The analytic count equals torch's FLOP counter on real tiny training steps (math attention, so
    the counter sees the attention matmuls), in the pixel phase and with 1..3 frozen blocks; with the
    sparse target context the target pass runs on Q + V tokens only."""
    cfg = load_config(None, [f"out_dir={tmp_path}", "schedule.pixel_steps=1", "schedule.interval=1",
                             "schedule.max_frozen=3", *target_sets])
    tc = cfg.target
    model = VideoMAE(cfg.model, latent_target_layers=range(1, 4))
    ll = LayerLock(model, cfg.layerlock(), tubelet=cfg.model.tubelet)
    g = torch.Generator().manual_seed(0)
    batch = 2
    for step in range(4):
        plan = ll.begin_step(step)
        video = torch.randn(batch, 3, cfg.model.num_frames, cfg.model.img_size, cfg.model.img_size)
        visible, masked = random_masking(batch, model.num_patches, cfg.model.mask_ratio, generator=g)
        query = subsample_indices(masked, tc.loss_fraction, generator=g) if tc.loss_fraction < 1 else masked
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
            targets = ll.targets(video, plan, query, visible)
            preds = model(video, visible, query, heads=list(targets), frozen_prefix=ll.frozen_prefix(plan))
            ll.loss(preds, targets)[0].backward()
        model.zero_grad(set_to_none=True)
        expected = step_flops(cfg.model, plan.num_frozen, ll.target_layers(plan), tc.loss_fraction,
                              plan.stem_frozen, tc.context)["total"]
        assert counter.get_total_flops() == pytest.approx(expected * batch, rel=1e-6), f"step {step}"


def test_adaptive_schedule_dry_run_costs_each_depth(capsys):
    assert main(["--dry-run", "--set", "schedule.kind=adaptive"]) == 0
    out = capsys.readouterr().out
    assert "decided during training (adaptive schedule, up to 3 blocks)" in out
    assert out.count("when decided") == 3


def test_dry_run_bad_world_size(capsys):
    assert main(["--config", "vit_g", "--dry-run", "--world-size", "0"]) == 2
    assert "--world-size: must be a positive integer" in capsys.readouterr().err


@pytest.mark.parametrize("name, sets", [("vit_l", []), ("vit_l", ["target.loss_fraction=1.0", "target.context=full"]),
                                        ("vit_g", [])])
def test_the_dry_run_says_the_whole_run_cost_against_mae_first(name, sets):
    """What a user pays for LayerLock, on the first line: the whole run's FLOPs against the same run as MAE
    (and, with a query subset, against an MAE run that queries every masked patch)."""
    from layerlock_plugin.reference.config import apply_overrides, build_config, load_yaml

    raw = apply_overrides(load_yaml(name), sets)
    raw["data"] = {"source": "digits", "num_videos": 1}
    cfg = build_config(raw)
    lines = []
    report = dry_run(cfg, world_size=8 if name == "vit_l" else 256, echo=lines.append)
    steps, batch = cfg.train.steps, cfg.train.batch_size
    same = step_flops(cfg.model, 0, [], cfg.target.loss_fraction)["total"] * steps * batch
    every = step_flops(cfg.model, 0, [], 1.0)["total"] * steps * batch
    assert lines[0].startswith("cost: the whole run is ") and f"{report['total_flops'] / same:.3f}x" in lines[0]
    assert f"freezing saves {1 - report['student_vs_mae']:.1%}" in lines[0]
    if cfg.target.loss_fraction < 1:
        assert f"{report['total_flops'] / every:.3f}x" in lines[1] and "every masked patch" in lines[1]
    else:
        assert "every masked patch" not in lines[1]
