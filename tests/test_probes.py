"""Frozen-feature probes on fake videos whose labels are known functions of the pixels."""

from __future__ import annotations


import pytest
import torch
from einops import rearrange

from layerlock_plugin.errors import ConfigError
from layerlock_plugin.reference.probes import (
    ProbeConfig,
    extract_features,
    fit_logistic,
    pool_temporal_slots,
    run_probes,
    token_depth_targets,
)

C, T, H, W = 3, 8, 16, 16
TUBELET = (2, 4, 4)
GRID = (T // 2, H // 4, W // 4)  # (4, 4, 4): N = 64 tokens of C * 2 * 4 * 4 = 96 values
COLORS = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])


class FakeVideos(torch.utils.data.Dataset):
    """Items like the real data: video [C,T,H,W], motion [], appearance [], depth [T,H,W].

    * appearance (4 classes): the colour of a bright 4x4 patch at a random place in every frame;
    * motion (2 classes): which temporal half of the clip is brighter (on top of a random global
      brightness, so the time average carries no information about it);
    * depth: ``"linear"`` = a linear function of the pixels (channel mean), so the tubelet mean is
      linear in the tokens; ``"noise"`` = independent noise.
    ``random_labels``: both labels are replaced by random draws independent of the video.
    """

    def __init__(self, n: int, seed: int, depth: str = "linear", random_labels: bool = False):
        g = torch.Generator().manual_seed(seed)
        self.motion = torch.randint(0, 2, (n,), generator=g)
        self.appearance = torch.randint(0, 4, (n,), generator=g)
        video = 0.5 * torch.randn(n, C, T, H, W, generator=g)
        video += torch.empty(n, 1, 1, 1, 1).uniform_(-1.0, 1.0, generator=g)
        half = torch.zeros(n, 1, T, 1, 1)
        first = self.motion == 0
        half[first, :, : T // 2] = 0.6
        half[~first, :, T // 2 :] = 0.6
        video += half
        ys = torch.randint(0, H - 4, (n,), generator=g)
        xs = torch.randint(0, W - 4, (n,), generator=g)
        for i in range(n):
            color = COLORS[self.appearance[i]].view(C, 1, 1, 1)
            video[i, :, :, ys[i] : ys[i] + 4, xs[i] : xs[i] + 4] += 2.0 * color
        self.video = video
        if depth == "linear":
            self.depth = 3.0 * video.mean(dim=1) + 1.0
        else:
            self.depth = torch.randn(n, T, H, W, generator=g)
        if random_labels:
            self.motion = torch.randint(0, 2, (n,), generator=g)
            self.appearance = torch.randint(0, 4, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.video)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "video": self.video[i],
            "motion": self.motion[i],
            "appearance": self.appearance[i],
            "depth": self.depth[i],
        }


def make_encoder(dim: int = 96, seed: int = 123):
    """A frozen 'encoder': tubelet patchify + a fixed random projection to ``dim``."""
    proj = torch.randn(C * TUBELET[0] * TUBELET[1] * TUBELET[2], dim, generator=torch.Generator().manual_seed(seed))

    def encode(video: torch.Tensor) -> torch.Tensor:
        assert not torch.is_grad_enabled(), "encode must run under torch.no_grad()"
        patches = rearrange(
            video, "b c (t pt) (h ph) (w pw) -> b (t h w) (c pt ph pw)", pt=TUBELET[0], ph=TUBELET[1], pw=TUBELET[2]
        )
        return patches @ proj

    return encode


SMALL = ProbeConfig(train_videos=256, test_videos=128, batch_size=64, pooling="temporal_slots")


@pytest.fixture(scope="module")
def signal_result():
    return run_probes(make_encoder(), FakeVideos(256, 1), FakeVideos(128, 2), GRID, TUBELET, SMALL)


def test_probes_decode_labels_that_are_in_the_features(signal_result):
    r = signal_result
    for key in ("motion_acc", "appearance_acc", "dense_rmse", "dense_r2", "motion_chance", "appearance_chance"):
        assert key in r and isinstance(r[key], float)
    assert 0.0 <= r["motion_chance"] <= 1.0 and 0.0 <= r["appearance_chance"] <= 1.0
    assert r["appearance_acc"] > 0.9
    assert r["motion_acc"] > 0.9  # needs the temporal order of the per-slot features
    assert r["dense_r2"] > 0.9
    assert r["dense_rmse"] < 0.3 * FakeVideos(128, 2).depth.std().item()
    assert r["train_videos"] == 256 and r["test_videos"] == 128
    assert r["motion_l2"] in SMALL.l2_grid and r["dense_l2"] in SMALL.l2_grid


def test_random_labels_and_noise_depth_stay_at_chance():
    r = run_probes(
        make_encoder(),
        FakeVideos(256, 3, depth="noise", random_labels=True),
        FakeVideos(128, 4, depth="noise", random_labels=True),
        GRID,
        TUBELET,
        SMALL,
    )
    assert r["appearance_acc"] < r["appearance_chance"] + 0.15
    assert r["motion_acc"] < r["motion_chance"] + 0.15
    assert abs(r["dense_r2"]) < 0.05


def test_time_averaged_features_cannot_read_motion():
    """The control that motivates per-slot pooling: averaging over time loses 'which half is brighter'."""
    encode = make_encoder()
    tr = extract_features(encode, FakeVideos(256, 1), 256, 64)
    te = extract_features(encode, FakeVideos(128, 2), 128, 64)
    mean_tr, mean_te = tr["features"].mean(1), te["features"].mean(1)
    predict = fit_logistic(mean_tr, tr["motion"], 2, l2=1e-2)
    acc = (predict(mean_te).argmax(1) == te["motion"]).double().mean().item()
    chance = torch.bincount(te["motion"]).max().item() / len(te["motion"])
    assert acc < chance + 0.15
    slots_tr, slots_te = pool_temporal_slots(tr["features"], GRID), pool_temporal_slots(te["features"], GRID)
    predict = fit_logistic(slots_tr, tr["motion"], 2, l2=1e-2)
    assert (predict(slots_te).argmax(1) == te["motion"]).double().mean().item() > 0.9


def test_deterministic_and_l2_chosen_without_the_test_set():
    encode = make_encoder()
    train = FakeVideos(96, 5)
    cfg = ProbeConfig(train_videos=96, test_videos=48, seed=7, max_iter=50)
    a = run_probes(encode, train, FakeVideos(48, 6), GRID, TUBELET, cfg)
    b = run_probes(encode, train, FakeVideos(48, 6), GRID, TUBELET, cfg)
    assert a == b
    c = run_probes(encode, train, FakeVideos(48, 8, random_labels=True, depth="noise"), GRID, TUBELET, cfg)
    for task in ("motion", "appearance", "dense"):
        assert c[f"{task}_l2"] == a[f"{task}_l2"]


def test_single_l2_value_is_used_as_is():
    cfg = ProbeConfig(train_videos=64, test_videos=32, l2=[1e-3])
    assert cfg.l2 == 1e-3 and cfg.l2_grid == (1e-3,)
    r = run_probes(make_encoder(), FakeVideos(64, 1), FakeVideos(32, 2), GRID, TUBELET, cfg)
    assert r["appearance_l2"] == r["motion_l2"] == r["dense_l2"] == 1e-3


def test_extract_features_shapes_and_limits():
    ds = FakeVideos(20, 0)
    out = extract_features(make_encoder(dim=32), ds, num=13, batch_size=4, progress=True)
    assert out["features"].shape == (13, 64, 32) and out["features"].dtype == torch.float32
    assert out["motion"].shape == (13,) and out["appearance"].shape == (13,)
    assert out["depth"].shape == (13, T, H, W)
    assert torch.equal(out["appearance"], ds.appearance[:13])
    out = extract_features(make_encoder(dim=32), ds, num=100, batch_size=8, tubelet=TUBELET)
    assert out["features"].shape[0] == 20
    assert "depth" not in out and out["depth_tokens"].shape == (20, 64)


def test_token_depth_targets_order_and_values():
    depth = torch.randn(3, T, H, W)
    got = token_depth_targets(depth, TUBELET)
    want = rearrange(depth, "n (t pt) (h ph) (w pw) -> n (t h w) (pt ph pw)", pt=2, ph=4, pw=4).mean(-1)
    assert got.shape == (3, 64)
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="divisible"):
        token_depth_targets(torch.randn(1, 7, 16, 16), TUBELET)


