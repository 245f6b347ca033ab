"""The reference video ViT MAE and its 3D RoPE (tiny sizes)."""

from __future__ import annotations

import pytest
import torch

from layerlock_plugin.encoder import as_layered_encoder
from layerlock_plugin.errors import ConfigError
from layerlock_plugin.masking import random_masking
from layerlock_plugin.reference.model import ModelConfig, VideoMAE
from layerlock_plugin.reference.model.rope import RoPE3D, sincos_pos_embed_3d

GRID = (4, 4, 4)  # the tiny preset's token grid


def tok(t: int, h: int, w: int) -> int:
    return (t * GRID[1] + h) * GRID[2] + w


# ------------------------------------------------------------------------------------------ RoPE
def rotate_at(rope: RoPE3D, x: torch.Tensor, pos: tuple[int, int, int]) -> torch.Tensor:
    """Rotate vector ``x [dim]`` as a token at grid position ``pos``."""
    return rope(x.view(1, 1, -1), torch.tensor([[tok(*pos)]]))[0, 0]


def test_rope_split_and_norm_preserved():
    rope = RoPE3D(96, GRID)
    assert rope.part_dims == (8, 24, 24) and rope.rotated_dim == 56  # 9.6 -> 8, 24, 24; 40 unrotated
    assert RoPE3D(32, GRID).part_dims == (2, 8, 8)  # per-head size in 'attention' mode
    x = torch.randn(2, 64, 96)
    y = rope(x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    assert torch.equal(y[..., 56:], x[..., 56:])  # the unrotated 40% is untouched, bit for bit
    assert not torch.allclose(y[..., :56], x[..., :56])
    assert rope.state_dict() == {}  # tables are non-persistent: a pure function of the config


def test_rope_token_idx_selects_positions():
    rope = RoPE3D(96, GRID)
    x = torch.randn(2, 64, 96)
    idx = torch.tensor([[3, 17, 60], [0, 5, 63]])
    sub = rope(x.gather(1, idx[..., None].expand(-1, -1, 96)), idx)
    full = rope(x).gather(1, idx[..., None].expand(-1, -1, 96))
    torch.testing.assert_close(sub, full)
    # per-head tensors [B, heads, n, d] broadcast over heads
    head = RoPE3D(32, GRID)
    xh = torch.randn(2, 3, 3, 32)
    torch.testing.assert_close(head(xh, idx)[:, 1], head(xh[:, 1], idx))


@pytest.mark.parametrize(
    "a, b, shift",
    [
        ((0, 1, 2), (2, 1, 2), (1, 0, 0)),  # along t
        ((1, 0, 3), (1, 3, 3), (0, 0, 0)),  # along h
        ((2, 2, 0), (2, 2, 2), (0, 1, 1)),  # along w
        ((0, 0, 0), (1, 2, 1), (2, 1, 2)),  # any 3D offset
    ],
)
def test_rope_dot_product_depends_only_on_offset(a, b, shift):
    torch.manual_seed(0)
    rope = RoPE3D(96, GRID)
    q, k = torch.randn(96, dtype=torch.float64), torch.randn(96, dtype=torch.float64)
    rope = rope.double()
    a2 = tuple(x + s for x, s in zip(a, shift))
    b2 = tuple(x + s for x, s in zip(b, shift))
    d1 = rotate_at(rope, q, a) @ rotate_at(rope, k, b)
    d2 = rotate_at(rope, q, a2) @ rotate_at(rope, k, b2)
    torch.testing.assert_close(d1, d2, rtol=1e-5, atol=1e-5)  # tables are float32
    assert not torch.isclose(d1, q @ k)  # a non-zero offset does change the score


def test_rope_axis_parts_rotate_only_with_their_axis():
    rope = RoPE3D(96, GRID)
    x = torch.randn(96)
    p, pt = rotate_at(rope, x, (0, 1, 2)), rotate_at(rope, x, (3, 1, 2))
    assert not torch.allclose(p[:8], pt[:8])
    assert torch.equal(p[8:], pt[8:])  # h, w and unrotated channels do not see a change in t


def test_sincos_pos_embed_3d():
    pe = sincos_pos_embed_3d(GRID, 96)
    assert pe.shape == (1, 64, 96)
    assert len({tuple(r.tolist()) for r in pe[0]}) == 64  # every token gets its own code
    assert sincos_pos_embed_3d(GRID, 7).shape == (1, 64, 7)


# ------------------------------------------------------------------------------------------ model
def make(latent=(1, 2, 3), seed: int = 0, **overrides) -> VideoMAE:
    torch.manual_seed(seed)
    return VideoMAE(ModelConfig.tiny(**overrides), latent_target_layers=latent)


def video(b: int = 2) -> torch.Tensor:
    return torch.randn(b, 3, 8, 32, 32, generator=torch.Generator().manual_seed(1))


def masks(b: int = 2, n: int = 64, ratio: float = 0.75):
    return random_masking(b, n, ratio, generator=torch.Generator().manual_seed(2))


POSITIONS = [
    dict(rope="after_norm", pos_embed="none"),
    dict(rope="attention", pos_embed="none"),
    dict(rope="none", pos_embed="sincos"),
    dict(rope="none", pos_embed="learned"),
    dict(rope="after_norm", pos_embed="learned"),
]


@pytest.mark.parametrize("pos", POSITIONS, ids=lambda p: f"{p['rope']}-{p['pos_embed']}")
def test_forward_shapes(pos):
    m = make(**pos)
    assert m.grid == GRID and m.num_patches == 64 and m.encoder_depth == 4
    x = video()
    vis, msk = masks()
    out = m(x, vis, msk, heads=("pixels", "layer_2", "layer_3"))
    assert out["pixels"].shape == (2, 48, 2 * 8 * 8 * 3)
    assert out["layer_2"].shape == out["layer_3"].shape == (2, 48, 96)
    assert m.patchify(x).shape == (2, 64, 2 * 8 * 8 * 3)
    assert m.encode(x).shape == (2, 64, 96)
    assert all(torch.isfinite(t).all() for t in out.values())


class Recorder:
    def __init__(self, blocks):
        self.out: dict[int, torch.Tensor] = {}
        self.handles = [b.register_forward_hook(self.hook(i + 1)) for i, b in enumerate(blocks)]

    def hook(self, k):
        def fn(module, args, output):
            self.out[k] = output.detach().clone()

        return fn

    def remove(self):
        for h in self.handles:
            h.remove()


def forbid(blocks):
    def fn(module, args):
        raise AssertionError("forward_prefix ran a block deeper than requested")

    return [b.register_forward_pre_hook(fn) for b in blocks]


@pytest.mark.parametrize("pos", POSITIONS[:3], ids=lambda p: f"{p['rope']}-{p['pos_embed']}")
def test_forward_prefix_matches_full_pass_and_stops_early(pos):
    m = make(**pos).eval()
    x = video()
    rec = Recorder(m.blocks[: m.encoder_depth])
    with torch.no_grad():
        m.forward_prefix(x, [m.encoder_depth])
    rec.remove()
    for k in range(1, m.encoder_depth + 1):
        handles = forbid(m.blocks[k:])
        try:
            with torch.no_grad():
                got = m.forward_prefix(x, [k])
        finally:
            for h in handles:
                h.remove()
        assert list(got) == [k]
        torch.testing.assert_close(got[k], rec.out[k], rtol=0, atol=0)
    both = m.forward_prefix(x, [3, 1])
    assert sorted(both) == [1, 3]
    torch.testing.assert_close(m.encode(x, 2), rec.out[2])


def test_masked_forward_with_everything_visible_matches_forward_prefix():
    """The per-sample position path (gather + indexed RoPE) agrees with the full-input path."""
    m = make().eval()
    x = video()
    perm = torch.stack([torch.randperm(64, generator=torch.Generator().manual_seed(s)) for s in (3, 4)])
    rec = Recorder(m.blocks[: m.encoder_depth])
    with torch.no_grad():
        m(x, perm, perm[:, :5])
        rec.remove()
        ref = m.forward_prefix(x, range(1, m.encoder_depth + 1))
    for k, h in ref.items():
        # rows of the masked pass are in perm order; put them back in token order
        unperm = torch.empty_like(rec.out[k]).scatter_(1, perm[..., None].expand(-1, -1, 96), rec.out[k])
        torch.testing.assert_close(unperm, h, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pos", [POSITIONS[0], POSITIONS[3]], ids=["rope", "learned"])
@pytest.mark.parametrize("k", [1, 3, 4])
def test_frozen_prefix_runs_without_autograd(pos, k):
    m = make(**pos).eval()
    x = video()
    vis, msk = masks()
    heads = ("pixels", "layer_1")
    ref = m(x, vis, msk, heads=heads)
    m.zero_grad(set_to_none=True)

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(1) or t, lambda t: t):
        out = m(x, vis, msk, heads=heads, frozen_prefix=k)
    saved_frozen = len(saved)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(1) or t, lambda t: t):
        m(x, vis, msk, heads=heads)
    assert saved_frozen < len(saved)  # autograd keeps nothing for the frozen prefix

    for h in heads:
        torch.testing.assert_close(out[h], ref[h], rtol=0, atol=0)
    sum(o.square().mean() for o in out.values()).backward()

    units = m.layerlock_units()
    frozen = [*units.stem.params, *(p for u in units.blocks[:k] for p in u.params)]
    assert all(p.requires_grad and p.grad is None for p in frozen)
    trainable = [*(p for b in m.blocks[k:] for p in b.parameters()), m.query_token, *m.decoder_norm.parameters()]
    trainable += [*m.readouts["pixels"].parameters(), *m.readouts["layer_1"].parameters()]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)


