"""LayerLockTrainer: VideoMAE pretraining with LayerLock under the real Hugging Face Trainer (tiny, CPU).

One uninterrupted 12-step run (module fixture) feeds most checks: events at steps 3 and 7 (stem + block 1,
then block 2), a 3-step switch warmup after each, a checkpoint every 4 steps; step 8 is inside the second
warmup, and the resume from that checkpoint must continue bitwise like the uninterrupted run.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import (  # noqa: E402
    TrainingArguments,
    VideoMAEConfig,
    VideoMAEForPreTraining,
    VideoMAEForVideoClassification,
)

from layerlock_plugin.adapters.huggingface import (  # noqa: E402
    LayerLockTrainer,
    LayerLockVideoMAEForPreTraining,
    check_transformers_version,
)
from layerlock_plugin.controller import LayerLockConfig  # noqa: E402
from layerlock_plugin.errors import CheckpointError, ConfigError, MissingDependencyError  # noqa: E402
from layerlock_plugin.masking import indices_to_mask, tube_masking  # noqa: E402
from layerlock_plugin.schedule import ScheduleConfig  # noqa: E402
from layerlock_plugin.warmup import WarmupConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

FRAMES, SIZE, PATCH, TUBELET, DEPTH = 4, 32, 8, 2, 4
N = (FRAMES // TUBELET) * (SIZE // PATCH) ** 2  # 32 tokens
STEPS, STOP = 12, 8


def tiny_config(**kw) -> VideoMAEConfig:
    base = dict(image_size=SIZE, patch_size=PATCH, num_channels=3, num_frames=FRAMES, tubelet_size=TUBELET,
                hidden_size=32, num_hidden_layers=DEPTH, num_attention_heads=2, intermediate_size=64,
                decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                decoder_intermediate_size=32, hidden_dropout_prob=0.1, use_mean_pooling=False)
    return VideoMAEConfig(**{**base, **kw})


def tiny_model(seed: int = 0) -> LayerLockVideoMAEForPreTraining:
    torch.manual_seed(seed)
    return LayerLockVideoMAEForPreTraining(tiny_config())


def ll_config(max_frozen: int = 2) -> LayerLockConfig:
    return LayerLockConfig(schedule=ScheduleConfig(pixel_steps=3, interval=4, max_frozen=max_frozen),
                           warmup=WarmupConfig(steps=3))


class Clips(torch.utils.data.Dataset):
    """16 random clips in transformers' layout ``[T, C, H, W]``."""

    def __init__(self, n: int = 16):
        self.x = torch.randn(n, FRAMES, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i]}


def training_args(out, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=1e-3,
                weight_decay=0.05, lr_scheduler_type="linear", save_strategy="steps", save_steps=4, logging_steps=1,
                report_to=[], use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0)
    return TrainingArguments(**{**base, **kw})


def make_trainer(model, out, config=None, **kw) -> LayerLockTrainer:
    return LayerLockTrainer(model=model, args=training_args(out, **kw), train_dataset=Clips(),
                            layerlock=config or ll_config(), mask_ratio=0.5, verbose=False)


class OptimizerLoadProbe(LayerLockTrainer):
    """Records, when HF loads the optimizer state, what is frozen and which readouts the optimizer holds."""

    seen: dict = {}

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)

        def probe(opt, state):
            held = {id(p) for g in opt.param_groups for p in g["params"]}
            self.seen.update(stem_frozen=not self.model.videomae.embeddings.patch_embeddings.projection.weight.requires_grad,
                             frozen_blocks=[not next(m.parameters()).requires_grad for m in self.model.videomae.encoder.layer],
                             readouts_held=all(id(p) in held for m in self.model.readouts().values() for p in m.parameters()))

        optimizer.register_load_state_dict_pre_hook(probe)
        return optimizer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The uninterrupted run, with TensorBoard logging (``report_to``) and a snapshot of each freeze event."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # set up before the function-scoped one_thread fixture
    root = tmp_path_factory.mktemp("hf")
    model = tiny_model()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = make_trainer(model, root / "full", report_to=["tensorboard"])
    snapshots = {}
    trainer.layerlock.on_event(lambda e: snapshots.setdefault(e.step, {k: v.clone() for k, v in model.state_dict().items()}))
    trainer.train()
    torch.set_num_threads(threads)
    return dict(root=root, model=model, trainer=trainer, initial=initial, snapshots=snapshots)


