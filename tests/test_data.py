"""Tests of layerlock_plugin.reference.data: the embedded digits videos (real video: test_video_*.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from layerlock_plugin.errors import ConfigError
from layerlock_plugin.reference.data import (
    DigitsVideoConfig,
    DigitsVideoDataset,
    channel_stats,
    digit_split_indices,
    direction_vector,
)

SMALL = DigitsVideoConfig(num_videos=64, num_test_videos=48)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------------
# digits videos
# --------------------------------------------------------------------------------------------------


def test_determinism_across_calls_instances_and_order():
    ds = DigitsVideoDataset(SMALL, "train")
    assert _same(ds[5], ds[5])
    other = DigitsVideoDataset(DigitsVideoConfig(num_videos=64, num_test_videos=48), "train")
    assert _same(ds[5], other[5])
    forward = [ds[i] for i in range(10)]
    backward = [other[i] for i in reversed(range(10))][::-1]
    assert all(_same(a, b) for a, b in zip(forward, backward))
    # a longer dataset (more videos) holds the same first samples
    longer = DigitsVideoDataset(DigitsVideoConfig(num_videos=128), "train")
    assert _same(ds[3], longer[3])
    # negative and tensor indices
    assert _same(ds[-1], ds[63])
    assert _same(ds[torch.tensor(7)], ds[7])
    # the cache serves exactly what lazy rendering gives
    cached = DigitsVideoDataset(DigitsVideoConfig(num_videos=12), "test", cache=True)
    lazy = DigitsVideoDataset(DigitsVideoConfig(num_videos=12), "test")
    assert all(_same(cached[i], lazy[i]) for i in range(12))


def test_seed_split_and_index_change_the_sample():
    a = DigitsVideoDataset(SMALL, "train")[0]["video"]
    b = DigitsVideoDataset(DigitsVideoConfig(num_videos=64, seed=1), "train")[0]["video"]
    c = DigitsVideoDataset(SMALL, "test")[0]["video"]
    d = DigitsVideoDataset(SMALL, "train")[1]["video"]
    for other in (b, c, d):
        assert not torch.equal(a, other)


def test_dataloader_workers_give_the_same_batches():
    ds = DigitsVideoDataset(DigitsVideoConfig(num_videos=16), "train")
    loader0 = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=0)
    loader2 = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2)
    for b0, b2 in zip(loader0, loader2):
        assert _same(b0, b2)


@pytest.mark.parametrize(
    "cfg",
    [
        DigitsVideoConfig(num_videos=8),
        DigitsVideoConfig(num_videos=8, channels=1, num_frames=4, size=24, digit_size=(8, 10), noise=0.0),
    ],
)
def test_shapes_dtypes_ranges(cfg):
    for split in ("train", "test"):
        ds = DigitsVideoDataset(cfg, split)
        assert len(ds) == 8
        s = ds[0]
        assert set(s) == {"video", "motion", "appearance", "depth"}
        C, T, S = cfg.channels, cfg.num_frames, cfg.size
        assert s["video"].shape == (C, T, S, S) and s["video"].dtype == torch.float32
        assert s["depth"].shape == (T, S, S) and s["depth"].dtype == torch.float32
        assert s["motion"].shape == () and s["motion"].dtype == torch.long
        assert s["appearance"].shape == () and s["appearance"].dtype == torch.long
        assert 0.0 <= s["video"].min() and s["video"].max() <= 1.0
        assert s["video"].std() > 0.02  # not a blank clip
        lo, hi = cfg.depth_range
        assert lo <= s["depth"].min() and s["depth"].max() <= hi
        assert torch.isfinite(s["depth"]).all()
    with pytest.raises(IndexError):
        ds[8]


def test_default_config_matches_the_documented_defaults():
    cfg = DigitsVideoConfig()
    assert (cfg.num_videos, cfg.num_frames, cfg.size, cfg.channels) == (2048, 8, 32, 3)
    assert cfg.digit_size == (12.0, 16.0) and cfg.num_directions == 8 and cfg.speeds == (1.0, 2.0)
    assert cfg.noise == 0.05 and cfg.seed == 0 and cfg.motion_label == "direction"
    ds = DigitsVideoDataset(cfg, "test")
    assert len(ds) == 2048 and ds.num_classes == {"motion": 8, "appearance": 10}


def test_label_ranges_and_balance():
    cfg = DigitsVideoConfig(num_videos=400)
    ds = DigitsVideoDataset(cfg, "train")
    params = [ds.sample_params(i) for i in range(len(ds))]
    motion = np.array([p["motion"] for p in params])
    appearance = np.array([p["appearance"] for p in params])
    assert motion.min() >= 0 and motion.max() < ds.num_classes["motion"]
    assert appearance.min() >= 0 and appearance.max() <= 9
    assert len(np.unique(motion)) == 8 and len(np.unique(appearance)) == 10
    assert np.bincount(motion).min() > 20 and np.bincount(appearance).min() > 15
    # sample_params agrees with the rendered labels
    for i in (0, 17, 399):
        s = ds[i]
        assert int(s["motion"]) == params[i]["motion"] and int(s["appearance"]) == params[i]["appearance"]

    ds2 = DigitsVideoDataset(DigitsVideoConfig(num_videos=300, motion_label="direction_speed"), "train")
    assert ds2.num_classes["motion"] == 16
    for i in range(len(ds2)):
        p = ds2.sample_params(i)
        assert p["motion"] == p["direction"] * 2 + cfg.speeds.index(p["speed"])
    assert len({ds2.sample_params(i)["motion"] for i in range(len(ds2))}) == 16


def test_train_and_test_use_disjoint_digit_images():
    from sklearn.datasets import load_digits

    targets = load_digits().target
    train, test = digit_split_indices("train"), digit_split_indices("test")
    assert len(set(train) & set(test)) == 0
    assert len(train) + len(test) == len(targets) == 1797
    assert 0.25 < len(test) / 1797 < 0.35
    assert set(targets[train]) == set(targets[test]) == set(range(10))
    for split, pool in (("train", set(train)), ("test", set(test))):
        ds = DigitsVideoDataset(DigitsVideoConfig(num_videos=200), split)
        used = {ds.sample_params(i)["digit_index"] for i in range(len(ds))}
        assert used <= pool
        assert len(used) > 150  # many different instances, not a handful
        for i in range(0, 200, 37):
            p = ds.sample_params(i)
            assert p["appearance"] == targets[p["digit_index"]]


def _circular_centre(mask: np.ndarray) -> tuple[float, float]:
    """Centre of mass (x, y) of a mask on a torus."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    cx = np.angle(np.exp(2j * np.pi * xs / w).mean()) * w / (2 * np.pi)
    cy = np.angle(np.exp(2j * np.pi * ys / h).mean()) * h / (2 * np.pi)
    return cx, cy


