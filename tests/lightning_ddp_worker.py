"""Worker for tests/test_lightning_ddp.py: a 2-process Lightning DDP fit with LayerLockCallback.

Run as ``python tests/lightning_ddp_worker.py OUT_DIR``; Lightning's DDP launcher re-runs this script
for rank 1. Each rank writes ``OUT_DIR/rank{r}.pt`` with its final weights, the weights of the blocks
frozen at each freeze event (taken at the event, before that step's update), and the events it saw.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch

from layerlock_plugin.adapters.lightning import LayerLockCallback
from teardown_abort import save_atomic
from test_lightning_callback import LitMAE, loader  # tests/ is sys.path[0] when run as a script


def main(out: Path) -> None:
    warnings.filterwarnings("ignore")
    model = LitMAE()
    ll = model.mae.layerlock
    vit = model.mae.backbone.vit
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def snapshot(event) -> None:
        frozen = {f"blocks.{i}.{n}": p.detach().clone()
                  for i in range(event.num_frozen) for n, p in vit.blocks[i].named_parameters()}
        frozen.update({f"patch_embed.{n}": p.detach().clone() for n, p in vit.patch_embed.named_parameters()})
        snapshots[event.step] = frozen

    ll.on_event(snapshot)
    initial_last_block = {n: p.detach().clone() for n, p in vit.blocks[-1].named_parameters()}
    trainer = pl.Trainer(max_steps=12, accelerator="cpu", devices=2, strategy="ddp_find_unused_parameters_true",
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=out,
                         callbacks=[LayerLockCallback(verbose=False)])
    trainer.fit(model, loader())
    vit_state = {k: v.detach().clone() for k, v in vit.state_dict().items()}
    frozen_grads = [p.grad is not None for p in ll.freezer.frozen_parameters()]
    save_atomic({"vit": vit_state, "snapshots": snapshots, "initial_last_block": initial_last_block, "frozen_has_grad": frozen_grads,
                "events": [(e, n) for e, n in ll.schedule.events()], "num_frozen": ll.plan.num_frozen,
                "next_step": ll.next_step, "world_size": trainer.world_size},
               out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
