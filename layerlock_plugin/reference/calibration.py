"""Features of known quality for calibrating the probes (see ``benchmarks/calibration.py``).

A probe is only evidence once it ranks features whose quality is known. This module makes the rungs
of that ladder, each as an ``encode(video [B, C, T, H, W]) -> tokens [B, N, D]`` function on the same
token grid as the encoder (``(t h w)`` order, one token per tubelet):

* :func:`pixel_tokens`: the raw pixels of each tubelet (``D = pt * ph * pw * C``);
* :func:`motion_tokens`: hand-made motion features, Lucas-Kanade statistics per tubelet (built for
  the motion task: a probe that cannot read motion from them is broken);
* :func:`train_supervised`: an encoder of the model's own architecture trained on a task's labels
  (a probe must rank it above random init on that task).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..targets import patchify
from .model import ModelConfig, VideoMAE

__all__ = ["MOTION_FEATURES", "motion_tokens", "pixel_tokens", "train_supervised", "SupervisedEncoder"]

Encode = Callable[[torch.Tensor], torch.Tensor]

#: channels of :func:`motion_tokens`
MOTION_FEATURES = ("ix_it", "iy_it", "ix_ix", "iy_iy", "ix_iy", "it_it", "flow_x", "flow_y")


def pixel_tokens(tubelet: Sequence[int]) -> Encode:
    """``encode`` that returns each tubelet's raw pixels: ``[B, C, T, H, W] -> [B, N, pt*ph*pw*C]``."""
    tubelet = tuple(int(x) for x in tubelet)
    return lambda video: patchify(video.float(), tubelet)


def motion_tokens(tubelet: Sequence[int], ridge: float = 1e-3) -> Encode:
    """``encode`` of hand-made motion features: ``[B, C, T, H, W] -> [B, N, 8]``.

    On the grey-level clip ``I``, with periodic central differences ``I_x``, ``I_y`` (averaged over the
    two frames of each pair) and the frame difference ``I_t = I[t+1] - I[t]``: the Lucas-Kanade
    statistics ``I_x I_t, I_y I_t, I_x^2, I_y^2, I_x I_y, I_t^2`` averaged over each tubelet's pixels
    (the last frame, which has no successor, repeats the previous pair), and the token's flow
    ``-(A + ridge * tr(A) I)^-1 b`` from its structure tensor ``A`` and ``b = (I_x I_t, I_y I_t)``.
    Brightness constancy makes ``b = -A v`` for a pattern moving with velocity ``v``.
    """
    pt, ph, pw = (int(x) for x in tubelet)

    def encode(video: torch.Tensor) -> torch.Tensor:
        grey = video.float().mean(dim=1)  # [B, T, H, W]
        if grey.shape[1] < 2:
            raise ValueError("motion features need at least 2 frames")
        ix = 0.5 * (grey.roll(-1, dims=3) - grey.roll(1, dims=3))
        iy = 0.5 * (grey.roll(-1, dims=2) - grey.roll(1, dims=2))
        ix, iy = 0.5 * (ix[:, 1:] + ix[:, :-1]), 0.5 * (iy[:, 1:] + iy[:, :-1])
        it = grey[:, 1:] - grey[:, :-1]
        stats = torch.stack([ix * it, iy * it, ix * ix, iy * iy, ix * iy, it * it], dim=1)  # [B, 6, T-1, H, W]
        stats = torch.cat([stats, stats[:, :, -1:]], dim=2)
        pooled = F.avg_pool3d(stats, kernel_size=(pt, ph, pw), stride=(pt, ph, pw)).flatten(2).transpose(1, 2)
        bx, by, axx, ayy, axy = pooled[..., 0], pooled[..., 1], pooled[..., 2], pooled[..., 3], pooled[..., 4]
        lam = ridge * (axx + ayy) + 1e-12
        axx, ayy = axx + lam, ayy + lam
        det = axx * ayy - axy * axy
        flow_x = -(ayy * bx - axy * by) / det
        flow_y = -(axx * by - axy * bx) / det
        return torch.cat([pooled, flow_x[..., None], flow_y[..., None]], dim=-1)

    return encode


class SupervisedEncoder(nn.Module):
    """The model's encoder with a classifier on its mean-pooled tokens: ``video -> logits [B, K]``.

    ``backbone`` is a :class:`VideoMAE` (only its stem and encoder blocks run: ``encode``); the head
    is ``LayerNorm -> Linear(D, K)`` on the mean over the ``N`` output tokens.
    """

    def __init__(self, cfg: ModelConfig, num_classes: int):
        super().__init__()
        self.backbone = VideoMAE(cfg)
        self.norm = nn.LayerNorm(cfg.embed_dim)
        self.head = nn.Linear(cfg.embed_dim, num_classes)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.backbone.encode(video).mean(dim=1)))


def train_supervised(
    model_cfg: ModelConfig,
    dataset: Dataset,
    task: str,
    *,
    steps: int,
    batch_size: int,
    optim,
    seed: int = 0,
    log: Callable[[int, float], None] | None = None,
) -> VideoMAE:
    """Train the architecture of ``model_cfg`` on ``dataset``'s ``task`` labels (cross-entropy on the
    full, unmasked clips) for ``steps`` steps of ``batch_size`` clips; returns the backbone (eval mode).

    The initial weights are the ones the reference trainer draws at ``seed`` (``torch.manual_seed(seed)``
    then ``VideoMAE(model_cfg)``): the same random-init encoder a probe compares against. ``optim`` is
    the trainer's :class:`~.config.OptimConfig` (AdamW, linear warmup then cosine decay, gradient
    clipping), so the budget matches a pretraining run's. Batches: a seeded permutation per epoch.
    ``log(step, loss)`` is called every step when given. The caller's RNG state is left alone.
    """
    from .trainer import cosine_with_warmup, param_groups

    num_classes = int(dataset.num_classes[task])  # type: ignore[attr-defined]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SupervisedEncoder(model_cfg, num_classes)
        opt = torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr, betas=tuple(optim.betas))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(steps, optim.warmup_steps, optim.min_lr_ratio))
        g = torch.Generator().manual_seed(seed + 7)
        order = torch.empty(0, dtype=torch.long)
        model.train()
        for step in range(steps):
            if len(order) < batch_size:
                order = torch.cat([order, torch.randperm(len(dataset), generator=g)])  # type: ignore[arg-type]
            idx, order = order[:batch_size], order[batch_size:]
            items = [dataset[int(i)] for i in idx]
            video = torch.stack([it["video"] for it in items])
            labels = torch.stack([it[task] for it in items]).long()
            loss = F.cross_entropy(model(video), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if optim.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
            opt.step()
            sched.step()
            if log is not None:
                log(step, float(loss.detach()))
    model.eval()
    return model.backbone