def test_layerlock_units_and_protocol():
    m = make(pos_embed="learned")
    assert as_layered_encoder(m) is m
    units = m.layerlock_units()
    assert units.num_layers == m.encoder_depth == 4
    assert [u.name for u in units.blocks] == ["block_1", "block_2", "block_3", "block_4"]
    assert all(u.modules == (m.blocks[i],) for i, u in enumerate(units.blocks))
    assert units.stem.modules == (m.patch_embed,) and units.stem.extra_params == (m.pos_embed,)
    listed = {id(p) for u in (units.stem, *units.blocks) for p in u.params}
    assert not listed & {id(p) for b in m.blocks[m.encoder_depth :] for p in b.parameters()}
    assert make().layerlock_units().stem.extra_params == ()


def test_init_and_state_dict():
    m = make(pos_embed="sincos", rope="none")
    sd = m.state_dict()
    assert "pos_embed" not in sd and not any("rope" in key for key in sd)  # derived tables stay out
    assert set(m.readouts) == {"pixels", "layer_1", "layer_2", "layer_3"}
    assert m.blocks[0].attn.qkv.bias.abs().sum() == 0 and m.decoder_norm.weight.eq(1).all()
    assert 0.01 < m.query_token.std() < 0.03


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(depth=0), "model.depth"),
        (dict(embed_dim=-8), "model.embed_dim"),
        (dict(img_size=30), "model.tubelet"),
        (dict(num_frames=7), "model.tubelet"),
        (dict(tubelet=(2, 8)), "model.tubelet"),
        (dict(tubelet=(2, 0, 8)), "model.tubelet[1]"),
        (dict(num_heads=5), "model.num_heads"),
        (dict(decoder_depth=6), "model.decoder_depth"),
        (dict(decoder_depth=0), "model.decoder_depth"),
        (dict(mask_ratio=1.0), "model.mask_ratio"),
        (dict(mask_ratio=0), "model.mask_ratio"),
        (dict(mlp_ratio=0), "model.mlp_ratio"),
        (dict(rope="rotary"), "model.rope"),
        (dict(pos_embed="abs"), "model.pos_embed"),
        (dict(rope="none"), "model.pos_embed"),
        (dict(rope_split=(0.5, 0.5, 0.5)), "model.rope_split"),
        (dict(rope_split=(0.01, 0.25, 0.25)), "model.rope_split"),
        (dict(rope_theta=0), "model.rope_theta"),
        (dict(drop_path=1.0), "model.drop_path"),
        (dict(proj_drop=-0.1), "model.proj_drop"),
        (dict(qkv_bias="yes"), "model.qkv_bias"),
    ],
)
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as e:
        ModelConfig.tiny(**overrides)
    assert e.value.field == field and str(e.value).startswith(field + ": ")


