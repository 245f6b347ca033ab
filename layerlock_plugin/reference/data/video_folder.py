"""A folder of real videos for the reference trainer: :class:`VideoFolderDataset` (config
:class:`~.video_config.VideoFolderConfig`; decoders need the ``video`` extra: ``pip install -e ".[video]"`` from a checkout).

Start-up opens no video: the index is the label file (mmaction2's list format, ``relative/path.mp4
label`` per line) or, without one, one listing of the folder (:func:`build_index`; the trainer lists on
rank 0 and shares the list). A video is opened when a sample needs it; what is wrong with a file is
found then and handled as a bad video (:mod:`.bad_videos`).

``dataset[(index, epoch)]`` draws the sample's clip from a generator seeded by ``(seed, epoch, index)``
(:mod:`.clip_sampling`): the same clip for any number of ranks or workers, and again after a resume.
``dataset[index]`` is ``(index, 0)``.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from ...errors import ConfigError
from .bad_videos import MAX_TRIES, bad_fields
from .clip_sampling import ClipTooShort, sample_generator
from .decoders import BadVideo, _import_av
from .video_clips import ClipMaker
from .video_config import IMAGENET_MEAN, IMAGENET_STD, VideoFolderConfig
from .video_transforms import STATS_CLIPS, channel_stats

__all__ = ["VideoFolderDataset", "VideoIndex", "build_index", "list_videos", "read_label_file"]


@dataclass(frozen=True)
class VideoIndex:
    """The dataset's videos: ``paths`` relative to the root (posix), ``labels`` (one per path) or ``None``."""

    paths: list[str]
    labels: list[int] | None = None


