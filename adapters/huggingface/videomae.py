"""Hugging Face ``VideoMAEForPreTraining`` with LayerLock's readouts, seen through the layered-encoder protocol.

* :class:`LayerLockVideoMAEForPreTraining` is a drop-in subclass of transformers'
  ``VideoMAEForPreTraining``: same config, same weights and state-dict keys (``from_pretrained`` of a
  VideoMAE checkpoint works), plus one readout ``Linear(decoder_hidden_size, hidden_size)`` per latent
  target ``layer_1 .. layer_{L-1}`` under ``layerlock_readouts.*``. Called as HF calls it
  (``model(pixel_values, bool_masked_pos)``) it *is* VideoMAE's pixel pretraining; called with
  ``heads=`` it runs LayerLock's student (:meth:`LayerLockVideoMAEForPreTraining.forward`).
  The pixel readout is VideoMAE's own ``decoder.head``, so before the first switch a step is exactly
  VideoMAE's (tested against its ``loss``).
* :class:`VideoMAEEncoder` points LayerLock at ``videomae.embeddings`` (the stem: the Conv3d patch
  embedding; the sin-cos positions are a fixed tensor, not a parameter) and ``videomae.encoder.layer[i]``
  (the freezable blocks; the decoder is separate, so every block is freezable). Its ``forward_prefix``
  runs the stem and blocks ``1..k`` on the full clip (or on ``token_idx`` only: ``target.context: sparse``).
* :func:`videomae_pixel_targets` is ``VideoMAEForPreTraining``'s own label computation (ImageNet
  un-normalisation for 3 channels, per-patch normalisation with ``config.norm_pix_loss``) for every token.

Inputs are in transformers' layout, ``pixel_values [B, T, C, H, W]``; tokens in ``(t h w)`` order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from layerlock_plugin.encoder import EncoderUnits, FreezeUnit, block_name, check_layers
from layerlock_plugin.errors import ConfigError
from layerlock_plugin.targets import PIXELS, gather_tokens, head_name, pixel_targets

from transformers import VideoMAEForPreTraining
from transformers.utils.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

__all__ = ["LayerLockVideoMAEForPreTraining", "VideoMAEEncoder", "videomae_pixel_targets"]

READOUTS = "layerlock_readouts"  # the readouts' attribute (and state-dict prefix) on the model


def _layout_error(model: nn.Module, what: str) -> ConfigError:
    return ConfigError("model", f"must be a transformers VideoMAE ({{VideoMAEModel, VideoMAEForPreTraining}} of "
                                f"transformers 5.x: videomae.embeddings.patch_embeddings.projection, "
                                f"videomae.encoder.layer); {type(model).__name__} {what}")


class VideoMAEEncoder:
    """transformers' ``VideoMAEModel`` (``model.videomae``) as a LayerLock layered encoder.

    Not an ``nn.Module``: it only points at the model's submodules, so state-dict keys stay VideoMAE's.
    Raises :class:`ConfigError` (field ``model``) naming what a model of another layout lacks.
    """

    def __init__(self, videomae: nn.Module):
        embeddings = getattr(videomae, "embeddings", None)
        projection = getattr(getattr(embeddings, "patch_embeddings", None), "projection", None)
        layers = getattr(getattr(videomae, "encoder", None), "layer", None)
        if not isinstance(projection, nn.Conv3d):
            raise _layout_error(videomae, "has no Conv3d at embeddings.patch_embeddings.projection")
        if not isinstance(layers, nn.ModuleList) or len(layers) < 2:
            raise _layout_error(videomae, "has no encoder.layer ModuleList of at least 2 blocks")
        self.videomae = videomae
        self.tubelet = tuple(int(s) for s in projection.kernel_size)  # (pt, ph, pw)

    @property
    def num_layers(self) -> int:
        """Number of freezable blocks (all encoder blocks)."""
        return len(self.videomae.encoder.layer)

    def layerlock_units(self) -> EncoderUnits:
        """The stem (``embeddings``: patch projection) and one unit per ``encoder.layer[i]``."""
        stem = FreezeUnit("stem", modules=(self.videomae.embeddings,))
        blocks = tuple(FreezeUnit(block_name(i + 1), modules=(m,)) for i, m in enumerate(self.videomae.encoder.layer))
        return EncoderUnits(stem=stem, blocks=blocks)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``pixel_values [B, T, C, H, W] -> [B, N, D]``: patch embedding + sin-cos positions, every token."""
        return self.videomae.embeddings(pixel_values, None)

    def forward_prefix(self, pixel_values: torch.Tensor, layers: Sequence[int],
                       token_idx: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        """``{k: [B, N, D]}``: raw output of blocks ``layers`` on the full clip ``[B, T, C, H, W]``, stopping
        at ``max(layers)``; with ``token_idx [B, K]`` the blocks see only those tokens -> ``{k: [B, K, D]}``."""
        ks = check_layers(layers, self.num_layers)
        x = self.embed(pixel_values)
        if token_idx is not None:
            x = gather_tokens(x, token_idx)
        out = {}
        for i, layer in enumerate(self.videomae.encoder.layer[: ks[-1]], start=1):
            x = layer(x)
            if i in ks:
                out[i] = x
        return out


@torch.no_grad()
def videomae_pixel_targets(config, pixel_values: torch.Tensor) -> torch.Tensor:
    """``VideoMAEForPreTraining``'s labels for every token: ``pixel_values [B, T, C, H, W] -> [B, N, P]``,
    ``P = tubelet * patch**2 * C`` in ``(pt ph pw c)`` order. 3-channel clips are un-normalised with
    ImageNet's mean / std first; ``config.norm_pix_loss`` normalises each patch per channel."""
    frames = pixel_values
    if config.num_channels == 3:
        mean = torch.as_tensor(IMAGENET_DEFAULT_MEAN, device=frames.device, dtype=frames.dtype)[None, None, :, None, None]
        std = torch.as_tensor(IMAGENET_DEFAULT_STD, device=frames.device, dtype=frames.dtype)[None, None, :, None, None]
        frames = frames * std + mean
    elif not config.norm_pix_loss:
        raise ConfigError("model.config.norm_pix_loss", "must be true for clips without 3 channels (VideoMAE cannot "
                                                        "un-normalise them)")
    tubelet = (config.tubelet_size, config.patch_size, config.patch_size)
    return pixel_targets(frames.permute(0, 2, 1, 3, 4), tubelet, normalize=config.norm_pix_loss)


class LayerLockVideoMAEForPreTraining(VideoMAEForPreTraining):
    """``VideoMAEForPreTraining`` plus LayerLock's latent readouts (see the module docstring)."""

    def __init__(self, config):
        super().__init__(config)
        heads = {head_name(k): nn.Linear(config.decoder_hidden_size, config.hidden_size)
                 for k in range(1, config.num_hidden_layers)}
        self.add_module(READOUTS, nn.ModuleDict(heads))
        self.post_init()  # initialises only the new readouts (transformers skips modules it initialised)

    @property
    def layerlock_encoder(self) -> VideoMAEEncoder:
        """The encoder as LayerLock sees it (stem + ``encoder.layer`` blocks)."""
        return VideoMAEEncoder(self.videomae)

    def readout(self, head: str) -> nn.Module:
        """The readout of ``head``: VideoMAE's ``decoder.head`` for ``"pixels"``, else ``layerlock_readouts[head]``."""
        return self.decoder.head if head == PIXELS else getattr(self, READOUTS)[head]

    def readouts(self) -> Mapping[str, nn.Module]:
        """Every readout by head name, pixels first."""
        return {PIXELS: self.decoder.head, **getattr(self, READOUTS)}

    def forward(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None = None, *,
                visible_idx: torch.Tensor | None = None, query_idx: torch.Tensor | None = None,
                heads: Sequence[str] | None = None, frozen_prefix: int = 0, **kwargs):
        """Without ``heads``: ``VideoMAEForPreTraining.forward`` unchanged. With ``heads``: LayerLock's
        student, ``{head: [B, Q, P]}`` at ``query_idx [B, Q]``.

        The encoder runs on ``visible_idx [B, V]`` (sorted) of ``pixel_values [B, T, C, H, W]``, the first
        ``frozen_prefix`` blocks (frozen, with the stem) without autograd; VideoMAE's decoder runs on the
        visible tokens followed by one mask token per query (its sin-cos positions), then ``decoder.norm``
        and the readout of each head. With ``query_idx`` = every masked token, this is VideoMAE's forward.
        """
        if heads is None:
            return super().forward(pixel_values, bool_masked_pos, **kwargs)
        if visible_idx is None or query_idx is None:
            raise ValueError("LayerLock's student needs visible_idx [B, V] and query_idx [B, Q] with heads")
        layers = self.videomae.encoder.layer
        with torch.no_grad() if frozen_prefix > 0 else contextlib.nullcontext():
            x = gather_tokens(self.videomae.embeddings(pixel_values, None), visible_idx)
            for layer in layers[:frozen_prefix]:
                x = layer(x)
        for layer in layers[frozen_prefix:]:
            x = layer(x)
        if self.videomae.layernorm is not None:
            x = self.videomae.layernorm(x)
        x = self.encoder_to_decoder(x)
        b, q = query_idx.shape
        pos = self.position_embeddings.detach().to(device=x.device, dtype=x.dtype).expand(b, -1, -1)
        z = torch.cat([x + gather_tokens(pos, visible_idx), self.mask_token + gather_tokens(pos, query_idx)], dim=1)
        for layer in self.decoder.decoder_layers:
            z = layer(z)
        z = self.decoder.norm(z[:, -q:])
        return {h: self.readout(h)(z) for h in heads}
