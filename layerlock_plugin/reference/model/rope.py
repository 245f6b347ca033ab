"""Position encodings of the reference video ViT: 3D RoPE (4DS style) and a fixed 3D sin-cos table.

3D RoPE splits a token's channels into four consecutive parts ``[t | h | w | rest]``; part ``a`` gets
the standard 1D rotary embedding of the token's index along axis ``a`` (frequencies
``theta ** (-2i / d_a)``, channel pairs ``(0, 1), (2, 3), ...``) and ``rest`` is left as it is. The
default split (t 10%, h 25%, w 25%, rest 40%) is the 4DS/LayerLock one. Because each part is a 1D
RoPE, ``<R(a) q, R(b) k>`` depends only on the offset ``b - a`` along each axis.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["RoPE3D", "apply_rope", "rope_part_dims", "sincos_pos_embed_3d"]


def rope_part_dims(dim: int, split: Sequence[float]) -> tuple[int, int, int]:
    """Channels rotated along (t, h, w): ``split[a] * dim`` rounded down to an even number."""
    return tuple(2 * int(s * dim // 2) for s in split)  # type: ignore[return-value]


def apply_rope(x: torch.Tensor, emb: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate the first ``r`` channels of ``x`` with ``emb = (sin, cos)``; the other channels pass through.

    ``x``: ``[B, n, C]`` or ``[B, heads, n, C]``; ``sin``/``cos``: ``[n, r]`` (shared positions) or
    ``[B, n, r]`` (per-sample positions), ``r <= C``. Returns a tensor shaped and typed like ``x``.
    """
    sin, cos = emb
    if x.dim() == 4 and sin.dim() == 3:  # per-sample positions, per-head x: broadcast over heads
        sin, cos = sin.unsqueeze(1), cos.unsqueeze(1)
    r = sin.shape[-1]
    # Slicing off the unrotated channels keeps them bit-exact and saves the work on them.
    from timm.layers import apply_rot_embed  # imported on use: the CLI's config checks start without timm

    return torch.cat([apply_rot_embed(x[..., :r], sin, cos), x[..., r:]], dim=-1)


def _axis_positions(grid: Sequence[int]) -> torch.Tensor:
    """``[N, 3]`` integer (t, h, w) coordinates of the tokens in ``(t h w)`` order."""
    axes = [torch.arange(g) for g in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


class RoPE3D(nn.Module):
    """3D rotary position embedding over a ``(T, H, W)`` token grid, tokens in ``(t h w)`` order.

    Args:
        dim: channels of the tensors it rotates (a full token for RoPE after norm1, a head for RoPE on q/k).
        grid: ``(T, H, W)`` token grid.
        split: fractions of ``dim`` rotated along t, h, w (each rounded down to an even count); the
            remaining channels are not rotated.
        theta: RoPE base frequency.

    ``sin``/``cos`` (``[N, r]``, ``r = sum(part_dims)``) are non-persistent buffers: they follow
    ``.to()`` but stay out of checkpoints, since they are a pure function of the config.
    """

    def __init__(
        self,
        dim: int,
        grid: Sequence[int],
        split: Sequence[float] = (0.1, 0.25, 0.25),
        theta: float = 10000.0,
    ):
        super().__init__()
        if len(grid) != 3 or len(split) != 3:
            raise ValueError(f"RoPE3D: grid and split need 3 entries (t, h, w), got {grid!r}, {split!r}")
        if any(s < 0 for s in split) or sum(split) > 1.0 + 1e-9:
            raise ValueError(f"RoPE3D: split fractions must be >= 0 and sum to <= 1, got {tuple(split)}")
        self.dim, self.grid, self.theta = dim, tuple(int(g) for g in grid), float(theta)
        self.part_dims = rope_part_dims(dim, split)
        self.rotated_dim = sum(self.part_dims)
        sin, cos = self._table()
        self.register_buffer("sin", sin, persistent=False)
        self.register_buffer("cos", cos, persistent=False)

    def _table(self) -> tuple[torch.Tensor, torch.Tensor]:
        from timm.layers import freq_bands

        pos = _axis_positions(self.grid).float()  # [N, 3]
        angles = [
            # [N, d/2] angles -> [N, d] in timm's interleaved layout [f0, f0, f1, f1, ...]
            (pos[:, a : a + 1] * freq_bands(d, temperature=self.theta)).repeat_interleave(2, dim=-1)
            for a, d in enumerate(self.part_dims)
        ]
        ang = torch.cat(angles, dim=-1)
        return ang.sin(), ang.cos()

    def reset_buffers(self) -> None:
        """Recompute the tables in place (after ``to_empty()`` from a meta-device init)."""
        sin, cos = self._table()
        self.sin.copy_(sin)
        self.cos.copy_(cos)

    @property
    def num_tokens(self) -> int:
        return self.sin.shape[0]

    def embed(self, token_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sin, cos)`` for the given tokens: ``[N, r]`` if ``token_idx`` is None, else ``[B, n, r]``
        for ``token_idx [B, n]`` (each token's position in ``0..N-1``)."""
        if token_idx is None:
            return self.sin, self.cos
        return self.sin[token_idx], self.cos[token_idx]

    def forward(self, x: torch.Tensor, token_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Rotate ``x [B, n, dim]`` (or ``[B, heads, n, dim]``) whose tokens sit at ``token_idx [B, n]``
        (None: all ``N`` tokens in order, ``n == N``)."""
        return apply_rope(x, self.embed(token_idx))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, grid={self.grid}, part_dims={self.part_dims}, theta={self.theta:g}"


def _sincos_1d(pos: torch.Tensor, dim: int, temperature: float) -> torch.Tensor:
    """``[N]`` positions -> ``[N, dim]`` = [sin | cos] (a zero channel pads an odd ``dim``)."""
    from timm.layers import freq_bands

    half = dim // 2
    ang = pos.float()[:, None] * freq_bands(2 * half, temperature=temperature)[None]  # [N, half]
    out = torch.cat([ang.sin(), ang.cos()], dim=-1)
    return torch.nn.functional.pad(out, (0, dim - 2 * half))


def sincos_pos_embed_3d(grid: Sequence[int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed additive 3D sin-cos table ``[1, N, dim]``, tokens in ``(t h w)`` order.

    h and w get ``dim // 3`` channels each (rounded down to even), t gets the rest.
    """
    d_hw = 2 * (dim // 6)
    dims = (dim - 2 * d_hw, d_hw, d_hw)
    pos = _axis_positions(grid)
    return torch.cat([_sincos_1d(pos[:, a], d, temperature) for a, d in enumerate(dims)], dim=-1)[None]