def list_videos(root: str, extensions: tuple[str, ...]) -> list[str]:
    """Relative posix paths of the files under ``root`` (recursive, following links) ending in one of
    ``extensions``, sorted. Reads directory entries only: no file is opened."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        for name in filenames:
            if name.lower().endswith(extensions):
                found.append(name if rel_dir == "." else posixpath.join(rel_dir.replace(os.sep, "/"), name))
    return sorted(found)


def read_label_file(label_file: str) -> VideoIndex:
    """Parse a label list (``relative/path label`` per line, ``#`` comments and blank lines skipped).
    A malformed line, a negative or non-integer label or a path listed twice is refused with its line
    number; whether the files exist is not checked here (a missing one is a bad video when it is drawn)."""
    paths: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    with open(label_file, encoding="utf-8") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(None, 1)
            if len(parts) != 2:
                raise ConfigError("data.label_file", f"{label_file} line {lineno}: expected 'relative/path label', got {line!r}")
            path, label_text = parts
            label = int(label_text) if label_text.isdigit() else -1
            if label < 0:
                raise ConfigError("data.label_file",
                                  f"{label_file} line {lineno}: label must be a non-negative integer, got {label_text!r}")
            rel = posixpath.normpath(path.replace("\\", "/"))
            if rel in seen:
                raise ConfigError("data.label_file", f"{label_file} line {lineno}: video {path!r} is listed twice")
            seen.add(rel)
            paths.append(rel)
            labels.append(label)
    if not paths:
        raise ConfigError("data.label_file", f"{label_file} lists no videos")
    return VideoIndex(paths, labels)


def build_index(config: VideoFolderConfig) -> VideoIndex:
    """The label file when there is one, else one listing of ``config.root``."""
    if config.label_file is not None:
        return read_label_file(config.label_file)
    found = list_videos(config.root, config.extensions)
    if not found:
        raise ConfigError("data.root", f"no video files with extensions {', '.join(config.extensions)} under {config.root}")
    return VideoIndex(found)


class VideoFolderDataset(Dataset):
    """Clips of the videos of a :class:`VideoIndex`, decoded lazily.

    ``dataset[(index, epoch)]`` is ``dict(video=float32[3, T, size, size], bad=str, failed=bool[])`` plus
    ``label=int64[]`` with a label file; ``video`` is ``[num_clips, 3, T, size, size]`` when
    ``num_clips > 1`` (lay them out as rows with :func:`~.video_clips.collate_clips`). ``train=True``:
    random window and augmentation per ``(seed, epoch, index)``; ``train=False``: the centred window and a
    centre crop, the same every epoch. ``bad`` / ``failed``: see :mod:`.bad_videos`.

    ``VideoFolderDataset(config, ...)`` or ``VideoFolderDataset(root, num_frames=..., ...)`` with any
    :class:`VideoFolderConfig` field; ``index``: a :class:`VideoIndex` already built (the trainer's rank 0
    builds it once and shares it).
    """

    def __init__(self, config: VideoFolderConfig | str | os.PathLike, *, train: bool = True, seed: int = 0,
                 index: VideoIndex | None = None, **fields: Any):
        if isinstance(config, VideoFolderConfig):
            if fields:
                raise TypeError("pass either a VideoFolderConfig or a root with fields, not both")
            cfg = config
        else:
            cfg = VideoFolderConfig(root=config, **fields)
        self.config, self.train, self.seed = cfg, train, seed
        if cfg.decoder == "pyav":
            _import_av()  # a missing decoder is said now, not in a worker
        self.index = index if index is not None else build_index(cfg)
        self.paths = self.index.paths
        self.labels = self.index.labels
        self.num_classes = None if self.labels is None else max(self.labels) + 1
        mean, std = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "none": (None, None)}.get(
            cfg.augment.normalize, (None, None))
        if cfg.augment.normalize == "dataset":
            mean, std = self.dataset_stats()
        self.mean, self.std = mean, std
        self.maker = ClipMaker(cfg, train, mean, std)

    @classmethod
    def from_config(cls, config: VideoFolderConfig, **kwargs: Any) -> VideoFolderDataset:
        if not isinstance(config, VideoFolderConfig):
            raise ConfigError("data", f"must be a VideoFolderConfig, got {type(config).__name__}")
        return cls(config, **kwargs)

    def dataset_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std of the centred clips of the first :data:`STATS_CLIPS` good videos."""
        plain = ClipMaker(self.config, train=False, mean=None, std=None)
        clips = []
        for rel in self.paths:
            if len(clips) == STATS_CLIPS:
                break
            try:
                clips.append(plain(os.path.join(self.config.root, rel), (self.seed, 0, 0)))
            except (BadVideo, ClipTooShort):
                continue
        if not clips:
            raise ConfigError("data.augment.normalize", f"'dataset' found no decodable video in {self.config.root}")
        return channel_stats(clips)

    def __len__(self) -> int:
        return len(self.paths)

    def _replacements(self, index: int, epoch: int) -> list[int]:
        """Videos tried in place of a bad one, in order: distinct, drawn from the sample's own key (not
        the neighbours, so a broken sub-folder does not fill the batch with its neighbours' clips)."""
        g = sample_generator(self.seed, epoch, index, 1)
        order = torch.randperm(len(self.paths), generator=g)[:MAX_TRIES].tolist()
        return [i for i in order if i != index][: MAX_TRIES - 1]

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, epoch = (int(key[0]), int(key[1])) if isinstance(key, (tuple, list)) else (int(key), 0)
        if not 0 <= index < len(self.paths):
            raise IndexError(f"index {index} out of range for {len(self.paths)} videos")
        bad: list[str] = []

        def candidates():
            yield index
            if self.config.on_bad_video == "replace":
                yield from self._replacements(index, epoch)

        for attempt, i in enumerate(candidates()):
            rel = self.paths[i]
            # the sample's own key for its first video; a replacement gets its own draws (not i's clip)
            key_ = (self.seed, epoch, index) if attempt == 0 else (self.seed, epoch, index, attempt)
            try:
                video = self.maker(os.path.join(self.config.root, rel), key_)
            except (BadVideo, ClipTooShort) as e:
                bad.append(f"{rel}: {e}")
                continue
            out = {"video": video, **bad_fields(bad, False)}
            if self.labels is not None:
                out["label"] = torch.tensor(self.labels[i], dtype=torch.long)
            return out
        c = self.config
        shape = (3, c.num_frames, c.size, c.size) if self.maker.num_clips == 1 else \
            (self.maker.num_clips, 3, c.num_frames, c.size, c.size)
        out = {"video": torch.zeros(shape), **bad_fields(bad, True)}
        if self.labels is not None:
            out["label"] = torch.tensor(0, dtype=torch.long)
        return out

    def __repr__(self) -> str:
        c = self.config
        return (f"VideoFolderDataset(root={c.root!r}, len={len(self)}, clip=[3, {c.num_frames}, {c.size}, {c.size}], "
                f"train={self.train})")
