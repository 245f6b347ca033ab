"""Features of known quality for calibrating the probes (see ``benchmarks/calibration.py``).

A probe is only evidence once it ranks features whose quality is known. This module makes the rungs
of that ladder, each as an ``encode(video [B, C, T, H, W]) -> tokens [B, N, D]`` function on the same
token grid as the encoder (``(t h w)`` order, one token per tubelet):

* :func:`pixel_tokens`: the raw pixels of each tubelet (``D = pt * ph * pw * C``);
* :func:`motion_tokens`: hand-made motion features, Lucas-Kanade statistics per tubelet (built for
  the motion task: a probe that cannot read motion from them is broken);
* :func:`train_supervised`: an encoder of the model's own architecture trained on a task's labels
  (a probe must rank it above random init on that task). Its peak learning rate is its own, chosen
  on held-out train clips (:func:`held_out_split`, :func:`supervised_accuracy`) from
  :data:`SUPERVISED_LRS`: at the pretraining rate (1.5e-3) this architecture's cross-entropy stays at
  ``ln K`` for the whole budget on the packaged data, at 6e-4 it fits its labels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ...targets import patchify
from ..model import ModelConfig, VideoMAE
from .supervised_multitask import next_batch, optimizer_step

__all__ = ["MOTION_FEATURES", "SUPERVISED_LRS", "motion_tokens", "pixel_tokens", "train_supervised",
           "SupervisedEncoder", "held_out_split", "supervised_accuracy"]

Encode = Callable[[torch.Tensor], torch.Tensor]

#: channels of :func:`motion_tokens`
MOTION_FEATURES = ("ix_it", "iy_it", "ix_ix", "iy_iy", "ix_iy", "it_it", "flow_x", "flow_y")
#: peak learning rates the supervised rung tries (the pretraining rate first)
SUPERVISED_LRS = (1.5e-3, 6e-4, 3e-4)


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

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """The backbone's tokens ``[B, N, D]`` (what a probe reads)."""
        return self.backbone.encode(video)


def held_out_split(dataset: Dataset, val_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """``(fit, val)`` clip indices of ``dataset``: the clips of a ``val_fraction`` share of its digit
    images are held out (drawn with ``seed``), so a held-out clip never shows a digit image a fitted
    clip shows (an appearance score there measures generalisation, not memorised digits). A dataset
    without ``sample_params`` is split clip by clip."""
    n = len(dataset)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(seed)
    params = getattr(dataset, "sample_params", None)
    if params is None:
        val = set(torch.randperm(n, generator=g)[: max(1, round(val_fraction * n))].tolist())
        return [i for i in range(n) if i not in val], sorted(val)
    digit = [params(i)["digit_index"] for i in range(n)]
    images = sorted(set(digit))
    order = torch.randperm(len(images), generator=g).tolist()
    held = {images[j] for j in order[: max(1, round(val_fraction * len(images)))]}
    return [i for i in range(n) if digit[i] not in held], [i for i in range(n) if digit[i] in held]


@torch.no_grad()
def supervised_accuracy(model: SupervisedEncoder, dataset: Dataset, indices: Sequence[int], task: str,
                        batch_size: int = 128) -> float:
    """Accuracy of ``model``'s own classifier on the clips ``indices`` of ``dataset`` (eval mode)."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(indices), batch_size):
        items = [dataset[int(i)] for i in indices[start:start + batch_size]]
        video = torch.stack([it["video"] for it in items])
        labels = torch.stack([it[task] for it in items]).long()
        correct += int((model(video).argmax(dim=1) == labels).sum())
    model.train(was_training)
    return correct / max(1, len(indices))


def train_supervised(
    model_cfg: ModelConfig,
    dataset: Dataset,
    task: str,
    *,
    steps: int,
    batch_size: int,
    optim,
    lr: float | None = None,
    indices: Sequence[int] | None = None,
    seed: int = 0,
    log: Callable[[int, float], None] | None = None,
) -> SupervisedEncoder:
    """Train the architecture of ``model_cfg`` on ``dataset``'s ``task`` labels (cross-entropy on the
    full, unmasked clips) for ``steps`` steps of ``batch_size`` clips; returns the model (backbone and
    classifier, eval mode; ``.encode`` gives the backbone's tokens).

    The initial weights are the ones the reference trainer draws at ``seed`` (``torch.manual_seed(seed)``
    then ``VideoMAE(model_cfg)``): the same random-init encoder a probe compares against. ``optim`` is
    the trainer's :class:`~layerlock_plugin.reference.config.OptimConfig` (AdamW, linear warmup then
    cosine decay, gradient clipping), so the budget matches a pretraining run's; ``lr`` replaces its
    peak learning rate (see :data:`SUPERVISED_LRS`). ``indices``: train on those clips only (default:
    all). Batches: a seeded permutation of the training clips per epoch.
    ``log(step, loss)`` is called every step when given. The caller's RNG state is left alone.
    """
    from ..train.optim import cosine_with_warmup, param_groups

    num_classes = int(dataset.num_classes[task])  # type: ignore[attr-defined]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SupervisedEncoder(model_cfg, num_classes)
        peak = optim.lr if lr is None else float(lr)
        opt = torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=peak, betas=tuple(optim.betas))
        clips = torch.arange(len(dataset)) if indices is None else torch.as_tensor(list(indices), dtype=torch.long)  # type: ignore[arg-type]
        sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(steps, optim.warmup_steps, optim.min_lr_ratio))
        g = torch.Generator().manual_seed(seed + 7)
        order = torch.empty(0, dtype=torch.long)
        model.train()
        for step in range(steps):
            idx, order = next_batch(order, clips, batch_size, g)
            items = [dataset[int(i)] for i in idx]
            video = torch.stack([it["video"] for it in items])
            labels = torch.stack([it[task] for it in items]).long()
            loss = F.cross_entropy(model(video), labels)
            optimizer_step(loss, model, opt, sched, optim.grad_clip)
            if log is not None:
                log(step, float(loss.detach()))
    return model.eval()
