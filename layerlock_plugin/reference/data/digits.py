"""The embedded procedural video dataset: :class:`DigitsVideoDataset` needs no download.

It renders short clips from scikit-learn's 1797 handwritten 8x8 digits (shipped inside scikit-learn):
a digit (upscaled bilinearly, tinted) glides with a constant velocity over a textured, fogged
background plane whose depth ramps across the frame. Every clip carries three labels that mirror the paper's probe suite:

* ``motion``: the direction class of the digit's velocity (like SSv2: needs more than one frame);
* ``appearance``: the digit class 0-9 (like Kinetics: needs shape, position/size/tint are nuisances);
* ``depth``: a per-pixel depth map ``[T, H, W]`` (like ScanNet depth: a dense task).

The digit wraps around the frame edges (a torus), so its position in any one frame is uniform and
independent of its direction: no single frame tells the motion class, and the class-mean clip is
the same for every direction (a linear probe on raw pixels is near chance on motion).

The evidence suite's options (:class:`~.config.DigitsVideoConfig`; off by default) make a clip a small
ViT can learn from and add a temporal task:

* ``placement: inside`` keeps the whole trajectory inside the frame. Wrapped around the edges, the digit
  is cut in pieces at opposite sides in most frames, and a ViT with a non-toroidal position code never
  learned digit identity from such clips, even from labels; inside, it does.
* ``turn`` (degrees): at the middle frame the velocity turns counter-clockwise (label ``turn`` 0) or
  clockwise (1). Telling them apart needs the motion before and after the turn set in relation (the
  sign of their cross product): frame differences pooled over the clip do not give it, a supervised
  encoder learns it.
* ``digit_saturation`` / ``digit_value`` / ``background_value``: fewer colour nuisances (a grey digit on a
  darker background); with the packaged tints a small ViT learns digit identity far more slowly.

The middle-frame position of an ``inside`` clip is drawn from one box for every clip, so no single
frame's position distribution depends on the turn label.

Conventions: ``video`` is float32 ``[C, T, H, W]`` in ``[0, 1]`` (per-channel standardised with
``standardize``); direction class ``k`` of ``K``
points at angle ``2*pi*k/K`` counter-clockwise from the +x axis (class 0 moves right, and with
``K = 8`` class 2 moves up, i.e. towards row 0). See :func:`direction_vector`.

Its config, :class:`~.config.DigitsVideoConfig`, is validated where it enters.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ... import _validate as v
from ...errors import ConfigError
from .config import SPLITS, DigitsVideoConfig

__all__ = ["DigitsVideoDataset", "channel_stats", "digit_split_indices", "direction_vector", "STANDARDIZE_CLIPS"]

_SPLIT_ID = {"train": 0, "test": 1}
# The digit-instance split is fixed (not tied to DigitsVideoConfig.seed) so that a model pretrained
# with one seed is never probed on test digits that another seed put into its training split.
_DIGIT_SPLIT_SEED = 20250910
_DIGIT_PIXELS = 8


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
        self.num_classes = config.label_classes
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
            **(self._evidence_params(index, digit_size, velocity, digit_color, bg_albedo)
               if cfg.uses_evidence_options else {}),
        }

    def _evidence_params(self, index: int, digit_size: float, velocity: tuple[float, float],
                         digit_color: np.ndarray, bg_albedo: np.ndarray) -> dict[str, Any]:
        """The evidence suite's draws (``DigitsVideoConfig`` docstring), from a second random stream per
        clip so that the packaged draws above stay as they are. Every draw is made whichever options are
        set (a fixed order: part of the determinism contract); only the options set are applied."""
        cfg = self.config
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, self._split_id, index, 1]))
        turn = int(rng.integers(2))
        a = math.radians(cfg.turn) * (1 if turn == 0 else -1)
        # rotation by +a counter-clockwise as seen on screen (y points down)
        c, s = math.cos(a), math.sin(a)
        vx, vy = velocity
        out: dict[str, Any] = {"turn": turn, "velocity_after": (vx * c + vy * s, -vx * s + vy * c)}
        if cfg.placement == "inside":
            # the centre at the middle frame, from one box for every clip: room for any trajectory
            reach = max(cfg.speeds) * cfg.num_frames / 2
            lo, hi = digit_size / 2 + reach, cfg.size - digit_size / 2 - reach
            out["middle"] = tuple(float(x) for x in rng.uniform(lo, hi, size=2))
        value = float(rng.uniform(*cfg.digit_value))
        bg_value = float(rng.uniform(*(cfg.background_value or (0.5, 0.9))))
        hue = float(rng.uniform())
        if cfg.digit_saturation is not None:
            digit_color = _hsv_to_rgb(hue, float(rng.uniform(*cfg.digit_saturation)), 1.0)
        out["digit_color"] = (digit_color * value).astype(np.float32)
        if cfg.background_value is not None:
            out["background_albedo"] = (bg_albedo / max(float(bg_albedo.max()), 1e-6) * bg_value).astype(np.float32)
        return out

    def _centres(self, p: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """The digit's centre ``(x [T], y [T])`` in pixels: a straight line through ``start``, or (evidence
        options) two legs meeting at the middle frame ``T // 2`` with ``velocity`` then ``velocity_after``."""
        cfg = self.config
        t = np.arange(cfg.num_frames, dtype=np.float64)
        (vx, vy), (x0, y0) = p["velocity"], p["start"]
        if not cfg.uses_evidence_options:
            return x0 + vx * t, y0 + vy * t
        tm = cfg.num_frames // 2
        v1, v2 = np.array(p["velocity"]), np.array(p["velocity_after"])
        rel = np.where((t < tm)[:, None], (t - tm)[:, None] * v1, (t - tm)[:, None] * v2)  # [T, 2]
        mid = np.array(p["middle"]) if cfg.placement == "inside" else np.array(p["start"]) + tm * v1
        pos = mid + rel
        return pos[:, 0], pos[:, 1]

    def render(self, index: int) -> dict[str, torch.Tensor]:
        """Render sample ``index`` (what ``dataset[index]`` returns without the cache)."""
        cfg = self.config
        p = self.sample_params(index)
        S = cfg.size
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
        cx, cy = self._centres(p)
        my = _sampling_matrix(cy, p["digit_size"], S)  # [T, H, 8]
        mx = _sampling_matrix(cx, p["digit_size"], S)  # [T, W, 8]
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
        out = {
            "video": torch.from_numpy(np.ascontiguousarray(video)),
            "motion": torch.tensor(p["motion"], dtype=torch.long),
            "appearance": torch.tensor(p["appearance"], dtype=torch.long),
            "depth": torch.from_numpy(np.ascontiguousarray(depth)),
        }
        if cfg.turn:
            out["turn"] = torch.tensor(p["turn"], dtype=torch.long)
        return out

    def _render_all(self) -> dict[str, torch.Tensor]:
        first = self.render(0)
        out = {k: torch.empty((self._length, *val.shape), dtype=val.dtype) for k, val in first.items()}
        for i in range(self._length):
            sample = first if i == 0 else self.render(i)
            for k, val in sample.items():
                out[k][i] = val
        return out

    @property
    def cached_videos(self) -> torch.Tensor | None:
        """Every clip ``[N, C, T, H, W]`` when rendered up front (``cache=True``), else None."""
        return None if self._cache is None else self._cache["video"]

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
