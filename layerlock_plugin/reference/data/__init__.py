"""The reference trainer's data: what a clip is and which clips a step trains on.

:mod:`.config` holds the validated data configs (:class:`DigitsVideoConfig`; the real-video ones,
:class:`VideoFolderConfig` and :class:`VideoShardsConfig`, come from :mod:`.video_config`), :mod:`.digits`
the embedded moving-digits videos with their motion, appearance and depth labels (no download), and
:mod:`.sampling` the batches of a step as a pure function of the step (:class:`StepBatchSampler`,
:class:`RankBatchSampler`).

Real video: :mod:`.video_folder` (a folder, indexed once, decoded lazily) and :mod:`.video_shards`
(WebDataset tar shards) make clips with :mod:`.video_clips`: frames drawn per (seed, epoch, index)
(:mod:`.clip_sampling`), decoded with seeking (:mod:`.decoders`), augmented and normalised
(:mod:`.video_transforms`); a bad file is replaced and counted (:mod:`.bad_videos`).
:mod:`.device_clips` serves cached clips (the embedded digits) from the training device (no loader between
cache and step).
"""

from .bad_videos import BadVideoLog
from .clip_sampling import clip_indices, draw_clip, sample_generator, sample_seed
from .config import SPLITS, VIDEO_EXTENSIONS, AugmentConfig, DigitsVideoConfig, VideoFolderConfig, VideoShardsConfig
from .digits import STANDARDIZE_CLIPS, DigitsVideoDataset, channel_stats, digit_split_indices, direction_vector
from .sampling import RankBatchSampler, StepBatchSampler
from .video_clips import collate_clips
from .video_folder import VideoFolderDataset, VideoIndex, build_index, list_videos, read_label_file

__all__ = [
    "AugmentConfig",
    "BadVideoLog",
    "DigitsVideoConfig",
    "DigitsVideoDataset",
    "VideoFolderConfig",
    "VideoFolderDataset",
    "VideoIndex",
    "VideoShardsConfig",
    "RankBatchSampler",
    "StepBatchSampler",
    "build_index",
    "channel_stats",
    "clip_indices",
    "collate_clips",
    "digit_split_indices",
    "direction_vector",
    "draw_clip",
    "list_videos",
    "read_label_file",
    "sample_generator",
    "sample_seed",
    "SPLITS",
    "STANDARDIZE_CLIPS",
    "VIDEO_EXTENSIONS",
]
