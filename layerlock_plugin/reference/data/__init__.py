"""The reference trainer's data: what a clip is and which clips a step trains on.

:mod:`.config` holds the validated data configs (:class:`DigitsVideoConfig`, :class:`VideoFolderConfig`),
:mod:`.digits` the embedded moving-digits videos with their motion, appearance and depth labels (no
download), :mod:`.video_folder` a folder of real videos decoded with PyAV, :mod:`.sampling` the
batches of a step as a pure function of the step (:class:`StepBatchSampler`, :class:`RankBatchSampler`),
and :mod:`.device_clips` cached clips served from the training device (no loader between cache and step).
"""

from .config import SPLITS, VIDEO_EXTENSIONS, DigitsVideoConfig, VideoFolderConfig
from .digits import STANDARDIZE_CLIPS, DigitsVideoDataset, channel_stats, digit_split_indices, direction_vector
from .sampling import RankBatchSampler, StepBatchSampler
from .video_folder import VideoFolderDataset, clip_indices

__all__ = [
    "DigitsVideoConfig",
    "DigitsVideoDataset",
    "VideoFolderConfig",
    "VideoFolderDataset",
    "RankBatchSampler",
    "StepBatchSampler",
    "channel_stats",
    "clip_indices",
    "digit_split_indices",
    "direction_vector",
    "SPLITS",
    "STANDARDIZE_CLIPS",
    "VIDEO_EXTENSIONS",
]
