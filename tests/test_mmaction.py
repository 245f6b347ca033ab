"""mmaction2 integration, run the way a user runs it: mmaction2's own tools/train.py (shipped in the
installed wheel under mmaction/.mim/tools/) on the tiny example config, over real mp4 files that
OpenCV writes and decord reads.

One 12-iteration run crosses two freeze events / target switches (steps 4 and 7); a second run
resumes it from the mid-schedule checkpoint (iteration 6, inside a switch warmup) with ``--resume``,
using a config *without* ``default_scope`` (custom_imports alone); the result's backbone is loaded
into mmaction2's stock VideoMAE fine-tuning config and its test pipeline runs on the clips.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("mmaction", reason='needs pip install "layerlock-plugin[mmaction]"')
pytest.importorskip("decord")
pytest.importorskip("cv2")

import layerlock_plugin.adapters.mmaction  # noqa: E402,F401  (registers; installs the DRN placeholder)
from layerlock_plugin.adapters.mmaction.compat import mmaction_root  # noqa: E402
from layerlock_plugin.adapters.mmaction.convert import convert  # noqa: E402
from layerlock_plugin.errors import ConfigError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "mmaction2" / "layerlock_vit-tiny_cpu.py"
TRAIN = mmaction_root() / ".mim" / "tools" / "train.py"
STOCK = mmaction_root() / ".mim" / "configs" / "recognition" / "videomae" / "vit-base-p16_videomae-k400-pre_16x4x1_kinetics-400.py"
PIXEL_STEPS, INTERVAL, WARMUP, ITERS = 4, 3, 3, 12  # as in the tiny config


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "examples" / "mmaction2" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clips")
    _load_example("make_tiny_clips").write_clips(root, num_clips=4, num_frames=24)
    return root


def _data_options(root: Path) -> list[str]:
    return ["--cfg-options", f"train_dataloader.dataset.ann_file={root}/train_list.txt",
            f"train_dataloader.dataset.data_prefix.video={root}/videos"]


def _train(config: Path, work_dir: Path, data: Path, *extra: str) -> str:
    cmd = [sys.executable, str(TRAIN), str(config), "--work-dir", str(work_dir), *extra, *_data_options(data)]
    proc = subprocess.run(cmd, cwd=work_dir.parent, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"tools/train.py failed:\n{log[-4000:]}"
    return log


def _scalars(work_dir: Path) -> dict[int, dict]:
    """{1-based iteration: logged scalars} from the LocalVisBackend's scalars.json."""
    (path,) = work_dir.glob("*/vis_data/scalars.json")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {row["step"]: row for row in rows if "layerlock/num_frozen" in row}


def _expected_plan(step: int) -> tuple[int, float]:
    """(num_frozen, warmup factor) of 0-based ``step`` under the tiny config's schedule."""
    stage = 0 if step < PIXEL_STEPS else min(1 + (step - PIXEL_STEPS) // INTERVAL, 2)
    since = step - (PIXEL_STEPS + (stage - 1) * INTERVAL)
    factor = 1.0 if stage == 0 or since >= WARMUP else 0.1 + 0.9 * since / WARMUP
    return stage, factor


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)  # our checkpoints need no allowlist


@pytest.fixture(scope="module")
def run(tmp_path_factory, data) -> tuple[Path, str]:
    work = tmp_path_factory.mktemp("run") / "work"
    return work, _train(TINY, work, data)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, data, run) -> tuple[Path, str]:
    """Resume run's iteration-6 checkpoint with a config that has custom_imports but no default_scope
    (the runner's scope is then mmengine's: mmengine issue #1662); mmaction2's own data types are
    named with their scope, LayerLock's need nothing."""
    base = tmp_path_factory.mktemp("resumed")
    text = TINY.read_text()
    assert "default_scope = 'mmaction'\n" in text
    text = text.replace("default_scope = 'mmaction'\n", "")
    # mmengine builds a dataset's transforms in the runner's scope, so each mmaction2 type needs its
    # scope prefix without default_scope; LayerLockVideoMAE resolves its backbone and preprocessor itself.
    for name in ("VideoDataset", "ActionVisualizer", "DecordInit", "SampleFrames", "DecordDecode", "Resize",
                 "CenterCrop", "FormatShape", "PackActionInputs"):
        assert f"type='{name}'" in text, name
        text = text.replace(f"type='{name}'", f"type='mmaction.{name}'")
    config = base / "tiny_no_default_scope.py"
    config.write_text(text)
    work = base / "work"
    work.mkdir()
    ckpt = work / "iter_6.pth"
    ckpt.write_bytes((run[0] / "iter_6.pth").read_bytes())
    return work, _train(config, work, data, "--resume", str(ckpt))


