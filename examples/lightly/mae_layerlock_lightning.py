"""LayerLock on lightly's image MAE with PyTorch Lightning (mirrors lightly's examples/pytorch_lightning/mae.py).

    python examples/lightly/mae_layerlock_lightning.py          # MAE and LayerLock, same budget, + probes

The LightningModule is lightly's MAE example with backbone + decoder wrapped in ``LayerLockMAE``; LayerLock
itself is one line: ``Trainer(callbacks=[LayerLockCallback()])``. The callback drives the module's
controller (freezing, target switch, LR warmup through the optimizer, collapse guard, ``layerlock/*``
metrics, LayerLock state in the checkpoint under ``checkpoint["layerlock"]``).
"""

from __future__ import annotations

import time

from common import (LayerLockMAE, N_TRAIN, build_backbone_and_decoder, digits, example_args, layerlock_config, probe,
                    quiet_lightning, require_adapter)

LayerLockCallback = require_adapter("lightning").LayerLockCallback

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, RandomSampler, TensorDataset  # noqa: E402


class MAE(pl.LightningModule):
    def __init__(self, method: str, steps: int):
        super().__init__()
        backbone, decoder = build_backbone_and_decoder()
        self.steps = steps
        self.mae = LayerLockMAE(backbone, decoder, layerlock_config(method, steps), mask_ratio=0.75)

    def training_step(self, batch, batch_idx):
        images = batch[0]
        out = self.mae(images)                     # masking, targets, student, decoder, loss
        self.log("train_loss", out.loss)
        return out.loss

    def configure_optimizers(self):
        optim = torch.optim.AdamW(self.parameters(), lr=1.5e-3, weight_decay=0.05)   # readouts pre-created
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, self.steps)
        return {"optimizer": optim, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def main() -> None:
    args = example_args(__doc__.splitlines()[0], out="runs/lightly_lightning")  # everything goes under --out
    quiet_lightning()
    images, labels = digits()
    results = {}
    for method in args.methods:
        pl.seed_everything(args.seed, verbose=False)
        model = MAE(method, args.steps)
        data = TensorDataset(images[:N_TRAIN])
        sampler = RandomSampler(data, replacement=True, num_samples=args.steps * args.batch_size,
                                generator=torch.Generator().manual_seed(args.seed))
        loader = DataLoader(data, batch_size=args.batch_size, sampler=sampler)
        trainer = pl.Trainer(
            max_steps=args.steps, accelerator="cpu", devices=1, enable_progress_bar=False,
            enable_model_summary=False, log_every_n_steps=50, default_root_dir=f"{args.out}/{method}",
            logger=pl.loggers.CSVLogger(args.out, name=method),
            callbacks=[LayerLockCallback()],       # <- LayerLock
        )
        t0 = time.time()
        trainer.fit(model, loader)
        results[method] = probe(model.mae.backbone, images, labels)
        print(f"[{method}] pretraining {time.time() - t0:.0f} s, probe accuracy {results[method]:.3f}, "
              f"metrics in {trainer.logger.log_dir}/metrics.csv")
    print(f"linear probe on held-out digits ({args.steps} steps x {args.batch_size} images each):")
    for name, acc in results.items():
        print(f"  {name:14s} {acc:.3f}")


if __name__ == "__main__":
    main()
