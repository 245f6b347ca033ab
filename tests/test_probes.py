"""Frozen-feature probes on fake videos whose labels are known functions of the pixels."""

from __future__ import annotations


import pytest
import torch
from einops import rearrange

from layerlock_plugin.errors import ConfigError
from layerlock_plugin.reference.eval import (
    AttentiveProbes,
    ProbeConfig,
    attentive_inputs,
    extract_features,
    fit_attentive,
    fit_feature_norm,
    fit_knn,
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

    num_classes = {"motion": 2, "appearance": 4}

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


SMALL = ProbeConfig(train_videos=256, test_videos=128, batch_size=64, kind="linear", kinds=("linear", "knn"),
                    pooling="temporal_slots")
SMALL_ATTENTIVE = ProbeConfig(
    train_videos=256, test_videos=128, batch_size=64, kind="attentive", kinds=("attentive",), steps=100,
    weight_decay=(0.1, 10.0),
)


@pytest.fixture(scope="module")
def signal_result():
    return run_probes(make_encoder(), FakeVideos(256, 1), FakeVideos(128, 2), GRID, TUBELET, SMALL)


def test_probes_decode_labels_that_are_in_the_features(signal_result):
    r = signal_result
    for key in ("motion_acc", "appearance_acc", "dense_rmse", "dense_r2", "motion_chance_uniform",
                "motion_chance_majority", "appearance_chance_uniform", "appearance_chance_majority"):
        assert key in r and isinstance(r[key], float)
    assert r["motion_chance_uniform"] == 0.5 and r["appearance_chance_uniform"] == 0.25
    assert r["motion_num_classes"] == 2 and r["appearance_num_classes"] == 4
    assert 0.5 <= r["motion_chance_majority"] <= 1.0 and 0.25 <= r["appearance_chance_majority"] <= 1.0
    assert r["motion_acc"] == r["motion_linear_acc"] and r["appearance_acc"] == r["appearance_linear_acc"]
    assert r["appearance_knn_acc"] > 0.6 and "motion_attentive_acc" not in r
    assert r["appearance_acc"] > 0.9
    assert r["motion_acc"] > 0.9  # needs the temporal order of the per-slot features
    assert r["dense_r2"] > 0.9
    assert r["dense_rmse"] < 0.3 * FakeVideos(128, 2).depth.std().item()
    assert r["train_videos"] == 256 and r["test_videos"] == 128
    assert r["motion_linear_l2"] in SMALL.l2_grid and r["dense_l2"] in SMALL.l2_grid
    assert r["motion_knn_k"] in SMALL.knn_k_grid


def test_random_labels_and_noise_depth_stay_at_chance():
    r = run_probes(
        make_encoder(),
        FakeVideos(256, 3, depth="noise", random_labels=True),
        FakeVideos(128, 4, depth="noise", random_labels=True),
        GRID,
        TUBELET,
        SMALL,
    )
    for task in ("motion", "appearance"):
        for kind in ("linear", "knn"):
            assert r[f"{task}_{kind}_acc"] < r[f"{task}_chance_majority"] + 0.15, (task, kind)
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


@pytest.mark.parametrize("kind", ["linear", "attentive", "knn"])
def test_deterministic_and_regularisation_chosen_without_the_test_set(kind):
    encode = make_encoder()
    train = FakeVideos(96, 5)
    cfg = ProbeConfig(train_videos=96, test_videos=48, seed=7, max_iter=50, kind=kind, kinds=(kind,), steps=60)
    a = run_probes(encode, train, FakeVideos(48, 6), GRID, TUBELET, cfg)
    b = run_probes(encode, train, FakeVideos(48, 6), GRID, TUBELET, cfg)
    assert a == b
    c = run_probes(encode, train, FakeVideos(48, 8, random_labels=True, depth="noise"), GRID, TUBELET, cfg)
    key = {"linear": "linear_l2", "attentive": "attentive_weight_decay", "knn": "knn_k"}[kind]
    grid = {"linear": cfg.l2_grid, "attentive": cfg.weight_decay_grid, "knn": cfg.knn_k_grid}[kind]
    for task in ("motion", "appearance"):
        assert c[f"{task}_{key}"] == a[f"{task}_{key}"]
        assert a[f"{task}_{key}"] in grid
        assert [k for k in a if k.startswith(f"{task}_") and k.endswith("_acc")] == [f"{task}_{kind}_acc", f"{task}_acc"]
    assert c["dense_l2"] == a["dense_l2"]


def test_single_l2_value_is_used_as_is():
    cfg = ProbeConfig(train_videos=64, test_videos=32, l2=[1e-3], knn_k=[7], kind="linear", kinds=("linear", "knn"))
    assert cfg.l2 == 1e-3 and cfg.l2_grid == (1e-3,) and cfg.knn_k == 7
    r = run_probes(make_encoder(), FakeVideos(64, 1), FakeVideos(32, 2), GRID, TUBELET, cfg)
    assert r["appearance_linear_l2"] == r["motion_linear_l2"] == r["dense_l2"] == 1e-3
    assert r["appearance_knn_k"] == r["motion_knn_k"] == 7


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
        ({"normalize": "batch_norm"}, "probe.normalize"),
        ({"whiten_eps": 0}, "probe.whiten_eps"),
        ({"kinds": []}, "probe.kinds"),
        ({"kinds": ("linear", "svm")}, "probe.kinds"),
        ({"kinds": ("knn", "knn")}, "probe.kinds"),
        ({"kind": "attentive", "kinds": ("linear",)}, "probe.kind"),
        ({"knn_k": 0}, "probe.knn_k"),
        ({"knn_k": (5, 2.5)}, "probe.knn_k"),
        ({"knn_temperature": -1.0}, "probe.knn_temperature"),
        ({"pca_dim": 0}, "probe.pca_dim"),
        ({"kind": "mlp"}, "probe.kind"),
        ({"kind": None}, "probe.kind"),
        ({"steps": 0}, "probe.steps"),
        ({"steps": 10.0}, "probe.steps"),
        ({"lr": 0}, "probe.lr"),
        ({"lr": "1e-3"}, "probe.lr"),
        ({"weight_decay": -0.1}, "probe.weight_decay"),
        ({"weight_decay": []}, "probe.weight_decay"),
        ({"weight_decay": (0.1, None)}, "probe.weight_decay"),
        ({"attn_heads": 0}, "probe.attn_heads"),
        ({"attn_dim": True}, "probe.attn_dim"),
        ({"attn_dim": 30, "attn_heads": 4}, "probe.attn_dim"),
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
    cfg = ProbeConfig.from_dict({"kind": "linear", "weight_decay": [0.5, 2]})
    assert cfg.kind == "linear" and cfg.weight_decay == (0.5, 2.0) and cfg.weight_decay_grid == (0.5, 2.0)
    cfg = ProbeConfig.from_dict({"weight_decay": [0.5]})
    assert cfg.weight_decay == 0.5 and cfg.weight_decay_grid == (0.5,)
    assert ProbeConfig().kind == "attentive" and ProbeConfig().kinds == ("linear", "attentive", "knn")
    assert ProbeConfig().normalize == "standardize"
    assert ProbeConfig.from_dict({"kinds": "knn", "kind": "knn", "knn_k": [3, 9]}).knn_k_grid == (3, 9)
    assert ProbeConfig.from_dict(None) == ProbeConfig()
    with pytest.raises(ConfigError) as err:
        ProbeConfig.from_dict({"epochs": 3})
    assert err.value.field == "probe.epochs"


@pytest.mark.parametrize("pooling", ["tokens_pca", "temporal_slots"])
def test_position_keeping_poolings_read_labels_at_full_size(pooling):
    """512 + 512 videos, N = 64, D = 96 (the main job's probe size) with either pooling that keeps
    time (the fake motion label is which temporal half is brighter: a mean over all tokens loses it)."""
    cfg = ProbeConfig(kind="linear", kinds=("linear",), pooling=pooling)
    r = run_probes(make_encoder(), FakeVideos(512, 11), FakeVideos(512, 12), GRID, TUBELET, cfg)
    assert r["appearance_acc"] > 0.85 and r["motion_acc"] > 0.85


# ---------------------------------------------------------------------------------------------------
# Attentive probes


def test_attentive_probe_decodes_labels_that_are_in_the_features():
    r = run_probes(make_encoder(), FakeVideos(256, 1), FakeVideos(128, 2), GRID, TUBELET, SMALL_ATTENTIVE)
    assert r["appearance_acc"] > 0.9
    assert r["motion_acc"] > 0.8  # which temporal half is brighter: needs the time of the tokens
    assert r["dense_r2"] > 0.9  # the dense probe stays the linear ridge one
    assert r["motion_attentive_weight_decay"] in SMALL_ATTENTIVE.weight_decay_grid
    assert "motion_linear_l2" not in r and "dense_l2" in r


def test_attentive_probe_stays_at_chance_on_random_labels():
    r = run_probes(
        make_encoder(),
        FakeVideos(256, 3, random_labels=True),
        FakeVideos(128, 4, random_labels=True),
        GRID,
        TUBELET,
        SMALL_ATTENTIVE,
    )
    assert r["appearance_acc"] < r["appearance_chance_majority"] + 0.15
    assert r["motion_acc"] < r["motion_chance_majority"] + 0.15


GRID_T = (4, 4, 4)
D_TOK = 32


def marker_tokens(n: int, seed: int, markers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise tokens ``[n, 64, D_TOK]`` on ``GRID_T``, with ``markers`` fixed content vectors written at
    distinct random token positions. A token's features carry no position (like a RoPE encoder's):
    the set of token contents is the same for every clip, only where the markers sit differs.
    Returns (tokens, positions [n, markers] in ``(t h w)`` order)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(n, 64, D_TOK, generator=g)
    content = 4.0 * torch.randn(markers, D_TOK, generator=torch.Generator().manual_seed(99))
    pos = torch.stack([torch.randperm(64, generator=g)[:markers] for _ in range(n)])
    for k in range(markers):
        tokens[torch.arange(n), pos[:, k]] = content[k] + 0.3 * torch.randn(n, D_TOK, generator=g)
    return tokens, pos


def _accuracy(predict, z, y) -> float:
    return (predict(z)[0].argmax(1) == y).double().mean().item()


def _mean_pool_accuracy(tr, y_tr, te, y_te, classes) -> float:
    predict = fit_logistic(tr.mean(1), y_tr, classes, l2=1e-2)
    return (predict(te.mean(1)).argmax(1) == y_te).double().mean().item()


def _standardised_inputs(tr: torch.Tensor, te: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The attentive probes' inputs as ``run_probes`` builds them: probe-train standardisation, then
    the position table."""
    norm = fit_feature_norm(tr, "standardize")
    return attentive_inputs(norm(tr), GRID_T), attentive_inputs(norm(te), GRID_T)


def test_attentive_probe_reads_where_a_marker_is():
    """Label = spatial quadrant of a marker token: a position-blind mean pool cannot read it; the
    attentive probe (which adds the probe's 3D sin-cos position table to the tokens) can."""
    tr, pos_tr = marker_tokens(384, 1, markers=1)
    te, pos_te = marker_tokens(256, 2, markers=1)

    def quadrant(pos):
        h, w = (pos[:, 0] // 4) % 4, pos[:, 0] % 4
        return (h >= 2).long() * 2 + (w >= 2).long()

    y_tr, y_te = quadrant(pos_tr), quadrant(pos_te)
    assert _mean_pool_accuracy(tr, y_tr, te, y_te, 4) < 0.25 + 0.1
    z_tr, z_te = _standardised_inputs(tr, te)
    predict = fit_attentive(z_tr, y_tr, [4], [0.1])
    assert _accuracy(predict, z_te, y_te) > 0.9


def test_attentive_probe_reads_temporal_order():
    """Label = whether marker A's time slot comes before marker B's (they never share a slot): both
    markers are in every clip, so the pooled content is the same for both classes."""

    def make(n, seed):
        tokens, pos = marker_tokens(4 * n, seed, markers=2)
        t = pos // 16
        keep = (t[:, 0] != t[:, 1]).nonzero().squeeze(1)[:n]
        return tokens[keep], (t[keep, 0] < t[keep, 1]).long()

    tr, y_tr = make(768, 3)
    te, y_te = make(256, 4)
    chance = max(y_te.float().mean().item(), 1 - y_te.float().mean().item())
    assert _mean_pool_accuracy(tr, y_tr, te, y_te, 2) < chance + 0.1
    z_tr, z_te = _standardised_inputs(tr, te)
    predict = fit_attentive(z_tr, y_tr, [2], [0.1])
    assert _accuracy(predict, z_te, y_te) > 0.9


def test_attentive_probe_without_position_table_cannot_read_where():
    """Control for the test above: the same probe on LayerNorm-ed tokens *without* the position table
    is position-blind (its pooling is a weighted sum over an unordered set of tokens)."""
    tr, pos_tr = marker_tokens(384, 1, markers=1)
    te, pos_te = marker_tokens(256, 2, markers=1)
    y_tr, y_te = (pos_tr[:, 0] % 4 >= 2).long(), (pos_te[:, 0] % 4 >= 2).long()
    ln = torch.nn.functional.layer_norm
    predict = fit_attentive(ln(tr, (D_TOK,)), y_tr, [2], [0.1])
    chance = max(y_te.float().mean().item(), 1 - y_te.float().mean().item())
    assert _accuracy(predict, ln(te, (D_TOK,)), y_te) < chance + 0.1


def test_fit_attentive_is_deterministic_and_seeded():
    tr, pos = marker_tokens(64, 5, markers=1)
    z, y = attentive_inputs(tr, GRID_T), pos[:, 0] % 3
    state = torch.random.get_rng_state()
    a = fit_attentive(z, y, [3], [0.1], steps=20, seed=1)(z)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left alone
    b = fit_attentive(z, y, [3], [0.1], steps=20, seed=1)(z)
    c = fit_attentive(z, y, [3], [0.1], steps=20, seed=2)(z)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_attentive_probes_shapes_masks_and_groups():
    probes = AttentiveProbes(in_dim=D_TOK, num_classes=[3, 5], heads=2, dim=16, seed=0)
    z = attentive_inputs(torch.randn(7, 64, D_TOK), GRID_T)
    logits = probes(z)
    assert logits.shape == (2, 7, 5)
    assert (logits[0, :, 3:] < -1e8).all() and (logits[1] > -1e8).all()
    groups = probes.param_groups([0.5, 2.0])
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0, 2.0, 0.0]
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in probes.parameters())
    with pytest.raises(ValueError, match="weight decay"):
        probes.param_groups([0.1])
    with pytest.raises(ValueError, match="tokens"):
        attentive_inputs(torch.randn(2, 10, D_TOK), GRID_T)
    with pytest.raises(ValueError, match="labels"):
        fit_attentive(z, torch.zeros(2, 7, dtype=torch.long), [3], [0.1], steps=1)


@pytest.mark.parametrize("in_dim", [D_TOK, 16])
def test_attentive_probes_compute_what_multihead_attention_computes(in_dim):
    """The batched single-query path equals ``nn.MultiheadAttention(q, z, z)`` of each probe's own module
    (with ``kdim != embed_dim`` and with the packed in-projection of ``kdim == embed_dim``)."""
    probes = AttentiveProbes(in_dim=in_dim, num_classes=[4, 2, 3], heads=4, dim=16, seed=3)
    with torch.no_grad():  # move the biases off zero so that they are checked too
        for p in probes.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    z = attentive_inputs(torch.randn(5, 64, in_dim), GRID_T)
    got = probes.pooled(z)
    for p in range(3):
        query = probes.query[p].view(1, 1, -1).expand(5, 1, -1)
        want = probes.attn[p](query, z, z, need_weights=False)[0][:, 0]
        torch.testing.assert_close(got[p], want, rtol=1e-4, atol=1e-5)


def test_attentive_single_weight_decay_is_used_as_is():
    cfg = ProbeConfig(train_videos=64, test_videos=32, weight_decay=[0.3], steps=20, kinds=("attentive",))
    r = run_probes(make_encoder(), FakeVideos(64, 1), FakeVideos(32, 2), GRID, TUBELET, cfg)
    assert r["appearance_attentive_weight_decay"] == r["motion_attentive_weight_decay"] == 0.3


# ---------------------------------------------------------------------------------------------------
# Feature normalisation, chance levels, k-NN


def test_standardisation_uses_probe_train_statistics_per_channel():
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([100.0, 1.0, 0.01])
    tr = torch.randn(40, 8, 3, generator=g) * scale + torch.tensor([5.0, -1.0, 0.0])
    te = torch.randn(30, 8, 3, generator=g) * scale + 3.0  # other statistics: they must not be used
    norm = fit_feature_norm(tr, "standardize")
    flat = norm(tr).reshape(-1, 3).double()
    torch.testing.assert_close(flat.mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.std(0, unbiased=False), torch.ones(3, dtype=torch.float64), atol=1e-5, rtol=0)
    ftr = tr.reshape(-1, 3)
    want = (te - ftr.mean(0)) / ftr.std(0, unbiased=False)
    torch.testing.assert_close(norm(te), want, rtol=1e-4, atol=1e-4)
    # a channel constant on probe-train maps to 0 (it carries nothing), not to amplified noise
    const = torch.cat([tr, torch.full((40, 8, 1), 2.0)], dim=-1)
    assert torch.all(fit_feature_norm(const, "standardize")(torch.randn(4, 8, 4))[..., 3] == 0)


def test_whitening_gives_identity_covariance_on_probe_train():
    g = torch.Generator().manual_seed(1)
    mix = torch.randn(4, 4, generator=g) * torch.tensor([10.0, 1.0, 0.1, 0.01])
    tr = torch.randn(200, 8, 4, generator=g) @ mix
    out = fit_feature_norm(tr, "whiten", eps=1e-9)(tr).reshape(-1, 4).double()
    cov = torch.cov(out.T, correction=0)
    torch.testing.assert_close(cov, torch.eye(4, dtype=torch.float64), atol=5e-3, rtol=0)


def test_layer_norm_and_none_options():
    x = torch.randn(3, 5, 6) * 7 + 2
    torch.testing.assert_close(fit_feature_norm(x, "layer_norm")(x), torch.nn.functional.layer_norm(x, (6,)))
    torch.testing.assert_close(fit_feature_norm(x, "none")(x), x)
    with pytest.raises(ConfigError, match="probe.normalize"):
        fit_feature_norm(x, "batch")


def small_direction_tokens(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens ``[n, 64, 16]`` where three channels carry almost all the variance (large per-token
    values, no label) and the binary label is a small shift of one low-variance channel: what trained
    encoders look like (a few dominant directions, the task in a small one)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    tokens = 0.01 * torch.randn(n, 64, 16, generator=g)
    tokens[..., :3] = 30.0 * torch.randn(n, 64, 3, generator=g)
    tokens[..., 5] += 0.01 * (2.0 * y.view(n, 1) - 1.0)
    return tokens, y


class TokenSet(torch.utils.data.Dataset):
    """Pre-made tokens as 'videos' (the encoder is the identity) with a motion label."""

    num_classes = {"motion": 2}

    def __init__(self, tokens: torch.Tensor, labels: torch.Tensor):
        self.tokens, self.labels = tokens, labels

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"video": self.tokens[i], "motion": self.labels[i]}


def test_standardised_probes_read_a_small_direction_that_layer_norm_drowns():
    """The attentive probe on per-token layer-normed inputs stays near chance (the label direction is
    ~1e-3 of each token's scale); on standardised inputs it, the linear and the k-NN probe read it."""
    train, test = TokenSet(*small_direction_tokens(256, 1)), TokenSet(*small_direction_tokens(128, 2))
    kw = dict(train_videos=256, test_videos=128, steps=100, weight_decay=(0.1, 10.0))
    ln = run_probes(lambda x: x, train, test, GRID_T, (1, 1, 1), ProbeConfig(normalize="layer_norm", **kw))
    std = run_probes(lambda x: x, train, test, GRID_T, (1, 1, 1), ProbeConfig(**kw))
    assert ln["motion_attentive_acc"] < ln["motion_chance_majority"] + 0.15
    for kind in ("attentive", "linear", "knn"):
        assert std[f"motion_{kind}_acc"] > 0.9, (kind, std)


def test_uniform_chance_counts_the_dataset_classes_not_the_labels_seen():
    """Labels 0/1 only, in a dataset that declares 4 classes: chance 1/4, not 1/2."""
    class FourClassVideos(FakeVideos):
        num_classes = {"motion": 4, "appearance": 4}

    r = run_probes(make_encoder(), FourClassVideos(64, 1), FourClassVideos(32, 2), GRID, TUBELET,
                   ProbeConfig(train_videos=64, test_videos=32, kind="linear", kinds=("linear",)))
    assert r["motion_chance_uniform"] == 0.25 and r["motion_num_classes"] == 4
    te = FakeVideos(32, 2)
    assert r["motion_chance_majority"] == torch.bincount(te.motion).max().item() / 32
    # an explicit num_classes wins; labels outside it or an unknown count are errors
    r = run_probes(make_encoder(), FakeVideos(64, 1), FakeVideos(32, 2), GRID, TUBELET, SMALL,
                   num_classes={"motion": 8, "appearance": 4})
    assert r["motion_chance_uniform"] == 0.125
    with pytest.raises(ValueError, match="motion labels must lie in 0..0"):
        run_probes(make_encoder(), FakeVideos(64, 1), FakeVideos(32, 2), GRID, TUBELET, SMALL,
                   num_classes={"motion": 1, "appearance": 4})
    with pytest.raises(ValueError, match="number of motion classes is unknown"):
        run_probes(lambda x: x, TokenSet(*small_direction_tokens(16, 0)), TokenSet(*small_direction_tokens(16, 1)),
                   GRID_T, (1, 1, 1), SMALL, num_classes={})


def test_knn_votes_for_the_nearest_class():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.05, 1.0]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    predict = fit_knn(bank, labels, 3, k=2)
    logp = predict(torch.tensor([[2.0, 0.1], [0.0, 3.0]]))
    assert logp.shape == (2, 3) and logp.argmax(1).tolist() == [0, 1]
    torch.testing.assert_close(logp.exp().sum(1), torch.ones(2, dtype=torch.float64))
    assert logp[0, 2] < -20  # a class without neighbours gets (numerically) zero probability
    # with every neighbour voting, the similarity weights still pick the nearest class
    assert fit_knn(bank, labels, 3, k=5)(torch.tensor([[1.0, 0.05]])).argmax(1).item() == 0


# ---------------------------------------------------------------------------------------------------
# The trainer's probes: beside the random-init encoder


TRAINER_SETS = [
    "data.num_videos=48", "train.batch_size=8", "train.steps=4", "train.log_every=2", "train.ckpt_every=100",
    "train.progress=false", "train.threads=1", "optim.warmup_steps=1", "method=mae", "probe.train_videos=32",
    "probe.test_videos=32", "probe.steps=10", "probe.max_iter=10", "probe.weight_decay=1.0", "probe.l2=0.01",
    "probe.knn_k=5",
]


@pytest.mark.parametrize("method", ["mae", "layerlock"])
def test_random_init_baseline_is_the_runs_own_initial_encoder(tmp_path, method):
    """The baseline is the run's model at its seed before any training step (with the latent readouts
    the method adds: building them draws from the RNG), and differs from another seed's."""
    from layerlock_plugin.reference.config import load_config
    from layerlock_plugin.reference.train import Trainer

    sets = [f"out_dir={tmp_path}", *TRAINER_SETS, f"method={method}", "seed=3",
            "schedule.pixel_steps=2", "schedule.interval=1", "schedule.max_frozen=2"]
    trainer = Trainer(load_config(None, sets), echo=lambda s: None)
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    base = trainer.random_init_encoder().state_dict()
    assert base.keys() == start.keys() and all(torch.equal(base[k], start[k]) for k in start)
    other = Trainer(load_config(None, [*sets, "seed=4"]), echo=lambda s: None).random_init_encoder().state_dict()
    assert not torch.equal(other["patch_embed.weight"], base["patch_embed.weight"])


@pytest.mark.timeout(300)
def test_the_random_init_baseline_is_computed_once_per_config_seed_code_and_machine(tmp_path, monkeypatch):
    """The second run of one config and seed reads its random-init numbers from the cache: the same
    numbers; another seed, other code or a disabled cache compute them."""
    import json

    from cli_helpers import run_cli, tiny_args

    from layerlock_plugin.reference.eval import baseline_cache

    monkeypatch.setenv("LAYERLOCK_CACHE", str(tmp_path / "cache"))
    runs = {}
    for name, extra in (("first", []), ("second", []), ("seed1", ["--seed", "1"])):
        out = run_cli(tiny_args("--out", name, "--set", "train.steps=2", *extra, probe=True), tmp_path)
        assert out.returncode == 0, out.stderr
        runs[name] = (out.stdout, json.loads((tmp_path / name / "probes.json").read_text()))
    entries = sorted((tmp_path / "cache" / baseline_cache.SUBDIR).glob("*.json"))
    assert len(entries) == 2  # one per seed
    said = "[probes] random-init baseline from the cache"
    assert said not in runs["first"][0] and said in runs["second"][0] and said not in runs["seed1"][0]
    assert runs["second"][1]["random_init"] == runs["first"][1]["random_init"]
    assert runs["seed1"][1]["random_init"] != runs["first"][1]["random_init"]
    # the key covers the package's source: any code change is a miss
    from layerlock_plugin.reference.model import ModelConfig

    args = (ModelConfig.tiny().__dict__, {}, {}, 0, (1, 2), torch.device("cpu"))
    key = baseline_cache.baseline_key(*args)
    monkeypatch.setattr(baseline_cache, "_source_digest", lambda: "other code")
    assert baseline_cache.baseline_key(*args) != key
    monkeypatch.setenv("LAYERLOCK_CACHE", "off")
    assert baseline_cache.cache_dir() is None and baseline_cache.load(key) is None


@pytest.mark.timeout(240)
def test_main_job_prints_and_saves_probes_beside_random_init(tmp_path, capsys):
    import json

    from layerlock_plugin.reference.cli import main

    out = tmp_path / "run"
    args = ["--out", str(out), "--no-progress"]
    for item in TRAINER_SETS:
        args += ["--set", item]
    assert main(args) == 0
    printed = capsys.readouterr().out
    probes = json.loads((out / "probes.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["probes"] == probes
    base = probes["random_init"]
    for key in ("motion_acc", "motion_linear_acc", "motion_attentive_acc", "motion_knn_acc", "appearance_acc",
                "dense_r2", "motion_chance_uniform", "motion_chance_majority"):
        assert isinstance(probes[key], float) and isinstance(base[key], float), key
    assert probes["motion_chance_uniform"] == 1 / 8 and probes["appearance_chance_uniform"] == 1 / 10
    assert (f"motion {probes['motion_acc']:.3f} (random init {base['motion_acc']:.3f}, uniform chance 0.125, "
            f"majority {probes['motion_chance_majority']:.3f})") in printed
    # the packaged suite's calibration: motion passed; appearance and depth are marked (no verdict on them)
    assert (f"appearance [uncalibrated] {probes['appearance_acc']:.3f} (random init {base['appearance_acc']:.3f}"
            in printed)
    assert f"depth [uncalibrated] R2 {probes['dense_r2']:.3f} (random init {base['dense_r2']:.3f}" in printed
    assert "motion [uncalibrated]" not in printed
    assert "every probe kind, trained / random init: motion linear" in printed
    # what a user may conclude from it, said with it
    assert "cannot rank methods" in printed and "below random init means frame detail was discarded" in printed
    assert "compare runs on depth" not in printed  # depth is uncalibrated on these clips


# ---------------------------------------------------------------------------------------------------
# The calibration ladder, coarsely: the probes must order features of known quality


@pytest.mark.timeout(480)  # trains an encoder of the reference architecture for 300 steps: ~90 s on CI's slow machine
def test_probe_ladder_orders_features_of_known_quality():
    """On the embedded digits (small splits, 4 directions): hand-made motion features read motion far
    above chance, position-blind pooled raw pixels do not (the data is built so), and an encoder of the
    reference architecture trained on the motion labels beats its own random init on motion."""
    from layerlock_plugin.reference.eval.calibration import motion_tokens, pixel_tokens, train_supervised
    from layerlock_plugin.reference.config import load_config
    from layerlock_plugin.reference.data import DigitsVideoDataset

    torch.set_num_threads(1)
    cfg = load_config(None, ["data.num_videos=384", "data.num_test_videos=256", "data.num_directions=4",
                             "data.standardize=true", "probe.train_videos=384", "probe.test_videos=256",
                             "probe.kind=linear", "probe.kinds=[linear]", "optim.warmup_steps=20"])
    train, test = DigitsVideoDataset(cfg.data, "train", cache=True), DigitsVideoDataset(cfg.data, "test")
    grid, tubelet = cfg.model.grid, cfg.model.tubelet

    def probe(encode):
        return run_probes(encode, train, test, grid, tubelet, cfg.probe)

    flow = probe(motion_tokens(tubelet))
    assert flow["motion_acc"] > flow["motion_chance_majority"] + 0.4, flow
    pixels = probe(pixel_tokens(tubelet))
    assert pixels["motion_acc"] < pixels["motion_chance_majority"] + 0.1, pixels
    kw = dict(batch_size=32, optim=cfg.optim, seed=0)
    rand = probe(train_supervised(cfg.model, train, "motion", steps=0, **kw).encode)
    losses = []
    sup = probe(train_supervised(cfg.model, train, "motion", steps=300, log=lambda s, x: losses.append(x), **kw).encode)
    assert sum(losses[-20:]) / 20 < 0.8 * sum(losses[:20]) / 20  # it learned (cross-entropy from ~ln 4)
    assert sup["motion_acc"] > rand["motion_acc"] + 0.2, (sup["motion_acc"], rand["motion_acc"])
