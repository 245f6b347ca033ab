"""Target selection: per-patch-normalised pixels, or the output of frozen block(s) ``h_k``.

Latent targets are computed by the encoder's truncated forward (``forward_prefix``) on the full,
unmasked input, without autograd and with dropout off, stopping at the deepest requested block.
Only the query positions are kept: ``[B, N, D] -> [B, Q, D]``.

With ``context="sparse"`` the truncated forward sees only the query tokens plus the student's visible
ones (``Q + V`` of the ``N`` tokens, each at its own position), so the target pass costs ``(Q + V) / N``
of the full one. That is the context size the frozen blocks were trained in (an MAE encoder only ever
sees the visible tokens); paired with a small ``loss_fraction`` it removes most of the latent
target's cost (the paper's "5% patches" setting).

Head names: ``"pixels"`` for the pixel target and ``"layer_k"`` for block ``k``'s output; a host
model keeps one readout per head name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from . import _validate as v
from .encoder import LayeredEncoder
from .schedule import Plan

PIXELS = "pixels"


def head_name(layer: int) -> str:
    """``0 -> "pixels"``, ``k -> "layer_k"``."""
    return PIXELS if layer == 0 else f"layer_{layer}"


@dataclass(frozen=True)
class TargetConfig:
    """How targets are chosen.

    ``kind``: ``"latent"`` (LayerLock: switch to frozen-block outputs) or ``"pixels"`` (MAE, and the
    paper's progressive-freezing-only ablation). ``mode``: ``"single"`` (newest frozen block, the
    default and the paper's choice) or ``"multi"`` (every frozen block, equal weights).
    ``layer_norm``: affine-free layer norm of latent targets. ``normalize_pixels``: per-patch mean/var
    normalisation of pixel targets (VideoMAE). ``loss_fraction``: fraction of the masked patches that
    get a query and a loss (the decoder shrinks with it; the paper's "5% patches" ablation is 0.05).
    ``context``: what the latent target pass sees: ``"full"`` (every token, the default) or
    ``"sparse"`` (only the queried and the visible tokens; needs an encoder whose ``forward_prefix``
    accepts ``token_idx``, see :mod:`layerlock_plugin.encoder`).
    """

    kind: str = "latent"
    mode: str = "single"
    layer_norm: bool = True
    normalize_pixels: bool = True
    loss_fraction: float = 1.0
    context: str = "full"

    def __post_init__(self) -> None:
        v.one_of("target.kind", self.kind, ("latent", "pixels"))
        v.one_of("target.mode", self.mode, ("single", "multi"))
        v.boolean("target.layer_norm", self.layer_norm)
        v.boolean("target.normalize_pixels", self.normalize_pixels)
        v.fraction("target.loss_fraction", self.loss_fraction)
        v.one_of("target.context", self.context, ("full", "sparse"))


def patchify(video: torch.Tensor, tubelet: Sequence[int]) -> torch.Tensor:
    """``[B, C, T, H, W] -> [B, N, pt*ph*pw*C]`` with tokens in ``(t h w)`` order.

    Images ``[B, C, H, W]`` are patchified with the last two tubelet sizes (``(1, p, p)`` or
    ``(p, p)``): ``-> [B, N, ph*pw*C]``, tokens in ``(h w)`` order (timm's / lightly's layout).
    """
    if video.dim() == 4:
        ph, pw = tubelet[-2:]
        return rearrange(video, "b c (h ph) (w pw) -> b (h w) (ph pw c)", ph=ph, pw=pw)
    pt, ph, pw = tubelet
    return rearrange(video, "b c (t pt) (h ph) (w pw) -> b (t h w) (pt ph pw c)", pt=pt, ph=ph, pw=pw)


def pixel_targets(video: torch.Tensor, tubelet: Sequence[int], normalize: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Pixel targets ``[B, N, P]`` (videos or images, see :func:`patchify`; ``P = pt*ph*pw*C``).

    With ``normalize``, VideoMAE's per-patch normalisation: each colour channel of a patch separately
    gets zero mean and unit variance over the patch's ``pt*ph*pw`` pixels (unbiased variance,
    ``(x - mean) / (std + eps)``), so a patch's brightness and tint are not part of the target.
    """
    patches = patchify(video, tubelet)
    if not normalize:
        return patches
    # patchify puts the channel fastest inside a patch: [B, N, P] -> [B, N, pixels, C]
    per_channel = patches.unflatten(-1, (-1, video.shape[1]))
    mean = per_channel.mean(dim=-2, keepdim=True)
    std = per_channel.var(dim=-2, unbiased=True, keepdim=True).sqrt()
    return ((per_channel - mean) / (std + eps)).flatten(-2)


def gather_tokens(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tokens [B, N, D]``, ``index [B, Q]`` -> ``[B, Q, D]``."""
    return torch.gather(tokens, 1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


@contextlib.contextmanager
def eval_mode(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Temporarily put modules in eval mode (dropout / drop-path off), restoring each one's mode."""
    saved = [(m, m.training) for mod in modules for m in mod.modules()]
    try:
        for mod in modules:
            mod.eval()
        yield
    finally:
        for m, mode in saved:
            m.training = mode


def prefix_outputs(encoder: LayeredEncoder, inputs: torch.Tensor, layers: Sequence[int], **kwargs) -> dict[int, torch.Tensor]:
    """``encoder.forward_prefix(inputs, layers, **kwargs)`` -> ``{k: [B, N, D]}`` with the stem and blocks
    ``1..max(layers)`` in eval mode (dropout / drop-path off), as a target pass needs; no autograd is
    switched off here (wrap the call in ``torch.no_grad()``)."""
    units = encoder.layerlock_units()
    modules = [*units.stem.modules, *(m for u in units.blocks[: max(layers)] for m in u.modules)]
    with eval_mode(modules):
        return encoder.forward_prefix(inputs, layers, **kwargs)


class TargetSelector:
    """Picks the head names for a plan and computes their targets at the query positions."""

    def __init__(self, config: TargetConfig, tubelet: Sequence[int] | None = None):
        self.config = config
        self.tubelet = tuple(tubelet) if tubelet is not None else None

    def layers(self, plan: Plan) -> list[int]:
        """Target blocks for ``plan``: ``[]`` means pixels."""
        if self.config.kind == "pixels" or plan.target_layer == 0:
            return []
        if self.config.mode == "multi":
            return list(range(1, plan.target_layer + 1))
        return [plan.target_layer]

    def heads(self, plan: Plan) -> list[str]:
        """Head names of ``plan``'s targets: ``["pixels"]`` or ``["layer_k", ...]``."""
        layers = self.layers(plan)
        return [head_name(k) for k in layers] if layers else [PIXELS]

    @torch.no_grad()
    def compute(self, encoder: LayeredEncoder, video: torch.Tensor, plan: Plan, query_idx: torch.Tensor,
                visible_idx: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Targets per head, each ``[B, Q, P]`` at ``query_idx [B, Q]``.

        Latent targets run the stem and blocks ``1..max(layers)`` once, in eval mode, without autograd:
        on all ``N`` tokens (``context="full"``), or on the ``Q`` query tokens followed by the
        ``visible_idx [B, V]`` ones (``context="sparse"``; without ``visible_idx``, on the queries alone).
        """
        layers = self.layers(plan)
        if not layers:
            if self.tubelet is None:
                raise ValueError("TargetSelector needs the tubelet (patch size) to build pixel targets")
            pix = pixel_targets(video, self.tubelet, self.config.normalize_pixels)
            return {PIXELS: gather_tokens(pix, query_idx)}
        sparse = self.config.context == "sparse"
        if sparse:
            context = query_idx if visible_idx is None else torch.cat([query_idx, visible_idx], dim=1)
            outputs = prefix_outputs(encoder, video, layers, token_idx=context)
        else:
            outputs = prefix_outputs(encoder, video, layers)
        targets = {}
        for k in layers:
            # sparse: the queries are the first Q context tokens
            h = outputs[k][:, : query_idx.shape[1]] if sparse else gather_tokens(outputs[k], query_idx)
            if self.config.layer_norm:
                h = F.layer_norm(h, h.shape[-1:])
            targets[head_name(k)] = h
        return targets


def target_loss(predictions: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean-squared error per head, ``predictions[h]`` and ``targets[h]`` both ``[B, Q, P]``, averaged over
    the heads (equal weight): returns the scalar loss and a detached scalar tensor per head (tensors, not
    floats: reading them on the host would cost a device sync every step; ``float()`` them to log)."""
    missing = set(targets) - set(predictions)
    if missing:
        raise KeyError(f"predictions lack heads {sorted(missing)}; got {sorted(predictions)}")
    parts = {name: F.mse_loss(predictions[name].float(), t.float()) for name, t in targets.items()}
    total = torch.stack(list(parts.values())).mean()
    return total, {name: p.detach() for name, p in parts.items()}
