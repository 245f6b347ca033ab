"""The supervised rung of the calibration ladder, trained on every label of the suite at once.

A task enters a verdict only after an encoder of the evaluation's own architecture and budget, trained on
labels, reads it well above random init and raw pixels (``benchmarks/calibration.py``). On the evidence
suite one encoder is trained on all labels together (cross-entropy per classification label, mean squared
error on the per-token depth): the ``turn`` label alone gives no gradient towards the motion features it is
built from (the sign of a cross product of two motions; the encoder stays at chance for the whole budget
trained on it alone), while with the motion labels beside it the encoder learns it within a few hundred
steps. One encoder for every task also costs a single training run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..model import ModelConfig, VideoMAE
from .features import token_depth_targets

__all__ = ["MultiTaskEncoder", "train_multitask", "multitask_accuracy", "next_batch", "optimizer_step"]


def next_batch(order: torch.Tensor, clips: torch.Tensor, batch_size: int,
               g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The next ``batch_size`` clip indices from ``order`` (refilled with a fresh permutation of ``clips`` when
    short: every clip once per pass), and what is left of ``order``."""
    if len(order) < batch_size:
        order = torch.cat([order, clips[torch.randperm(len(clips), generator=g)]])
    return order[:batch_size], order[batch_size:]


def optimizer_step(loss: torch.Tensor, model: nn.Module, opt: torch.optim.Optimizer,
                   sched: torch.optim.lr_scheduler.LRScheduler, grad_clip: float) -> None:
    """One update of a supervised rung: backward, clip (``grad_clip`` > 0), step, schedule."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    sched.step()


class MultiTaskEncoder(nn.Module):
    """The model's encoder with a head per label: ``video [B, C, T, H, W] -> {task: logits [B, K], 'depth': [B, N]}``.

    ``backbone`` is a :class:`VideoMAE` (only its stem and encoder blocks run: ``encode``). Each
    classification task gets ``LayerNorm -> Linear(D, K)`` on the mean over the ``N`` output tokens; depth
    gets a per-token ``Linear(D, 1)`` predicting the standardised mean depth of the token's tubelet.
    """

    def __init__(self, cfg: ModelConfig, num_classes: Mapping[str, int], depth: bool = True):
        super().__init__()
        self.backbone = VideoMAE(cfg)
        d = cfg.embed_dim
        self.heads = nn.ModuleDict({t: nn.Sequential(nn.LayerNorm(d), nn.Linear(d, int(k)))
                                    for t, k in num_classes.items()})
        self.depth = nn.Linear(d, 1) if depth else None

    def forward(self, video: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = self.backbone.encode(video)
        pooled = tokens.mean(dim=1)
        out = {t: head(pooled) for t, head in self.heads.items()}
        if self.depth is not None:
            out["depth"] = self.depth(tokens).squeeze(-1)
        return out

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """The backbone's tokens ``[B, N, D]`` (what a probe reads)."""
        return self.backbone.encode(video)


def _batch(dataset: Dataset, idx: Sequence[int], tasks: Sequence[str], tubelet: Sequence[int]) -> dict[str, torch.Tensor]:
    items = [dataset[int(i)] for i in idx]
    out = {t: torch.stack([it[t] for it in items]).long() for t in tasks}
    out["video"] = torch.stack([it["video"] for it in items])
    out["depth"] = token_depth_targets(torch.stack([it["depth"] for it in items]), tubelet)
    return out


def train_multitask(
    model_cfg: ModelConfig,
    dataset: Dataset,
    tasks: Sequence[str],
    *,
    steps: int,
    batch_size: int,
    optim,
    lr: float | None = None,
    depth: bool = True,
    indices: Sequence[int] | None = None,
    seed: int = 0,
    log: Callable[[int, float], None] | None = None,
) -> MultiTaskEncoder:
    """Train the architecture of ``model_cfg`` on every label in ``tasks`` of ``dataset`` (and on depth) for
    ``steps`` steps of ``batch_size`` full, unmasked clips; returns the model in eval mode.

    The loss is the sum of the tasks' cross-entropies plus the mean squared error of the depth head on
    token depths standardised with the first batch's statistics. The initial weights are the random-init
    encoder the trainer draws at ``seed``; ``optim`` is the trainer's optimizer config (AdamW, warmup, cosine,
    clipping) with ``lr`` as its peak learning rate. ``indices``: train on those clips only (default: all),
    a seeded permutation per epoch. ``log(step, loss)`` every step. The caller's RNG state is left alone.
    """
    from ..train.optim import cosine_with_warmup, param_groups

    classes = {t: int(dataset.num_classes[t]) for t in tasks}  # type: ignore[attr-defined]
    tubelet = model_cfg.tubelet
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MultiTaskEncoder(model_cfg, classes, depth=depth)
        peak = optim.lr if lr is None else float(lr)
        opt = torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=peak, betas=tuple(optim.betas))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(steps, optim.warmup_steps, optim.min_lr_ratio))
        clips = torch.arange(len(dataset)) if indices is None else torch.as_tensor(list(indices), dtype=torch.long)  # type: ignore[arg-type]
        g = torch.Generator().manual_seed(seed + 7)
        order = torch.empty(0, dtype=torch.long)
        depth_stats: tuple[float, float] | None = None
        model.train()
        for step in range(steps):
            idx, order = next_batch(order, clips, batch_size, g)
            b = _batch(dataset, idx.tolist(), tasks, tubelet)
            out = model(b["video"])
            loss = sum(F.cross_entropy(out[t], b[t]) for t in tasks)
            if depth:
                if depth_stats is None:
                    depth_stats = (float(b["depth"].mean()), max(float(b["depth"].std()), 1e-6))
                loss = loss + F.mse_loss(out["depth"], (b["depth"] - depth_stats[0]) / depth_stats[1])
            optimizer_step(loss, model, opt, sched, optim.grad_clip)
            if log is not None:
                log(step, float(loss.detach()))
    return model.eval()


@torch.no_grad()
def multitask_accuracy(model: MultiTaskEncoder, dataset: Dataset, indices: Sequence[int], tasks: Sequence[str],
                       batch_size: int = 128) -> dict[str, float]:
    """Accuracy of ``model``'s own heads on the clips ``indices`` of ``dataset`` (eval mode), per task."""
    was_training = model.training
    model.eval()
    correct = {t: 0 for t in tasks}
    tubelet = model.backbone.cfg.tubelet
    for start in range(0, len(indices), batch_size):
        b = _batch(dataset, list(indices[start:start + batch_size]), tasks, tubelet)
        out = model(b["video"])
        for t in tasks:
            correct[t] += int((out[t].argmax(dim=1) == b[t]).sum())
    model.train(was_training)
    return {t: c / max(1, len(indices)) for t, c in correct.items()}