def test_train_py_crosses_freeze_events_and_logs_layerlock_scalars(run):
    work, log = run
    scalars = _scalars(work)
    assert sorted(scalars) == list(range(1, ITERS + 1))
    for it, row in scalars.items():
        frozen, factor = _expected_plan(it - 1)
        assert row["layerlock/num_frozen"] == frozen, (it, row)
        assert row["layerlock/target_layer"] == frozen, (it, row)
        assert row["layerlock/warmup_factor"] == pytest.approx(factor), (it, row)
        # collapse statistics exist once the target is latent
        assert ("layerlock/effective_rank" in row) == (frozen > 0), (it, row)
    assert "[layerlock] step 4: froze stem, block_1 (1 blocks frozen); target -> layer_1" in log
    assert "[layerlock] step 7: froze block_2 (2 blocks frozen); target -> layer_2" in log


def test_frozen_parameters_stop_changing_and_lose_optimizer_state(run):
    work, _ = run
    ck = {i: _state(work / f"iter_{i}.pth") for i in (3, 6, 9, 12)}
    sd = {i: c["state_dict"] for i, c in ck.items()}

    def same(prefix, a, b):
        keys = [k for k in sd[a] if k.startswith(prefix)]
        assert keys, prefix
        return all(torch.equal(sd[a][k], sd[b][k]) for k in keys)

    # Block 1 (and the stem) freeze at step 4: trained up to then, untouched afterwards.
    assert not same("backbone.blocks.0.", 3, 6)
    assert same("backbone.blocks.0.", 6, 12) and same("backbone.patch_embed.", 6, 12)
    # Block 2 freezes at step 7: still training between iterations 6 and 9, frozen from 9 on.
    assert not same("backbone.blocks.1.", 6, 9)
    assert same("backbone.blocks.1.", 9, 12)
    assert not same("backbone.blocks.3.", 9, 12)  # the last block never freezes
    assert ck[12]["layerlock"]["next_step"] == ITERS
    # AdamW keeps no state for frozen parameters (so neither momentum nor weight decay moves them).
    names = list(sd[12])  # parameter order of the optimizer = model.parameters() order
    params = [k for k in names if not k.endswith("pos_embed")]  # pos_embed is a buffer here
    state = ck[12]["optimizer"]["state"]
    frozen_idx = [i for i, k in enumerate(params) if k.startswith(("backbone.blocks.0.", "backbone.blocks.1.", "backbone.patch_embed."))]
    assert frozen_idx and not any(i in state for i in frozen_idx)
    trained_idx = [i for i, k in enumerate(params) if k.startswith("backbone.blocks.3.")]
    assert all(i in state for i in trained_idx)


