"""Configs of the real-video sources, validated where they enter (errors name ``data.<field>``):
:class:`VideoFolderConfig` (a folder of video files, :mod:`.video_folder`), :class:`VideoShardsConfig`
(WebDataset tar shards, :mod:`.video_shards`) and their shared :class:`AugmentConfig`.

The defaults follow the anchors: a random temporal window per video per epoch (V-JEPA's random clip
sampling, VideoMAE's random start), V-JEPA's random resized crop (area 0.3-1.0, aspect 0.75-1.35) with a
horizontal flip, ImageNet mean/std normalisation. They import no decoder, so the run config holds them
cheaply.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from ... import _validate as v
from ...errors import ConfigError

__all__ = ["AugmentConfig", "VideoFolderConfig", "VideoShardsConfig", "VIDEO_EXTENSIONS", "DECODERS"]

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov")
DECODERS = ("pyav", "torchcodec")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # normalise fields of a frozen dataclass


def _pair(name: str, value: Any, lo_min: float) -> tuple[float, float]:
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in value)):
        raise ConfigError(name, f"must be a pair [lo, hi] of numbers, got {value!r}")
    lo, hi = float(value[0]), float(value[1])
    if not lo_min < lo <= hi:
        raise ConfigError(name, f"must be a pair [lo, hi] with {lo_min} < lo <= hi, got {value!r}")
    return lo, hi


@dataclass(frozen=True)
class AugmentConfig:
    """How a training clip is cropped, flipped and normalised (``data.augment.<field>``).

    ``crop``: ``'random_resized'`` (V-JEPA: a box of ``scale`` x the frame's area and aspect ratio in
    ``aspect``, resized to ``data.size``), ``'multi_scale'`` (VideoMAE's GroupMultiScaleCrop: box sides
    drawn from ``scales`` x the short side, at one of 13 fixed positions) or ``'center'`` (no spatial
    augmentation). The box and the flip are the same for every frame of a clip. ``flip``: probability of
    a horizontal flip. ``normalize``: ``'imagenet'`` (mean/std of ImageNet), ``'dataset'`` (per-channel
    mean/std of the dataset's first :data:`~.video_transforms.STATS_CLIPS` centred clips, measured at
    start-up) or ``'none'`` (clips stay in ``[0, 1]``). Evaluation clips are never augmented: centred
    window, centre crop, the same normalisation.
    """

    crop: str = "random_resized"
    scale: tuple[float, float] = (0.3, 1.0)
    aspect: tuple[float, float] = (0.75, 1.35)
    scales: tuple[float, ...] = (1.0, 0.875, 0.75, 0.66)
    flip: float = 0.5
    normalize: str = "imagenet"

    def __post_init__(self) -> None:
        v.one_of("data.augment.crop", self.crop, ("random_resized", "multi_scale", "center"))
        lo, hi = _pair("data.augment.scale", self.scale, 0.0)
        if hi > 1.0:
            raise ConfigError("data.augment.scale", f"must lie within (0, 1] (a share of the frame's area), got {self.scale!r}")
        _set(self, "scale", (lo, hi))
        _set(self, "aspect", _pair("data.augment.aspect", self.aspect, 0.0))
        scales = self.scales
        if (not isinstance(scales, (tuple, list)) or not scales
                or any(isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s <= 1 for s in scales)):
            raise ConfigError("data.augment.scales", f"must be a non-empty list of numbers in (0, 1], got {self.scales!r}")
        _set(self, "scales", tuple(float(s) for s in scales))
        _set(self, "flip", v.fraction("data.augment.flip", self.flip, allow_zero=True))
        v.one_of("data.augment.normalize", self.normalize, ("imagenet", "dataset", "none"))


def _strides(value: Any) -> int | tuple[int, ...]:
    """``data.frame_stride``: one stride, or a list to draw from per clip (kept as given: an int stays an int)."""
    if isinstance(value, (tuple, list)):
        if not value:
            raise ConfigError("data.frame_stride", "must be a positive integer or a non-empty list of them, got []")
        out = tuple(v.positive_int("data.frame_stride", s) for s in value)
        if len(set(out)) != len(out):
            raise ConfigError("data.frame_stride", f"must not repeat a stride, got {list(value)!r}")
        return out
    return v.positive_int("data.frame_stride", value)


@dataclass(frozen=True)
class _ClipFields:
    """What a clip is and how it is drawn, decoded and augmented; shared by the folder and the shards."""

    num_frames: int = 8
    size: int = 32
    frame_stride: int | tuple[int, ...] = 2
    sampling: str = "random"
    num_clips: int = 1
    short_video: str = "loop"
    decode_size: int | None = None
    decoder: str = "pyav"
    on_bad_video: str = "replace"
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def _check_clip(self) -> None:
        v.positive_int("data.num_frames", self.num_frames)
        v.positive_int("data.size", self.size)
        _set(self, "frame_stride", _strides(self.frame_stride))
        v.one_of("data.sampling", self.sampling, ("random", "center"))
        v.positive_int("data.num_clips", self.num_clips)
        v.one_of("data.short_video", self.short_video, ("loop", "repeat_last", "skip"))
        if self.decode_size is not None:
            v.positive_int("data.decode_size", self.decode_size)
            if self.decode_size < self.size:
                raise ConfigError("data.decode_size", f"must be at least data.size={self.size}, got {self.decode_size}")
        v.one_of("data.decoder", self.decoder, DECODERS)
        v.one_of("data.on_bad_video", self.on_bad_video, ("replace", "raise"))
        if isinstance(self.augment, dict):
            from ..._config import from_dict  # noqa: PLC0415 - a dict given directly (not through the YAML loader)

            _set(self, "augment", from_dict(AugmentConfig, self.augment, "data.augment"))
        if not isinstance(self.augment, AugmentConfig):
            raise ConfigError("data.augment", f"must be a mapping of augmentation fields, got {self.augment!r}")

    @property
    def strides(self) -> tuple[int, ...]:
        """The frame strides a clip draws from (one when ``frame_stride`` is an int)."""
        s = self.frame_stride
        return s if isinstance(s, tuple) else (s,)

    @property
    def train_short_side(self) -> int:
        """Short side the decoder scales a training frame to before the crop: ``decode_size``, or
        ``size * 256 / 224`` (the anchors' 256-pixel frames for 224-pixel crops)."""
        return self.decode_size if self.decode_size is not None else max(self.size, round(self.size * 256 / 224))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class VideoFolderConfig(_ClipFields):
    """Config of :class:`~.video_folder.VideoFolderDataset` (errors name ``data.<field>``).

    ``root``: the folder. ``label_file``: mmaction2 list format (``relative/path.mp4 label`` per line,
    paths relative to ``root``); when given it IS the index: the dataset is the listed videos and no
    file is listed or opened at start-up (a listed file that is missing is a bad video, see
    ``on_bad_video``). Without it rank 0 lists the folder (``extensions``) once and shares the list.

    ``frame_stride``: take every ``frame_stride``-th frame; a list draws one stride per clip.
    ``sampling``: ``'random'`` draws the window's start (and stride) per video per epoch from a
    generator seeded by (run seed, epoch, index); ``'center'`` always takes the centred window.
    ``num_clips``: clips per decoded video (VideoMAE V2's repeated sampling: one decode, ``num_clips``
    independently augmented crops of the same window); a step then draws ``batch / num_clips`` videos.
    ``short_video``: a video shorter than the clip's span ``'loop'``\\ s from its start, holds its last
    frame (``'repeat_last'``) or counts as bad (``'skip'``). ``decode_size``: short side frames are
    scaled to while decoding (default ``size * 256 / 224``). ``decoder``: ``'pyav'`` (seeks to the
    window; its wheels bundle FFmpeg) or ``'torchcodec'`` (needs FFmpeg's shared libraries).
    ``on_bad_video``: ``'replace'`` a video that cannot give a clip (missing, empty, corrupt, no video
    stream, too short under ``'skip'``) by another video drawn from the same (seed, epoch, index), with
    one warning naming it and a count; ``'raise'`` stops the run with that line.
    """

    root: str = ""
    label_file: str | None = None
    extensions: tuple[str, ...] = VIDEO_EXTENSIONS

    def __post_init__(self) -> None:
        if not isinstance(self.root, (str, os.PathLike)) or str(self.root) == "":
            raise ConfigError("data.root", f"must be a folder path, got {self.root!r}")
        _set(self, "root", os.fspath(self.root))
        if not os.path.isdir(self.root):
            raise ConfigError("data.root", f"folder not found: {self.root}")
        self._check_clip()
        if self.label_file is not None:
            if not isinstance(self.label_file, (str, os.PathLike)) or str(self.label_file) == "":
                raise ConfigError("data.label_file", f"must be a file path or null, got {self.label_file!r}")
            _set(self, "label_file", os.fspath(self.label_file))
            if not os.path.isfile(self.label_file):
                raise ConfigError("data.label_file", f"file not found: {self.label_file}")
        exts = self.extensions
        if isinstance(exts, str):
            exts = (exts,)
        if (not isinstance(exts, (tuple, list)) or len(exts) == 0
                or any(not isinstance(e, str) or not e.strip(".") for e in exts)):
            raise ConfigError("data.extensions", f"must be a non-empty list of file extensions, got {self.extensions!r}")
        _set(self, "extensions", tuple("." + e.lower().lstrip(".") for e in exts))


@dataclass(frozen=True)
class VideoShardsConfig(_ClipFields):
    """Config of :class:`~.video_shards.VideoShardsDataset`: WebDataset tar shards (errors name
    ``data.<field>``).

    ``urls``: the shards, as a brace pattern (``/data/k400-{000000..000999}.tar``), a list of paths or
    URLs, or anything WebDataset opens (``pipe:aws s3 cp s3://bucket/k400-000000.tar -``). A sample is a
    video file (``video_key``, e.g. ``mp4``) and optionally an integer class (``label_key``, e.g.
    ``cls``). Every rank and data-loader worker reads whole shards of its own (see the module for what
    is exact on resume); there must be at least ``world_size x max(1, train.num_workers)`` shards.
    """

    urls: str | tuple[str, ...] = ""
    video_key: str = "mp4"
    label_key: str | None = "cls"

    def __post_init__(self) -> None:
        urls = self.urls
        if isinstance(urls, str):
            urls = (urls,)
        if not isinstance(urls, (tuple, list)) or not urls or any(not isinstance(u, str) or not u for u in urls):
            raise ConfigError("data.urls", f"must be a shard pattern or a non-empty list of shard paths/URLs, got {self.urls!r}")
        _set(self, "urls", tuple(urls))
        self._check_clip()
        if not isinstance(self.video_key, str) or not self.video_key:
            raise ConfigError("data.video_key", f"must name the video member of a sample (e.g. 'mp4'), got {self.video_key!r}")
        if self.label_key is not None and (not isinstance(self.label_key, str) or not self.label_key):
            raise ConfigError("data.label_key", f"must name the label member (e.g. 'cls') or be null, got {self.label_key!r}")