def test_config_from_dict_and_presets():
    cfg = ModelConfig.from_dict({"preset": "tiny", "tubelet": [2, 8, 8], "rope": "attention"})
    assert cfg.tubelet == (2, 8, 8) and cfg.rope == "attention" and cfg.embed_dim == 96
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match=r"^model\.dim: unknown field"):
        ModelConfig.from_dict({"dim": 3})
    with pytest.raises(ConfigError, match=r"^model\.preset"):
        ModelConfig.preset("enormous")
    assert ModelConfig.preset("giant").grid == (8, 14, 14)


def test_forward_errors():
    m = make()
    x = video()
    vis, msk = masks()
    with pytest.raises(KeyError, match="available.*pixels.*layer_1"):
        m(x, vis, msk, heads=("layer_4",))
    with pytest.raises(ValueError, match="query_idx.*0..63"):
        m(x, vis, msk + 64)
    with pytest.raises(ValueError, match="visible_idx"):
        m(x, vis.int(), msk)
    with pytest.raises(ValueError, match="frozen_prefix"):
        m(x, vis, msk, frozen_prefix=5)
    with pytest.raises(ValueError, match="video"):
        m(x[:, :, :4], vis, msk)
    with pytest.raises(ValueError, match="1..4"):
        m.forward_prefix(x, [5])
    with pytest.raises(ConfigError, match="latent_target_layers"):
        make(latent=(4,))
