"""The data configs, validated where they enter (errors name ``data.<field>``): :class:`DigitsVideoConfig`
for the embedded moving digits (:mod:`.digits`); the real-video configs (:class:`VideoFolderConfig`,
:class:`VideoShardsConfig`) live in :mod:`.video_config` and are re-exported here. They import no
dataset code, so the run config can hold them cheaply.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from ... import _validate as v
from ..._config import from_dict
from ...errors import ConfigError

from .video_config import VIDEO_EXTENSIONS, AugmentConfig, VideoFolderConfig, VideoShardsConfig

__all__ = ["DigitsVideoConfig", "AugmentConfig", "VideoFolderConfig", "VideoShardsConfig", "SPLITS", "VIDEO_EXTENSIONS"]

SPLITS = ("train", "test")


def _number_pair(field: str, value: Any, *, positive: bool = True) -> tuple[float, float]:
    """A (lo, hi) pair of numbers with lo <= hi (a list from YAML is accepted)."""
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in value)
    ):
        raise ConfigError(field, f"must be a pair [lo, hi] of numbers, got {value!r}")
    lo, hi = float(value[0]), float(value[1])
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise ConfigError(field, f"must be a pair [lo, hi] of finite numbers with lo <= hi, got {value!r}")
    if positive and lo <= 0:
        raise ConfigError(field, f"must hold positive numbers, got {value!r}")
    return lo, hi


def _unit_pair(field: str, value: Any) -> tuple[float, float]:
    """A (lo, hi) pair within [0, 1]."""
    lo, hi = _number_pair(field, value, positive=False)
    if lo < 0 or hi > 1:
        raise ConfigError(field, f"must be a pair [lo, hi] within [0, 1], got {value!r}")
    return lo, hi


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # normalise fields of a frozen dataclass


@dataclass(frozen=True)
class DigitsVideoConfig:
    """Config of :class:`~.digits.DigitsVideoDataset` (every field is checked here, errors name ``data.<field>``).

    ``num_videos`` / ``num_test_videos``: clips in the train / test split (``None``: as many test
    clips as ``num_videos``). ``digit_size``: range of the digit's side in pixels (the 8x8 digit is
    upscaled bilinearly to a size drawn uniformly from it). ``num_directions``: motion classes;
    ``speeds``: digit speeds in pixels/frame, one drawn per clip; ``motion_label``: ``'direction'``
    (speed is a nuisance) or ``'direction_speed'`` (label ``direction * len(speeds) + speed_index``).
    ``direction_jitter``: the velocity angle is jittered uniformly by up to this fraction of half a
    class sector (0: exact class angles; 1: the whole sector, classes touch). ``texture``: contrast of the background texture (0 = flat). ``noise``: std of
    Gaussian pixel noise. ``depth_range``: (nearest, farthest) depth; the digit is always nearer than
    the background plane. ``fog``: brightness falls as ``exp(-(depth - near) / fog)``.
    ``test_digit_fraction``: share of each digit class's images kept for the test split (a fixed,
    seed-independent stratified permutation; train and test never share a digit image).
    ``standardize``: each colour channel of the rendered clip becomes ``(x - mean_c) / std_c`` with the
    mean and std of the first :data:`~.digits.STANDARDIZE_CLIPS` train clips of this config (the same numbers
    for both splits; see :func:`~.digits.channel_stats`). Off, clips are in ``[0, 1]``. A ViT whose patch
    embedding sees low-contrast ``[0, 1]`` pixels starts with its content far below the blocks'
    initial output in the residual stream and learns very slowly; per-patch-normalised pixel
    targets are unchanged by it (they are invariant to a per-channel affine map).

    The evidence suite's options (defaults: the packaged clips, bit for bit). ``placement``: ``'wrap'``
    (the digit wraps around the frame edges) or ``'inside'`` (its whole trajectory stays inside the
    frame; needs ``size >= digit_size[1] + max(speeds) * num_frames``). ``turn``: degrees (0 to 180; 0 =
    no turn) by which the velocity turns at the middle frame, counter-clockwise (label ``turn`` 0) or
    clockwise (1). ``digit_saturation``: ``[lo, hi]`` saturation of the digit's colour (``[0, 0]``: grey;
    ``None``: the packaged tint, 0.6-1); ``digit_value``: ``[lo, hi]`` brightness of the digit's colour
    (packaged 1); ``background_value``: ``[lo, hi]`` brightness of the background's albedo (``None``: the
    packaged 0.5-0.9).
    """

    num_videos: int = 2048
    num_test_videos: int | None = None
    num_frames: int = 8
    size: int = 32
    channels: int = 3
    digit_size: tuple[float, float] = (12.0, 16.0)
    num_directions: int = 8
    speeds: tuple[float, ...] = (1.0, 2.0)
    motion_label: str = "direction"
    direction_jitter: float = 0.0
    noise: float = 0.05
    texture: float = 0.65
    depth_range: tuple[float, float] = (2.0, 10.0)
    fog: float = 8.0
    test_digit_fraction: float = 0.3
    standardize: bool = False
    seed: int = 0
    placement: str = "wrap"
    turn: float = 0.0
    digit_saturation: tuple[float, float] | None = None
    digit_value: tuple[float, float] = (1.0, 1.0)
    background_value: tuple[float, float] | None = None

    PLACEMENTS: ClassVar[tuple[str, ...]] = ("wrap", "inside")

    def __post_init__(self) -> None:
        v.positive_int("data.num_videos", self.num_videos)
        if self.num_test_videos is not None:
            v.positive_int("data.num_test_videos", self.num_test_videos)
        v.positive_int("data.num_frames", self.num_frames)
        v.positive_int("data.size", self.size)
        if self.size < 8:
            raise ConfigError("data.size", f"must be at least 8 pixels, got {self.size}")
        v.one_of("data.channels", self.channels, (1, 3))
        lo, hi = _number_pair("data.digit_size", self.digit_size)
        if lo < 4 or hi > self.size:
            raise ConfigError(
                "data.digit_size", f"must lie within [4, data.size={self.size}] pixels, got {self.digit_size!r}"
            )
        _set(self, "digit_size", (lo, hi))
        v.positive_int("data.num_directions", self.num_directions)
        if self.num_directions < 2:
            raise ConfigError("data.num_directions", f"must be at least 2, got {self.num_directions}")
        speeds = self.speeds
        if isinstance(speeds, (int, float)) and not isinstance(speeds, bool):
            speeds = (speeds,)
        if not isinstance(speeds, (tuple, list)) or len(speeds) == 0:
            raise ConfigError("data.speeds", f"must be a non-empty list of positive numbers, got {self.speeds!r}")
        speeds = tuple(v.positive_float("data.speeds", s) for s in speeds)
        if len(set(speeds)) != len(speeds):
            raise ConfigError("data.speeds", f"must not repeat a speed, got {self.speeds!r}")
        _set(self, "speeds", speeds)
        v.one_of("data.motion_label", self.motion_label, ("direction", "direction_speed"))
        _set(self, "direction_jitter", v.fraction("data.direction_jitter", self.direction_jitter, allow_zero=True))
        _set(self, "noise", v.non_negative_float("data.noise", self.noise))
        _set(self, "texture", v.fraction("data.texture", self.texture, allow_zero=True))
        dlo, dhi = _number_pair("data.depth_range", self.depth_range)
        if dhi - dlo < 1.0:
            raise ConfigError("data.depth_range", f"must span at least 1 depth unit, got {self.depth_range!r}")
        _set(self, "depth_range", (dlo, dhi))
        _set(self, "fog", v.positive_float("data.fog", self.fog))
        f = v.fraction("data.test_digit_fraction", self.test_digit_fraction)
        if f >= 1.0:
            raise ConfigError("data.test_digit_fraction", f"must be in (0, 1), got {self.test_digit_fraction!r}")
        _set(self, "test_digit_fraction", f)
        v.boolean("data.standardize", self.standardize)
        v.non_negative_int("data.seed", self.seed)
        self._check_evidence_options()

    def _check_evidence_options(self) -> None:
        v.one_of("data.placement", self.placement, self.PLACEMENTS)
        if self.placement == "inside" and self.size < self.digit_size[1] + max(self.speeds) * self.num_frames:
            raise ConfigError(
                "data.placement",
                f"'inside' needs data.size >= digit_size[1] + max(speeds) * num_frames = "
                f"{self.digit_size[1] + max(self.speeds) * self.num_frames:g} px (room for any trajectory), "
                f"got size {self.size}",
            )
        turn = v.non_negative_float("data.turn", self.turn)
        if turn > 180:
            raise ConfigError("data.turn", f"must be an angle in [0, 180] degrees, got {self.turn!r}")
        _set(self, "turn", turn)
        if self.digit_saturation is not None:
            if self.channels != 3:
                raise ConfigError("data.digit_saturation", "needs data.channels = 3 (a grey clip has no saturation)")
            _set(self, "digit_saturation", _unit_pair("data.digit_saturation", self.digit_saturation))
        _set(self, "digit_value", _unit_pair("data.digit_value", self.digit_value))
        if self.background_value is not None:
            _set(self, "background_value", _unit_pair("data.background_value", self.background_value))

    @property
    def uses_evidence_options(self) -> bool:
        """True when any option of the evidence suite differs from the packaged clips (then a second,
        independent random stream per clip draws them; the packaged draws stay as they are)."""
        return (self.placement != "wrap" or self.turn != 0 or self.digit_saturation is not None
                or self.digit_value != (1.0, 1.0) or self.background_value is not None)

    @property
    def label_classes(self) -> dict[str, int]:
        """Class count per classification label of a clip: ``motion``, ``appearance`` and, with a turn, ``turn``."""
        out = {"motion": self.num_motion_classes, "appearance": 10}
        if self.turn:
            out["turn"] = 2
        return out

    @property
    def num_motion_classes(self) -> int:
        if self.motion_label == "direction":
            return self.num_directions
        return self.num_directions * len(self.speeds)

    def split_size(self, split: str) -> int:
        v.one_of("data.split", split, SPLITS)
        if split == "test" and self.num_test_videos is not None:
            return self.num_test_videos
        return self.num_videos

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> DigitsVideoConfig:
        return from_dict(cls, d, "data")
