"""Data for the reference trainer: an embedded procedural video dataset and a real video folder.

:class:`DigitsVideoDataset` needs no download. It renders short clips from scikit-learn's 1797
handwritten 8x8 digits (shipped inside scikit-learn): a digit (upscaled bilinearly, tinted)
glides with a constant velocity over a textured, fogged background plane whose depth ramps across
the frame. Every clip carries three labels that mirror the paper's probe suite:

* ``motion``: the direction class of the digit's velocity (like SSv2: needs more than one frame);
* ``appearance``: the digit class 0-9 (like Kinetics: needs shape, position/size/tint are nuisances);
* ``depth``: a per-pixel depth map ``[T, H, W]`` (like ScanNet depth: a dense task).

The digit wraps around the frame edges (a torus), so its position in any one frame is uniform and
independent of its direction: no single frame tells the motion class, and the class-mean clip is
the same for every direction (a linear probe on raw pixels is near chance on motion).

Conventions: ``video`` is float32 ``[C, T, H, W]`` in ``[0, 1]`` (per-channel standardised with
``standardize``); direction class ``k`` of ``K``
points at angle ``2*pi*k/K`` counter-clockwise from the +x axis (class 0 moves right, and with
``K = 8`` class 2 moves up, i.e. towards row 0). See :func:`direction_vector`.

:class:`VideoFolderDataset` decodes real videos with PyAV (``pip install "layerlock-plugin[video]"``)
and reads optional labels in mmaction2's list format (``relative/path.mp4 label`` per line).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import posixpath
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .. import _validate as v
from .._config import from_dict
from ..errors import ConfigError, MissingDependencyError

__all__ = [
    "DigitsVideoConfig",
    "DigitsVideoDataset",
    "VideoFolderConfig",
    "VideoFolderDataset",
    "clip_indices",
    "direction_vector",
    "digit_split_indices",
    "VIDEO_EXTENSIONS",
]

SPLITS = ("train", "test")
_SPLIT_ID = {"train": 0, "test": 1}
# The digit-instance split is fixed (not tied to DigitsVideoConfig.seed) so that a model pretrained
# with one seed is never probed on test digits that another seed put into its training split.
_DIGIT_SPLIT_SEED = 20250910
_DIGIT_PIXELS = 8
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov")


# --------------------------------------------------------------------------------------------------
# small validators
# --------------------------------------------------------------------------------------------------


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


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # normalise fields of a frozen dataclass


# --------------------------------------------------------------------------------------------------
# embedded procedural dataset
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DigitsVideoConfig:
    """Config of :class:`DigitsVideoDataset` (every field is checked here, errors name ``data.<field>``).

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
    mean and std of the first :data:`STANDARDIZE_CLIPS` train clips of this config (the same numbers
    for both splits; see :func:`channel_stats`). Off, clips are in ``[0, 1]``. A ViT whose patch
    embedding sees low-contrast ``[0, 1]`` pixels starts with its content far below the blocks'
    initial output in the residual stream and learns very slowly; per-patch-normalised pixel
    targets are unchanged by it (they are invariant to a per-channel affine map).
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


@functools.lru_cache(maxsize=1)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 scikit-learn digits as float32 [N, 8, 8] in [0, 1] and int64 targets."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (np.asarray(d.images, dtype=np.float32) / 16.0).clip(0.0, 1.0)
    images.setflags(write=False)
    targets = np.asarray(d.target, dtype=np.int64)
    targets.setflags(write=False)
    return images, targets


@functools.lru_cache(maxsize=16)
def digit_split_indices(split: str, test_fraction: float = 0.3) -> np.ndarray:
    """Sorted indices (into ``sklearn.datasets.load_digits()``) of the digit images of ``split``.

    Stratified per class with a fixed permutation; the train and test sets are disjoint and together
    cover all 1797 images.
    """
    v.one_of("data.split", split, SPLITS)
    _, targets = _load_digits()
    rng = np.random.default_rng(_DIGIT_SPLIT_SEED)
    chosen = []
    for c in range(10):
        idx = np.flatnonzero(targets == c)
        idx = idx[rng.permutation(len(idx))]
        n_test = max(1, int(round(test_fraction * len(idx))))
        chosen.append(idx[:n_test] if split == "test" else idx[n_test:])
    out = np.sort(np.concatenate(chosen))
    out.setflags(write=False)
    return out


