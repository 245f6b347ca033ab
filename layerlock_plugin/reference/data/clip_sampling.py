"""Which frames a clip takes, and the generator that draws them.

Every random choice about one sample (temporal window, stride, crop, flip, a replacement for a bad
video) comes from :func:`sample_generator` seeded by ``(run seed, epoch, index)``: the same sample gets
the same clip whatever the number of ranks or data-loader workers, and a resumed run redraws exactly
what the uninterrupted one drew, with no sampler state to save.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["ClipTooShort", "clip_indices", "draw_clip", "sample_generator", "sample_seed"]


class ClipTooShort(ValueError):
    """The video has fewer frames than the clip spans (raised under ``short_video: skip``)."""


def sample_seed(*key: int) -> int:
    """A 63-bit seed from a tuple of non-negative ints, e.g. ``(seed, epoch, index)``: numpy's
    SeedSequence mixes them, so neighbouring keys give unrelated streams."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint64)[0]) >> 1


def sample_generator(*key: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded by :func:`sample_seed` of ``key``."""
    return torch.Generator().manual_seed(sample_seed(*key))


def _fit_short(indices: list[int], num_available: int, short_video: str) -> list[int]:
    if short_video == "loop":
        return [i % num_available for i in indices]
    if short_video == "repeat_last":
        return [min(i, num_available - 1) for i in indices]
    raise ClipTooShort(f"has {num_available} frames, fewer than the clip's span of {indices[-1] + 1}")


def clip_indices(num_available: int, num_frames: int, stride: int, short_video: str = "loop") -> list[int]:
    """Frame indices of the centred clip of ``num_frames`` frames taken every ``stride`` frames."""
    if num_available <= 0:
        raise ValueError("a video without frames has no clip")
    span = (num_frames - 1) * stride + 1
    if span <= num_available:
        start = (num_available - span) // 2
        return [start + i * stride for i in range(num_frames)]
    return _fit_short([i * stride for i in range(num_frames)], num_available, short_video)


def draw_clip(num_available: int, num_frames: int, strides: Sequence[int], generator: torch.Generator | None,
              short_video: str = "loop") -> list[int]:
    """Frame indices of one clip: a stride drawn uniformly from ``strides`` and a window start drawn
    uniformly over every start that fits (``generator=None``: the middle stride, centred window).
    A video shorter than the span loops, holds its last frame or raises :class:`ClipTooShort`."""
    if num_available <= 0:
        raise ValueError("a video without frames has no clip")
    if generator is None:
        return clip_indices(num_available, num_frames, sorted(strides)[len(strides) // 2], short_video)
    stride = strides[int(torch.randint(len(strides), (), generator=generator))] if len(strides) > 1 else strides[0]
    span = (num_frames - 1) * stride + 1
    if span > num_available:
        return _fit_short([i * stride for i in range(num_frames)], num_available, short_video)
    start = int(torch.randint(num_available - span + 1, (), generator=generator))
    return [start + i * stride for i in range(num_frames)]
