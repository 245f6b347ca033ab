"""Token masks for masked prediction, as sorted index tensors (torch + stdlib only).

Conventions used across the package:

* a token set is a ``LongTensor [B, K]`` of token positions, sorted ascending in every row, with the
  same ``K`` for every sample (so batches stay rectangular);
* a boolean mask ``[B, N]`` has ``True`` = *masked* (the VideoMAE convention); V-JEPA-style hosts use
  index lists, and :func:`indices_to_mask` / :func:`mask_to_indices` convert between the two;
* video tokens are ordered ``(t h w)``: token ``n = (t * H + h) * W + w``.

Randomness comes only from ``torch.rand(..., generator=generator)``, so a seeded generator gives the
same masks on every run and every device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import _validate as v

__all__ = [
    "num_masked",
    "random_masking",
    "tube_masking",
    "indices_to_mask",
    "mask_to_indices",
    "subsample_indices",
]


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device) -> torch.Tensor:
    # Draw on the generator's own device (a CPU generator cannot fill a CUDA tensor), then move:
    # the same seed then gives the same masks whatever device the batch lives on.
    target = torch.device(device) if device is not None else torch.get_default_device()
    gen_device = generator.device if generator is not None else target
    return torch.rand(shape, generator=generator, device=gen_device).to(target)


def num_masked(num_tokens: int, mask_ratio: float) -> int:
    """Number of masked tokens ``M = round(mask_ratio * num_tokens)`` (halves round up).

    Raises ``ValueError`` unless ``1 <= M <= num_tokens - 1`` (both sets must be non-empty).
    """
    v.positive_int("num_tokens", num_tokens)
    ratio = v.fraction("mask_ratio", mask_ratio, allow_one=False)
    m = math.floor(ratio * num_tokens + 0.5)
    if not 1 <= m <= num_tokens - 1:
        raise ValueError(
            f"mask_ratio={mask_ratio} over {num_tokens} tokens masks {m}; need at least one masked and "
            f"one visible token (1 <= round(mask_ratio * num_tokens) <= {num_tokens - 1})"
        )
    return m


def random_masking(
    batch_size: int,
    num_tokens: int,
    mask_ratio: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent uniformly random mask per sample.

    Returns ``(visible_idx [B, V], masked_idx [B, M])``, both ``int64`` and sorted ascending per row,
    disjoint, together covering ``0..N-1``; ``M = num_masked(N, mask_ratio)``, ``V = N - M``.
    """
    b = v.positive_int("batch_size", batch_size)
    m = num_masked(num_tokens, mask_ratio)
    perm = _rand((b, num_tokens), generator, device).argsort(dim=1)
    visible = perm[:, : num_tokens - m].sort(dim=1).values
    masked = perm[:, num_tokens - m :].sort(dim=1).values
    return visible, masked


def tube_masking(
    batch_size: int,
    grid: Sequence[int],
    mask_ratio: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """VideoMAE tube masking: one random spatial mask per sample, repeated at every temporal slot.

    ``grid = (T, H, W)`` in tokens; token order ``(t h w)``. The ratio applies to the ``H * W`` spatial
    tokens, so ``M = T * num_masked(H * W, mask_ratio)``.
    Returns ``(visible_idx [B, T * Vs], masked_idx [B, T * Ms])``, sorted ascending per row.
    """
    if len(grid) != 3:
        raise ValueError(f"grid: must be (T, H, W), got {tuple(grid)!r}")
    t, h, w = (v.positive_int(f"grid[{i}]", g) for i, g in enumerate(grid))
    vis_s, mask_s = random_masking(batch_size, h * w, mask_ratio, generator=generator, device=device)
    # Slot t, spatial s -> token t*HW + s. Iterating t outermost keeps every row sorted.
    offsets = torch.arange(t, device=vis_s.device).mul_(h * w).view(1, t, 1)
    tube = lambda s: (offsets + s.unsqueeze(1)).flatten(1)  # noqa: E731  [B, S] -> [B, T*S]
    return tube(vis_s), tube(mask_s)


def indices_to_mask(idx: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``idx [B, K]`` token positions -> ``bool [B, N]`` with ``True`` at those positions (= masked)."""
    v.positive_int("num_tokens", num_tokens)
    if idx.dim() != 2:
        raise ValueError(f"idx: must be [B, K], got shape {tuple(idx.shape)}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_tokens):
        raise ValueError(f"idx: positions must be in 0..{num_tokens - 1}, got {int(idx.min())}..{int(idx.max())}")
    mask = torch.zeros(idx.shape[0], num_tokens, dtype=torch.bool, device=idx.device)
    return mask.scatter_(1, idx.long(), True)


def mask_to_indices(mask: torch.Tensor) -> torch.Tensor:
    """``bool [B, N]`` (``True`` = masked) -> sorted positions of the ``True`` entries, ``[B, K]``.

    Every row must have the same number ``K`` of ``True`` entries; for the visible set pass ``~mask``.
    """
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"mask: must be a bool [B, N] tensor, got {mask.dtype} {tuple(mask.shape)}")
    counts = mask.sum(dim=1)
    if counts.numel() and bool((counts != counts[0]).any()):
        raise ValueError(
            "mask: every row must mask the same number of tokens to form a [B, K] index tensor; got "
            f"per-row counts {counts.tolist()}"
        )
    k = int(counts[0]) if counts.numel() else 0
    # nonzero() lists hits in row-major order, so each row's positions come out sorted.
    return mask.nonzero(as_tuple=False)[:, 1].reshape(mask.shape[0], k)


def subsample_indices(
    idx: torch.Tensor,
    fraction: float,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Keep a random ``fraction`` of each row of ``idx [B, M]`` -> ``[B, M']``, sorted ascending.

    ``M' = max(1, round(fraction * M))`` (halves round up). Used to put the loss (and the decoder's
    queries) on only part of the masked patches; ``fraction=1`` returns every position, sorted.
    """
    frac = v.fraction("fraction", fraction)
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError(f"idx: must be a non-empty [B, M] tensor, got shape {tuple(idx.shape)}")
    b, m = idx.shape
    keep = max(1, math.floor(frac * m + 0.5))
    if keep >= m:
        return idx.sort(dim=1).values
    cols = _rand((b, m), generator, idx.device).argsort(dim=1)[:, :keep]
    return idx.gather(1, cols).sort(dim=1).values
