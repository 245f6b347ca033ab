"""V-JEPA's ViTs as LayerLock layered encoders (used by :mod:`layerlock_plugin.adapters.vjepa`).

:class:`VJEPAEncoder` wraps V-JEPA's ``VisionTransformer`` (the ``vjepa`` distribution, or a look-alike
with ``patch_embed``, ``pos_embed``, ``blocks``, ``norm`` and ``interpolate_pos_encoding``);
:class:`VJEPA2Encoder` wraps V-JEPA 2's (``vjepa2.models.vision_transformer``, the registry package
``cc-vjepa2``), whose blocks apply 3D RoPE inside attention from each token's grid position;
:func:`as_layered` picks the wrapper for a model after :func:`unwrap` looked through the host's
wrappers. This module does not import ``vjepa``: it works on the modules you pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from layerlock_plugin import _validate as v
from layerlock_plugin.encoder import EncoderUnits, FreezeUnit, LayeredEncoder, block_name, check_layers
from layerlock_plugin.errors import ConfigError, EncoderStructureError, MissingDependencyError, install_extra
from layerlock_plugin.integration import LayerLockDDP

__all__ = ["INSTALL_HINT", "VJEPA2Encoder", "VJEPAEncoder", "as_layered", "require_vjepa", "require_vjepa2", "unwrap"]

#: Host wrappers that hold the encoder as ``.backbone`` (V-JEPA's multi-mask, V-JEPA 2's multi-sequence).
_BACKBONE_WRAPPERS = ("MultiMaskWrapper", "PredictorMultiMaskWrapper", "MultiSeqWrapper", "PredictorMultiSeqWrapper")
INSTALL_HINT = f"{install_extra('vjepa')}; then pip install --no-deps vjepa==0.1.2"


def require_vjepa():
    """Import and return the ``vjepa`` package, or raise an error naming the install line."""
    try:
        import vjepa  # noqa: F401
        import vjepa.models.vision_transformer  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(
            f"the V-JEPA example and tests need the official V-JEPA code: {INSTALL_HINT}"
        ) from exc
    return vjepa


def require_vjepa2():
    """Import and return the ``vjepa2`` package (registry package ``cc-vjepa2``), or raise naming the extra."""
    try:
        import vjepa2.models.vision_transformer  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(f"the V-JEPA 2 example and tests need vjepa2 (the registry package cc-vjepa2): "
                                     f"{install_extra('vjepa')}") from exc
    import vjepa2

    return vjepa2


class VJEPAEncoder(nn.Module):
    """V-JEPA's ``VisionTransformer`` as a LayerLock layered encoder.

    Args:
        model: ``vjepa.models.vision_transformer.VisionTransformer`` (e.g. ``vit_large(num_frames=16)``)
            or a look-alike with ``patch_embed``, ``pos_embed``, ``blocks``, ``norm`` and
            ``interpolate_pos_encoding``. Held as ``self.model``; calling the wrapper calls it unchanged.
        apply_norm: return ``model.norm(h_k)`` instead of the raw block output ``h_k`` (V-JEPA's
            ``out_layers`` convention).

    Units: the stem is ``patch_embed`` plus ``pos_embed`` (fixed sincos in V-JEPA, learned in
    look-alikes); blocks ``1..depth`` follow, named ``block_k``. The final ``norm`` belongs to no unit
    and always trains. V-JEPA has no decoder-reused blocks (its predictor is a separate network).

    Caveat: V-JEPA's ``Attention`` passes its ``drop`` rate to ``scaled_dot_product_attention`` even in
    eval mode, so a frozen block with ``drop_rate > 0`` still drops attention; V-JEPA's configs use 0.
    """

    REQUIRED = ("patch_embed", "pos_embed", "blocks", "norm", "interpolate_pos_encoding")

    def __init__(self, model: nn.Module, apply_norm: bool = False):
        super().__init__()
        name = type(model).__name__
        for attr in self.REQUIRED:
            if not hasattr(model, attr):
                raise EncoderStructureError(
                    f"{type(self).__name__}: {name} has no attribute {attr!r}; expected V-JEPA's VisionTransformer "
                    f"or a model with {', '.join(self.REQUIRED)}"
                )
        if not isinstance(model.blocks, (nn.ModuleList, nn.Sequential)) or len(model.blocks) == 0:
            raise EncoderStructureError(f"{type(self).__name__}: {name}.blocks must be a non-empty nn.ModuleList")
        self.model = model
        self.apply_norm = v.boolean("teacher_norm", apply_norm)

    @property
    def num_layers(self) -> int:
        """Number of blocks (all freezable)."""
        return len(self.model.blocks)

    @property
    def embed_dim(self) -> int:
        """Token width ``D``."""
        return int(getattr(self.model, "embed_dim", None) or self.model.pos_embed.shape[-1])

    def forward(self, *args, **kwargs):
        """Calls the wrapped model unchanged."""
        return self.model(*args, **kwargs)

    def layerlock_units(self) -> EncoderUnits:
        """The stem (``patch_embed`` + a ``pos_embed`` parameter) and one unit per block."""
        m = self.model
        extra = (m.pos_embed,) if isinstance(m.pos_embed, nn.Parameter) else ()
        stem = FreezeUnit("stem", modules=(m.patch_embed,), extra_params=extra)
        blocks = tuple(FreezeUnit(block_name(i + 1), modules=(b,)) for i, b in enumerate(m.blocks))
        return EncoderUnits(stem=stem, blocks=blocks)

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """``[B, C, T, H, W] -> [B, N, D]``: V-JEPA's stem without masks (patch embedding + interpolated positions)."""
        m = self.model
        x = m.patch_embed(inputs)
        return x + m.interpolate_pos_encoding(inputs, m.pos_embed) if m.pos_embed is not None else x

    def run_block(self, block: nn.Module, x: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """One block on the full token sequence ``x [B, N, D]`` of ``inputs``."""
        return block(x)

    def forward_prefix(self, inputs: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """Outputs of blocks ``layers`` on the full clip, stopping after ``max(layers)``.

        ``inputs [B, C, T, H, W]`` (or ``[B, C, H, W]`` for image models) -> ``{k: [B, N, D]}``.
        """
        ks = check_layers(layers, self.num_layers)
        x = self.embed(inputs)
        out: dict[int, torch.Tensor] = {}
        for i, blk in enumerate(self.model.blocks[: ks[-1]], start=1):
            x = self.run_block(blk, x, inputs)
            if i in ks:
                out[i] = self.model.norm(x) if self.apply_norm else x
        return out


class VJEPA2Encoder(VJEPAEncoder):
    """V-JEPA 2's ``VisionTransformer`` as a LayerLock layered encoder (arguments as :class:`VJEPAEncoder`).

    With ``use_rope`` (V-JEPA 2's models) there is no ``pos_embed``: each block rotates queries and keys
    by the token's (t, h, w) grid position. The truncated forward runs the blocks on the full clip with
    ``mask=None`` and the clip's grid ``T, H_patches, W_patches``, so every token gets the position V-JEPA
    2's own full forward gives it; without ``use_rope`` the sincos ``pos_embed`` is added as in V-JEPA.
    """

    REQUIRED = ("patch_embed", "pos_embed", "blocks", "norm", "use_rope", "patch_size", "tubelet_size")

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """``[B, C, T, H, W] -> [B, N, D]``: V-JEPA 2's stem without masks."""
        m = self.model
        return m.patch_embed(inputs) if m.use_rope else super().embed(inputs)

    def run_block(self, block: nn.Module, x: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """One block on all ``N`` tokens of ``inputs`` with the clip's token grid (RoPE positions)."""
        m = self.model
        grid = (inputs.shape[2] // m.tubelet_size if inputs.dim() == 5 else 1,
                inputs.shape[-2] // m.patch_size, inputs.shape[-1] // m.patch_size)
        t, h, w = grid if getattr(m, "handle_nonsquare_inputs", True) else (None, None, None)
        return block(x, mask=None, attn_mask=None, T=t, H_patches=h, W_patches=w)


def unwrap(module: nn.Module) -> nn.Module:
    """Look through DDP / ``LayerLockDDP`` (``.module``), ``torch.compile`` (``._orig_mod``) and
    V-JEPA's ``MultiMaskWrapper`` / V-JEPA 2's ``MultiSeqWrapper`` (``.backbone``) down to the encoder itself."""
    while True:
        if isinstance(module, (DistributedDataParallel, LayerLockDDP)):
            module = module.module
        elif isinstance(getattr(module, "_orig_mod", None), nn.Module):
            module = module._orig_mod
        elif type(module).__name__ in _BACKBONE_WRAPPERS and isinstance(
            getattr(module, "backbone", None), nn.Module
        ):
            module = module.backbone
        else:
            return module


def as_layered(model: nn.Module, teacher_norm: bool = False) -> LayeredEncoder:
    """A layered encoder for ``model`` (unwrapped first): itself if it implements the protocol, a
    :class:`VJEPAEncoder` for V-JEPA ViTs, a ``TimmViTEncoder`` for timm ViTs."""
    inner = unwrap(model)
    if hasattr(inner, "layerlock_units") and hasattr(inner, "forward_prefix"):
        if teacher_norm and not (isinstance(inner, VJEPAEncoder) and inner.apply_norm):  # V-JEPA 2's too
            raise ConfigError("teacher_norm", f"is only supported for V-JEPA VisionTransformers, not {type(inner).__name__}")
        return inner
    if hasattr(inner, "interpolate_pos_encoding") and hasattr(inner, "blocks"):
        cls = VJEPA2Encoder if hasattr(inner, "use_rope") else VJEPAEncoder  # only V-JEPA 2's ViT has use_rope
        return cls(inner, apply_norm=teacher_norm)
    if hasattr(inner, "forward_intermediates") and hasattr(inner, "_pos_embed"):
        if teacher_norm:
            raise ConfigError("teacher_norm", "is only supported for V-JEPA VisionTransformers, not timm ViTs")
        from layerlock_plugin.adapters.timm_vit import TimmViTEncoder

        return TimmViTEncoder(inner)
    raise EncoderStructureError(
        f"{type(inner).__name__} is neither a V-JEPA VisionTransformer, a timm ViT, nor a LayerLock layered "
        f"encoder (layerlock_units() + forward_prefix()); LayerLock cannot find its patch embedding and blocks"
    )
