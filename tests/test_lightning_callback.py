"""LayerLockCallback: LayerLock in a Lightning Trainer (CPU, single process, tiny models)."""

from __future__ import annotations

import csv
import warnings
from types import SimpleNamespace

import pytest
import torch

timm = pytest.importorskip("timm")
pytest.importorskip("lightly")
pl = pytest.importorskip("pytorch_lightning")

from lightly.models.modules import MAEDecoderTIMM, MaskedVisionTransformerTIMM  # noqa: E402
from pytorch_lightning.callbacks import ModelCheckpoint  # noqa: E402
from pytorch_lightning.loggers import CSVLogger  # noqa: E402
from pytorch_lightning.strategies import DDPStrategy  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from layerlock_plugin.adapters.lightly_mae import LayerLockMAE  # noqa: E402
from layerlock_plugin.adapters.lightning import LayerLockCallback  # noqa: E402
from layerlock_plugin.controller import LayerLock, LayerLockConfig  # noqa: E402
from layerlock_plugin.errors import ConfigError, EncoderStructureError  # noqa: E402
from layerlock_plugin.masking import random_masking  # noqa: E402
from layerlock_plugin.schedule import ScheduleConfig  # noqa: E402
from layerlock_plugin.warmup import WarmupConfig  # noqa: E402

IMG, PATCH, DEPTH, DIM = 32, 8, 4, 48
N = (IMG // PATCH) ** 2
BATCHES_PER_EPOCH = 4


def ll_config() -> LayerLockConfig:
    # events at steps 3 (freeze stem + block 1, target layer_1) and 6 (block 2, target layer_2);
    # a 4-step warmup after each, so a checkpoint at step 8 is inside the second warmup.
    return LayerLockConfig(schedule=ScheduleConfig(pixel_steps=3, interval=3, max_frozen=2), warmup=WarmupConfig(steps=4))


def tiny_vit():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=IMG, patch_size=PATCH,
                             depth=DEPTH, embed_dim=DIM, num_heads=3, drop_rate=0.1)