def _wrap(d: float, n: int) -> float:
    return (d + n / 2) % n - n / 2


def test_motion_label_is_the_direction_of_the_digit_displacement():
    cfg = DigitsVideoConfig(num_videos=48, noise=0.0)
    ds = DigitsVideoDataset(cfg, "train")
    dirs = np.array([direction_vector(k, cfg.num_directions) for k in range(cfg.num_directions)])
    for i in range(len(ds)):
        s, p = ds[i], ds.sample_params(i)
        mask = (s["depth"] == np.float32(p["digit_depth"])).numpy()
        centres = [_circular_centre(m) for m in mask]
        steps = np.array(
            [
                (_wrap(b[0] - a[0], cfg.size), _wrap(b[1] - a[1], cfg.size))
                for a, b in zip(centres[:-1], centres[1:])
            ]
        )
        mean = steps.mean(0)
        assert int(np.argmax(dirs @ mean / np.linalg.norm(mean))) == int(s["motion"]), (i, mean)
        assert abs(np.linalg.norm(mean) - p["speed"]) < 0.35, (i, mean, p["speed"])
    # the convention: class 0 moves right (+x), class 2 of 8 moves up (towards row 0)
    assert np.allclose(direction_vector(0, 8), (1, 0)) and np.allclose(direction_vector(2, 8), (0, -1))


def test_frame_position_does_not_reveal_the_direction():
    # The digit wraps around the edges and starts uniformly anywhere, so where it is in one frame
    # says nothing about where it goes: mean start positions agree across direction classes.
    ds = DigitsVideoDataset(DigitsVideoConfig(num_videos=800), "train")
    params = [ds.sample_params(i) for i in range(len(ds))]
    starts = np.array([p["start"] for p in params])
    assert starts.min() >= 0 and starts.max() < 32
    directions = np.array([p["direction"] for p in params])
    for k in range(8):
        assert np.abs(starts[directions == k].mean(0) - 16).max() < 4.5


