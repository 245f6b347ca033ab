"""The probes' config: :class:`ProbeConfig`, every field validated where it enters (``probe.<field>``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from ... import _validate as v
from ..._config import from_dict
from ...errors import ConfigError

__all__ = ["ProbeConfig"]


def _grid_field(field: str, value: Any, check: Callable[[str, Any], Any] = v.non_negative_float) -> Any:
    """One value, or a non-empty list of them (a one-element list becomes the value)."""
    if isinstance(value, (list, tuple)):
        if len(value) == 0:
            raise ConfigError(field, "the grid must hold at least one value, got an empty list")
        grid = tuple(check(field, x) for x in value)
        return grid if len(grid) > 1 else grid[0]
    return check(field, value)


def _as_grid(value: Any) -> tuple[Any, ...]:
    return value if isinstance(value, tuple) else (value,)


@dataclass(frozen=True)
class ProbeConfig:
    """Config of the frozen-feature probes (fields are validated as ``probe.<field>``).

    ``train_videos`` / ``test_videos``: how many videos (the first ones of each dataset) are encoded.
    ``batch_size``: encoding batch size. ``val_fraction`` / ``seed``: the held-out split of the
    probe-train videos on which every grid below is searched (never the test set).

    ``normalize``: ``'standardize'`` (default), ``'whiten'``, ``'layer_norm'`` or ``'none'`` (see
    :func:`~.features.fit_feature_norm`); ``whiten_eps``: added to the covariance's eigenvalues, relative to their mean.

    ``kinds``: the classification read-outs fitted (each reported), any of ``'linear'``,
    ``'attentive'``, ``'knn'``; ``kind``: the headline one (reported as ``<task>_acc``), one of ``kinds``.

    * linear: ``pooling`` (``'mean'``, ``'temporal_slots'`` or ``'tokens_pca'`` with ``pca_dim``
      directions), ``max_iter`` L-BFGS iterations, ``l2`` one value or a grid.
    * attentive: ``steps`` full-batch AdamW steps at peak learning rate ``lr`` (cosine decay to 0),
      ``weight_decay`` one value or a grid, ``attn_heads`` heads, ``attn_dim`` width after the
      value/output projection.
    * knn: ``knn_k`` neighbours, one value or a grid; ``knn_temperature`` of the vote weights; the
      features are those of the linear probe (``pooling``).

    ``l2`` also regularises the dense depth ridge probe.

    ``dense_kinds``: the depth read-outs fitted, ``'ridge'`` (per token, the headline ``dense_r2``) and/or
    ``'attentive'`` (4DS style, :mod:`.dense_attentive`, reported as ``dense_attentive_r2``): at most
    ``dense_steps`` AdamW steps at ``dense_lr`` on minibatches of ``dense_batch_size`` videos with weight
    decay ``dense_weight_decay``, early-stopped on the held-out probe-train videos.
    """

    train_videos: int = 512
    test_videos: int = 512
    batch_size: int = 64
    normalize: str = "standardize"
    whiten_eps: float = 1e-4
    kind: str = "attentive"
    kinds: tuple[str, ...] = ("linear", "attentive", "knn")
    max_iter: int = 100
    l2: float | tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1)
    val_fraction: float = 0.2
    seed: int = 0
    pooling: str = "mean"
    pca_dim: int = 16
    steps: int = 200
    lr: float = 3e-3
    weight_decay: float | tuple[float, ...] = (0.1, 1.0, 10.0)
    attn_heads: int = 4
    attn_dim: int = 96
    knn_k: int | tuple[int, ...] = (5, 20, 50)
    knn_temperature: float = 0.07
    dense_kinds: tuple[str, ...] = ("ridge",)
    dense_steps: int = 400
    dense_lr: float = 1e-3
    dense_weight_decay: float = 0.05
    dense_batch_size: int = 128

    DENSE_KINDS: ClassVar[tuple[str, ...]] = ("ridge", "attentive")
    KINDS: ClassVar[tuple[str, ...]] = ("linear", "attentive", "knn")
    NORMALIZATIONS: ClassVar[tuple[str, ...]] = ("standardize", "whiten", "layer_norm", "none")
    POOLINGS: ClassVar[tuple[str, ...]] = ("mean", "temporal_slots", "tokens_pca")

    def __post_init__(self) -> None:
        v.positive_int("probe.train_videos", self.train_videos)
        v.positive_int("probe.test_videos", self.test_videos)
        v.positive_int("probe.batch_size", self.batch_size)
        v.one_of("probe.normalize", self.normalize, self.NORMALIZATIONS)
        object.__setattr__(self, "whiten_eps", v.positive_float("probe.whiten_eps", self.whiten_eps))
        kinds = self.kinds
        if isinstance(kinds, str):
            kinds = (kinds,)
        if not isinstance(kinds, (list, tuple)) or len(kinds) == 0:
            raise ConfigError("probe.kinds", f"must be a non-empty list of {', '.join(self.KINDS)}; got {self.kinds!r}")
        kinds = tuple(v.one_of("probe.kinds", k, self.KINDS) for k in kinds)
        if len(set(kinds)) != len(kinds):
            raise ConfigError("probe.kinds", f"must not repeat a kind, got {self.kinds!r}")
        object.__setattr__(self, "kinds", kinds)
        v.one_of("probe.kind", self.kind, self.KINDS)
        if self.kind not in kinds:
            raise ConfigError("probe.kind", f"must be one of probe.kinds {list(kinds)} (the headline probe), got {self.kind!r}")
        v.positive_int("probe.max_iter", self.max_iter)
        v.non_negative_int("probe.seed", self.seed)
        v.one_of("probe.pooling", self.pooling, self.POOLINGS)
        v.positive_int("probe.pca_dim", self.pca_dim)
        vf = self.val_fraction
        if isinstance(vf, bool) or not isinstance(vf, (int, float)) or not 0.0 < float(vf) < 1.0:
            raise ConfigError("probe.val_fraction", f"must be a number in (0, 1), got {vf!r}")
        object.__setattr__(self, "val_fraction", float(vf))
        object.__setattr__(self, "l2", _grid_field("probe.l2", self.l2))
        v.positive_int("probe.steps", self.steps)
        object.__setattr__(self, "lr", v.positive_float("probe.lr", self.lr))
        object.__setattr__(self, "weight_decay", _grid_field("probe.weight_decay", self.weight_decay))
        v.positive_int("probe.attn_heads", self.attn_heads)
        v.positive_int("probe.attn_dim", self.attn_dim)
        if self.attn_dim % self.attn_heads:
            raise ConfigError(
                "probe.attn_dim", f"must be divisible by probe.attn_heads={self.attn_heads}, got {self.attn_dim}"
            )
        object.__setattr__(self, "knn_k", _grid_field("probe.knn_k", self.knn_k, v.positive_int))
        object.__setattr__(self, "knn_temperature", v.positive_float("probe.knn_temperature", self.knn_temperature))
        dense = (self.dense_kinds,) if isinstance(self.dense_kinds, str) else self.dense_kinds
        if not isinstance(dense, (list, tuple)) or len(dense) == 0 or "ridge" not in dense:
            raise ConfigError("probe.dense_kinds", f"must be a list of {', '.join(self.DENSE_KINDS)} that holds "
                                                   f"'ridge' (the headline depth probe); got {self.dense_kinds!r}")
        dense = tuple(v.one_of("probe.dense_kinds", k, self.DENSE_KINDS) for k in dense)
        if len(set(dense)) != len(dense):
            raise ConfigError("probe.dense_kinds", f"must not repeat a kind, got {self.dense_kinds!r}")
        object.__setattr__(self, "dense_kinds", dense)
        v.positive_int("probe.dense_steps", self.dense_steps)
        object.__setattr__(self, "dense_lr", v.positive_float("probe.dense_lr", self.dense_lr))
        object.__setattr__(self, "dense_weight_decay",
                           v.non_negative_float("probe.dense_weight_decay", self.dense_weight_decay))
        v.positive_int("probe.dense_batch_size", self.dense_batch_size)

    @property
    def l2_grid(self) -> tuple[float, ...]:
        return _as_grid(self.l2)

    @property
    def weight_decay_grid(self) -> tuple[float, ...]:
        return _as_grid(self.weight_decay)

    @property
    def knn_k_grid(self) -> tuple[int, ...]:
        return _as_grid(self.knn_k)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> ProbeConfig:
        return from_dict(cls, d, "probe")
