"""transformers' ``VJEPA2Model`` pretrained with LayerLock through :class:`~layerlock_plugin.adapters.vjepa.LayerLockAdapter`.

transformers 5.x ships V-JEPA 2's encoder and predictor for inference and fine-tuning, not for pretraining:

* ``VJEPA2Model.forward`` runs the encoder on **every** token and applies ``context_mask`` to its *output*,
  so the context encodings have attended to the tokens the predictor must predict (no error: the
  context leaks the targets). V-JEPA's student sees the context tokens only. Its layers do take the
  tokens' positions (``VJEPA2Layer(hidden_states, position_mask)``, RoPE from token indices), so
  :meth:`HFVJEPA2Encoder.forward_context` runs them on the context tokens alone.
* ``VJEPA2Model`` / ``VJEPA2Predictor`` take one (context, target) mask pair per call: with two pairs of
  different sizes the predictor fails (``RuntimeError: Sizes of tensors must match except in dimension 0``;
  same sizes: ``... except in dimension 1``). :func:`vjepa2_predict` runs one pair; loop over V-JEPA's mask configs.
* No EMA teacher, loss or pretraining class: the EMA teacher is ``copy.deepcopy(model.encoder)`` updated by
  the adapter (by parameter name), the loss is V-JEPA's L1, as in ``examples``/docs.

:class:`HFVJEPA2Encoder` is the layered-encoder view the adapter needs: the stem is ``embeddings`` (Conv3d
tubelets; no position table, positions enter as RoPE inside attention), the blocks ``layer[i]``; its
truncated forward runs them on the full clip with ``position_mask=None`` (RoPE positions of a full forward),
the final ``layernorm`` belongs to no unit and keeps training. Inputs are ``pixel_values_videos
[B, T, C, H, W]`` (transformers' layout); tokens in ``(t h w)`` order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from layerlock_plugin.encoder import EncoderUnits, FreezeUnit, block_name, check_layers
from layerlock_plugin.errors import ConfigError
from layerlock_plugin.targets import gather_tokens

__all__ = ["HFVJEPA2Encoder", "vjepa2_predict"]


class HFVJEPA2Encoder(nn.Module):
    """transformers' ``VJEPA2Encoder`` (``VJEPA2Model.encoder``) as a LayerLock layered encoder.

    Held as ``self.model``, so an EMA teacher wrapped the same way pairs its parameters by the same names.
    Raises :class:`ConfigError` (field ``model``) naming what a module of another layout lacks.
    """

    def __init__(self, encoder: nn.Module):
        super().__init__()
        encoder = getattr(encoder, "encoder", encoder)  # a VJEPA2Model: its encoder
        proj = getattr(getattr(getattr(encoder, "embeddings", None), "patch_embeddings", None), "proj", None)
        layers = getattr(encoder, "layer", None)
        if not isinstance(proj, nn.Conv3d) or not isinstance(layers, nn.ModuleList) or len(layers) < 2 \
                or not isinstance(getattr(encoder, "layernorm", None), nn.LayerNorm):
            raise ConfigError("model", f"must be transformers' VJEPA2Model or its encoder (embeddings.patch_embeddings"
                                       f".proj, a layer ModuleList of >= 2 blocks, layernorm); got {type(encoder).__name__}")
        self.model = encoder

    @property
    def num_layers(self) -> int:
        """Number of freezable blocks (all encoder blocks)."""
        return len(self.model.layer)

    @property
    def embed_dim(self) -> int:
        """Token width ``D``."""
        return int(self.model.config.hidden_size)

    def layerlock_units(self) -> EncoderUnits:
        """The stem (``embeddings``) and one unit per ``layer[i]``."""
        stem = FreezeUnit("stem", modules=(self.model.embeddings,))
        return EncoderUnits(stem=stem, blocks=tuple(FreezeUnit(block_name(i + 1), modules=(m,))
                                                    for i, m in enumerate(self.model.layer)))

    def forward_prefix(self, pixel_values_videos: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """``{k: [B, N, D]}``: raw output of blocks ``layers`` on the full clip ``[B, T, C, H, W]``, stopping at
        ``max(layers)`` (equal to ``VJEPA2Model(..., output_hidden_states=True).hidden_states[k]``)."""
        ks = check_layers(layers, self.num_layers)
        x = self.model.embeddings(pixel_values_videos)
        out = {}
        for i, layer in enumerate(self.model.layer[: ks[-1]], start=1):
            x = layer(x, None)[0]
            if i in ks:
                out[i] = x
        return out

    def forward_context(self, pixel_values_videos: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
        """The student: the encoder on the context tokens only, ``[B, T, C, H, W]``, ``context_mask [B, K]``
        (token indices) -> ``[B, K, D]`` after the final ``layernorm``; each token keeps its RoPE position.
        With every token as context this equals ``VJEPA2Model``'s encoder output."""
        x = gather_tokens(self.model.embeddings(pixel_values_videos), context_mask)
        for layer in self.model.layer:
            x = layer(x, context_mask)[0]
        return self.model.layernorm(x)

    def forward(self, pixel_values_videos: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
        """:meth:`forward_context` (so that a DDP wrapper around this module runs the student)."""
        return self.forward_context(pixel_values_videos, context_mask)


def vjepa2_predict(predictor: nn.Module, context: torch.Tensor, context_mask: torch.Tensor, target_mask: torch.Tensor,
            num_tokens: int) -> torch.Tensor:
    """``VJEPA2Predictor`` on one mask pair: ``context [B, K, D]`` (from :meth:`HFVJEPA2Encoder.forward_context`)
    at ``context_mask [B, K]`` -> predictions ``[B, Kt, D]`` at ``target_mask [B, Kt]``. The predictor gathers
    its context from a full-length ``[B, N, D]`` sequence, so the context is scattered into one first."""
    index = context_mask.unsqueeze(-1).expand(-1, -1, context.shape[-1])
    full = context.new_zeros(context.shape[0], num_tokens, context.shape[-1]).scatter(1, index, context)
    return predictor(full, [context_mask], [target_mask]).last_hidden_state
