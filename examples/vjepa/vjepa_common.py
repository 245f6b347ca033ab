"""What the V-JEPA and V-JEPA 2 examples share and neither host changes: the command line, the data, V-JEPA's
``init_opt`` (AdamW, no weight decay on biases and norms), the LayerLock config and checkpoint / resume."""

from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path

import torch
import torch.distributed as dist

from layerlock_plugin.checkpoint import load_checkpoint, save_atomic
from layerlock_plugin.controller import LayerLockConfig  # [LayerLock]
from layerlock_plugin.reference.data import DigitsVideoConfig, DigitsVideoDataset
from layerlock_plugin.schedule import ScheduleConfig  # [LayerLock]
from layerlock_plugin.warmup import WarmupConfig  # [LayerLock]


def parse_args(argv=None, methods=("layerlock", "vjepa")) -> argparse.Namespace:
    """The examples' command line; ``methods[1]`` runs the host's original lines."""
    p = argparse.ArgumentParser(description="LayerLock on a V-JEPA train step (tiny, CPU)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--method", choices=methods, default=methods[0])
    p.add_argument("--teacher-frozen", choices=("follow", "stop"), default="follow")
    p.add_argument("--ckpt", type=Path, default=None, help="checkpoint path (resumes from it if it exists)")
    p.add_argument("--stop-at", type=int, default=None, help="stop after this many steps (to test resume)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny models: 1 is fastest)")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def setup_distributed(args: argparse.Namespace) -> tuple[int, int]:
    """Threads, seed and (under torchrun, which sets WORLD_SIZE) a gloo process group: ``(world_size, rank)``."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    return world_size, dist.get_rank() if dist.is_initialized() else 0


def build(args, init_video_model, make_mask_collator, schedulers, frames: int, crop: int):
    """What both train.py files build before the loop (same seed on every rank: DDP also broadcasts rank 0's
    weights): ``(encoder, predictor, target_encoder, mask_collator, dataset, optimizer, lr / wd schedulers)``."""
    encoder, predictor = init_video_model()
    target_encoder = copy.deepcopy(encoder)
    optimizer, scheduler, wd_scheduler = init_opt(encoder, predictor, args.steps, *schedulers)
    return encoder, predictor, target_encoder, make_mask_collator(), data(frames, crop), optimizer, scheduler, wd_scheduler


def data_config(frames: int = 4, crop: int = 32) -> DigitsVideoConfig:
    """The embedded moving-digits clips at the tiny models' size (also what benchmarks probe on)."""
    return DigitsVideoConfig(num_videos=256, num_frames=frames, size=crop)


def data(frames: int, crop: int) -> DigitsVideoDataset:
    """The training clips, ``{"video": [C, T, H, W]}`` each."""
    return DigitsVideoDataset(data_config(frames, crop), "train", cache=True)


def init_opt(encoder, predictor, steps: int, warmup_cosine, cosine_wd):
    """V-JEPA's ``init_opt`` (the same in V-JEPA 2): ``(optimizer, lr scheduler, wd scheduler)``."""
    def groups(module, decay: bool) -> list:
        return [p for n, p in module.named_parameters() if ("bias" not in n and len(p.shape) != 1) == decay]

    param_groups = [{"params": groups(encoder, True)}, {"params": groups(predictor, True)},
                    {"params": groups(encoder, False), "WD_exclude": True, "weight_decay": 0},
                    {"params": groups(predictor, False), "WD_exclude": True, "weight_decay": 0}]
    optimizer = torch.optim.AdamW(param_groups)
    scheduler = warmup_cosine(optimizer, warmup_steps=steps // 10, start_lr=2e-4, ref_lr=1e-3, final_lr=1e-5, T_max=steps)
    return optimizer, scheduler, cosine_wd(optimizer, ref_wd=0.04, final_wd=0.4, T_max=steps)


def layerlock_config(steps: int) -> LayerLockConfig:  # [LayerLock]
    """Freeze 2 of the 4 blocks: events at 1/3 and 2/3 of the run, a short LR warmup after each."""  # [LayerLock]
    return LayerLockConfig(  # [LayerLock]
        schedule=ScheduleConfig(pixel_steps=steps // 3, interval=steps // 3, max_frozen=2),  # [LayerLock]
        warmup=WarmupConfig(steps=max(1, steps // 12)),  # [LayerLock]
    )  # [LayerLock]


def _inner(module):
    return module.module if hasattr(module, "module") else module  # DDP / LayerLockDDP


def resume(args, encoder, predictor, target_encoder, optimizer, layerlock) -> int:
    """Load ``args.ckpt`` if it exists (weights, then LayerLock, then the optimizer); returns the start step."""
    if args.ckpt is None or not args.ckpt.exists():
        return 0
    ckpt = load_checkpoint(args.ckpt)
    _inner(encoder).load_state_dict(ckpt["encoder"])
    _inner(predictor).load_state_dict(ckpt["predictor"])
    target_encoder.load_state_dict(ckpt["target_encoder"])
    if layerlock is not None:
        layerlock.load_state_dict(ckpt["layerlock"])  # [LayerLock] re-freezes; before the optimizer state
    optimizer.load_state_dict(ckpt["opt"])
    return int(ckpt["step"])


def fast_forward(start_step: int, *steppers) -> None:
    """Advance the host's schedules (``scheduler.step``, ``mask_collator.step``, ...) to a resumed run's step."""
    for _ in range(start_step):
        for step in steppers:
            step()


def step_videos(args, rank: int, step: int, dataset) -> list[torch.Tensor]:
    """The clips of one step, ``[C, T, H, W]`` each: a function of (seed, rank, step) only, so an interrupted run
    resumes exactly. The global RNG is seeded too: the hosts' mask collators draw block positions from it."""
    gen = torch.Generator().manual_seed(args.seed * 100_003 + rank * 1_009 + step)
    index = torch.randint(len(dataset), (args.batch_size,), generator=gen)
    torch.manual_seed(args.seed * 100_003 + rank * 1_009 + step)
    return [dataset[int(i)]["video"] for i in index]


def save(args, rank: int, step: int, encoder, predictor, target_encoder, optimizer, layerlock) -> None:
    """Rank 0 writes ``args.ckpt`` atomically (when given)."""
    if rank != 0 or args.ckpt is None:
        return
    save_atomic({"encoder": _inner(encoder).state_dict(), "predictor": _inner(predictor).state_dict(),
                 "opt": optimizer.state_dict(), "target_encoder": target_encoder.state_dict(), "step": step,
                 "layerlock": layerlock.state_dict() if layerlock is not None else None}, args.ckpt)  # [LayerLock]
