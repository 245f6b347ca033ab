"""LayerLock on lightly's image MAE, plain PyTorch (mirrors lightly's examples/pytorch/mae.py).

    python examples/lightly/mae_layerlock.py                 # MAE and LayerLock, same budget, + probes
    python examples/lightly/mae_layerlock.py --methods layerlock --steps 300

Each method pretrains the same tiny ViT (same init, same data order, same masks) on scikit-learn's
digits, then a linear probe on frozen mean-pooled features reports digit accuracy on held-out images.
"""

from __future__ import annotations

import time

import torch

from common import LayerLockMAE, N_TRAIN, build_backbone_and_decoder, digits, example_args, layerlock_config, probe


def pretrain(method: str, steps: int, batch_size: int, seed: int, images: torch.Tensor) -> LayerLockMAE:
    torch.manual_seed(seed)
    backbone, decoder = build_backbone_and_decoder()
    mae = LayerLockMAE(backbone, decoder, layerlock_config(method, steps), mask_ratio=0.75, total_steps=steps)
    optimizer = torch.optim.AdamW(mae.parameters(), lr=1.5e-3, weight_decay=0.05)   # readouts pre-created
    mae.layerlock.attach_optimizer(optimizer)
    mae.layerlock.on_event(lambda e: print(f"  [{method}] {e.describe()}"))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    gen = torch.Generator().manual_seed(seed)
    train = images[:N_TRAIN]
    mae.train()
    for step in range(steps):
        batch = train[torch.randint(len(train), (batch_size,), generator=gen)]
        mae.layerlock.begin_step(step)                       # freeze on schedule, switch target, LR warmup
        out = mae(batch)                                     # lightly masking, targets, student, decoder, loss
        out.loss.backward()
        if not mae.layerlock.end_step(out.loss, out.targets).skip:   # collapse guard
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if step % 100 == 0 or step == steps - 1:
            m = mae.layerlock.metrics()
            print(f"  [{method}] step {step:4d} loss {out.loss.item():.4f} target {list(out.targets)[0]} "
                  f"frozen {int(m['layerlock/num_frozen'])}")
    return mae


def main() -> None:
    args = example_args(__doc__.splitlines()[0])
    images, labels = digits()

    torch.manual_seed(args.seed)
    init_backbone, _ = build_backbone_and_decoder()
    results = {"random-init": probe(init_backbone, images, labels)}
    for method in args.methods:
        t0 = time.time()
        mae = pretrain(method, args.steps, args.batch_size, args.seed, images)
        results[method] = probe(mae.backbone, images, labels)
        print(f"  [{method}] pretraining {time.time() - t0:.0f} s, probe accuracy {results[method]:.3f}")
    print(f"linear probe on held-out digits ({args.steps} steps x {args.batch_size} images each):")
    for name, acc in results.items():
        print(f"  {name:14s} {acc:.3f}")


if __name__ == "__main__":
    main()
