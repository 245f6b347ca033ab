"""LayerLock adapter for timm Vision Transformers.

:class:`TimmViTEncoder` wraps a timm ``VisionTransformer``-family model (plain ViT, with or without a
class token, register tokens or a distillation token; e.g.
``timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=32, patch_size=8)``) and
implements the layered-encoder protocol of :mod:`layerlock_plugin.encoder`:

* ``layerlock_units()``: the stem (patch embedding, ``norm_pre``, positional embedding and prefix
  tokens) and then one unit per freezable block;
* ``forward_prefix(x, layers)``: the patch-token output of the requested blocks on the full input,
  computed by timm's own ``forward_intermediates`` with ``stop_early=True`` so that no block deeper
  than ``max(layers)`` runs.

Models whose blocks need more than the token tensor (rotary position embeddings as in EVA, relative
position bias as in BEiT) and hierarchical models (Swin, ConvNeXt, ResNet) are rejected with
:class:`~layerlock_plugin.errors.EncoderStructureError`.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import nn

from layerlock_plugin.encoder import EncoderUnits, FreezeUnit, block_name, check_layers
from layerlock_plugin.errors import EncoderStructureError, MissingDependencyError

try:
    import timm  # noqa: F401  (imported so a missing install fails here, with a clear message)
except ImportError as exc:  # timm is a core dependency of the reference trainer, so rare
    raise MissingDependencyError(
        "layerlock_plugin.adapters.timm_vit needs timm: pip install timm"
    ) from exc

__all__ = ["TimmViTEncoder"]

# What the wrapper relies on. ``_pos_embed`` / ``norm_pre`` are how timm's ViT family spells the
# stem; hierarchical models (Swin, ConvNeXt, ResNet) lack them and cannot give a flat [B, N, D]
# token sequence per block.
_REQUIRED_ATTRS = ("patch_embed", "blocks", "_pos_embed", "norm_pre", "forward_intermediates")
# forward_intermediates keywords we pass; older/other implementations without them are rejected.
_REQUIRED_FI_KWARGS = ("indices", "norm", "stop_early", "output_fmt", "intermediates_only")
# Learned tensors that belong to the stem (added/concatenated before block 1), when present.
_STEM_PARAM_NAMES = ("pos_embed", "cls_token", "reg_token", "dist_token")
# Parameter-free stem modules: put in eval mode with the stem so that a frozen stem is deterministic.
_STEM_DROPOUT_NAMES = ("pos_drop", "patch_drop")


class TimmViTEncoder(nn.Module):
    """A timm ViT as a LayerLock layered encoder.

    Args:
        model: a timm ``VisionTransformer`` (or a subclass / look-alike with ``patch_embed``,
            ``blocks``, ``_pos_embed``, ``norm_pre`` and ``forward_intermediates``). It is held as
            the submodule ``self.model``; calling the wrapper calls the model unchanged.
        decoder_blocks: how many of the *last* blocks a decoder reuses. They are left out of the
            freezable units (so they are never frozen) and cannot be asked for in
            ``forward_prefix``. ``0 <= decoder_blocks < len(model.blocks)``.

    Raises:
        EncoderStructureError: the model lacks one of the attributes above, its ``blocks`` is not an
            ``nn.Sequential``/``nn.ModuleList``, its blocks need extra inputs (rotary embeddings), or
            ``decoder_blocks`` leaves no freezable block.
    """

    def __init__(self, model: nn.Module, decoder_blocks: int = 0):
        super().__init__()
        cls_name = type(model).__name__
        for attr in _REQUIRED_ATTRS:
            if not hasattr(model, attr):
                raise EncoderStructureError(
                    f"TimmViTEncoder: {cls_name} has no attribute {attr!r}; only timm ViT-style models "
                    f"(a patch embedding followed by a flat sequence of transformer blocks, e.g. "
                    f"timm.models.vision_transformer.VisionTransformer) are supported, not hierarchical "
                    f"models such as Swin, ConvNeXt or ResNet"
                )
        blocks = model.blocks
        if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
            raise EncoderStructureError(
                f"TimmViTEncoder: {cls_name}.blocks must be a non-empty nn.Sequential or nn.ModuleList "
                f"of transformer blocks, got {type(blocks).__name__}"
            )
        if getattr(model, "rope", None) is not None:
            # EVA-style blocks take the rotary embedding as a second input (blk(x, rope=...)), so a
            # block is not a function of the token tensor alone; LayerLock's per-block targets and
            # the frozen-prefix caching in the trainer assume it is.
            raise EncoderStructureError(
                f"TimmViTEncoder: {cls_name} uses rotary position embeddings (model.rope is set), so its "
                f"blocks need the rotary embedding as an extra input besides the tokens; only ViTs whose "
                f"blocks take a single token tensor are supported (build it without rope, e.g. "
                f"use_rot_pos_emb=False, or implement layerlock_units()/forward_prefix() yourself)"
            )
        fi_params = inspect.signature(model.forward_intermediates).parameters
        missing_kwargs = [k for k in _REQUIRED_FI_KWARGS if k not in fi_params]
        if missing_kwargs:
            raise EncoderStructureError(
                f"TimmViTEncoder: {cls_name}.forward_intermediates does not accept {missing_kwargs}; "
                f"need timm>=1.0 ViT semantics (indices, norm, stop_early, output_fmt='NLC', "
                f"intermediates_only)"
            )
        if isinstance(decoder_blocks, bool) or not isinstance(decoder_blocks, int):
            raise TypeError(f"TimmViTEncoder: decoder_blocks must be an int, got {decoder_blocks!r}")
        if not 0 <= decoder_blocks < len(blocks):
            raise EncoderStructureError(
                f"TimmViTEncoder: decoder_blocks must be in 0..{len(blocks) - 1} for {cls_name} with "
                f"{len(blocks)} blocks (at least one block must stay freezable), got {decoder_blocks}"
            )
        self.model = model
        self.decoder_blocks = decoder_blocks

    # ----------------------------------------------------------------- info
    @property
    def num_layers(self) -> int:
        """Number of freezable blocks: ``len(model.blocks) - decoder_blocks``."""
        return len(self.model.blocks) - self.decoder_blocks

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens (class + register + distillation tokens)."""
        return int(getattr(self.model, "num_prefix_tokens", 0))

    def forward(self, *args, **kwargs):
        """Calls the wrapped model unchanged (the wrapper only adds the LayerLock protocol)."""
        return self.model(*args, **kwargs)

    # ------------------------------------------------------------- protocol
    def layerlock_units(self) -> EncoderUnits:
        """The stem and the freezable blocks, in depth order.

        The stem is ``patch_embed`` + ``norm_pre`` (+ the parameter-free ``pos_drop`` /
        ``patch_drop``, so freezing the stem also turns its dropout off) with the loose parameters
        ``pos_embed``, ``cls_token``, ``reg_token`` and ``dist_token`` where the model has them.
        Blocks ``1..num_layers`` follow, one unit each, named ``block_k`` (1-based).
        """
        m = self.model
        modules: list[nn.Module] = [m.patch_embed, m.norm_pre]
        for name in _STEM_DROPOUT_NAMES:
            mod = getattr(m, name, None)
            if isinstance(mod, nn.Module):
                modules.append(mod)
        extra = tuple(
            p for p in (getattr(m, n, None) for n in _STEM_PARAM_NAMES) if isinstance(p, nn.Parameter)
        )
        stem = FreezeUnit("stem", modules=tuple(modules), extra_params=extra)
        blocks = tuple(
            FreezeUnit(block_name(i + 1), modules=(m.blocks[i],)) for i in range(self.num_layers)
        )
        return EncoderUnits(stem=stem, blocks=blocks)

    def forward_prefix(self, inputs: torch.Tensor, layers: Sequence[int],
                       token_idx: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        """Patch-token outputs of blocks ``layers`` on the full input, stopping after ``max(layers)``.

        Args:
            inputs: images ``[B, C, H, W]``.
            layers: 1-based block indices in ``1..num_layers`` (duplicates allowed, order ignored).
            token_idx: optional ``[B, K]`` patch indices (``0..N-1``): run the blocks on the prefix
                tokens and those patches only (``target.context: sparse``).

        Returns:
            ``{k: h_k}`` with ``h_k`` of shape ``[B, N, D]`` (``[B, K, D]`` in ``token_idx`` order): the
            raw output of block ``k`` (no final norm) with the ``num_prefix_tokens`` class/register
            tokens dropped; ``N`` is the number of patches.

        Gradients flow as usual; wrap the call in ``torch.no_grad()`` for targets.
        """
        ks = check_layers(layers, self.num_layers)
        m = self.model
        if token_idx is not None:
            return self._forward_prefix_sparse(inputs, ks, token_idx)
        # Patch dropout (timm's patch_drop_rate) removes random tokens in training mode, which would
        # make the target cover a subset of the patches. Targets are defined on the full input, so
        # switch it off for this call only and restore the host's mode afterwards.
        patch_drop = getattr(m, "patch_drop", None)
        restore = isinstance(patch_drop, nn.Module) and patch_drop.training
        if restore:
            patch_drop.eval()
        try:
            # timm 1.0.x: patch_embed -> _pos_embed -> patch_drop -> norm_pre -> blocks[:max+1],
            # collecting the raw block output (norm=False) at each 0-based index, then slicing off
            # num_prefix_tokens; output_fmt='NLC' keeps [B, N, D] instead of reshaping to NCHW.
            outs = m.forward_intermediates(
                inputs,
                indices=[k - 1 for k in ks],
                norm=False,
                stop_early=True,
                output_fmt="NLC",
                intermediates_only=True,
            )
        finally:
            if restore:
                patch_drop.train()
        if len(outs) != len(ks):  # guards against a subclass with different semantics
            raise EncoderStructureError(
                f"TimmViTEncoder: {type(m).__name__}.forward_intermediates returned {len(outs)} "
                f"intermediates for {len(ks)} requested blocks"
            )
        return {k: h for k, h in zip(ks, outs)}

    def _forward_prefix_sparse(self, inputs: torch.Tensor, ks: list[int], token_idx: torch.Tensor) -> dict[int, torch.Tensor]:
        """``forward_intermediates``' stem and blocks (timm 1.0.x: patch_embed -> _pos_embed -> norm_pre ->
        blocks) on the prefix tokens plus the patches at ``token_idx``; patch dropout is not applied."""
        m, npt = self.model, self.num_prefix_tokens
        x = m._pos_embed(m.patch_embed(inputs))  # [B, prefix + N, D], positions added
        n = x.shape[1] - npt
        if token_idx.dim() != 2 or token_idx.shape[0] != x.shape[0] or token_idx.dtype != torch.long:
            raise ValueError(f"token_idx: must be an int64 [B={x.shape[0]}, K] tensor, got {token_idx.dtype} {tuple(token_idx.shape)}")
        if token_idx.numel() and (int(token_idx.min()) < 0 or int(token_idx.max()) >= n):
            raise ValueError(f"token_idx: patch indices must be in 0..{n - 1}")
        patches = x[:, npt:].gather(1, token_idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = m.norm_pre(torch.cat([x[:, :npt], patches], dim=1))
        out: dict[int, torch.Tensor] = {}
        for i, blk in enumerate(m.blocks[: ks[-1]], start=1):
            x = blk(x)
            if i in ks:
                out[i] = x[:, npt:]
        return out
