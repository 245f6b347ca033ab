"""LayerLock in a hand-written training loop: the core API on the reference video MAE.

    python examples/custom_loop.py --steps 120

The loop is what you would add to your own trainer: ``begin_step`` (freeze on schedule, switch target,
LR warmup), ``targets`` (from the frozen prefix, no autograd), the student forward with its frozen
prefix run without autograd, ``loss``, ``end_step`` (collapse guard), and the LayerLock state in the
checkpoint.

The clips are standardised per colour channel, as in the main job (``layerlock-train``): on raw [0, 1]
clips this tiny ViT's latent targets shrink toward a constant after the switch to them (their
``feature_std`` falls below the guard's ``min_feature_std`` of 0.05 within 120 steps), the loss falls
toward 0 without anything being learned, and the collapse guard says so (policy ``warn``: it prints
and training goes on).
"""

import argparse

import torch

from layerlock_plugin.controller import LayerLock, LayerLockConfig
from layerlock_plugin.masking import random_masking
from layerlock_plugin.reference.data import DigitsVideoConfig, DigitsVideoDataset
from layerlock_plugin.reference.model import ModelConfig, VideoMAE
from layerlock_plugin.schedule import ScheduleConfig
from layerlock_plugin.warmup import WarmupConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    args = parser.parse_args()
    torch.manual_seed(0)

    model_cfg = ModelConfig.tiny(mask_ratio=0.9)
    config = LayerLockConfig(schedule=ScheduleConfig(pixel_steps=args.steps // 3, interval=args.steps // 6, max_frozen=3),
                             warmup=WarmupConfig(steps=10))
    model = VideoMAE(model_cfg, latent_target_layers=range(1, 4))   # one readout per possible target
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    ll = LayerLock(model, config, optimizer, tubelet=model_cfg.tubelet, total_steps=args.steps)
    ll.on_event(lambda event: print(event.describe()))
    data = DigitsVideoDataset(DigitsVideoConfig(num_videos=256, standardize=True), "train", cache=True)  # see above

    for step in range(args.steps):
        batch = torch.stack([data[(step * 16 + i) % len(data)]["video"] for i in range(16)])   # [B, C, T, H, W]
        plan = ll.begin_step(step)
        visible_idx, masked_idx = random_masking(batch.shape[0], model.num_patches, model_cfg.mask_ratio)
        targets = ll.targets(batch, plan, masked_idx)                        # {head: [B, Q, P]}
        preds = model(batch, visible_idx, masked_idx, heads=list(targets), frozen_prefix=ll.frozen_prefix(plan))
        loss, parts = ll.loss(preds, targets)
        loss.backward()
        if not ll.end_step(loss, targets).skip:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 20 == 0 or step == args.steps - 1:
            m = ll.metrics()
            print(f"step {step:4d} loss {loss.item():.4f} frozen {int(m['layerlock/num_frozen'])} "
                  f"target {ll.heads()[-1]} lr-factor {m['layerlock/warmup_factor']:.2f}")

    checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "layerlock": ll.state_dict()}
    print(f"collapse guard: {int(ll.metrics()['layerlock/guard_trips'])} trips (a trip prints a line with the "
          f"statistic below its threshold)")
    print(f"done; checkpoint keys: {sorted(checkpoint)}; LayerLock resumes at step {checkpoint['layerlock']['next_step']}")


if __name__ == "__main__":
    main()
