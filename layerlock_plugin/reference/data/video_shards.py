"""Video clips from WebDataset tar shards (``data.source: shards``), for data in object storage or on a
parallel file system: each rank and data-loader worker streams whole shards of its own, no index, no
random access. Reading uses the ``webdataset`` library (the ``video`` extra: ``pip install -e ".[video]"`` from a checkout);
:func:`write_shards` makes shards from a video folder.

Who reads what. Epoch ``e`` orders the shards by a permutation seeded by ``(seed, e)``; rank ``r`` of
``R`` takes every ``R``-th of them from ``r``, and its worker role ``w`` of ``W`` every ``W``-th of those.
A role reads its shards in order, sample by sample, then goes on to the next epoch's: an endless stream.
Step ``s`` of a rank is one batch of the role ``s mod W`` (the data loader takes its workers' batches in
turn), that role's ``(s // W)``-th batch.

What is exact on resume. The stream is a function of (seed, shards, ``R``, ``W``, the rank's batch), so
a run resumed at step ``s`` with the same ranks and workers skips, in each role, exactly the samples the
steps before ``s`` used (whole shards by their sample count, then samples within one shard without
decoding them) and continues with the very batches and clips of the uninterrupted run. A sample's clip
(window, crop, flip) is drawn from ``(seed, epoch, shard, position in shard)``, independent of ranks and
workers. Not exact: resuming with another number of ranks or workers gives each role another stream
(the run goes on, with another order); the skip reads the skipped part of one shard per role (and counts
the samples of the shards it skips whole, by reading their tar headers).

A bad sample (undecodable, too short under ``short_video: skip``, without its label) is replaced by the
next good sample of the role's stream (looked ahead, not consumed: it also appears in its own place),
reported as :mod:`.bad_videos` says; positions stay one sample per row, so resume stays exact.
"""

from __future__ import annotations

import io
import itertools
import tarfile
from collections import deque
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ...errors import ConfigError, MissingDependencyError, install_extra
from .bad_videos import MAX_TRIES, bad_fields
from .clip_sampling import ClipTooShort, sample_seed
from .decoders import BadVideo
from .video_clips import ClipMaker
from .video_config import IMAGENET_MEAN, IMAGENET_STD, VideoShardsConfig

__all__ = ["VideoShardsDataset", "expand_shards", "write_shards"]


def _wds():
    try:
        import webdataset  # noqa: PLC0415 - optional dependency, imported lazily
    except ImportError as e:
        raise MissingDependencyError(f"reading video shards needs webdataset: {install_extra('video')}") from e
    return webdataset


def expand_shards(urls: tuple[str, ...]) -> list[str]:
    """The shard URLs of ``data.urls`` (brace patterns expanded, in order)."""
    _wds()
    from webdataset.shardlists import expand_urls  # noqa: PLC0415

    return [u for pattern in urls for u in expand_urls(pattern)]


def _raw_samples(url: str) -> Iterator[dict[str, Any]]:
    """The samples of one shard as webdataset groups them (``__key__`` plus one bytes value per member)."""
    from webdataset.tariterators import tarfile_samples  # noqa: PLC0415

    yield from tarfile_samples([{"url": url}])


def _count_samples(url: str) -> int:
    """Samples in one shard: member keys counted from the tar headers (a local file is not read
    through; a remote one streams past its data)."""
    from webdataset.gopen import gopen  # noqa: PLC0415
    from webdataset.tariterators import base_plus_ext  # noqa: PLC0415

    keys: set[str] = set()
    with gopen(url, "rb") as stream:
        mode = "r:*" if hasattr(stream, "seekable") and stream.seekable() else "r|*"
        with tarfile.open(fileobj=stream, mode=mode) as tar:
            for member in tar:
                if member.isreg() and not member.name.startswith("__"):
                    prefix, _ = base_plus_ext(member.name)
                    if prefix is not None:
                        keys.add(prefix)
    return len(keys)


