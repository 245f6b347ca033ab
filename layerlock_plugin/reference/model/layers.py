"""The few small layers the reference ViT needs, written here instead of imported from timm.

Importing timm costs one to three seconds of every run's start-up (and the CLI's bad-input refusals), for
five small functions. Each one below computes exactly what the timm function of the same name (timm 1.0)
computes, operation for operation, so weights, RNG draws and results are bitwise the same:
``trunc_normal_`` is timm's inverse-CDF sampler (torch's own ``nn.init.trunc_normal_`` now rejects and
redraws, which draws other numbers), ``Mlp`` keeps timm's parameter names (``fc1``, ``fc2``).
``tests/test_reference_model.py`` checks them against timm.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["DropPath", "Mlp", "apply_rot_embed", "freq_bands", "trunc_normal_"]


def trunc_normal_(tensor: torch.Tensor, mean: float = 0.0, std: float = 1.0, a: float = -2.0,
                  b: float = 2.0) -> torch.Tensor:
    """Fill ``tensor`` in place from N(mean, std^2) truncated to [a, b]: uniform draws mapped through the
    inverse normal CDF (one draw per element, no redraws)."""
    def norm_cdf(x: float) -> float:
        return (1.0 + math.erf(x / math.sqrt(2.0))) / 2.0

    with torch.no_grad():
        lo, hi = norm_cdf((a - mean) / std), norm_cdf((b - mean) / std)
        tensor.uniform_(2 * lo - 1, 2 * hi - 1)
        tensor.erfinv_()
        tensor.mul_(std * math.sqrt(2.0))
        tensor.add_(mean)
        tensor.clamp_(min=a, max=b)
    return tensor


def freq_bands(num_bands: int, temperature: float = 10000.0, step: int = 2) -> torch.Tensor:
    """``[ceil(num_bands / step)]`` RoPE frequencies ``1 / temperature^(2i / num_bands)``."""
    exponent = torch.arange(0, num_bands, step, dtype=torch.int64).to(torch.float32) / num_bands
    return 1.0 / (temperature ** exponent)


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """``[..., D]`` -> ``[..., D]``: each channel pair (x0, x1) becomes (-x1, x0)."""
    return torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)


def apply_rot_embed(x: torch.Tensor, sin_emb: torch.Tensor, cos_emb: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the interleaved layout (``sin`` / ``cos`` ``[..., D]`` repeat each frequency
    twice): ``x * cos + rotate_pairs(x) * sin``, in ``x``'s dtype."""
    return (x * cos_emb + _rotate_pairs(x) * sin_emb).to(dtype=x.dtype)


class Mlp(nn.Module):
    """``fc1 -> act -> dropout -> fc2 -> dropout``: ``[..., in] -> [..., in]``."""

    def __init__(self, in_features: int, hidden_features: int, act_layer: type[nn.Module] = nn.GELU,
                 drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: in training, zero the whole residual branch of a sample with probability
    ``drop_prob`` and scale the kept ones by ``1 / (1 - drop_prob)``; ``x [B, ...]``."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        if keep > 0.0:
            mask.div_(keep)
        return x * mask

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"
