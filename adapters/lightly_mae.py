"""LayerLock for lightly's image MAE (``MaskedVisionTransformerTIMM`` + ``MaskedVisionTransformerDecoderTIMM``).

:class:`LayerLockMAE` wraps the modules of lightly's MAE example and adds LayerLock to it::

    vit = timm.create_model("vit_base_patch32_224")
    backbone = MaskedVisionTransformerTIMM(vit=vit)
    decoder = MaskedVisionTransformerDecoderTIMM(num_patches=vit.patch_embed.num_patches, embed_dim=512,
                                                 depth=1, num_heads=16, num_prefix_tokens=vit.num_prefix_tokens)
    mae = LayerLockMAE(backbone, decoder, LayerLockConfig(...), mask_ratio=0.75)
    optimizer = torch.optim.AdamW(mae.parameters(), lr=1.5e-4)   # includes every readout head
    mae.layerlock.attach_optimizer(optimizer)                    # warmup + optimizer-state freeing

    for step, images in enumerate(loader):                       # images [B, C, H, W]
        mae.layerlock.begin_step(step)                           # freeze on schedule, switch target
        out = mae(images)                                        # masking, targets, student, loss
        out.loss.backward()
        if not mae.layerlock.end_step(out.loss, out.targets).skip:   # collapse guard
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

What it does per step (mirroring lightly's ``forward_encoder`` / ``forward_decoder``):

* masking with lightly's ``random_token_mask`` (prefix tokens such as CLS are always kept);
* targets at the masked positions from ``self.layerlock.targets``: per-patch pixels
  (``"pixels"``, lightly's ``patchify`` layout) before the first switch, then the output of the newest
  frozen block of the wrapped timm ViT on the full, unmasked image (``"layer_k"``), computed through
  :meth:`TimmViTEncoder.forward_prefix` in eval mode without autograd and stopping at block ``k``;
* the student runs ``backbone.preprocess`` (lightly), ``vit.norm_pre`` and the frozen blocks under
  ``torch.no_grad()``, then the trainable blocks with autograd (``forward_encoder``);
* lightly's decoder path (``decoder_embed`` -> ``set_at_index`` into mask tokens -> ``add_pos_embed`` ->
  ``decode`` -> ``get_at_index``) and one readout per head: the pixel head for pixels, a
  ``Linear(decoder_dim, embed_dim)`` per latent target.

Decoders: ``MaskedVisionTransformerDecoderTIMM`` (lightly >= 1.6) leaves the input embedding and the
prediction head to the caller, as lightly's MAE example does: pass yours as ``decoder_embed`` /
``pixel_head`` or let :class:`LayerLockMAE` build them (``Linear(vit.embed_dim, decoder_dim)`` and
``Linear(decoder_dim, patch_h * patch_w * in_chans)``). The deprecated ``MAEDecoderTIMM`` (lightly 1.6,
removed in 1.7) still works while it exists: it brings its own ``embed`` / ``predict``.

Readout heads are **pre-created** in ``__init__`` for every target the schedule will ever use, so
``mae.parameters()`` given to the optimizer before training already contains them: no param-group
surgery at a switch, checkpoints always have the same keys, and DDP/FSDP see a fixed parameter set
(heads not used yet get no gradient; torch optimizers skip parameters whose ``grad`` is None).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from layerlock_plugin.adapters.timm_vit import TimmViTEncoder
from layerlock_plugin.controller import LayerLock, LayerLockConfig
from layerlock_plugin.errors import EncoderStructureError, MissingDependencyError, install_extra
from layerlock_plugin.masking import subsample_indices
from layerlock_plugin.targets import PIXELS, head_name

try:
    from lightly.models import utils as lightly_utils
except ImportError as exc:  # pragma: no cover - exercised only without lightly
    raise MissingDependencyError(
        f"layerlock_plugin.adapters.lightly_mae needs lightly: {install_extra('lightly')}"
    ) from exc

__all__ = ["LayerLockMAE", "LayerLockMAEOutput"]


class LayerLockMAEOutput(NamedTuple):
    """One training step's results.

    ``loss``: scalar (mean over heads of the MSE). ``parts``: loss per head (floats).
    ``predictions`` / ``targets``: ``{head: [B, Q, P]}`` at the masked (query) positions.
    ``idx_keep [B, K]`` / ``idx_mask [B, Q]``: lightly-style sequence indices (prefix tokens included,
    so patch ``n`` is sequence index ``n + num_prefix_tokens``).
    """

    loss: torch.Tensor
    parts: dict[str, float]
    predictions: dict[str, torch.Tensor]
    targets: dict[str, torch.Tensor]
    idx_keep: torch.Tensor
    idx_mask: torch.Tensor


def _check_lightly_modules(backbone: nn.Module, decoder: nn.Module) -> bool:
    """Whether ``decoder`` is the deprecated ``MAEDecoderTIMM`` (own embed/predict); refuses other modules."""
    vit = getattr(backbone, "vit", None)
    if vit is None or not callable(getattr(backbone, "preprocess", None)):
        raise EncoderStructureError(
            f"LayerLockMAE: backbone must be lightly's MaskedVisionTransformerTIMM (with .vit and "
            f".preprocess()), got {type(backbone).__name__}"
        )
    legacy = all(hasattr(decoder, a) for a in ("embed", "predict"))
    missing = [a for a in ("decode", "mask_token", *(() if legacy else ("add_pos_embed",))) if not hasattr(decoder, a)]
    if missing:
        raise EncoderStructureError(
            f"LayerLockMAE: decoder must be lightly's MaskedVisionTransformerDecoderTIMM (add_pos_embed/decode/"
            f"mask_token) or MAEDecoderTIMM (embed/decode/predict); {type(decoder).__name__} lacks {missing}"
        )
    return legacy


def _linear(d_in: int, d_out: int) -> nn.Linear:
    """A readout initialised as MAE's linears: xavier-uniform weight, zero bias."""
    layer = nn.Linear(d_in, d_out)
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class LayerLockMAE(nn.Module):
    """lightly's image MAE with LayerLock.

    Args:
        backbone: ``lightly.models.modules.MaskedVisionTransformerTIMM`` around a timm
            ``VisionTransformer`` (the encoder that is progressively frozen).
        decoder: ``lightly.models.modules.MaskedVisionTransformerDecoderTIMM`` (or the deprecated
            ``MAEDecoderTIMM``); its own blocks, never frozen.
        config: the LayerLock config (schedule, target, warmup, guard). ``config.with_method("mae")``
            gives lightly's plain MAE with the same code path (the baseline).
        mask_ratio: fraction of patches masked (lightly's MAE example: 0.75).
        optimizer: optional; same as calling ``self.layerlock.attach_optimizer(optimizer)`` later.
        total_steps: optional; warns when the schedule would be cut short.
        decoder_embed: ``[B, K, D] -> [B, K, decoder_dim]`` for ``MaskedVisionTransformerDecoderTIMM``
            (default: a new ``Linear``); must be None with ``MAEDecoderTIMM``, which has its own.
        pixel_head: ``[B, Q, decoder_dim] -> [B, Q, patch_h * patch_w * in_chans]``, likewise.

    Attributes:
        layerlock: the :class:`~layerlock_plugin.controller.LayerLock` controller (``begin_step``,
            ``end_step``, ``metrics``, ``state_dict``). Its encoder is a :class:`TimmViTEncoder`
            around ``backbone.vit`` (held by the controller only, so the state dict has no
            duplicate keys).
        readouts: ``nn.ModuleDict`` ``{"layer_k": Linear(decoder_dim, embed_dim)}``, pre-created.

    Raises:
        EncoderStructureError: the backbone's ViT is not a supported timm ViT (see
            :class:`TimmViTEncoder`), or backbone/decoder are not lightly's MAE modules.
    """

    def __init__(
        self,
        backbone: nn.Module,
        decoder: nn.Module,
        config: LayerLockConfig | None = None,
        *,
        mask_ratio: float = 0.75,
        optimizer: torch.optim.Optimizer | None = None,
        total_steps: int | None = None,
        decoder_embed: nn.Module | None = None,
        pixel_head: nn.Module | None = None,
    ):
        super().__init__()
        legacy = _check_lightly_modules(backbone, decoder)
        if legacy and (decoder_embed is not None or pixel_head is not None):
            raise EncoderStructureError("LayerLockMAE: MAEDecoderTIMM has its own embed/predict; pass decoder_embed / "
                                        "pixel_head only with MaskedVisionTransformerDecoderTIMM")
        if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)) or not 0 < mask_ratio < 1:
            raise ValueError(f"LayerLockMAE: mask_ratio must be in (0, 1), got {mask_ratio!r}")
        vit = backbone.vit
        encoder = TimmViTEncoder(vit)  # raises EncoderStructureError for unsupported timm models
        self.backbone = backbone
        self.decoder = decoder
        self.mask_ratio = float(mask_ratio)
        patch = vit.patch_embed.patch_size
        self.patch_size: tuple[int, int] = (int(patch[0]), int(patch[1])) if isinstance(patch, Sequence) else (int(patch),) * 2
        self.num_patches = int(vit.patch_embed.num_patches)
        self.num_prefix_tokens = int(getattr(vit, "num_prefix_tokens", 0))
        self.layerlock = LayerLock(encoder, config, optimizer, tubelet=(1, *self.patch_size), total_steps=total_steps)
        decoder_dim = int(decoder.mask_token.shape[-1])
        self.legacy_decoder = legacy
        if not legacy:
            in_chans = int(vit.patch_embed.proj.in_channels)
            self.decoder_embed = decoder_embed or _linear(vit.embed_dim, decoder_dim)
            self.pixel_head = pixel_head or _linear(decoder_dim, self.patch_size[0] * self.patch_size[1] * in_chans)
        self.readouts = nn.ModuleDict({head_name(k): _linear(decoder_dim, vit.embed_dim)
                                       for k in self.layerlock.readout_layers()})

    @property
    def sequence_length(self) -> int:
        """Prefix tokens + patches (lightly's ``backbone.sequence_length``)."""
        return self.num_prefix_tokens + self.num_patches

    # ------------------------------------------------------------------------------ masking
    def random_mask(self, batch_size: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(idx_keep [B, K], idx_mask [B, M])`` in sequence indices (prefix tokens always kept).

        Patches are drawn with lightly's ``random_token_mask`` (``K - prefix = int(N * (1 - ratio))``).
        """
        keep, mask = lightly_utils.random_token_mask(
            size=(batch_size, self.num_patches), mask_ratio=self.mask_ratio, mask_class_token=True, device=device
        )
        keep, mask = keep + self.num_prefix_tokens, mask + self.num_prefix_tokens
        if self.num_prefix_tokens:
            prefix = torch.arange(self.num_prefix_tokens, device=keep.device).expand(batch_size, -1)
            keep = torch.cat([prefix, keep], dim=1)
        return keep, mask

    # ------------------------------------------------------------------------------ model
    def forward_encoder(self, images: torch.Tensor, idx_keep: torch.Tensor, frozen_prefix: int | None = None) -> torch.Tensor:
        """Encode the kept tokens: ``images [B, C, H, W]``, ``idx_keep [B, K]`` -> ``[B, K, D]``.

        Same computation as ``backbone.encode(images, idx_keep=idx_keep)``, except that the stem and
        the first ``frozen_prefix`` blocks (default: the controller's current frozen prefix) run
        under ``torch.no_grad()``: no activations are stored for them.
        """
        vit = self.backbone.vit
        p = self.layerlock.frozen_prefix() if frozen_prefix is None else int(frozen_prefix)
        with torch.set_grad_enabled(torch.is_grad_enabled() and p == 0):
            x = self.backbone.preprocess(images=images, idx_keep=idx_keep)
            x = vit.norm_pre(x)
            for blk in vit.blocks[:p]:
                x = blk(x)
        use_ckpt = getattr(self.backbone, "grad_checkpointing", False) and torch.is_grad_enabled()
        for blk in vit.blocks[p:]:
            x = checkpoint(blk, x, use_reentrant=False) if use_ckpt else blk(x)
        return vit.norm(x)

    def forward_decoder(
        self, x_encoded: torch.Tensor, idx_keep: torch.Tensor, idx_mask: torch.Tensor, heads: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        """lightly's MAE decoder + one readout per head: ``{head: [B, Q, P]}`` at ``idx_mask [B, Q]``."""
        legacy = self.legacy_decoder  # MAEDecoderTIMM: its own embed, positions inside decode, predict
        batch_size = x_encoded.shape[0]
        x_decode = self.decoder.embed(x_encoded) if legacy else self.decoder_embed(x_encoded)
        x_full = lightly_utils.repeat_token(self.decoder.mask_token, (batch_size, self.sequence_length))
        x_full = lightly_utils.set_at_index(x_full, idx_keep, x_decode.type_as(x_full))
        x_decoded = self.decoder.decode(x_full if legacy else self.decoder.add_pos_embed(x_full))
        x_query = lightly_utils.get_at_index(x_decoded, idx_mask)
        out = {}
        for h in heads:
            if h == PIXELS:
                out[h] = self.decoder.predict(x_query) if legacy else self.pixel_head(x_query)
            elif h in self.readouts:
                out[h] = self.readouts[h](x_query)
            else:
                raise KeyError(f"LayerLockMAE has no readout for head {h!r}; has {[PIXELS, *self.readouts]}")
        return out

    def forward(self, images: torch.Tensor, idx_keep: torch.Tensor | None = None, idx_mask: torch.Tensor | None = None) -> LayerLockMAEOutput:
        """One MAE/LayerLock step on ``images [B, C, H, W]`` with the controller's current plan.

        Call ``self.layerlock.begin_step(step)`` first (the Lightning callback does it). Masks are drawn
        with :meth:`random_mask` unless given. ``config.target.loss_fraction < 1`` keeps a random
        fraction of the masked positions as queries (smaller decoder readout and loss).
        """
        if images.dim() != 4:
            raise ValueError(f"LayerLockMAE: images must be [B, C, H, W], got shape {tuple(images.shape)}")
        if idx_keep is None or idx_mask is None:
            idx_keep, idx_mask = self.random_mask(images.shape[0], images.device)
        fraction = self.layerlock.config.target.loss_fraction
        if fraction < 1.0:
            idx_mask = subsample_indices(idx_mask, fraction)
        plan = self.layerlock.plan
        query_idx = idx_mask - self.num_prefix_tokens  # patch indices
        targets = self.layerlock.targets(images, plan, query_idx, self._visible_patches(idx_keep))
        x_encoded = self.forward_encoder(images, idx_keep)
        preds = self.forward_decoder(x_encoded, idx_keep, idx_mask, list(targets))
        loss, parts = self.layerlock.loss(preds, targets)
        return LayerLockMAEOutput(loss, parts, preds, targets, idx_keep, idx_mask)

    def _visible_patches(self, idx_keep: torch.Tensor) -> torch.Tensor:
        """``idx_keep [B, prefix + V]`` (sequence indices, prefix tokens first, as :meth:`random_mask`
        draws them) -> visible patch indices ``[B, V]`` for the sparse target context."""
        npt = self.num_prefix_tokens
        if npt and not torch.equal(idx_keep[:, :npt], torch.arange(npt, device=idx_keep.device).expand(idx_keep.shape[0], -1)):
            raise ValueError(f"idx_keep: must start with the {npt} prefix token index(es) 0..{npt - 1} in every row "
                             f"(as LayerLockMAE.random_mask draws them)")
        return idx_keep[:, npt:] - npt

    @torch.no_grad()
    def features(self, images: torch.Tensor, pool: str = "mean") -> torch.Tensor:
        """Frozen features of the full image for probes: ``[B, D]`` (``pool``: ``"mean"`` over patch
        tokens after the final norm, or ``"cls"``)."""
        tokens = self.backbone.encode(images)
        if pool == "cls":
            return tokens[:, 0]
        return tokens[:, self.num_prefix_tokens:].mean(dim=1)