class VideoShardsDataset(IterableDataset):
    """This rank's endless stream of clips from WebDataset shards (see the module for who reads what
    and what is exact on resume).

    ``batch_size``: this rank's videos per step; ``start_step``: the first step this loader serves (the
    stream skips what steps ``0 .. start_step - 1`` used). Items are dicts like
    :class:`~.video_folder.VideoFolderDataset`'s (``video``, ``bad``, ``failed``, ``label`` with
    ``label_key``) plus ``where``: ``int64 [3]`` = (epoch, shard, position in shard).
    """

    def __init__(self, config: VideoShardsConfig, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 batch_size: int = 1, start_step: int = 0, train: bool = True):
        if not isinstance(config, VideoShardsConfig):
            raise ConfigError("data", f"must be a VideoShardsConfig, got {type(config).__name__}")
        self.config, self.seed, self.train = config, seed, train
        self.rank, self.world_size, self.batch_size, self.start_step = rank, world_size, batch_size, start_step
        self.shards = expand_shards(config.urls)
        if len(self.shards) < world_size:
            raise ConfigError("data.urls", f"has {len(self.shards)} shard(s), fewer than the {world_size} ranks")
        norm = config.augment.normalize
        if norm == "dataset":
            raise ConfigError("data.augment.normalize", "'dataset' is for data.source: folder; shards use 'imagenet' or 'none'")
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if norm == "imagenet" else (None, None)
        self.maker = ClipMaker(config, train, mean, std)
        self._counts: dict[int, int] = {}

    def check_workers(self, num_workers: int) -> None:
        """Every worker of every rank needs a shard of its own in every epoch."""
        need = self.world_size * max(1, num_workers)
        if len(self.shards) < need:
            raise ConfigError("data.urls", f"has {len(self.shards)} shard(s); {self.world_size} rank(s) x "
                                           f"{max(1, num_workers)} worker(s) need at least {need}")

    def role_shards(self, epoch: int, role: int, num_roles: int) -> list[int]:
        """Shard numbers that role ``role`` of this rank reads in ``epoch``, in order."""
        g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, 7))
        order = torch.randperm(len(self.shards), generator=g).tolist()
        return order[self.rank :: self.world_size][role::num_roles]

    def _count(self, shard: int) -> int:
        if shard not in self._counts:
            self._counts[shard] = _count_samples(self.shards[shard])
        return self._counts[shard]

    def _positions(self, role: int, num_roles: int, skip: int) -> Iterator[tuple[int, int, int, dict[str, Any]]]:
        """(epoch, shard, position, raw sample) of the role's stream after its first ``skip`` samples."""
        for epoch in itertools.count():
            shards = self.role_shards(epoch, role, num_roles)
            if not shards:
                raise ConfigError("data.urls", f"rank {self.rank} role {role} has no shard in epoch {epoch}")
            for shard in shards:
                if skip > 0:
                    n = self._count(shard)
                    if n <= skip:
                        skip -= n
                        continue
                for pos, raw in enumerate(_raw_samples(self.shards[shard])):
                    if skip > 0:
                        skip -= 1
                        continue
                    yield epoch, shard, pos, raw

    def _decode(self, raw: dict[str, Any], key: tuple[int, ...]) -> dict[str, Any]:
        cfg = self.config
        if cfg.video_key not in raw:
            raise BadVideo(f"has no '{cfg.video_key}' member")
        out: dict[str, Any] = {"video": self.maker(io.BytesIO(raw[cfg.video_key]), key)}
        if cfg.label_key is not None:
            text = raw.get(cfg.label_key)
            try:
                out["label"] = torch.tensor(int(bytes(text).decode().strip()), dtype=torch.long)
            except (TypeError, ValueError):
                raise BadVideo(f"has no integer '{cfg.label_key}' member") from None
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        num_roles, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        role = (self.start_step + worker) % num_roles
        before = max(0, -(-(self.start_step - role) // num_roles))  # steps < start_step served by this role
        stream = self._positions(role, num_roles, before * self.batch_size)
        ahead: deque[tuple[int, int, int, dict[str, Any]]] = deque()

        def item(k: int):
            while len(ahead) <= k:
                ahead.append(next(stream))
            return ahead[k]

        tries = 1 if self.config.on_bad_video == "raise" else MAX_TRIES
        while True:
            epoch, shard, pos, raw = item(0)
            bad: list[str] = []
            out = None
            for attempt in range(tries):
                e2, s2, p2, raw2 = item(attempt)
                key = (self.seed, epoch, shard, pos) if attempt == 0 else (self.seed, epoch, shard, pos, attempt)
                try:
                    out = self._decode(raw2, key)
                    break
                except (BadVideo, ClipTooShort) as e:
                    bad.append(f"{self.shards[s2]}/{raw2.get('__key__', '?')}: {e}")
            ahead.popleft()
            failed = out is None
            if failed:
                c = self.config
                out = {"video": torch.zeros(self.maker.num_clips, 3, c.num_frames, c.size, c.size).squeeze(0)}
                if c.label_key is not None:
                    out["label"] = torch.tensor(0, dtype=torch.long)
            out.update(bad_fields(bad, failed))
            out["where"] = torch.tensor([epoch, shard, pos])
            yield out


def write_shards(dataset_root: str, pattern: str, *, label_file: str | None = None, per_shard: int = 1000,
                 extensions: tuple[str, ...] = (".mp4",)) -> list[str]:
    """Pack the videos of a folder (its label file's order, or the sorted listing) into tar shards
    ``pattern % i`` (e.g. ``/data/k400-%06d.tar``) of ``per_shard`` samples: ``<key>.mp4`` with the
    file's bytes as they are (no re-encoding) and ``<key>.cls`` with its label. Returns the shard paths."""
    import os  # noqa: PLC0415

    from .video_folder import list_videos, read_label_file  # noqa: PLC0415

    wds = _wds()
    if label_file is not None:
        index = read_label_file(label_file)
        paths, labels = index.paths, index.labels
    else:
        paths, labels = list_videos(dataset_root, extensions), None
    written: list[str] = []
    with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0, post=written.append) as sink:
        for i, rel in enumerate(paths):
            ext = os.path.splitext(rel)[1].lstrip(".").lower()
            with open(os.path.join(dataset_root, rel), "rb") as fh:
                sample = {"__key__": f"{i:09d}", ext: fh.read()}
            if labels is not None:
                sample["cls"] = labels[i]
            sink.write(sample)
    return written
