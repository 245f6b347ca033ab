"""Worker for tests/test_hf_ddp.py: a 2-process LayerLockTrainer run (gloo, CPU) across two freeze events.

Run as ``python -m torch.distributed.run --nproc_per_node 2 tests/hf_ddp_worker.py OUT_DIR``. Each rank
writes ``OUT_DIR/rank{r}.pt``: its final weights, the weights at each freeze event (taken at the event,
before that step's update), whether a frozen parameter kept a gradient, and how DDP was set up.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from teardown_abort import save_atomic
from test_hf_videomae import Clips, ll_config, tiny_model, training_args  # tests/ is sys.path[0] as a script

from layerlock_plugin.adapters.huggingface import LayerLockTrainer


def main(out: Path) -> None:
    torch.set_num_threads(1)
    model = tiny_model()
    trainer = LayerLockTrainer(model=model, args=training_args(out / "run", max_steps=10, save_strategy="no",
                                                               logging_steps=5, ddp_backend="gloo"),
                               train_dataset=Clips(32), layerlock=ll_config(), mask_ratio=0.5, verbose=False)
    snapshots = {}
    trainer.layerlock.on_event(lambda e: snapshots.setdefault(e.step, {k: v.clone() for k, v in model.state_dict().items()}))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train()
    ddp = trainer.model_wrapped
    save_atomic({"state": model.state_dict(), "initial": initial, "snapshots": snapshots,
                "events": [(e.step, e.num_frozen) for e in trainer.events], "world_size": dist.get_world_size(),
                "wrapper": type(ddp).__name__, "find_unused": getattr(ddp, "find_unused_parameters", None),
                "frozen_have_grad": [p.grad is not None for p in trainer.layerlock.freezer.frozen_parameters()]},
               out / f"rank{dist.get_rank()}.pt")
    # release the DDP wrapper (it holds the process group) before destroying the group: gloo work left to
    # interpreter finalization can abort the process
    del trainer, ddp
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
