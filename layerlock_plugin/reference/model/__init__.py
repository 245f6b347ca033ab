"""The reference model: a 4DS-style video ViT masked autoencoder with 3D RoPE.

:mod:`.config` holds :class:`ModelConfig` (the architecture, validated) and the named sizes
(:data:`PRESETS`), :mod:`.vit_mae` the model (:class:`VideoMAE`, its blocks, the layered-encoder
protocol LayerLock freezes through), :mod:`.rope` the 3D rotary and sin-cos position embeddings.
"""

from .config import PRESETS, ModelConfig
from .vit_mae import Attention, Block, VideoMAE

__all__ = ["ModelConfig", "VideoMAE", "Block", "Attention", "PRESETS"]