class LitMAE(pl.LightningModule):
    """lightly's MAE example as a LightningModule, with LayerLockMAE in place of backbone + decoder."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            decoder = MAEDecoderTIMM(num_patches=N, patch_size=PATCH, embed_dim=DIM, decoder_embed_dim=32,
                                     decoder_depth=1, decoder_num_heads=2)
        self.mae = LayerLockMAE(MaskedVisionTransformerTIMM(vit=tiny_vit()), decoder, ll_config(), mask_ratio=0.75)

    def training_step(self, batch, batch_idx):
        torch.manual_seed(1000 + self.global_step)  # masks + dropout a function of the step (exact resume)
        out = self.mae(batch[0])
        self.log("train_loss", out.loss)
        return out.loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.05)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.05 * s))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def loader() -> DataLoader:
    x = torch.randn(BATCHES_PER_EPOCH * 4, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x), batch_size=4, shuffle=False)


def trainer(max_steps: int, tmp_path, **kw) -> pl.Trainer:
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    return pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
                      **kw)


def frozen_state(module: LitMAE):
    vit = module.mae.backbone.vit
    return [p.requires_grad for p in vit.blocks.parameters()], vit.patch_embed.proj.weight.requires_grad


def test_fit_across_freeze_and_switch_then_resume_is_exact(tmp_path):
    # uninterrupted run: 12 steps
    ref_model = LitMAE()
    ref_cb = LayerLockCallback(verbose=False)
    ref_logger = CSVLogger(tmp_path / "logs", name="ref")
    trainer(12, tmp_path / "ref", callbacks=[ref_cb], logger=ref_logger, log_every_n_steps=1).fit(ref_model, loader())
    assert [(e.step, e.num_frozen, e.heads) for e in ref_cb.events] == [(3, 1, ("layer_1",)), (6, 2, ("layer_2",))]
    ll = ref_model.mae.layerlock
    assert ll.plan.num_frozen == 2 and ll.next_step == 12

    # metrics reached the logger
    ref_logger.save()
    rows = list(csv.DictReader(open(f"{ref_logger.log_dir}/metrics.csv")))
    frozen = [float(r["layerlock/num_frozen"]) for r in rows if r.get("layerlock/num_frozen")]
    assert frozen[0] == 0 and frozen[-1] == 2
    assert any(r.get("layerlock/warmup_factor") and float(r["layerlock/warmup_factor"]) < 1 for r in rows)

    # interrupted run: 8 steps (= 2 epochs) with a checkpoint, inside the second switch warmup
    model_a = LitMAE()
    # A step-based checkpoint: Lightning 2.6 resumes a checkpoint written by `every_n_epochs=1` (at
    # on_train_epoch_end) as if the epoch were unfinished and runs one extra batch from a fresh
    # iterator, so the data order (not LayerLock) would differ from the uninterrupted run.
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    trainer(8, tmp_path / "a", callbacks=[LayerLockCallback(verbose=False), ckpt_cb],
            enable_checkpointing=True).fit(model_a, loader())
    path = tmp_path / "ckpt" / "epoch=1-step=8.ckpt"
    assert path.exists(), sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["layerlock"]["next_step"] == 8

    # resume in a new Trainer with a freshly built (differently initialised) model
    model_b = LitMAE(seed=123)
    cb_b = LayerLockCallback(verbose=False)
    t_b = trainer(12, tmp_path / "b", callbacks=[cb_b])
    t_b.fit(model_b, loader(), ckpt_path=path)
    assert [(e.step, e.num_frozen, e.resumed) for e in cb_b.events] == [(7, 2, True)]
    assert model_b.mae.layerlock.plan.num_frozen == 2 and model_b.mae.layerlock.next_step == 12
    assert frozen_state(model_b) == frozen_state(ref_model)
    ref_state, b_state = ref_model.state_dict(), model_b.state_dict()
    assert ref_state.keys() == b_state.keys()
    for k in ref_state:
        assert torch.equal(ref_state[k], b_state[k]), k
    # frozen parameters have no optimizer state
    opt = t_b.optimizers[0]
    for p in model_b.mae.layerlock.freezer.frozen_parameters():
        assert p not in opt.state


def test_checkpoint_without_layerlock_state_is_tolerated(tmp_path):
    model = LitMAE()
    cb = LayerLockCallback(verbose=False)
    t = trainer(1, tmp_path, callbacks=[cb])
    cb.setup(t, model, "fit")
    cb.on_load_checkpoint(t, model, {})  # no "layerlock" key: nothing restored, no error
    assert model.mae.layerlock.next_step == 0


class LitEncoderOnly(pl.LightningModule):
    """The other way in: expose `layerlock_encoder` (a timm ViT) and call `self.layerlock.targets`."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.vit = tiny_vit()
        self.layerlock_encoder = self.vit
        self.readouts = torch.nn.ModuleDict({"pixels": torch.nn.Linear(DIM, PATCH * PATCH * 3),
                                             "layer_1": torch.nn.Linear(DIM, DIM),
                                             "layer_2": torch.nn.Linear(DIM, DIM)})

    def training_step(self, batch, batch_idx):
        x = batch[0]
        _, masked = random_masking(x.shape[0], N, 0.75)
        targets = self.layerlock.targets(x, None, masked)
        tokens = self.vit.forward_features(x)[:, self.vit.num_prefix_tokens:]   # toy student: all tokens
        q = torch.gather(tokens, 1, masked.unsqueeze(-1).expand(-1, -1, DIM))
        loss, _ = self.layerlock.loss({h: self.readouts[h](q) for h in targets}, targets)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_callback_builds_controller_from_layerlock_encoder(tmp_path):
    model = LitEncoderOnly()
    cb = LayerLockCallback(ll_config(), tubelet=(1, PATCH, PATCH), verbose=False)
    trainer(8, tmp_path, callbacks=[cb]).fit(model, loader())
    assert isinstance(model.layerlock, LayerLock)
    assert model.layerlock.plan.num_frozen == 2
    assert not any(p.requires_grad for p in model.vit.blocks[:2].parameters())
    assert all(p.requires_grad for p in model.vit.blocks[2:].parameters())
    assert cb.controller.guard.last_stats or cb.controller.guard.trips == 0


def test_unsupported_encoder_through_callback(tmp_path):
    model = LitEncoderOnly()
    model.layerlock_encoder = timm.create_model("resnet18", pretrained=False, num_classes=0)
    cb = LayerLockCallback(ll_config(), tubelet=(1, PATCH, PATCH))
    with pytest.raises(EncoderStructureError, match="not hierarchical|hierarchical"):
        trainer(2, tmp_path, callbacks=[cb]).fit(model, loader())


def test_module_without_encoder_or_controller_gets_clear_error(tmp_path):
    class Bare(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

        def training_step(self, batch, batch_idx):
            return self.lin(batch[0].flatten(1)[:, :2]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(EncoderStructureError, match="layerlock_encoder"):
        trainer(2, tmp_path, callbacks=[LayerLockCallback()]).fit(Bare(), loader())


def test_plain_ddp_is_refused_with_a_fix(tmp_path):
    """The check reads the DDP wrapper the strategy built (on_fit_start runs after strategy setup)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        for find_unused in (False, True):
            ddp = DistributedDataParallel(torch.nn.Linear(2, 2), find_unused_parameters=find_unused)
            trainer = SimpleNamespace(strategy=SimpleNamespace(model=ddp))
            if find_unused:
                LayerLockCallback._check_strategy(trainer)
            else:
                with pytest.raises(ConfigError, match="find_unused_parameters"):
                    LayerLockCallback._check_strategy(trainer)
    finally:
        dist.destroy_process_group()
    LayerLockCallback._check_strategy(SimpleNamespace(strategy=DDPStrategy()))  # not set up: nothing wrapped yet


def test_config_conflict_with_module_controller(tmp_path):
    model = LitMAE()
    cb = LayerLockCallback(LayerLockConfig().with_method("mae"))
    with pytest.raises(ConfigError, match="config=None"):
        cb.setup(trainer(1, tmp_path), model, "fit")
