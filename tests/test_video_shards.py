"""WebDataset shards of real videos: who reads which shard (ranks x workers), the stream resumed at any
step equal to the uninterrupted one, bad samples replaced. The 2-process run: test_video_training.py."""

from __future__ import annotations

import itertools
import tarfile

import pytest
import torch
from torch.utils.data import DataLoader
from video_helpers import needs_av, write_clip

from layerlock_plugin.errors import ConfigError
from layerlock_plugin.reference.data import BadVideoLog, VideoShardsConfig, collate_clips

wds = pytest.importorskip("webdataset", reason='needs webdataset: pip install "layerlock-plugin[video]"')

from layerlock_plugin.reference.data.video_shards import VideoShardsDataset, write_shards  # noqa: E402

NUM_VIDEOS, PER_SHARD = 15, 3  # 5 shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    base = tmp_path_factory.mktemp("shards")
    root = base / "videos"
    for i in range(NUM_VIDEOS):
        write_clip(root / f"v{i:02d}.mp4", 12, shift=i)
    (base / "labels.txt").write_text("".join(f"v{i:02d}.mp4 {i}\n" for i in range(NUM_VIDEOS)))
    written = write_shards(str(root), str(base / "s-%04d.tar"), label_file=str(base / "labels.txt"), per_shard=PER_SHARD)
    assert len(written) == 5
    return str(base / "s-{0000..0004}.tar")


def _config(urls, **kw):
    return VideoShardsConfig(urls=urls, num_frames=4, size=32, frame_stride=[1, 2], **kw)


def _stream(urls, *, rank=0, world=1, workers=0, start=0, steps=6, batch=2, **kw):
    ds = VideoShardsDataset(_config(urls, **kw), seed=4, rank=rank, world_size=world, batch_size=batch, start_step=start)
    ds.check_workers(workers)
    loader = DataLoader(ds, batch_size=batch, num_workers=workers, collate_fn=collate_clips(1))
    return list(itertools.islice(BadVideoLog().wrap(loader), steps))


@needs_av
def test_samples_hold_the_video_label_and_their_place(shards):
    (batch,) = _stream(shards, steps=1, batch=3)
    assert batch["video"].shape == (3, 3, 4, 32, 32) and batch["label"].dtype == torch.long
    epoch, shard, pos = batch["where"][0].tolist()
    assert epoch == 0 and pos == 0 and batch["label"][0] == 3 * shard  # shard k holds videos 3k .. 3k+2


@needs_av
def test_ranks_and_workers_read_disjoint_shards_that_cover_the_epoch(shards):
    seen = {}
    for rank in (0, 1):
        # 2 ranks x 2 workers: 5 shards split 3 / 2 over the ranks, then over each rank's 2 workers
        batches = _stream(shards, rank=rank, world=2, workers=2, steps=4, batch=3)
        first_epoch = {tuple(w) for b in batches for w in b["where"].tolist() if w[0] == 0}
        seen[rank] = {s for _, s, _ in first_epoch}
        # each batch is one worker's: whole shards, in order
        for b in batches:
            where = b["where"].tolist()
            assert len({(e, s) for e, s, _ in where}) == 1 and [p for _, _, p in where] == [0, 1, 2]
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(5))


@needs_av
@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_stream_equals_the_uninterrupted_one(shards, workers):
    full = _stream(shards, workers=workers, steps=9, batch=2)  # 9 steps x 2 > 15 samples: into epoch 1
    assert {int(w[0]) for b in full for w in b["where"]} == {0, 1}
    epoch0 = sorted((s, p) for b in full for e, s, p in b["where"].tolist() if e == 0)
    assert epoch0 == [(s, p) for s in range(5) for p in range(3)]  # every sample of the epoch once
    for start in (1, 4, 7):  # mid-shard and across the epoch boundary
        resumed = _stream(shards, workers=workers, start=start, steps=9 - start, batch=2)
        for a, b in zip(full[start:], resumed):
            assert torch.equal(a["where"], b["where"]) and torch.equal(a["video"], b["video"])


@needs_av
def test_clips_are_drawn_per_epoch(shards):
    batches = _stream(shards, steps=16, batch=2)  # over 2 epochs
    clips = {}
    for b in batches:
        for (e, s, p), v in zip(b["where"].tolist(), b["video"]):
            clips.setdefault((s, p), {})[e] = v
    twice = [c for c in clips.values() if len(c) == 2]
    assert twice and all(not torch.equal(c[0], c[1]) for c in twice)


@needs_av
def test_a_bad_sample_is_replaced_by_the_next_good_one(tmp_path, shards):
    # a shard whose second sample is not a video, another without a label
    good = tarfile.open(shards.replace("{0000..0004}", "0000"))
    members = {m.name: good.extractfile(m).read() for m in good.getmembers()}
    path = tmp_path / "bad-0000.tar"
    with wds.TarWriter(str(path)) as sink:
        keys = sorted({n.split(".")[0] for n in members})
        sink.write({"__key__": keys[0], "mp4": members[f"{keys[0]}.mp4"], "cls": 0})
        sink.write({"__key__": "broken", "mp4": b"not a video" * 20, "cls": 1})
        sink.write({"__key__": "nolabel", "mp4": members[f"{keys[1]}.mp4"]})
        sink.write({"__key__": keys[2], "mp4": members[f"{keys[2]}.mp4"], "cls": 2})
    lines = []
    ds = VideoShardsDataset(_config(str(path)), batch_size=4)
    loader = DataLoader(ds, batch_size=4, collate_fn=collate_clips(1))
    (batch,) = list(itertools.islice(BadVideoLog(say=lines.append).wrap(loader), 1))
    assert batch["video"].shape[0] == 4 and batch["where"][:, 2].tolist() == [0, 1, 2, 3]
    assert batch["label"].tolist() == [0, 2, 2, 2]  # positions 1 and 2 filled by the next good sample
    assert len(lines) == 2 and "broken: does not open" in lines[0] and "nolabel: has no integer 'cls'" in lines[1]


def test_shard_config_errors(tmp_path):
    for field, kwargs in [("data.urls", {"urls": ""}), ("data.urls", {"urls": []}),
                          ("data.video_key", {"urls": "x.tar", "video_key": ""}),
                          ("data.num_clips", {"urls": "x.tar", "num_clips": -1})]:
        with pytest.raises(ConfigError) as info:
            VideoShardsConfig(**kwargs)
        assert info.value.field == field
    ds = VideoShardsDataset(VideoShardsConfig(urls=str(tmp_path / "s-{0..2}.tar")), world_size=2)
    with pytest.raises(ConfigError, match=r"3 shard\(s\); 2 rank\(s\) x 2 worker\(s\) need at least 4"):
        ds.check_workers(2)
