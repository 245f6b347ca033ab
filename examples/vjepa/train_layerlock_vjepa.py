"""LayerLock on the official V-JEPA modules: V-JEPA's train step with the changed lines marked.

    pip install -e ".[vjepa]" && pip install --no-deps vjepa==0.1.2
    python examples/vjepa/train_layerlock_vjepa.py --steps 60                    # LayerLock-V-JEPA
    python examples/vjepa/train_layerlock_vjepa.py --steps 60 --method vjepa     # V-JEPA's own step (baseline)
    torchrun --nproc_per_node 2 examples/vjepa/train_layerlock_vjepa.py --steps 60   # DDP (gloo on CPU)
    python examples/vjepa/train_layerlock_vjepa.py --steps 60 --ckpt /tmp/vj.pt --stop-at 30   # then rerun
        # the same command without --stop-at: it resumes from /tmp/vj.pt

The structure follows V-JEPA's ``app/vjepa/train.py`` (model init, ``MaskCollator``, AdamW with
``WarmupCosineSchedule`` / ``CosineWDSchedule``, DDP with ``static_graph=True``, ``forward_target``,
``forward_context``, ``loss_fn``, the momentum update, checkpoint / resume). Every line LayerLock adds or
changes ends with ``# [LayerLock]``; with ``--method vjepa`` the original V-JEPA lines run instead (kept next
to them, marked ``# [V-JEPA]``). The models are tiny (4-block ViT, 32x32 clips of 4 frames from the
embedded moving-digits data) so that it runs on a CPU in seconds.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from layerlock_plugin.adapters.vjepa import LayerLockAdapter, LayerLockDDP, require_vjepa  # [LayerLock]

sys.path.insert(0, str(Path(__file__).resolve().parent))  # vjepa_common.py, shared with the V-JEPA 2 example
from vjepa_common import (build, data_config, fast_forward, init_opt, layerlock_config, parse_args,  # noqa: E402,F401
                          resume, save, setup_distributed, step_videos)

require_vjepa()  # a clear error naming the install line when the vjepa distribution is missing
from vjepa.masks.multiblock3d import MaskCollator  # noqa: E402
from vjepa.masks.utils import apply_masks  # noqa: E402
from vjepa.models.predictor import vit_predictor  # noqa: E402
from vjepa.models.utils.multimask import MultiMaskWrapper, PredictorMultiMaskWrapper  # noqa: E402
from vjepa.models.vision_transformer import VisionTransformer  # noqa: E402
from vjepa.utils.schedulers import CosineWDSchedule, WarmupCosineSchedule  # noqa: E402

# Tiny sizes (V-JEPA ViT-L: 224 px, 16 frames, patch 16, tubelet 2, depth 24, predictor depth 12).
CROP, FRAMES, PATCH, TUBELET = 32, 4, 8, 2
# V-JEPA's two multi-block mask configs (short- and long-range), scaled to a 4x4 grid of 2 time steps.
CFGS_MASK = [
    dict(spatial_scale=(0.15, 0.15), temporal_scale=(1.0, 1.0), aspect_ratio=(0.75, 1.5), num_blocks=4, max_temporal_keep=1.0),
    dict(spatial_scale=(0.5, 0.5), temporal_scale=(1.0, 1.0), aspect_ratio=(0.75, 1.5), num_blocks=1, max_temporal_keep=1.0),
]


def init_video_model(depth: int = 4, embed_dim: int = 48, pred_depth: int = 2, pred_embed_dim: int = 32):
    """V-JEPA's ``init_video_model`` at tiny size: ``MultiMaskWrapper(VisionTransformer)`` and
    ``PredictorMultiMaskWrapper(vit_predictor)`` with one mask token per mask config."""
    encoder = VisionTransformer(img_size=CROP, patch_size=PATCH, num_frames=FRAMES, tubelet_size=TUBELET,
                                embed_dim=embed_dim, depth=depth, num_heads=3,
                                norm_layer=partial(nn.LayerNorm, eps=1e-6))
    predictor = vit_predictor(img_size=CROP, patch_size=PATCH, num_frames=FRAMES, tubelet_size=TUBELET,
                              embed_dim=embed_dim, predictor_embed_dim=pred_embed_dim, depth=pred_depth, num_heads=2,
                              use_mask_tokens=True, num_mask_tokens=len(CFGS_MASK), zero_init_mask_tokens=True)
    return MultiMaskWrapper(encoder), PredictorMultiMaskWrapper(predictor)


def make_mask_collator() -> MaskCollator:
    return MaskCollator(cfgs_mask=CFGS_MASK, crop_size=(CROP, CROP), num_frames=FRAMES, patch_size=PATCH,
                        tubelet_size=TUBELET)


def main(argv=None) -> dict:
    args = parse_args(argv)
    layerlock_on = args.method == "layerlock"
    world_size, rank = setup_distributed(args)  # torchrun sets WORLD_SIZE: a gloo process group

    # -- init model, mask collator, data, optimizer and schedulers (V-JEPA's init_opt: AdamW, no WD on biases / norms)
    (encoder, predictor, target_encoder, mask_collator, dataset, optimizer, scheduler,
     wd_scheduler) = build(args, init_video_model, make_mask_collator, (WarmupCosineSchedule, CosineWDSchedule), FRAMES, CROP)
    if world_size > 1:
        if layerlock_on:
            encoder = LayerLockDDP(encoder, static_graph=True)  # [LayerLock] was DistributedDataParallel(...)
        else:
            encoder = nn.parallel.DistributedDataParallel(encoder, static_graph=True)  # [V-JEPA]
        predictor = nn.parallel.DistributedDataParallel(predictor, static_graph=True)
    for p in target_encoder.parameters():
        p.requires_grad = False

    # -- momentum schedule (V-JEPA: ema = [0.998, 1.0] over the run; faster here for a short run)
    ema = (0.99, 1.0)
    momentum_scheduler = (ema[0] + i * (ema[1] - ema[0]) / args.steps for i in range(args.steps + 1))

    layerlock = None
    if layerlock_on:
        layerlock = LayerLockAdapter(encoder, target_encoder, predictor, optimizer,  # [LayerLock]
                                     layerlock_config(args.steps), teacher_frozen=args.teacher_frozen,  # [LayerLock]
                                     total_steps=args.steps)  # [LayerLock]

    # -- load training checkpoint
    start_step = resume(args, encoder, predictor, target_encoder, optimizer, layerlock)
    fast_forward(start_step, scheduler.step, wd_scheduler.step, lambda: next(momentum_scheduler), mask_collator.step)

    losses: list[float] = []
    stop = args.stop_at if args.stop_at is not None else args.steps
    for step in range(start_step, stop):
        (clips,), masks_enc, masks_pred = mask_collator([(v,) for v in step_videos(args, rank, step, dataset)])

        if layerlock is not None:
            layerlock.begin_step(step)  # [LayerLock] freeze on schedule, switch target, LR warmup factor

        _new_lr = scheduler.step()
        _new_wd = wd_scheduler.step()

        def forward_target(c):
            if layerlock is not None:
                return layerlock.targets(c, masks_pred)  # [LayerLock] teacher block k, layer norm, at masks_pred
            with torch.no_grad():  # [V-JEPA]
                h = target_encoder(c)  # [V-JEPA]
                h = F.layer_norm(h, (h.size(-1),))  # [V-JEPA]
                return apply_masks(h, masks_pred, concat=False)  # [V-JEPA]

        def forward_context(c, h):
            z = encoder(c, masks_enc)
            return predictor(z, h, masks_enc, masks_pred)

        def loss_fn(z, h):
            loss = 0.0
            for zi, hi in zip(z, h):
                loss += torch.mean(torch.abs(zi - hi))
            return loss / len(masks_pred)

        h = forward_target(clips)
        z = forward_context(clips, h)
        loss = loss_fn(z, h)
        loss.backward()
        if layerlock is None or not layerlock.end_step(loss, h).skip:  # [LayerLock] collapse guard
            optimizer.step()
        optimizer.zero_grad()

        m = next(momentum_scheduler)
        if layerlock is not None:
            layerlock.update_teacher(m)  # [LayerLock] by parameter name, torch._foreach_*
        else:
            with torch.no_grad():  # [V-JEPA]
                for param_q, param_k in zip(encoder.parameters(), target_encoder.parameters()):  # [V-JEPA]
                    param_k.data.mul_(m).add_((1.0 - m) * param_q.detach().data)  # [V-JEPA]

        losses.append(float(loss.detach()))
        if not args.quiet and rank == 0 and (step % 10 == 0 or step == stop - 1):
            extra = layerlock.metrics() if layerlock is not None else {}  # [LayerLock] layerlock/* scalars
            shown = {k.split("/")[1]: round(val, 3) for k, val in extra.items()
                     if k.split("/")[1] in ("num_frozen", "target_layer", "warmup_factor", "feature_std")}
            print(f"step {step:4d} loss {losses[-1]:.4f} lr {_new_lr:.2e} {shown}", flush=True)
    save(args, rank, stop, encoder, predictor, target_encoder, optimizer, layerlock)

    result = {"losses": losses, "encoder": encoder, "target_encoder": target_encoder, "predictor": predictor,
              "optimizer": optimizer, "layerlock": layerlock,
              "last_target": [t.detach() for t in h] if stop > start_step else None}  # the last step's targets
    if world_size > 1:
        dist.barrier()
    return result


if __name__ == "__main__":
    main()
    if dist.is_initialized():
        dist.destroy_process_group()
