"""The architecture config of the reference model: :class:`ModelConfig` and the named sizes.

Every field is validated where it enters (errors name ``model.<field>``); the model itself lives in
:mod:`.vit_mae`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

from ... import _validate as V
from ...errors import ConfigError
from .rope import rope_part_dims

__all__ = ["ModelConfig", "PRESETS"]

# Named sizes. ``tiny`` is what the tests and the CPU demo use; the others follow the usual ViT
# widths (giant = ViT-G/14's 1664 x 48 with MLP 8192, the 48-block model of the paper).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(img_size=32, num_frames=8, tubelet=(2, 8, 8), embed_dim=96, depth=6, num_heads=3, decoder_depth=2),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "giant": dict(embed_dim=1664, depth=48, num_heads=16, mlp_ratio=8192 / 1664),
}


@dataclass
class ModelConfig:
    """Architecture of :class:`VideoMAE`; every field is validated (errors name ``model.<field>``).

    Defaults: ViT-B, 16 x 224 x 224 clips, 2 x 16 x 16 tubelets, 4 decoder blocks, 95% masking,
    3D RoPE after norm1 and no additive position embedding.
    """

    img_size: int = 224
    num_frames: int = 16
    in_chans: int = 3
    tubelet: tuple[int, int, int] = (2, 16, 16)  # (t, h, w)
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    decoder_depth: int = 4
    mask_ratio: float = 0.95
    rope: str = "after_norm"  # 'after_norm' | 'attention' | 'none'
    rope_split: tuple[float, float, float] = (0.1, 0.25, 0.25)  # t, h, w; the rest is not rotated
    rope_theta: float = 10000.0
    pos_embed: str = "none"  # 'none' | 'sincos' | 'learned'
    drop_path: float = 0.0
    proj_drop: float = 0.0
    qkv_bias: bool = True

    ROPE_MODES: ClassVar[tuple[str, ...]] = ("after_norm", "attention", "none")
    POS_EMBEDS: ClassVar[tuple[str, ...]] = ("none", "sincos", "learned")

    def __post_init__(self) -> None:
        f = "model."
        for name in ("img_size", "num_frames", "in_chans", "embed_dim", "depth", "num_heads", "decoder_depth"):
            V.positive_int(f + name, getattr(self, name))
        self.tubelet = self._triple(f + "tubelet", self.tubelet, V.positive_int)
        pt, ph, pw = self.tubelet
        if self.num_frames % pt or self.img_size % ph or self.img_size % pw:
            raise ConfigError(
                f + "tubelet",
                f"{self.tubelet} must divide (num_frames, img_size, img_size) = "
                f"({self.num_frames}, {self.img_size}, {self.img_size})",
            )
        if self.embed_dim % self.num_heads:
            raise ConfigError(f + "num_heads", f"must divide embed_dim={self.embed_dim}, got {self.num_heads}")
        self.mlp_ratio = V.positive_float(f + "mlp_ratio", self.mlp_ratio)
        if self.decoder_depth >= self.depth:
            raise ConfigError(
                f + "decoder_depth",
                f"must be less than depth={self.depth} (the encoder needs at least one block), "
                f"got {self.decoder_depth}",
            )
        self.mask_ratio = self._mask_ratio(f + "mask_ratio", self.mask_ratio)
        self.drop_path = self._open_fraction(f + "drop_path", self.drop_path, allow_zero=True)
        self.proj_drop = self._open_fraction(f + "proj_drop", self.proj_drop, allow_zero=True)
        V.boolean(f + "qkv_bias", self.qkv_bias)
        V.one_of(f + "rope", self.rope, self.ROPE_MODES)
        V.one_of(f + "pos_embed", self.pos_embed, self.POS_EMBEDS)
        if self.rope == "none" and self.pos_embed == "none":
            raise ConfigError(
                f + "pos_embed", "must be 'sincos' or 'learned' when model.rope is 'none' (tokens need a position)"
            )
        self.rope_theta = V.positive_float(f + "rope_theta", self.rope_theta)
        self.rope_split = self._triple(f + "rope_split", self.rope_split, V.non_negative_float)
        if sum(self.rope_split) > 1.0 + 1e-9:
            raise ConfigError(f + "rope_split", f"fractions (t, h, w) must sum to at most 1, got {self.rope_split}")
        if self.rope != "none":
            # An axis longer than one token whose share rounds down to zero channels would be invisible.
            dim = self.rope_dim
            for axis, size, d in zip("thw", self.grid, rope_part_dims(dim, self.rope_split)):
                if size > 1 and d == 0:
                    raise ConfigError(
                        f + "rope_split",
                        f"the {axis} share of {dim} rotated channels rounds down to 0 (need >= 2) while the "
                        f"{axis} axis has {size} tokens; raise it or use a wider model",
                    )

    @staticmethod
    def _triple(field: str, value: Any, check) -> tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 3:
            raise ConfigError(field, f"must be a list of 3 numbers (t, h, w), got {value!r}")
        return tuple(check(f"{field}[{i}]", v) for i, v in enumerate(value))

    def _mask_ratio(self, field: str, value: Any) -> float:
        """``round(ratio * N)`` tokens are masked (halves round up; :func:`~layerlock_plugin.masking.num_masked`):
        at least one must be masked and one visible, so ``0.5 / N <= ratio < (N - 0.5) / N``."""
        t, h, w = self.grid
        n = t * h * w
        lo, hi = 0.5 / n, (n - 0.5) / n
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and lo <= float(value) < hi
        if not ok:
            raise ConfigError(field, f"must be a number in [{lo:.4g}, {hi:.4g}) for the model's {n} tokens "
                                     f"(at least one masked and one visible token), got {value!r}")
        return float(value)

    @staticmethod
    def _open_fraction(field: str, value: Any, allow_zero: bool = False) -> float:
        v = V.fraction(field, value, allow_zero=allow_zero)
        if v >= 1.0:
            raise ConfigError(field, f"must be less than 1, got {value!r}")
        return v

    @property
    def grid(self) -> tuple[int, int, int]:
        """Token grid ``(T', H', W')``."""
        pt, ph, pw = self.tubelet
        return self.num_frames // pt, self.img_size // ph, self.img_size // pw

    @property
    def rope_dim(self) -> int:
        """Channels RoPE sees: a full token after norm1, one head inside attention."""
        return self.embed_dim // self.num_heads if self.rope == "attention" else self.embed_dim

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named size from :data:`PRESETS` with ``overrides`` applied."""
        if name not in PRESETS:
            raise ConfigError("model.preset", f"must be one of {', '.join(map(repr, PRESETS))}; got {name!r}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def tiny(cls, **overrides: Any) -> ModelConfig:
        return cls.preset("tiny", **overrides)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Build from a mapping (e.g. YAML); an optional ``preset`` key picks the base size.
        An unknown key is an error naming ``model.<key>``."""
        d = dict(d)
        known = {fl.name for fl in fields(cls)} | {"preset"}
        for key in d:
            if key not in known:
                raise ConfigError(f"model.{key}", f"unknown field; allowed: {', '.join(sorted(known))}")
        preset = d.pop("preset", None)
        return cls.preset(preset, **d) if preset is not None else cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