def test_grid_mismatch_is_reported():
    with pytest.raises(ValueError, match="tokens"):
        run_probes(make_encoder(), FakeVideos(16, 0), FakeVideos(16, 1), (2, 4, 4), TUBELET, SMALL)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"train_videos": 0}, "probe.train_videos"),
        ({"test_videos": -3}, "probe.test_videos"),
        ({"batch_size": True}, "probe.batch_size"),
        ({"max_iter": 2.5}, "probe.max_iter"),
        ({"l2": -1e-3}, "probe.l2"),
        ({"l2": []}, "probe.l2"),
        ({"l2": (1e-3, "x")}, "probe.l2"),
        ({"val_fraction": 1.0}, "probe.val_fraction"),
        ({"val_fraction": 0}, "probe.val_fraction"),
        ({"seed": -1}, "probe.seed"),
        ({"pooling": "max"}, "probe.pooling"),
        ({"pca_dim": 0}, "probe.pca_dim"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ConfigError) as err:
        ProbeConfig(**kwargs)
    assert err.value.field == field
    assert str(err.value).startswith(field + ":")


def test_config_from_dict():
    cfg = ProbeConfig.from_dict({"train_videos": 32, "l2": [1e-4, 1e-2]})
    assert cfg.train_videos == 32 and cfg.l2 == (1e-4, 1e-2)
    assert ProbeConfig.from_dict(None) == ProbeConfig()
    with pytest.raises(ConfigError) as err:
        ProbeConfig.from_dict({"epochs": 3})
    assert err.value.field == "probe.epochs"


@pytest.mark.parametrize("pooling", ["tokens_pca", "temporal_slots"])
def test_both_poolings_read_labels_at_full_size(pooling):
    """512 + 512 videos, N = 64, D = 96 (the main job's probe size) with either pooling."""
    r = run_probes(make_encoder(), FakeVideos(512, 11), FakeVideos(512, 12), GRID, TUBELET, ProbeConfig(pooling=pooling))
    assert r["appearance_acc"] > 0.85 and r["motion_acc"] > 0.85
