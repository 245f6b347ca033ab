"""LayerLock on V-JEPA 2's modules: V-JEPA 2's train step (``app/vjepa/train.py``) with the changed lines marked.

    pip install -e ".[vjepa]"          # brings cc-vjepa2: V-JEPA 2's src/ as the package vjepa2
    python examples/vjepa/train_layerlock_vjepa2.py --steps 60                      # LayerLock-V-JEPA 2
    python examples/vjepa/train_layerlock_vjepa2.py --steps 60 --method vjepa2      # V-JEPA 2's own step
    torchrun --nproc_per_node 2 examples/vjepa/train_layerlock_vjepa2.py --steps 60  # DDP (gloo on CPU)
    python examples/vjepa/train_layerlock_vjepa2.py --ckpt /tmp/vj2.pt --stop-at 30  # then rerun without
        # --stop-at: it resumes from /tmp/vj2.pt

The structure follows V-JEPA 2's ``app/vjepa/train.py``: ``MultiSeqWrapper`` / ``PredictorMultiSeqWrapper``
around a ViT with 3D RoPE inside attention (``use_rope=True``) and its RoPE predictor, the multi-sequence
``MaskCollator`` (one batch per frames-per-clip, index masks per mask config), AdamW with
``WarmupCosineSchedule`` / ``CosineWDSchedule``, DDP with ``static_graph=True``, ``forward_target`` /
``forward_context`` / ``loss_fn`` with ``loss_exp``, the EMA by ``torch._foreach_mul_ / _foreach_add_``
(momentum 0.99925, V-JEPA 2's), checkpoint / resume. Every line LayerLock adds or changes ends with
``# [LayerLock]``; with ``--method vjepa2`` the original lines run instead (marked ``# [V-JEPA 2]``).
Tiny models (4-block ViT, 32x32 clips of 4 frames from the embedded moving-digits data) run on a CPU.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from layerlock_plugin.adapters.vjepa import LayerLockAdapter, LayerLockDDP, require_vjepa2  # [LayerLock]

sys.path.insert(0, str(Path(__file__).resolve().parent))  # vjepa_common.py, shared with the V-JEPA example
from vjepa_common import (build, fast_forward, layerlock_config, parse_args, resume, save,  # noqa: E402
                          setup_distributed, step_videos)

require_vjepa2()  # a clear error naming the extra when cc-vjepa2 is missing
from vjepa2.masks.multiseq_multiblock3d import MaskCollator  # noqa: E402
from vjepa2.masks.utils import apply_masks  # noqa: E402
from vjepa2.models.predictor import vit_predictor  # noqa: E402
from vjepa2.models.vision_transformer import VisionTransformer  # noqa: E402
from vjepa2.utils.schedulers import CosineWDSchedule, WarmupCosineSchedule  # noqa: E402
from vjepa2.utils.wrappers import MultiSeqWrapper, PredictorMultiSeqWrapper  # noqa: E402

# Tiny sizes (V-JEPA 2 ViT-L: 256 px, 16/64 frames, patch 16, tubelet 2, depth 24, predictor depth 12).
CROP, FRAMES, PATCH, TUBELET = 32, 4, 8, 2
DATASET_FPCS = [FRAMES]  # frames per clip of each dataset (V-JEPA 2 mixes several)
# V-JEPA 2's two multi-block mask configs (short- and long-range), scaled to a 4x4 grid of 2 time steps.
CFGS_MASK = [
    dict(spatial_scale=(0.15, 0.15), temporal_scale=(1.0, 1.0), aspect_ratio=(0.75, 1.5), num_blocks=4, max_temporal_keep=1.0),
    dict(spatial_scale=(0.5, 0.5), temporal_scale=(1.0, 1.0), aspect_ratio=(0.75, 1.5), num_blocks=1, max_temporal_keep=1.0),
]
LOSS_EXP = 1.0
EMA = (0.99925, 0.99925)
MIXED_PRECISION = False  # V-JEPA 2's dtype: bfloat16 on GPUs; these CPU runs stay in float32


def init_video_model(depth: int = 4, embed_dim: int = 48, pred_depth: int = 2, pred_embed_dim: int = 32):
    """V-JEPA 2's ``init_video_model`` at tiny size: RoPE encoder and predictor in the multi-sequence wrappers."""
    encoder = VisionTransformer(img_size=CROP, patch_size=PATCH, num_frames=FRAMES, tubelet_size=TUBELET,
                                embed_dim=embed_dim, depth=depth, num_heads=2, use_rope=True, use_sdpa=True,
                                norm_layer=partial(nn.LayerNorm, eps=1e-6))
    predictor = vit_predictor(img_size=CROP, patch_size=PATCH, num_frames=FRAMES, tubelet_size=TUBELET,
                              embed_dim=embed_dim, predictor_embed_dim=pred_embed_dim, depth=pred_depth, num_heads=2,
                              use_mask_tokens=True, num_mask_tokens=len(CFGS_MASK) * len(DATASET_FPCS),
                              zero_init_mask_tokens=True, use_rope=True, use_sdpa=True)
    return MultiSeqWrapper(encoder), PredictorMultiSeqWrapper(predictor)


def make_mask_collator() -> MaskCollator:
    return MaskCollator(cfgs_mask=CFGS_MASK, dataset_fpcs=DATASET_FPCS, crop_size=(CROP, CROP), patch_size=(PATCH, PATCH),
                        tubelet_size=TUBELET)