def test_pixel_phase_is_videomaes_own_pretraining_loss(tmp_path):
    model = tiny_model().eval()
    trainer = make_trainer(model, tmp_path)
    x = Clips().x[:4]
    _, masked = tube_masking(4, (FRAMES // TUBELET, SIZE // PATCH, SIZE // PATCH), 0.5, generator=torch.Generator().manual_seed(1))
    mask = indices_to_mask(masked, N)
    with torch.no_grad():
        ours = trainer.compute_loss(model, {"pixel_values": x, "bool_masked_pos": mask})
        hf = VideoMAEForPreTraining.forward(model, x, mask).loss
        assert torch.equal(model(x, mask).loss, hf)  # without heads= the subclass is VideoMAE unchanged
    assert torch.allclose(ours, hf, rtol=1e-6, atol=0), (float(ours), float(hf))


def test_freeze_events_targets_switch_and_metrics_reach_the_logs(run):
    trainer = run["trainer"]
    assert [(e.step, e.num_frozen, e.heads) for e in trainer.events] == [(3, 1, ("layer_1",)), (7, 2, ("layer_2",))]
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == STEPS
    assert [h["layerlock/num_frozen"] for h in logs] == [0] * 3 + [1] * 4 + [2] * 5
    assert [h["layerlock/warmup_factor"] < 1 for h in logs] == [False] * 3 + [True] * 3 + [False] + [True] * 3 + [False] * 2
    # the same scalars went to TensorBoard through report_to
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = [d for d, _, files in os.walk(run["root"] / "full") if any(f.startswith("events.") for f in files)]
    acc = EventAccumulator(runs[0])
    acc.Reload()
    assert [s.value for s in acc.Scalars("train/layerlock/num_frozen")][-1] == 2


def test_frozen_means_frozen_and_readouts_train_after_their_switch(run):
    model, trainer, snapshots, initial = run["model"], run["trainer"], run["snapshots"], run["initial"]
    final = model.state_dict()
    frozen_at = {3: ["videomae.embeddings.", "videomae.encoder.layer.0."], 7: ["videomae.encoder.layer.1."]}
    for step, prefixes in frozen_at.items():
        keys = [k for k in final if k.startswith(tuple(prefixes))]
        assert keys and all(torch.equal(final[k], snapshots[step][k]) for k in keys), f"moved after step {step}"
        assert not any(torch.equal(final[k], initial[k]) for k in keys if k.endswith("weight")), "trained before"
    optimizer = trainer.layerlock.optimizers[0]
    for p in trainer.layerlock.freezer.frozen_parameters():
        assert not p.requires_grad and p.grad is None and p not in optimizer.state
    assert all(not m.training for m in model.videomae.encoder.layer[:2])  # dropout off though HF calls train()
    assert all(p.requires_grad for p in model.videomae.encoder.layer[2:].parameters())
    # layer_1 trained from step 3 on, layer_2 from 7; layer_3 never targeted: never moved (weight decay included)
    for head, moved in (("layer_1", True), ("layer_2", True), ("layer_3", False)):
        key = f"layerlock_readouts.{head}.weight"
        assert torch.equal(final[key], snapshots[3][key]) is not moved, head
    assert not torch.equal(final["decoder.head.weight"], initial["decoder.head.weight"])  # the pixel readout trained


def test_resume_inside_a_switch_warmup_is_bitwise_exact(run, tmp_path):
    full, root = run["trainer"], run["root"]
    OptimizerLoadProbe.seen = {}
    model = tiny_model(seed=123)  # different init: everything must come from the checkpoint
    trainer = OptimizerLoadProbe(model=model, args=training_args(tmp_path), train_dataset=Clips(),
                                 layerlock=ll_config(), mask_ratio=0.5, verbose=False)
    trainer.train(resume_from_checkpoint=str(root / "full" / f"checkpoint-{STOP}"))
    # the frozen set (stem + 2 blocks) was restored and every readout was in the optimizer before HF loaded its state
    assert OptimizerLoadProbe.seen == dict(stem_frozen=True, frozen_blocks=[True, True, False, False], readouts_held=True)
    assert [(e.step, e.num_frozen, e.resumed) for e in trainer.events] == [(STOP - 1, 2, True)]
    a, b = run["model"].state_dict(), model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    opt_a = torch.load(root / "full" / f"checkpoint-{STEPS}" / "optimizer.pt", weights_only=True)
    opt_b = torch.load(tmp_path / f"checkpoint-{STEPS}" / "optimizer.pt", weights_only=True)
    assert opt_a["param_groups"] == opt_b["param_groups"] and opt_a["state"].keys() == opt_b["state"].keys()
    for i, s in opt_a["state"].items():
        assert all(torch.equal(s[k], opt_b["state"][i][k]) for k in s), i
    losses = lambda t: [h["loss"] for h in t.state.log_history if "loss" in h and h["step"] > STOP]  # noqa: E731
    assert losses(trainer) == losses(full) and len(losses(trainer)) == STEPS - STOP
    assert trainer.layerlock.state_dict() == full.layerlock.state_dict()


def test_resume_refuses_inconsistent_or_foreign_layerlock_state(run, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(run["root"] / "full" / f"checkpoint-{STOP}", ckpt)
    shutil.copy(run["root"] / "full" / "checkpoint-4" / "layerlock.pt", ckpt / "layerlock.pt")
    with pytest.raises(CheckpointError, match="inconsistent"):
        make_trainer(tiny_model(), tmp_path / "a").train(resume_from_checkpoint=str(ckpt))
    with pytest.raises(CheckpointError, match="different config"):
        make_trainer(tiny_model(), tmp_path / "b", ll_config(max_frozen=3)).train(
            resume_from_checkpoint=str(run["root"] / "full" / f"checkpoint-{STOP}"))


def test_encoder_round_trip_into_video_classification(run, tmp_path):
    trainer, model = run["trainer"], run["model"]
    trainer.save_encoder(tmp_path / "encoder")
    assert model.config.architectures != ["VideoMAEModel"]  # the pretraining model's config is left alone
    clf, info = VideoMAEForVideoClassification.from_pretrained(tmp_path / "encoder", num_labels=5, output_loading_info=True)
    assert info["missing_keys"] == {"classifier.weight", "classifier.bias"}
    assert not info["unexpected_keys"] and not info["mismatched_keys"] and not info["error_msgs"]
    enc = model.videomae.state_dict()
    assert enc.keys() == clf.videomae.state_dict().keys()
    assert all(torch.equal(v, clf.videomae.state_dict()[k]) for k, v in enc.items())
    clf.save_pretrained(tmp_path / "clf")
    again, info = VideoMAEForVideoClassification.from_pretrained(tmp_path / "clf", output_loading_info=True)
    assert not any(info.values())
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in clf.state_dict().items())
    assert again(Clips().x[:2]).logits.shape == (2, 5)


# ------------------------------------------------------------------------------------------- bad input
def test_bad_models_and_configs_are_refused_before_training(tmp_path):
    torch.manual_seed(0)
    with pytest.raises(ConfigError, match="LayerLockVideoMAEForPreTraining") as info:
        make_trainer(VideoMAEForPreTraining(tiny_config()), tmp_path)
    assert info.value.field == "model"
    with pytest.raises(ConfigError) as info:
        make_trainer(tiny_model(), tmp_path, ll_config(max_frozen=DEPTH))
    assert info.value.field == "schedule.max_frozen" and f"({DEPTH})" in str(info.value)
    with pytest.raises(ConfigError) as info:
        LayerLockTrainer(model=tiny_model(), args=training_args(tmp_path), train_dataset=Clips(), layerlock=ll_config(),
                         mask_ratio=1.0)
    assert info.value.field == "mask_ratio"
    with pytest.raises(ConfigError) as info:
        make_trainer(tiny_model(), tmp_path, {"schedule": {"interval": 0}})  # the plain-dict form
    assert info.value.field == "schedule.interval"
    with pytest.raises(ConfigError) as info:  # pixel targets are VideoMAE's own: config.norm_pix_loss decides
        make_trainer(tiny_model(), tmp_path, LayerLockConfig.from_dict({"target": {"kind": "pixels", "normalize_pixels": False}}))
    assert info.value.field == "target.normalize_pixels"


def test_an_optimizer_without_the_readouts_is_refused(tmp_path):
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.videomae.parameters(), lr=1e-3)
    trainer = LayerLockTrainer(model=model, args=training_args(tmp_path), train_dataset=Clips(), layerlock=ll_config(),
                               optimizers=(optimizer, None))
    with pytest.raises(ConfigError, match=r"does not hold the readouts \['pixels', 'layer_1'") as info:
        trainer.train()
    assert info.value.field == "optimizers"


def test_bool_masked_pos_with_unequal_counts_is_refused_before_any_update(tmp_path):
    class Ragged(Clips):
        def __getitem__(self, i):
            mask = torch.zeros(N, dtype=torch.bool)
            mask[: 8 + i % 2] = True  # rows mask 8 or 9 tokens
            return {"pixel_values": self.x[i], "bool_masked_pos": mask}

    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = LayerLockTrainer(model=model, args=training_args(tmp_path), train_dataset=Ragged(), layerlock=ll_config())
    with pytest.raises(ConfigError, match=r"same number of tokens.*got \[[89], [89], [89], [89]\]") as info:
        trainer.train()
    assert info.value.field == "bool_masked_pos"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_transformers_outside_the_tested_range_is_refused():
    for version in ("4.57.1", "5.16.1", "6.0.0"):
        with pytest.raises(MissingDependencyError, match=rf"transformers>=5\.17,<6.*found transformers {version}.*layerlock-plugin\[hf\]"):
            check_transformers_version(version)
    check_transformers_version("5.17.0")
    check_transformers_version("5.25.0.dev0")


@pytest.mark.parametrize("missing", ["transformers", "accelerate"])
def test_missing_extra_names_it(monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)
    for name in [m for m in sys.modules if m.startswith("layerlock_plugin.adapters.huggingface")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(MissingDependencyError, match=r'pip install "layerlock-plugin\[hf\]"'):
        importlib.import_module("layerlock_plugin.adapters.huggingface")


def test_ddp_without_find_unused_parameters_is_refused_with_the_fix(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from layerlock_plugin.adapters.huggingface import LayerLockCallback

    trainer = make_trainer(tiny_model(), tmp_path)
    callback = LayerLockCallback(trainer)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        for find_unused in (True, False):
            trainer.model_wrapped = DistributedDataParallel(torch.nn.Linear(2, 2), find_unused_parameters=find_unused)
            if find_unused:
                callback.on_train_begin(trainer.args, trainer.state, trainer.control)
            else:
                with pytest.raises(ConfigError, match="must be True under DDP") as info:
                    callback.on_train_begin(trainer.args, trainer.state, trainer.control)
                assert info.value.field == "TrainingArguments.ddp_find_unused_parameters"
        trainer.model_wrapped = None
    finally:
        dist.destroy_process_group()


def test_gradient_accumulation_plans_per_optimizer_step(tmp_path):
    """Two micro-batches per optimizer step: both see the plan of that step (begin_step runs once per step), and
    the micro-batch index (part of the mask seed) restarts at every step."""
    model = tiny_model()
    trainer = LayerLockTrainer(model=model, args=training_args(tmp_path, max_steps=5, per_device_train_batch_size=2,
                                                               gradient_accumulation_steps=2, save_strategy="no"),
                               train_dataset=Clips(), layerlock=ll_config(max_frozen=1), mask_ratio=0.5, verbose=False)
    seen = []
    original = trainer.compute_loss

    def spy(model, inputs, **kw):
        seen.append((trainer.state.global_step, trainer.micro_batch, trainer.layerlock.plan.num_frozen))
        return original(model, inputs, **kw)

    trainer.compute_loss = spy
    trainer.train()
    assert seen == [(s, m, int(s >= 3)) for s in range(5) for m in (0, 1)]
    assert [(e.step, e.num_frozen) for e in trainer.events] == [(3, 1)]