#: how many train clips :func:`channel_stats` renders
STANDARDIZE_CLIPS = 256


@functools.lru_cache(maxsize=8)
def channel_stats(config: DigitsVideoConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std ``([C], [C])`` of the first :data:`STANDARDIZE_CLIPS` (or all)
    ``[0, 1]`` train clips of ``config`` (``standardize`` ignored): the statistics that
    ``standardize`` applies to both splits."""
    raw = DigitsVideoDataset(dataclasses.replace(config, standardize=False), "train")
    n = min(STANDARDIZE_CLIPS, len(raw))
    video = np.stack([raw.render(i)["video"].numpy() for i in range(n)])  # [n, C, T, H, W]
    mean = video.mean(axis=(0, 2, 3, 4), dtype=np.float64)
    std = video.std(axis=(0, 2, 3, 4), dtype=np.float64)
    return mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32)


def direction_vector(label: int, num_directions: int) -> tuple[float, float]:
    """Unit (dx, dy) in image coordinates (x right, y down) of direction class ``label``.

    Class ``k`` points at angle ``2*pi*k/num_directions`` counter-clockwise from +x as seen on screen,
    so ``dy = -sin(angle)`` (up is towards row 0).
    """
    a = 2.0 * math.pi * label / num_directions
    return math.cos(a), -math.sin(a)


def _hsv_to_rgb(h: float, s: float, val: float) -> np.ndarray:
    k = (np.array([5.0, 3.0, 1.0]) + h * 6.0) % 6.0
    return (val - val * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)).astype(np.float32)


def _sampling_matrix(centers: np.ndarray, size: float, n: int) -> np.ndarray:
    """[T, n, 8] bilinear weights that place an 8-pixel digit axis of ``size`` pixels centred at
    ``centers[t]`` (float pixel coordinate) on an ``n``-pixel axis that wraps around (zero outside)."""
    pix = np.arange(n, dtype=np.float64) + 0.5
    d = (pix[None, :] - centers[:, None] + n / 2.0) % n - n / 2.0  # signed toroidal offset
    u = (d + size / 2.0) * (_DIGIT_PIXELS / size) - 0.5  # coordinate in digit pixels
    i0 = np.floor(u)
    w1 = u - i0
    taps = np.arange(_DIGIT_PIXELS, dtype=np.float64)
    m = (1.0 - w1)[..., None] * (i0[..., None] == taps) + w1[..., None] * (i0[..., None] + 1.0 == taps)
    return m.astype(np.float32)


class DigitsVideoDataset(Dataset):
    """Procedural moving-digit clips (see the module docstring).

    ``dataset[i]`` is ``dict(video=float32[C, T, H, W] in [0, 1] (standardised with config.standardize),
    motion=int64[], appearance=int64[],
    depth=float32[T, H, W])``. Sample ``i`` depends only on ``(config, split, i)``: it is rendered
    from a numpy Generator seeded by ``(config.seed, split, i)``, so access order and worker count do
    not matter. Rendering is lazy (well under a millisecond per 8x32x32 clip); ``cache=True``
    renders the whole split once in ``__init__`` and then serves stored tensors.
    """

    def __init__(self, config: DigitsVideoConfig | None = None, split: str = "train", *, cache: bool = False):
        if config is None:
            config = DigitsVideoConfig()
        if not isinstance(config, DigitsVideoConfig):
            raise ConfigError("data", f"must be a DigitsVideoConfig, got {type(config).__name__}")
        v.one_of("data.split", split, SPLITS)
        v.boolean("data.cache", cache)
        self.config = config
        self.split = split
        self._split_id = _SPLIT_ID[split]
        self._length = config.split_size(split)
        images, targets = _load_digits()
        self.digit_indices = digit_split_indices(split, config.test_digit_fraction)
        self._images = images
        self._targets = targets
        self.num_classes = {"motion": config.num_motion_classes, "appearance": 10}
        self._cache: dict[str, torch.Tensor] | None = None
        if cache:
            self._cache = self._render_all()

    def __len__(self) -> int:
        return self._length

    def _index(self, index: int) -> int:
        if isinstance(index, torch.Tensor):
            index = int(index.item())
        index = int(index)
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError(f"index {index} out of range for {self._length} {self.split} videos")
        return index

    def sample_params(self, index: int) -> dict[str, Any]:
        """The random draws behind sample ``index`` (for tests, debugging and visualisation)."""
        index = self._index(index)
        cfg = self.config
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, self._split_id, index]))
        # Draw order is part of the determinism contract: never reorder these lines.
        digit_index = int(self.digit_indices[rng.integers(len(self.digit_indices))])
        direction = int(rng.integers(cfg.num_directions))
        speed_index = int(rng.integers(len(cfg.speeds)))
        jitter = float(rng.uniform(-1.0, 1.0)) * cfg.direction_jitter * math.pi / cfg.num_directions
        start = rng.uniform(0.0, cfg.size, size=2)  # (x, y) centre at frame 0
        digit_size = float(rng.uniform(*cfg.digit_size))
        dlo, dhi = cfg.depth_range
        span = dhi - dlo
        bg_near = float(rng.uniform(dlo + 0.3 * span, dlo + 0.6 * span))
        bg_far = float(rng.uniform(bg_near + 0.1 * span, dhi))
        digit_depth = float(rng.uniform(dlo, bg_near - 0.1 * span))
        ramp_angle = float(rng.uniform(0.0, 2.0 * math.pi))
        tex_freq = float(rng.uniform(1.5, 3.0))
        tex_angle = float(rng.uniform(0.0, math.pi))
        tex_phase = rng.uniform(0.0, 2.0 * math.pi, size=2)
        if cfg.channels == 3:
            digit_color = _hsv_to_rgb(rng.uniform(), rng.uniform(0.6, 1.0), 1.0)
            bg_albedo = _hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.6), rng.uniform(0.5, 0.9))
        else:
            digit_color = np.array([rng.uniform(0.85, 1.0)], dtype=np.float32)
            bg_albedo = np.array([rng.uniform(0.4, 0.75)], dtype=np.float32)
        angle = 2.0 * math.pi * direction / cfg.num_directions + jitter
        speed = cfg.speeds[speed_index]
        velocity = (speed * math.cos(angle), -speed * math.sin(angle))  # (vx, vy) pixels/frame
        if cfg.motion_label == "direction":
            motion = direction
        else:
            motion = direction * len(cfg.speeds) + speed_index
        return {
            "index": index,
            "digit_index": digit_index,
            "appearance": int(self._targets[digit_index]),
            "motion": motion,
            "direction": direction,
            "speed": speed,
            "velocity": velocity,
            "start": (float(start[0]), float(start[1])),
            "digit_size": digit_size,
            "digit_depth": digit_depth,
            "background_depth": (bg_near, bg_far),
            "ramp_angle": ramp_angle,
            "texture": (tex_freq, tex_angle, float(tex_phase[0]), float(tex_phase[1])),
            "digit_color": digit_color,
            "background_albedo": bg_albedo,
            "noise_seed": int(rng.integers(2**63 - 1)),
        }

    def render(self, index: int) -> dict[str, torch.Tensor]:
        """Render sample ``index`` (what ``dataset[index]`` returns without the cache)."""
        cfg = self.config
        p = self.sample_params(index)
        T, S = cfg.num_frames, cfg.size
        # Background plane: a depth ramp across the frame, textured in world coordinates (so the
        # texture looks finer where it is farther) and darkened by fog.
        coords = (np.arange(S, dtype=np.float32) + 0.5) / S * 2.0 - 1.0
        xn, yn = coords[None, :], coords[:, None]
        ca, sa = math.cos(p["ramp_angle"]), math.sin(p["ramp_angle"])
        r = ca * xn + sa * yn
        r = (r - r.min()) / max(float(r.max() - r.min()), 1e-6)
        near, far = p["background_depth"]
        zb = (near + (far - near) * r).astype(np.float32)  # [H, W]
        freq, tang, ph0, ph1 = p["texture"]
        X, Y = xn * zb, yn * zb
        ct, st = math.cos(tang), math.sin(tang)
        tex = 0.5 + 0.5 * np.sin(freq * (ct * X + st * Y) + ph0) * np.sin(freq * (-st * X + ct * Y) + ph1)
        lo = cfg.depth_range[0]
        bg = p["background_albedo"][:, None, None] * ((1.0 - cfg.texture + cfg.texture * tex) * np.exp(-(zb - lo) / cfg.fog))
        # Digit: bilinear upscale + toroidal placement as two separable sampling matrices per frame.
        t = np.arange(T, dtype=np.float64)
        (vx, vy), (x0, y0) = p["velocity"], p["start"]
        my = _sampling_matrix(y0 + vy * t, p["digit_size"], S)  # [T, H, 8]
        mx = _sampling_matrix(x0 + vx * t, p["digit_size"], S)  # [T, W, 8]
        img = self._images[p["digit_index"]]
        alpha = np.clip(np.matmul(np.matmul(my, img), mx.transpose(0, 2, 1)), 0.0, 1.0)  # [T, H, W]
        fg = p["digit_color"] * math.exp(-(p["digit_depth"] - lo) / cfg.fog)  # [C]
        a = alpha[None]
        video = (1.0 - a) * bg[:, None] + a * fg[:, None, None, None]  # [C, T, H, W]
        if cfg.noise > 0:
            noise_rng = np.random.default_rng(p["noise_seed"])
            video = video + cfg.noise * noise_rng.standard_normal(video.shape, dtype=np.float32)
        video = np.clip(video, 0.0, 1.0).astype(np.float32, copy=False)
        if cfg.standardize:
            mean, std = channel_stats(cfg)
            video = (video - mean[:, None, None, None]) / std[:, None, None, None]
        depth = np.where(alpha >= 0.5, np.float32(p["digit_depth"]), zb[None]).astype(np.float32)
        return {
            "video": torch.from_numpy(np.ascontiguousarray(video)),
            "motion": torch.tensor(p["motion"], dtype=torch.long),
            "appearance": torch.tensor(p["appearance"], dtype=torch.long),
            "depth": torch.from_numpy(np.ascontiguousarray(depth)),
        }

    def _render_all(self) -> dict[str, torch.Tensor]:
        first = self.render(0)
        out = {k: torch.empty((self._length, *val.shape), dtype=val.dtype) for k, val in first.items()}
        for i in range(self._length):
            sample = first if i == 0 else self.render(i)
            for k, val in sample.items():
                out[k][i] = val
        return out

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = self._index(index)
        if self._cache is not None:
            return {k: val[index] for k, val in self._cache.items()}
        return self.render(index)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"DigitsVideoDataset(split={self.split!r}, len={len(self)}, "
            f"clip=[{c.channels}, {c.num_frames}, {c.size}, {c.size}], num_classes={self.num_classes})"
        )


# --------------------------------------------------------------------------------------------------
# real video folder
# --------------------------------------------------------------------------------------------------


def _import_av():
    try:
        import av  # noqa: PLC0415 - optional dependency, imported lazily
    except ImportError as e:
        raise MissingDependencyError(
            'decoding video files needs PyAV: pip install "layerlock-plugin[video]"'
        ) from e
    return av


@dataclass(frozen=True)
class VideoFolderConfig:
    """Config of :class:`VideoFolderDataset` (errors name ``data.<field>``).

    ``frame_stride``: take every ``frame_stride``-th frame; the clip is centred in the video.
    ``short_video``: for a video shorter than the clip span, ``'loop'`` plays it again from the
    start, ``'repeat_last'`` holds its last frame. ``label_file``: mmaction2 list format
    (``relative/path.mp4 label`` per line, paths relative to ``root``); when given, the dataset is
    the listed videos only.
    """

    root: str = ""
    num_frames: int = 8
    size: int = 32
    frame_stride: int = 2
    label_file: str | None = None
    extensions: tuple[str, ...] = VIDEO_EXTENSIONS
    short_video: str = "loop"

    def __post_init__(self) -> None:
        if not isinstance(self.root, (str, os.PathLike)) or str(self.root) == "":
            raise ConfigError("data.root", f"must be a folder path, got {self.root!r}")
        _set(self, "root", os.fspath(self.root))
        if not os.path.isdir(self.root):
            raise ConfigError("data.root", f"folder not found: {self.root}")
        v.positive_int("data.num_frames", self.num_frames)
        v.positive_int("data.size", self.size)
        v.positive_int("data.frame_stride", self.frame_stride)
        if self.label_file is not None:
            if not isinstance(self.label_file, (str, os.PathLike)) or str(self.label_file) == "":
                raise ConfigError("data.label_file", f"must be a file path or null, got {self.label_file!r}")
            _set(self, "label_file", os.fspath(self.label_file))
            if not os.path.isfile(self.label_file):
                raise ConfigError("data.label_file", f"file not found: {self.label_file}")
        exts = self.extensions
        if isinstance(exts, str):
            exts = (exts,)
        if (
            not isinstance(exts, (tuple, list))
            or len(exts) == 0
            or any(not isinstance(e, str) or not e.strip(".") for e in exts)
        ):
            raise ConfigError("data.extensions", f"must be a non-empty list of file extensions, got {self.extensions!r}")
        _set(self, "extensions", tuple("." + e.lower().lstrip(".") for e in exts))
        v.one_of("data.short_video", self.short_video, ("loop", "repeat_last"))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _list_videos(root: str, extensions: Sequence[str]) -> list[str]:
    """Relative posix paths of the files under ``root`` (recursive) with one of ``extensions``, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in filenames:
            if name.lower().endswith(tuple(extensions)):
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                found.append(rel.replace(os.sep, "/"))
    return sorted(found)


def _probe(av: Any, path: str) -> bool:
    """True when ``path`` opens as a container holding at least one video stream."""
    try:
        with av.open(path) as container:
            return len(container.streams.video) > 0
    except Exception:  # noqa: BLE001 - any failure to open means "not decodable"
        return False


def _read_labels(label_file: str, known: set[str]) -> dict[str, int]:
    labels: dict[str, int] = {}
    with open(label_file, encoding="utf-8") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(None, 1)
            if len(parts) != 2:
                raise ConfigError(
                    "data.label_file",
                    f"{label_file} line {lineno}: expected 'relative/path label', got {line!r}",
                )
            path, label_text = parts
            try:
                label = int(label_text)
            except ValueError:
                label = -1
            if label < 0:
                raise ConfigError(
                    "data.label_file",
                    f"{label_file} line {lineno}: label must be a non-negative integer, got {label_text!r}",
                )
            rel = posixpath.normpath(path.replace("\\", "/"))
            if rel not in known:
                raise ConfigError(
                    "data.label_file",
                    f"{label_file} line {lineno}: unknown video path {path!r} "
                    "(not a video file found under data.root with data.extensions)",
                )
            if rel in labels:
                raise ConfigError("data.label_file", f"{label_file} line {lineno}: video {path!r} is listed twice")
            labels[rel] = label
    if not labels:
        raise ConfigError("data.label_file", f"{label_file} lists no videos")
    return labels


def clip_indices(num_available: int, num_frames: int, stride: int, short_video: str = "loop") -> list[int]:
    """Frame indices of the centred clip of ``num_frames`` frames taken every ``stride`` frames."""
    if num_available <= 0:
        raise ValueError("a video without frames has no clip")
    span = (num_frames - 1) * stride + 1
    if span <= num_available:
        start = (num_available - span) // 2
        return [start + i * stride for i in range(num_frames)]
    if short_video == "loop":
        return [(i * stride) % num_available for i in range(num_frames)]
    return [min(i * stride, num_available - 1) for i in range(num_frames)]


class VideoFolderDataset(Dataset):
    """Videos under ``root`` (recursive, sorted), decoded with PyAV into clips.

    ``dataset[i]`` is ``dict(video=float32[3, T, size, size] in [0, 1])`` plus ``label=int64[]``
    when a label file is given. Frames are resized so the short side is ``size``, then centre-cropped.
    Files that do not open as a video are skipped with one warning; ``paths`` lists the kept ones.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        num_frames: int = 8,
        size: int = 32,
        frame_stride: int = 2,
        label_file: str | os.PathLike | None = None,
        extensions: Sequence[str] = VIDEO_EXTENSIONS,
        short_video: str = "loop",
    ):
        cfg = VideoFolderConfig(
            root=root,
            num_frames=num_frames,
            size=size,
            frame_stride=frame_stride,
            label_file=label_file,
            extensions=tuple(extensions) if not isinstance(extensions, str) else extensions,
            short_video=short_video,
        )
        self.config = cfg
        av = _import_av()
        found = _list_videos(cfg.root, cfg.extensions)
        if not found:
            raise ConfigError(
                "data.root", f"no video files with extensions {', '.join(cfg.extensions)} under {cfg.root}"
            )
        self.labels: dict[str, int] | None = None
        if cfg.label_file is not None:
            self.labels = _read_labels(cfg.label_file, set(found))
            unlisted = [p for p in found if p not in self.labels]
            if unlisted:
                warnings.warn(
                    f"{len(unlisted)} video file(s) under {cfg.root} are not in {cfg.label_file} and are left out",
                    stacklevel=2,
                )
            found = [p for p in found if p in self.labels]
        bad = [p for p in found if not _probe(av, os.path.join(cfg.root, p))]
        self.paths = [p for p in found if p not in set(bad)]
        if not self.paths:
            raise ConfigError("data.root", f"no decodable video file in {cfg.root} (tried {len(found)} file(s))")
        if bad:
            shown = ", ".join(bad[:20]) + (f", ... and {len(bad) - 20} more" if len(bad) > 20 else "")
            warnings.warn(f"skipping {len(bad)} undecodable video file(s) under {cfg.root}: {shown}", stacklevel=2)
        self.skipped = bad
        self.num_classes = None if self.labels is None else max(self.labels[p] for p in self.paths) + 1

    @classmethod
    def from_config(cls, config: VideoFolderConfig) -> VideoFolderDataset:
        if not isinstance(config, VideoFolderConfig):
            raise ConfigError("data", f"must be a VideoFolderConfig, got {type(config).__name__}")
        c = config
        return cls(c.root, c.num_frames, c.size, c.frame_stride, c.label_file, c.extensions, c.short_video)

    def __len__(self) -> int:
        return len(self.paths)

    def _resize_crop(self, frame: Any) -> np.ndarray:
        size = self.config.size
        w, h = frame.width, frame.height
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        arr = frame.reformat(width=nw, height=nh, format="rgb24").to_ndarray()  # [nh, nw, 3]
        top, left = (nh - size) // 2, (nw - size) // 2
        return arr[top : top + size, left : left + size]

    def _decode(self, path: str) -> np.ndarray:
        """[T, size, size, 3] uint8 for the centred clip of ``path``."""
        cfg = self.config
        av = _import_av()
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            n = int(stream.frames or 0)
            if n > 0:
                # Known length: decode up to the last wanted frame, convert only the wanted ones.
                wanted = clip_indices(n, cfg.num_frames, cfg.frame_stride, cfg.short_video)
                need, last = set(wanted), max(wanted)
                got: dict[int, np.ndarray] = {}
                for i, frame in enumerate(container.decode(stream)):
                    if i in need:
                        got[i] = self._resize_crop(frame)
                    if i >= last:
                        break
                if len(got) == len(need):
                    return np.stack([got[i] for i in wanted])
                # The container over-reported its length: fall back to a full decode below.
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            frames = [self._resize_crop(f) for f in container.decode(stream)]
        if not frames:
            raise RuntimeError(f"video {path} decoded to no frames")
        wanted = clip_indices(len(frames), cfg.num_frames, cfg.frame_stride, cfg.short_video)
        return np.stack([frames[i] for i in wanted])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rel = self.paths[index]
        path = os.path.join(self.config.root, rel)
        try:
            clip = self._decode(path)
        except (RuntimeError, MissingDependencyError):
            raise
        except Exception as e:  # noqa: BLE001 - name the file in any decoder error
            raise RuntimeError(f"failed to decode video {path}: {e}") from e
        video = torch.from_numpy(clip).permute(3, 0, 1, 2).float().div_(255.0).contiguous()
        out = {"video": video}
        if self.labels is not None:
            out["label"] = torch.tensor(self.labels[rel], dtype=torch.long)
        return out

    def __repr__(self) -> str:
        c = self.config
        return f"VideoFolderDataset(root={c.root!r}, len={len(self)}, clip=[3, {c.num_frames}, {c.size}, {c.size}])"