def collate(collator: MaskCollator, videos: list[torch.Tensor]):
    """V-JEPA 2's ``load_clips``: samples ``([clip], label, [frame indices])`` -> per-fpc lists of clips and masks."""
    sample = collator([([v], 0, [np.arange(v.shape[1])]) for v in videos])
    clips, masks_enc, masks_pred = [], [], []
    for udata, m_enc, m_pred in sample:
        clips += [udata[0][0]]
        masks_enc += [m_enc]
        masks_pred += [m_pred]
    return clips, masks_enc, masks_pred


def main(argv=None) -> dict:
    args = parse_args(argv, methods=("layerlock", "vjepa2"))
    layerlock_on = args.method == "layerlock"
    world_size, rank = setup_distributed(args)

    # -- init model, mask collator, data, optimizer and schedulers (V-JEPA 2's init_opt)
    (encoder, predictor, target_encoder, mask_collator, dataset, optimizer, scheduler,
     wd_scheduler) = build(args, init_video_model, make_mask_collator, (WarmupCosineSchedule, CosineWDSchedule), FRAMES, CROP)
    if world_size > 1:
        ddp = LayerLockDDP if layerlock_on else nn.parallel.DistributedDataParallel  # [LayerLock] was DistributedDataParallel
        encoder = ddp(encoder, static_graph=True)
        predictor = nn.parallel.DistributedDataParallel(predictor, static_graph=False, find_unused_parameters=True)
    for p in target_encoder.parameters():
        p.requires_grad = False

    scaler = torch.amp.GradScaler("cuda") if MIXED_PRECISION else None

    # -- momentum schedule
    momentum_scheduler = (EMA[0] + i * (EMA[1] - EMA[0]) / args.steps for i in range(args.steps + 1))

    layerlock = LayerLockAdapter(encoder, target_encoder, predictor, optimizer, layerlock_config(args.steps),  # [LayerLock]
                                 teacher_frozen=args.teacher_frozen, total_steps=args.steps) if layerlock_on else None  # [LayerLock]

    # -- load training checkpoint
    start_step = resume(args, encoder, predictor, target_encoder, optimizer, layerlock)
    fast_forward(start_step, scheduler.step, wd_scheduler.step, lambda: next(momentum_scheduler), mask_collator.step)

    losses: list[float] = []
    stop = args.stop_at if args.stop_at is not None else args.steps
    for itr in range(start_step, stop):
        clips, masks_enc, masks_pred = collate(mask_collator, step_videos(args, rank, itr, dataset))  # load_clips()
        if layerlock is not None:
            layerlock.begin_step(itr)  # [LayerLock] freeze on schedule, switch target, LR warmup factor

        def train_step():
            _new_lr = scheduler.step()
            _new_wd = wd_scheduler.step()

            def forward_target(c):
                if layerlock is not None:
                    return layerlock.targets(c)  # [LayerLock] teacher block k (RoPE, full clip), layer norm
                with torch.no_grad():  # [V-JEPA 2]
                    h = target_encoder(c)  # [V-JEPA 2]
                    h = [F.layer_norm(hi, (hi.size(-1),)) for hi in h]  # [V-JEPA 2]
                    return h  # [V-JEPA 2]

            def forward_context(c):
                z = encoder(c, masks_enc)
                z = predictor(z, masks_enc, masks_pred)
                return z

            def loss_fn(z, h):
                # Assumption: predictor will have returned only masked tokens for z
                h = [apply_masks(hi, mi, concat=False) for hi, mi in zip(h, masks_pred)]
                loss, n = 0, 0
                for zi, hi in zip(z, h):
                    for zij, hij in zip(zi, hi):
                        loss += torch.mean(torch.abs(zij - hij) ** LOSS_EXP) / LOSS_EXP
                        n += 1
                loss /= n
                return loss

            # Step 1. Forward
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=MIXED_PRECISION):
                h = forward_target(clips)
                z = forward_context(clips)
                loss = loss_fn(z, h)  # jepa prediction loss

            # Step 2. Backward & step
            if MIXED_PRECISION:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if layerlock is None or not layerlock.end_step(loss, h).skip:  # [LayerLock] collapse guard
                if MIXED_PRECISION:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
            optimizer.zero_grad()

            # Step 3. momentum update of target encoder
            m = next(momentum_scheduler)
            if layerlock is not None:
                layerlock.update_teacher(m)  # [LayerLock] by parameter name
            else:
                with torch.no_grad():  # [V-JEPA 2]
                    params_k, params_q = [], []  # [V-JEPA 2]
                    for param_q, param_k in zip(encoder.parameters(), target_encoder.parameters()):  # [V-JEPA 2]
                        params_k.append(param_k)  # [V-JEPA 2]
                        params_q.append(param_q)  # [V-JEPA 2]
                    torch._foreach_mul_(params_k, m)  # [V-JEPA 2]
                    torch._foreach_add_(params_k, params_q, alpha=1 - m)  # [V-JEPA 2]
            return float(loss), _new_lr, _new_wd

        loss, _new_lr, _new_wd = train_step()
        losses.append(loss)
        if not args.quiet and rank == 0 and (itr % 10 == 0 or itr == stop - 1):
            shown = {} if layerlock is None else {k.split("/")[1]: round(v, 3) for k, v in layerlock.metrics().items()
                                                  if k.split("/")[1] in ("num_frozen", "target_layer", "feature_std")}
            print(f"itr {itr:4d} loss {loss:.4f} lr {_new_lr:.2e} {shown}", flush=True)
    save(args, rank, stop, encoder, predictor, target_encoder, optimizer, layerlock)
    return {"losses": losses, "encoder": encoder, "target_encoder": target_encoder, "predictor": predictor,
            "optimizer": optimizer, "layerlock": layerlock, "world_size": world_size}


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
