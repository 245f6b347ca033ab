"""Can the reference architecture learn the probe tasks from their labels? The supervised rung's recipe.

The calibration ladder (``benchmarks/calibration.py``) needs an encoder trained on the labels that beats
random init. This study trains :class:`~layerlock_plugin.reference.eval.calibration.SupervisedEncoder` (the
packaged tiny architecture, mean-pooled tokens -> LayerNorm -> linear) with the pretraining optimizer
schedule (AdamW, warmup then cosine, gradient clipping) at a given peak learning rate on the first
``--clips`` train clips (batches drawn with replacement), and every sixth of the run reports the
running train loss and the model's own accuracy on 512 train clips and on 512 test clips (test digit
images are never in the train split). ``--set data.num_videos=48000`` makes (almost) every training clip
a fresh rendering, so the loss can only fall by learning the task, not by memorising clips.

    python benchmarks/supervised_recipe.py --quick
    python benchmarks/supervised_recipe.py --task motion --lr 1.5e-3 --tag motion-lr1.5e-3
    python benchmarks/supervised_recipe.py --task appearance --lr 6e-4 --set data.num_videos=48000 \\
        --set data.num_test_videos=512 --tag appearance-fresh

Writes ``benchmarks/results/supervised_recipe[-TAG].json`` (the curve, provenance).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_run_args, provenance, start_run, write_json  # noqa: E402

from layerlock_plugin.reference.eval.calibration import SupervisedEncoder  # noqa: E402
from layerlock_plugin.reference.config import load_config  # noqa: E402
from layerlock_plugin.reference.data import DigitsVideoDataset  # noqa: E402
from layerlock_plugin.reference.train.optim import cosine_with_warmup, param_groups  # noqa: E402

QUICK_SETS = ["data.num_videos=48", "data.num_test_videos=32"]


def batch(dataset: DigitsVideoDataset, idx: torch.Tensor, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    items = [dataset[int(i)] for i in idx]
    return torch.stack([it["video"] for it in items]), torch.stack([it[task] for it in items])


@torch.no_grad()
def accuracy(model: SupervisedEncoder, dataset: DigitsVideoDataset, n: int, task: str) -> float:
    """The model's own classifier on the first ``n`` clips of ``dataset`` (eval mode)."""
    model.eval()
    idx = torch.arange(min(n, len(dataset)))
    correct = 0
    for chunk in idx.split(256):
        video, labels = batch(dataset, chunk, task)
        correct += int((model(video).argmax(1) == labels).sum())
    model.train()
    return correct / len(idx)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="12 steps on 48 clips: a smoke run")
    p.add_argument("--task", default="motion", choices=("motion", "appearance"))
    p.add_argument("--lr", type=float, default=1.5e-3, help="peak learning rate")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--clips", type=int, default=0, help="train on the first CLIPS clips (0: all)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    add_run_args(p)
    args = p.parse_args(argv)
    suffix = start_run(args)
    steps = 12 if args.quick else args.steps
    cfg = load_config(None, (QUICK_SETS if args.quick else []) + args.sets)
    # Cache small splits; a large one (fresh clips) renders each clip when drawn (under a millisecond).
    train = DigitsVideoDataset(cfg.data, "train", cache=cfg.data.num_videos <= 4096)
    test = DigitsVideoDataset(cfg.data, "test", cache=cfg.data.split_size("test") <= 4096)
    n = args.clips or len(train)
    torch.manual_seed(0)
    model = SupervisedEncoder(cfg.model, train.num_classes[args.task])
    opt = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=args.lr, betas=tuple(cfg.optim.betas))
    warmup = max(1, round(cfg.optim.warmup_steps * steps / 1500))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(steps, warmup, cfg.optim.min_lr_ratio))
    g = torch.Generator().manual_seed(7)
    losses: list[float] = []
    curve = []
    started = time.perf_counter()
    for step in range(steps):
        video, labels = batch(train, torch.randint(0, n, (args.batch_size,), generator=g), args.task)
        loss = F.cross_entropy(model(video), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if (step + 1) % max(1, steps // 6) == 0:
            recent = losses[-50:]
            curve.append({"step": step + 1, "train_loss": sum(recent) / len(recent),
                          "train_acc": accuracy(model, train, 512, args.task),
                          "test_acc": accuracy(model, test, 512, args.task),
                          "seconds": round(time.perf_counter() - started, 1)})
            print(" ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in curve[-1].items()),
                  flush=True)
    meta, results = provenance(), Path(args.results_dir)
    write_json(results / f"supervised_recipe{suffix}.json",
               {"study": "supervised_recipe", "provenance": meta, "task": args.task, "lr": args.lr,
                "steps": steps, "batch_size": args.batch_size, "clips": n, "sets": args.sets,
                "num_classes": train.num_classes[args.task], "curve": curve})
    lines = [f"Supervised {args.task} (K = {train.num_classes[args.task]}), peak lr {args.lr:g}, {n} train clips, "
             f"{steps} steps x {args.batch_size}{' ' + ' '.join(args.sets) if args.sets else ''}:", "",
             "| step | train loss | train acc | test acc | seconds |", "|---|---|---|---|---|"]
    lines += [f"| {c['step']} | {c['train_loss']:.3f} | {c['train_acc']:.3f} | {c['test_acc']:.3f} | {c['seconds']:.0f} |"
              for c in curve]
    lines += ["", f"{meta['machine']}, torch {meta['torch']}, {meta['layerlock_plugin']}, {meta['date_utc']}.",
              f"Command: `{meta['command']}`"]
    (results / f"supervised_recipe{suffix}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
