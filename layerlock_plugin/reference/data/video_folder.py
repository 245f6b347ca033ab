"""A folder of real videos for the reference trainer: :class:`VideoFolderDataset` decodes them with PyAV
(the ``video`` extra: ``pip install -e ".[video]"`` from a checkout) and reads optional labels in mmaction2's list format
(``relative/path.mp4 label`` per line). Its config is :class:`~.config.VideoFolderConfig`.
"""

from __future__ import annotations

import os
import posixpath
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ...errors import ConfigError, MissingDependencyError, install_extra
from .config import VIDEO_EXTENSIONS, VideoFolderConfig

__all__ = ["VideoFolderDataset", "clip_indices"]


def _import_av():
    try:
        import av  # noqa: PLC0415 - optional dependency, imported lazily
    except ImportError as e:
        raise MissingDependencyError(
            f"decoding video files needs PyAV: {install_extra('video')}"
        ) from e
    return av


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