def test_depth_map_separates_digit_and_background():
    cfg = DigitsVideoConfig(num_videos=40, channels=1, noise=0.0)
    ds = DigitsVideoDataset(cfg, "train")
    brighter_near = 0
    for i in range(len(ds)):
        s, p = ds[i], ds.sample_params(i)
        depth = s["depth"]
        digit = depth == np.float32(p["digit_depth"])
        assert 0.02 < digit.float().mean() < 0.5
        bg = depth[~digit]
        assert float(bg.min()) > p["digit_depth"]  # the digit is nearer than the background
        near, far = p["background_depth"]
        assert near - 1e-4 <= float(bg.min()) and float(bg.max()) <= far + 1e-4
        assert float(bg.max() - bg.min()) > 0.5  # a ramp, not a flat plane
        # depth is visible: nearer background is brighter (fog)
        video = s["video"][0]
        med = bg.median()
        near_px, far_px = (~digit) & (depth < med), (~digit) & (depth > med)
        brighter_near += int(video[near_px].mean() > video[far_px].mean())
    assert brighter_near >= 0.85 * len(ds)


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("data.num_videos", {"num_videos": 0}),
        ("data.num_videos", {"num_videos": 2.5}),
        ("data.num_test_videos", {"num_test_videos": -1}),
        ("data.num_frames", {"num_frames": 0}),
        ("data.size", {"size": True}),
        ("data.size", {"size": 4}),
        ("data.channels", {"channels": 2}),
        ("data.digit_size", {"digit_size": (16, 12)}),
        ("data.digit_size", {"digit_size": (12, 40)}),
        ("data.digit_size", {"digit_size": 12}),
        ("data.num_directions", {"num_directions": 1}),
        ("data.speeds", {"speeds": ()}),
        ("data.speeds", {"speeds": (1.0, -1.0)}),
        ("data.speeds", {"speeds": (1.0, 1.0)}),
        ("data.motion_label", {"motion_label": "speed"}),
        ("data.direction_jitter", {"direction_jitter": 1.5}),
        ("data.noise", {"noise": -0.1}),
        ("data.depth_range", {"depth_range": (5, 5.5)}),
        ("data.depth_range", {"depth_range": (0, 10)}),
        ("data.fog", {"fog": 0}),
        ("data.test_digit_fraction", {"test_digit_fraction": 1.0}),
        ("data.seed", {"seed": -1}),
        ("data.standardize", {"standardize": 1}),
    ],
)
def test_config_errors_name_the_field(field, kwargs):
    with pytest.raises(ConfigError) as info:
        DigitsVideoConfig(**kwargs)
    assert info.value.field == field
    assert str(info.value).startswith(field + ":")


def test_standardize_uses_train_statistics_for_both_splits():
    """Standardised clips are the [0, 1] clips mapped per channel with the train split's statistics:
    unit scale on train, the same affine map (not their own statistics) on test, labels and depth as before."""
    raw_cfg = DigitsVideoConfig(num_videos=40, num_test_videos=8)
    cfg = DigitsVideoConfig(num_videos=40, num_test_videos=8, standardize=True)
    mean, std = channel_stats(cfg)
    assert mean.shape == std.shape == (3,) and np.all(std > 0.05)
    train = torch.stack([DigitsVideoDataset(cfg, "train")[i]["video"] for i in range(40)])
    torch.testing.assert_close(train.mean(dim=(0, 2, 3, 4)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(train.std(dim=(0, 2, 3, 4), unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    for split in ("train", "test"):
        a, b = DigitsVideoDataset(raw_cfg, split)[3], DigitsVideoDataset(cfg, split)[3]
        want = (a["video"] - torch.from_numpy(mean).view(3, 1, 1, 1)) / torch.from_numpy(std).view(3, 1, 1, 1)
        torch.testing.assert_close(b["video"], want)
        assert all(torch.equal(a[k], b[k]) for k in ("motion", "appearance", "depth"))
    # the statistics are a function of the config, not of the split or of the standardize flag
    assert np.array_equal(channel_stats(raw_cfg)[0], mean)


def test_config_accepts_yaml_lists_and_rejects_unknown_fields():
    cfg = DigitsVideoConfig.from_dict({"digit_size": [10, 14], "speeds": [1, 3], "depth_range": [1, 9]})
    assert cfg.digit_size == (10.0, 14.0) and cfg.speeds == (1.0, 3.0) and cfg.depth_range == (1.0, 9.0)
    with pytest.raises(ConfigError) as info:
        DigitsVideoConfig.from_dict({"num_vidoes": 3})
    assert info.value.field == "data.num_vidoes"
    with pytest.raises(ConfigError) as info:
        DigitsVideoDataset(SMALL, "val")
    assert info.value.field == "data.split"


def test_digits_generation_is_fast_enough():
    import time

    ds = DigitsVideoDataset(DigitsVideoConfig(num_videos=256), "train")
    ds[0]
    t0 = time.perf_counter()
    for i in range(256):
        ds[i]
    per_clip = (time.perf_counter() - t0) / 256
    assert per_clip < 0.01, f"{per_clip * 1e3:.2f} ms per clip"
    assert math.isfinite(per_clip)
