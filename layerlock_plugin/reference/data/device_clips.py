"""Cached clips served from the training device: no loader between the cache and the step.

The embedded digits are rendered once into one tensor ``[N, C, T, H, W]`` (``data.cache``). A DataLoader
over it would index, collate and pin every batch on the main thread (``num_workers=0``): for ViT-L clips
that is ~60 ms per batch on one core, more than an H100 step. Instead the whole cache is put on the
training device once and each step's rows are gathered there (``index_select``), with only the step's
indices (a few hundred int64) copied in, pinned and non-blocking.

Storage dtype: float32 on the CPU (the cache tensor itself, no copy: batches are bitwise those the
DataLoader gave); on a GPU bf16 when the run computes in bf16 (half the memory; the patch embedding reads
bf16 under autocast anyway, and the pixel targets see the clip at bf16 precision), else float32. The
cache goes to a GPU only if it takes at most a quarter of its memory; otherwise the trainer keeps the
DataLoader.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch

#: The largest share of a GPU's memory the cached clips may take.
MAX_DEVICE_SHARE = 0.25


def storage_dtype(device: torch.device, compute_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype cached clips are kept in on ``device`` for a run computing in ``compute_dtype`` (None: fp32)."""
    return torch.bfloat16 if device.type == "cuda" and compute_dtype == torch.bfloat16 else torch.float32


def fits(nbytes: int, device: torch.device) -> bool:
    """Whether ``nbytes`` of clips may live on ``device``: always on the CPU (they are there already), on a
    GPU up to :data:`MAX_DEVICE_SHARE` of its memory, never elsewhere (XLA shards host batches itself)."""
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return nbytes <= MAX_DEVICE_SHARE * torch.cuda.get_device_properties(device).total_memory
    return False


class DeviceClips:
    """The clips ``videos [N, C, T, H, W]`` on ``device`` in ``dtype``; :meth:`batches` yields the rows of
    each index list as ``{"video": float32 [b, C, T, H, W]}`` on the device, as a DataLoader batch would be."""

    def __init__(self, videos: torch.Tensor, device: torch.device, dtype: torch.dtype):
        self.device = device
        self.videos = videos.to(device=device, dtype=dtype)  # on the CPU in float32: the same tensor

    def batches(self, index_lists: Iterable[list[int]],
                to_device: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]) -> Iterator[dict[str, torch.Tensor]]:
        """``to_device``: how the host indices reach the device (the trainer's pinned, non-blocking copy)."""
        for rows in index_lists:
            (idx,) = to_device(torch.as_tensor(rows, dtype=torch.long))
            yield {"video": self.videos.index_select(0, idx).float()}


__all__ = ["DeviceClips", "MAX_DEVICE_SHARE", "fits", "storage_dtype"]
