"""Spatial augmentation and normalisation of a decoded clip, with torchvision's v2 transforms.

A clip is a ``tv_tensors.Video`` ``[T, C, H, W]``, so every v2 transform draws its parameters once per
clip: the crop box and the flip are the same for every frame. The random draws come from a seed of the
sample's own generator (:func:`~.clip_sampling.sample_generator`), not from the worker's RNG stream, so a
sample's augmentation does not depend on which worker made it or on what that worker made before.

Training (:attr:`AugmentConfig.crop`): ``random_resized`` is torchvision's ``RandomResizedCrop`` (V-JEPA's
scale 0.3-1.0, aspect 0.75-1.35), ``multi_scale`` is :class:`MultiScaleCrop` (VideoMAE's
GroupMultiScaleCrop, not in torchvision), ``center`` a centre crop; then ``RandomHorizontalFlip``, all
on uint8; then ``[0, 1]`` and normalisation in one fused pass. Evaluation: the frame's short side at ``size`` (scaled by the
decoder), centre crop, normalisation: deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F
from torchvision.transforms.v2._utils import query_size

from .video_config import IMAGENET_MEAN, IMAGENET_STD, AugmentConfig

__all__ = ["ClipTransform", "MultiScaleCrop", "STATS_CLIPS", "channel_stats"]

STATS_CLIPS = 32  # clips whose pixels give ``normalize: dataset`` its mean and std


class MultiScaleCrop(v2.Transform):
    """VideoMAE's multi-scale crop: box sides drawn from ``scales`` x the short side (width and height
    at most ``max_distort`` scale steps apart), placed at one of 13 fixed positions (corners, centre,
    edge middles, quarter points), resized to ``size``. One draw per call, so per clip."""

    def __init__(self, size: int, scales: Sequence[float] = (1.0, 0.875, 0.75, 0.66), max_distort: int = 1):
        super().__init__()
        self.size, self.scales, self.max_distort = size, tuple(scales), max_distort

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = query_size(flat_inputs)
        sides = [int(min(height, width) * s) for s in self.scales]
        snap = [self.size if abs(x - self.size) < 3 else x for x in sides]  # VideoMAE snaps near-size sides
        pairs = [(w, h) for i, h in enumerate(snap) for j, w in enumerate(snap) if abs(i - j) <= self.max_distort]
        w, h = pairs[int(torch.randint(len(pairs), ()))]
        w, h = min(w, width), min(h, height)
        ws, hs = (width - w) // 4, (height - h) // 4
        grid = [(0, 0), (4, 0), (0, 4), (4, 4), (2, 2), (0, 2), (4, 2), (2, 4), (2, 0), (1, 1), (3, 1), (1, 3), (3, 3)]
        gx, gy = grid[int(torch.randint(len(grid), ()))]
        return dict(top=gy * hs, left=gx * ws, height=h, width=w)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resized_crop, inpt, **params, size=[self.size, self.size], antialias=True)


def channel_stats(clips: Sequence[torch.Tensor]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std over the pixels of ``clips`` (each ``[C, T, H, W]`` in ``[0, 1]``)."""
    flat = torch.cat([c.flatten(1).double() for c in clips], dim=1)  # [C, pixels]
    mean, std = flat.mean(1), flat.std(1).clamp_min(1e-6)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


class ClipTransform:
    """``uint8 [T, H, W, 3]`` -> ``float32 [3, T, size, size]``: cropped and flipped in uint8 with
    torchvision (augmented when ``train=True``, else a centre crop), then scaled to ``[0, 1]`` and normalised with ``mean`` / ``std`` (ImageNet's by default; ``None`` or
    ``augment.normalize: none``: kept in ``[0, 1]``)."""

    def __init__(self, size: int, augment: AugmentConfig, train: bool,
                 mean: Sequence[float] | None = IMAGENET_MEAN, std: Sequence[float] | None = IMAGENET_STD):
        self.train = train and (augment.crop != "center" or augment.flip > 0)
        steps: list[v2.Transform] = []
        if train and augment.crop == "random_resized":
            ratio = tuple(augment.aspect)
            steps.append(v2.RandomResizedCrop(size, scale=tuple(augment.scale), ratio=ratio, antialias=True))
        elif train and augment.crop == "multi_scale":
            steps.append(MultiScaleCrop(size, augment.scales))
        else:
            steps.append(v2.CenterCrop(size))
        if train and augment.flip > 0:
            steps.append(v2.RandomHorizontalFlip(augment.flip))
        self.pipeline = v2.Compose(steps)
        # to [0, 1] and normalised in one pass over the output: x * scale + shift per channel
        norm = mean is not None and augment.normalize != "none"
        m = torch.tensor(mean if norm else (0.0, 0.0, 0.0), dtype=torch.float32)
        s = torch.tensor(std if norm else (1.0, 1.0, 1.0), dtype=torch.float32)
        self.scale = (1.0 / (255.0 * s)).view(3, 1, 1, 1)
        self.shift = (-m / s).view(3, 1, 1, 1)

    def __call__(self, frames: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """``frames``: ``uint8 [T, H, W, 3]``; ``seed``: the sample's draw (needed when training)."""
        # a channels-last view, no copy: torchvision's uint8 antialiased resize is fastest on it
        video = tv_tensors.Video(frames.permute(0, 3, 1, 2))  # [T, 3, H, W]
        if self.train:
            if seed is None:
                raise ValueError("a training clip needs its sample's seed")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                out = self.pipeline(video)
        else:
            out = self.pipeline(video)
        out = out.as_subclass(torch.Tensor).permute(1, 0, 2, 3)  # [3, T, size, size], still uint8
        return torch.addcmul(self.shift, out.float(), self.scale).contiguous()