def test_resume_mid_schedule_continues_the_plan_exactly(run, resumed):
    (work, _), (rwork, rlog) = run, resumed
    assert "resumed at iteration 6: 1 blocks frozen, target layer_1" in rlog
    full, again = _scalars(work), _scalars(rwork)
    assert sorted(again) == list(range(7, ITERS + 1))
    for it in again:  # same plan, same warmup, same losses as the uninterrupted run
        for key in ("layerlock/num_frozen", "layerlock/target_layer", "layerlock/warmup_factor"):
            assert again[it][key] == full[it][key], (it, key)
        assert again[it]["loss"] == pytest.approx(full[it]["loss"], rel=1e-4), it
    a, b = _state(work / "iter_12.pth")["state_dict"], _state(rwork / "iter_12.pth")["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)


def test_backbone_loads_into_stock_videomae_config_and_runs_its_test_pipeline(run, data, tmp_path):
    from mmengine.config import Config
    from mmengine.registry import DefaultScope
    from mmengine.runner import Runner

    from mmaction.registry import MODELS

    backbone_file = convert(run[0] / "iter_12.pth", tmp_path / "backbone.pth")
    cfg = Config.fromfile(str(STOCK))
    # Shrink the stock ViT-B/16 to the tiny run's size (CPU); key names are the stock ones.
    cfg.model.backbone.update(img_size=32, embed_dims=64, depth=4, num_heads=4, num_frames=8)
    cfg.model.cls_head.update(in_channels=64, num_classes=2)
    with DefaultScope.overwrite_default_scope("mmaction"):
        model = MODELS.build(cfg.model)
    state = {k[len("backbone."):]: v for k, v in _state(backbone_file)["state_dict"].items()}
    result = model.backbone.load_state_dict(state, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []

    pipeline = cfg.test_pipeline
    pipeline[1].update(clip_len=8, frame_interval=2, num_clips=2)
    pipeline[3].update(scale=(-1, 32))
    pipeline[4].update(crop_size=32)
    cfg.test_dataloader.update(num_workers=0, persistent_workers=False)
    cfg.test_dataloader.dataset.update(ann_file=str(data / "train_list.txt"),
                                       data_prefix=dict(video=str(data / "videos")), pipeline=pipeline)
    cfg.update(work_dir=str(tmp_path / "test"), load_from=str(backbone_file),
               env_cfg=dict(dist_cfg=dict(backend="gloo")))
    metrics = Runner.from_cfg(cfg).test()
    assert 0.0 <= metrics["acc/top1"] <= 1.0
    # the loaded backbone is the trained one
    trained = _state(run[0] / "iter_12.pth")["state_dict"]["backbone.blocks.3.mlp.layers.1.weight"]
    assert torch.equal(state["blocks.3.mlp.layers.1.weight"], trained)


# -- bad input: errors name the config key -------------------------------------------------------------
def _build(cfg: dict, registry: str = "HOOKS"):
    from mmaction import registry as reg
    from mmengine.registry import DefaultScope

    with DefaultScope.overwrite_default_scope("mmaction"):
        return getattr(reg, registry).build(cfg)


def test_unknown_hook_keys_are_named():
    with pytest.raises(ConfigError, match=r"^LayerLockHook\.pixel_stps: unknown key"):
        _build(dict(type="LayerLockHook", pixel_stps=3))
    with pytest.raises(ConfigError, match=r"^LayerLockHook\.schedule\.intervall: unknown key"):
        _build(dict(type="LayerLockHook", schedule=dict(intervall=3)))
    with pytest.raises(ConfigError, match=r"^LayerLockHook\.warmup\.steps"):
        _build(dict(type="LayerLockHook", warmup=dict(steps=-1)))


def test_backbone_without_blocks_is_refused():
    with pytest.raises(ConfigError, match=r"^model\.backbone: must be mmaction2's VisionTransformer.*C3D"):
        _build(dict(type="LayerLockVideoMAE", backbone=dict(type="C3D")), "MODELS")
    with pytest.raises(ConfigError, match=r"^model\.mask\.type"):
        _build(dict(type="LayerLockVideoMAE", backbone=dict(type="VisionTransformer"), mask=dict(type="block")), "MODELS")


_RUNNER_IDS = itertools.count()


def _runner(tmp_path, data, **changes):
    from mmengine.config import Config
    from mmengine.runner import Runner

    cfg = Config.fromfile(str(TINY))
    cfg.train_dataloader.dataset.update(ann_file=str(data / "train_list.txt"), data_prefix=dict(video=str(data / "videos")))
    cfg.merge_from_dict(changes)
    cfg.work_dir = str(tmp_path)
    # mmengine names a run's MessageHub / logger / visualizer instances after the config file and the
    # current second: two runners built within one second would share (and mix) their logged scalars.
    cfg.experiment_name = f"{tmp_path.parent.name}-{tmp_path.name}-{next(_RUNNER_IDS)}"
    return Runner.from_cfg(cfg)


def test_max_frozen_beyond_the_encoder_is_refused_before_training(tmp_path, data):
    hooks = [dict(type="LayerLockHook", schedule=dict(pixel_steps=4, interval=3, max_frozen=4))]
    runner = _runner(tmp_path, data, custom_hooks=hooks)
    with pytest.raises(ConfigError, match=r"^LayerLockHook\.schedule\.max_frozen: must be smaller than .*\(4\)"):
        runner.train()
    assert runner.iter == 0


def test_hook_refuses_a_model_that_is_not_the_layerlock_model(tmp_path, data):
    model = dict(_delete_=True, type="Recognizer3D",
                 backbone=dict(type="VisionTransformer", img_size=32, embed_dims=64, depth=4, num_heads=4, num_frames=8),
                 cls_head=dict(type="TimeSformerHead", num_classes=2, in_channels=64),
                 data_preprocessor=dict(type="ActionDataPreprocessor", format_shape="NCTHW"))
    runner = _runner(tmp_path, data, model=model)
    with pytest.raises(ConfigError, match=r"^model\.type: LayerLockHook needs the LayerLock pretraining model"):
        runner.train()


# -- in-process runs of the tiny config (no subprocess): LR warmup and collapse guard ------------------
class _Recorder:
    """An mmengine hook (priority LOW, so after LayerLockHook) that records, per step, the LR the
    param schedulers set and the LR the optimizer actually steps with, and snapshots the weights."""

    def __new__(cls, *args, **kwargs):
        from mmengine.hooks import Hook

        class Recorder(Hook):
            priority = "LOW"

            def __init__(self):
                self.scheduled, self.stepped, self.snapshots = [], [], {}

            def before_train(self, runner):
                runner.optim_wrapper.optimizer.register_step_pre_hook(
                    lambda opt, a, k: self.stepped.append((runner.iter, opt.param_groups[0]["lr"])))

            def before_train_iter(self, runner, batch_idx, data_batch=None):
                self.scheduled.append(runner.optim_wrapper.get_lr()["lr"][0])
                self.snapshots[runner.iter] = {k: v.clone() for k, v in runner.model.state_dict().items()}

        return Recorder()


def _run_in_process(tmp_path, data, hook: dict, iters: int = 9):
    runner = _runner(tmp_path, data, custom_hooks=[hook], train_cfg=dict(max_iters=iters),
                     default_hooks=dict(checkpoint=dict(interval=100)))
    recorder = _Recorder()
    runner.register_hook(recorder)
    runner.train()
    return runner, recorder


def _scheduled_lrs(iters: int) -> list[float]:
    """The LRs the tiny config's param schedulers give on their own (a bare optimizer, no LayerLock)."""
    from mmengine.config import Config
    from mmengine.optim.scheduler import LinearLR  # noqa: F401  (registers the schedulers)
    from mmengine.registry import PARAM_SCHEDULERS

    cfg = Config.fromfile(str(TINY))
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim_wrapper.optimizer.lr)
    schedulers = [PARAM_SCHEDULERS.build({**c, "optimizer": opt}) for c in cfg.param_scheduler]
    out = []
    for _ in range(iters):
        out.append(opt.param_groups[0]["lr"])
        opt.step()  # no gradients: changes nothing, keeps the schedulers' order check quiet
        for s in schedulers:
            s.step()
    return out


def test_switch_warmup_multiplies_the_param_schedulers_lr_without_changing_it(tmp_path, data):
    schedule = dict(pixel_steps=PIXEL_STEPS, interval=INTERVAL, max_frozen=2)
    _, warm = _run_in_process(tmp_path, data, dict(type="LayerLockHook", schedule=schedule,
                                                   warmup=dict(steps=WARMUP, start_factor=0.1)))
    assert warm.scheduled == pytest.approx(_scheduled_lrs(9))  # mmengine's schedule is untouched
    assert [it for it, _ in warm.stepped] == list(range(9))
    factors = [_expected_plan(it)[1] for it in range(9)]
    assert min(factors) < 1.0  # the run crosses warmups
    assert [s for _, s in warm.stepped] == pytest.approx([f * lr for f, lr in zip(factors, warm.scheduled)])


def test_collapse_guard_skip_policy_drops_the_update(tmp_path, data):
    guard = dict(policy="skip", every=1, min_feature_std=0.99, min_effective_rank=0.99, patience=1)
    runner, rec = _run_in_process(tmp_path, data, dict(type="LayerLockHook", guard=guard,
                                                      schedule=dict(pixel_steps=PIXEL_STEPS, interval=INTERVAL, max_frozen=2)),
                                  iters=7)
    final = {k: v for k, v in runner.model.state_dict().items()}
    before_latent = rec.snapshots[PIXEL_STEPS]  # weights before the first latent-target step
    trained = [k for k in final if not torch.equal(rec.snapshots[1][k], rec.snapshots[PIXEL_STEPS][k])]
    assert trained, "the pixel phase must train"
    assert all(torch.equal(before_latent[k], final[k]) for k in final), "a tripped step must not update"
    assert runner.message_hub.get_scalar("train/layerlock/guard_trips").current() == 7 - PIXEL_STEPS


def test_full_vit_b_k400_config_builds_and_its_schedule_fits_the_run():
    import warnings

    from mmengine.config import Config

    from layerlock_plugin.controller import LayerLock

    cfg = Config.fromfile(str(REPO / "examples" / "mmaction2" / "layerlock_vit-base-p16_k400_16x4x1.py"))
    model = _build(cfg.model, "MODELS")
    hook = _build(cfg.custom_hooks[0])
    assert len(model.backbone.blocks) == 12 and model.backbone.embed_dims == 768
    for transform in cfg.train_pipeline:  # every transform of its pipeline builds
        _build(transform, "TRANSFORMS")
    total = cfg.train_cfg.max_iters
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a schedule longer than the run would warn
        ll = LayerLock(model.encoder, hook.config, tubelet=model.encoder.tubelet, total_steps=total)
    steps, depths = zip(*ll.schedule.events())
    assert depths[-1] == 8  # 2/3 of the 12 blocks, as the paper's 32 of 48
    assert steps[0] / total == pytest.approx(160 / 500, abs=0.01)  # pixel phase: 32% of the run
    assert steps[-1] / total == pytest.approx(470 / 500, abs=0.01)  # last event at 94% of the run


def test_resume_from_a_checkpoint_without_layerlock_state_rederives_the_plan(run, data, tmp_path):
    ckpt = _state(run[0] / "iter_6.pth")
    del ckpt["layerlock"]
    path = tmp_path / "iter_6_plain.pth"
    torch.save(ckpt, path)
    runner = _runner(tmp_path / "work", data, resume=True, load_from=str(path), train_cfg=dict(max_iters=8),
                     default_hooks=dict(checkpoint=dict(interval=100)))
    with pytest.warns(UserWarning, match="no 'layerlock' entry; re-deriving the freezing plan from iteration 6"):
        runner.train()
    hub = runner.message_hub
    assert hub.get_scalar("train/layerlock/num_frozen").data[0].tolist()[-2:] == [1.0, 2.0]  # steps 6, 7
    assert hub.get_scalar("train/layerlock/warmup_factor").current() == pytest.approx(0.1)  # switch at 7


def test_importing_the_adapter_says_nothing_the_user_cannot_act_on():
    """Every mmaction2 command imports the adapter (custom_imports): no DRN-placeholder, mmcv-lite or timm
    deprecation warning each time, and mmaction2 imports beside transformers 5 (the hf extra)."""
    out = subprocess.run([sys.executable, "-W", "default", "-c", "import layerlock_plugin.adapters.mmaction"],
                         capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0 and out.stderr == "" and out.stdout == "", out.stderr[-3000:]


def test_drn_placeholder_only_for_the_broken_wheel_and_silent(tmp_path, monkeypatch):
    from layerlock_plugin.adapters.mmaction import compat

    for name in (compat._PACKAGE, compat._MODULE):
        monkeypatch.delitem(sys.modules, name)
    # A source install has the folder: nothing is installed, nothing is said.
    source = tmp_path / "source"
    (source / compat.DRN_RELATIVE_PATH).parent.mkdir(parents=True)
    (source / compat.DRN_RELATIVE_PATH).write_text("")
    monkeypatch.setattr(compat, "mmaction_root", lambda: source)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compat.install_drn_placeholder() is False
    assert compat._MODULE not in sys.modules
    # The wheel lacks it: placeholder installed without a word; building DRN says why it is missing.
    monkeypatch.setattr(compat, "mmaction_root", lambda: tmp_path / "wheel")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compat.install_drn_placeholder() is True
    with pytest.raises(compat.DRNUnavailable, match="Install mmaction2 from source"):
        sys.modules[compat._MODULE].DRN()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compat.install_drn_placeholder() is False  # already there
        del sys.modules[compat._MODULE]
        assert compat.install_drn_placeholder() is True  # installed again, silently


def test_vindlu_is_left_out_under_transformers_5():
    """mmaction2 1.2.0 imports its VindLU video-text models whenever transformers is installed, and they import
    what transformers 5 (the hf extra) removed: the adapter registers mmaction2's placeholders for them instead,
    so that the rest of mmaction.models imports."""
    import importlib.metadata

    from mmaction.registry import MODELS
    from mmaction.utils import dependency

    assert "mmaction.models" in sys.modules and MODELS.get("VisionTransformer") is not None
    try:
        major = int(importlib.metadata.version("transformers").split(".")[0])
    except importlib.metadata.PackageNotFoundError:
        major = None
    if major is not None and major >= 5:
        assert dependency.WITH_MULTIMODAL is False
        with pytest.raises(ImportError, match="multi-modal"):
            MODELS.build(dict(type="VindLURetrieval"))


def test_adaptive_schedule_by_hook_config_and_its_resume(tmp_path, data):
    adaptive = dict(observe_every=1, window=2, min_pixel_steps=2, max_pixel_steps=4, min_interval=1, max_interval=3)
    hook = dict(type="LayerLockHook", schedule=dict(kind="adaptive", max_frozen=2, adaptive=adaptive))
    first = _runner(tmp_path / "a", data, custom_hooks=[hook], train_cfg=dict(max_iters=8),
                    default_hooks=dict(checkpoint=dict(interval=5)))
    first.train()
    frozen = first.message_hub.get_scalar("train/layerlock/num_frozen").data[0].tolist()
    assert frozen[0] == 0 and frozen[-1] == 2 and frozen == sorted(frozen)
    assert "schedule_state" in _state(tmp_path / "a" / "iter_5.pth")["layerlock"]
    again = _runner(tmp_path / "b", data, custom_hooks=[hook], train_cfg=dict(max_iters=8), resume=True,
                    load_from=str(tmp_path / "a" / "iter_5.pth"), default_hooks=dict(checkpoint=dict(interval=100)))
    again.train()
    loss = lambda r: r.message_hub.get_scalar("train/loss").data[0].tolist()[-3:]  # noqa: E731
    assert again.message_hub.get_scalar("train/layerlock/num_frozen").data[0].tolist() == frozen
    assert loss(again) == pytest.approx(loss(first), rel=1e-4)


def _param_group(runner, name: str) -> dict:
    """The optimizer param group that holds the model parameter ``name`` (fails if none does)."""
    param = dict(runner.model.named_parameters())[name]
    (group,) = [g for g in runner.optim_wrapper.optimizer.param_groups if any(p is param for p in g["params"])]
    return group


@pytest.mark.parametrize("optim", [
    dict(paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0)),  # most mmaction2 configs
    dict(constructor="LearningRateDecayOptimizerConstructor",  # VideoMAE-style layer decay
         paramwise_cfg=dict(num_layers=4, decay_rate=0.75, decay_type="layer_wise")),
], ids=["paramwise_cfg", "layer_decay"])
def test_every_readout_trains_under_per_parameter_optimizer_constructors(tmp_path, data, optim):
    schedule = dict(pixel_steps=PIXEL_STEPS, interval=INTERVAL, max_frozen=2)  # layer_1 at 4-6, layer_2 at 7-8
    runner = _runner(tmp_path, data, custom_hooks=[dict(type="LayerLockHook", schedule=schedule)],
                     train_cfg=dict(max_iters=9), default_hooks=dict(checkpoint=dict(interval=100)),
                     optim_wrapper=optim)
    recorder = _Recorder()
    runner.register_hook(recorder)
    runner.train()
    snap, final = recorder.snapshots, runner.model.state_dict()

    def moved(head, a, b):
        after = snap[b] if b in snap else final
        return not torch.equal(snap[a][f"readouts.{head}.weight"], after[f"readouts.{head}.weight"])

    assert moved("pixels", 0, PIXEL_STEPS)
    assert moved("layer_1", PIXEL_STEPS, PIXEL_STEPS + INTERVAL), "layer_1's readout did not train while it was the target"
    assert moved("layer_2", PIXEL_STEPS + INTERVAL, 9), "layer_2's readout did not train while it was the target"
    assert not moved("layer_1", 0, PIXEL_STEPS)  # and a head trains only while it is a target
    # the constructor's per-parameter rules reached the heads: a head's bias is grouped like the pixel head's
    for key in ("weight_decay", "lr"):
        assert _param_group(runner, "readouts.layer_2.bias")[key] == _param_group(runner, "readouts.pixels.bias")[key]
    if "bias_decay_mult" in optim["paramwise_cfg"]:
        assert _param_group(runner, "readouts.layer_1.bias")["weight_decay"] == 0.0


def test_a_readout_the_optimizer_skipped_is_refused_before_training(tmp_path, data):
    runner = _runner(tmp_path, data, optim_wrapper=dict(paramwise_cfg=dict(bias_decay_mult=0.0)))
    for p in runner.model.readouts["layer_1"].parameters():
        p.requires_grad_(False)  # as the model did before: the constructor then leaves the head out
    with pytest.raises(ConfigError, match=r"^optim_wrapper: the optimizer does not hold readouts\.layer_1\.weight"):
        runner.train()
    assert runner.iter == 0


def test_a_config_inheriting_mmaction_package_bases_builds(tmp_path):
    """``_base_ = 'mmaction::...'`` resolves through mmengine's pkg_resources lookup (setuptools < 82)."""
    from mmengine.config import Config

    config = tmp_path / "inherits.py"
    config.write_text("_base_ = ['mmaction::_base_/default_runtime.py']\n" + TINY.read_text().split("default_hooks = dict(")[0])
    cfg = Config.fromfile(str(config))
    assert cfg.default_hooks.checkpoint.type == "CheckpointHook"  # from mmaction2's default_runtime.py
    assert cfg.custom_hooks[0].type == "LayerLockHook"


FINETUNE = REPO / "examples" / "mmaction2" / "finetune_vit-tiny_cpu.py"


def _tool(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(TRAIN.parent / f"{name}.py"), *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_finetune_with_the_stock_config_then_tools_test_loads_epoch_checkpoint(run, data, tmp_path):
    """The fine-tuning example (stock VideoMAE config + custom_imports) trains from the converted backbone,
    and mmaction2's tools/test.py loads the epoch_1.pth it wrote (torch's weights_only default)."""
    convert(run[0] / "iter_12.pth", tmp_path / "backbone.pth")
    options = ["--cfg-options", f"load_from={tmp_path / 'backbone.pth'}"]
    for split in ("train", "test"):
        options += [f"{split}_dataloader.dataset.ann_file={data}/train_list.txt",
                    f"{split}_dataloader.dataset.data_prefix.video={data}/videos"]
    train = _tool("train", str(FINETUNE), "--work-dir", str(tmp_path / "ft"), *options, cwd=tmp_path)
    log = train.stdout + train.stderr
    assert train.returncode == 0, log[-4000:]
    assert "missing keys in source state_dict: cls_head.fc_cls.weight, cls_head.fc_cls.bias" in log  # backbone loaded
    test = _tool("test", str(FINETUNE), str(tmp_path / "ft" / "epoch_1.pth"), "--work-dir", str(tmp_path / "test"),
                 *options, cwd=tmp_path)
    assert test.returncode == 0, (test.stdout + test.stderr)[-4000:]
    assert "acc/top1" in test.stdout + test.stderr


def test_a_forgotten_custom_imports_shows_the_drn_error(tmp_path):
    """What the troubleshooting section names: the stock config without the plugin's import fails to build."""
    config = tmp_path / "no_import.py"
    config.write_text("\n".join(line for line in FINETUNE.read_text().splitlines() if not line.startswith("custom_imports")))
    proc = _tool("train", str(config), "--work-dir", str(tmp_path / "w"), cwd=tmp_path)
    assert proc.returncode != 0 and "mmaction.models.localizers.drn" in proc.stdout + proc.stderr


def test_the_three_config_lines_a_user_adds_for_pretraining(tmp_path, data):
    """custom_imports, the model with only its backbone (decoder and mask take VideoMAE's defaults) and the
    hook with only its schedule: that is all LayerLock needs in an mmaction2 config."""
    model = dict(_delete_=True, type="LayerLockVideoMAE",
                 backbone=dict(type="VisionTransformer", img_size=32, patch_size=8, embed_dims=64, depth=4, num_heads=4,
                               num_frames=8, norm_cfg=dict(type="LN", eps=1e-6)))
    hook = dict(type="LayerLockHook", schedule=dict(pixel_steps=1, interval=1, max_frozen=2))
    runner = _runner(tmp_path, data, model=model, custom_hooks=[hook], train_cfg=dict(max_iters=3),
                     default_hooks=dict(checkpoint=dict(interval=100)))
    runner.train()
    m = runner.model
    assert (m.mask_type, m.mask_ratio, len(m.decoder_blocks), m.mask_token.shape[-1]) == ("tube", 0.9, 4, 384)
    assert runner.message_hub.get_scalar("train/layerlock/num_frozen").data[0].tolist() == [0.0, 1.0, 2.0]
