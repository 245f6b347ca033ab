"""One video file (or its bytes) -> its training or evaluation clip(s): draw the frames, decode them,
augment, normalise. Shared by the folder (:mod:`.video_folder`) and the shards (:mod:`.video_shards`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import default_collate

from .clip_sampling import draw_clip, sample_generator
from .decoders import BadVideo, _ShortRead, open_reader
from .video_config import IMAGENET_MEAN, IMAGENET_STD, _ClipFields
from .video_transforms import ClipTransform

__all__ = ["ClipMaker", "collate_clips"]


class ClipMaker:
    """``maker(source, key)`` -> ``float32 [3, T, size, size]`` (``[num_clips, 3, T, size, size]`` when
    ``config.num_clips > 1``), or :class:`~.decoders.BadVideo`.

    ``key``: the sample's ``(run seed, epoch, index, ...)``; its generator draws the stride and window
    (``sampling: random``, training only), then one augmentation seed per clip. ``train=False``: the
    centred window, the frame's short side scaled to ``size``, a centre crop: deterministic. ``mean`` /
    ``std``: normalisation (``None``: clips stay in ``[0, 1]``).
    """

    def __init__(self, config: _ClipFields, train: bool, mean: Sequence[float] | None = IMAGENET_MEAN,
                 std: Sequence[float] | None = IMAGENET_STD):
        self.config, self.train = config, train
        self.transform = ClipTransform(config.size, config.augment, train, mean, std)
        spatial = train and config.augment.crop != "center"
        self.short_side = config.train_short_side if spatial else config.size
        self.num_clips = config.num_clips if train else 1

    def frames(self, source: Any, key: Sequence[int]) -> tuple[torch.Tensor, torch.Generator]:
        """``uint8 [T, H, W, 3]`` of the drawn window and the generator after the draw."""
        cfg = self.config
        with open_reader(cfg.decoder, source) as reader:
            n = reader.num_frames
            if n <= 0 and hasattr(reader, "count_frames"):
                n = reader.count_frames()
            for _ in range(3):  # a container that over-reports its length: redraw with the true one
                g = sample_generator(*key)
                draw = g if self.train and cfg.sampling == "random" else None
                indices = draw_clip(max(n, 1), cfg.num_frames, cfg.strides, draw, cfg.short_video)
                try:
                    return torch.from_numpy(reader.read(indices, self.short_side)), g
                except _ShortRead as short:
                    n = min(short.num_frames, n - 1)
                    if n <= 0:
                        break
        raise BadVideo("decoded to fewer frames than its container says, even after redrawing")

    def __call__(self, source: Any, key: Sequence[int]) -> torch.Tensor:
        frames, g = self.frames(source, key)
        if not self.transform.train:
            clip = self.transform(frames)
            return clip if self.num_clips == 1 else clip.unsqueeze(0).expand(self.num_clips, *clip.shape).clone()
        seeds = torch.randint(1 << 62, (self.num_clips,), generator=g).tolist()
        clips = [self.transform(frames, s) for s in seeds]
        return clips[0] if self.num_clips == 1 else torch.stack(clips)


class collate_clips:  # noqa: N801 - used like a function; a class so that spawned workers can pickle it
    """A DataLoader ``collate_fn``: the default collation, then ``num_clips`` clips per video laid out as
    rows: ``video [b, k, 3, T, H, W] -> [b * k, 3, T, H, W]``, labels repeated alike."""

    def __init__(self, num_clips: int):
        self.num_clips = num_clips

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = default_collate(samples)
        if self.num_clips > 1:
            batch["video"] = batch["video"].flatten(0, 1)
            if "label" in batch:
                batch["label"] = batch["label"].repeat_interleave(self.num_clips)
        return batch
