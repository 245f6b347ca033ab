"""TimmViTEncoder: the timm ViT adapter of the layered-encoder protocol (tiny models, never pretrained)."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

timm = pytest.importorskip("timm")

from layerlock_plugin.adapters.timm_vit import TimmViTEncoder  # noqa: E402
from layerlock_plugin.encoder import EncoderUnits, as_layered_encoder  # noqa: E402
from layerlock_plugin.errors import EncoderStructureError, MissingDependencyError  # noqa: E402

DEPTH = 4
DIM = 48
N_PATCHES = (32 // 8) ** 2


def tiny_vit(name: str = "vit_tiny_patch16_224", **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    args = dict(pretrained=False, img_size=32, patch_size=8, depth=DEPTH, embed_dim=DIM, num_heads=3)
    args.update(kw)
    return timm.create_model(name, **args).eval()


CONFIGS = {
    "cls": dict(),
    "reg2": dict(reg_tokens=2),
    "no_cls_avg": dict(class_token=False, global_pool="avg"),
}


def images(b: int = 2) -> torch.Tensor:
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def hooked_block_outputs(model, x) -> list[torch.Tensor]:
    """Outputs of every block during timm's own full forward, prefix tokens dropped."""
    outs: list[torch.Tensor] = []
    handles = [b.register_forward_hook(lambda _m, _i, o: outs.append(o)) for b in model.blocks]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    assert len(outs) == len(model.blocks)
    return [o[:, model.num_prefix_tokens:] for o in outs]


# ----------------------------------------------------------------------------------------- targets
@pytest.mark.parametrize("cfg", list(CONFIGS), ids=list(CONFIGS))
@pytest.mark.parametrize("k", range(1, DEPTH + 1))
def test_forward_prefix_matches_full_forward(cfg, k):
    model = tiny_vit(**CONFIGS[cfg])
    enc = TimmViTEncoder(model)
    x = images()
    ref = hooked_block_outputs(model, x)
    with torch.no_grad():
        out = enc.forward_prefix(x, [k])
    assert set(out) == {k}
    assert out[k].shape == (2, N_PATCHES, DIM)
    torch.testing.assert_close(out[k], ref[k - 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg", list(CONFIGS), ids=list(CONFIGS))
def test_forward_prefix_on_a_token_subset(cfg):
    """token_idx: every patch in shuffled order gives the full outputs in that order (attention with
    additive positions is permutation-equivariant; prefix tokens stay in the context); a subset's
    outputs do not depend on the patches left out."""
    enc = TimmViTEncoder(tiny_vit(**CONFIGS[cfg]))
    x = images()
    perm = torch.stack([torch.randperm(N_PATCHES, generator=torch.Generator().manual_seed(s)) for s in (0, 1)])
    with torch.no_grad():
        full = enc.forward_prefix(x, [1, 3])
        shuffled = enc.forward_prefix(x, [1, 3], token_idx=perm)
        for k in (1, 3):
            torch.testing.assert_close(shuffled[k], full[k].gather(1, perm.unsqueeze(-1).expand(-1, -1, DIM)),
                                       rtol=1e-5, atol=1e-5)
        subset = perm[:, :5]
        edited = x.clone()
        outside = perm[0, 5].item()  # a patch outside row 0's subset: its pixels must not matter
        r, c = divmod(outside, 32 // 8)
        edited[0, :, 8 * r:8 * r + 8, 8 * c:8 * c + 8] += 3.0
        a = enc.forward_prefix(x, [2], token_idx=subset)[2]
        b = enc.forward_prefix(edited, [2], token_idx=subset)[2]
    assert a.shape == (2, 5, DIM)
    torch.testing.assert_close(a[0], b[0])
    with pytest.raises(ValueError, match="token_idx: patch indices must be in 0..15"):
        enc.forward_prefix(x, [1], token_idx=torch.full((2, 3), N_PATCHES))


def test_prefix_token_counts():
    assert tiny_vit().num_prefix_tokens == 1
    assert tiny_vit(reg_tokens=2).num_prefix_tokens == 3
    assert tiny_vit(class_token=False, global_pool="avg").num_prefix_tokens == 0
    assert TimmViTEncoder(tiny_vit(reg_tokens=2)).num_prefix_tokens == 3


def test_forward_prefix_several_layers_and_duplicates():
    model = tiny_vit(reg_tokens=2)
    enc = TimmViTEncoder(model)
    x = images()
    ref = hooked_block_outputs(model, x)
    with torch.no_grad():
        out = enc.forward_prefix(x, [3, 1, 3])
    assert sorted(out) == [1, 3]
    for k, h in out.items():
        torch.testing.assert_close(h, ref[k - 1], rtol=1e-5, atol=1e-5)


def test_distilled_deit_drops_both_prefix_tokens():
    model = tiny_vit("deit_tiny_distilled_patch16_224")
    assert model.num_prefix_tokens == 2
    enc = TimmViTEncoder(model)
    x = images()
    ref = hooked_block_outputs(model, x)
    with torch.no_grad():
        out = enc.forward_prefix(x, [2])
    torch.testing.assert_close(out[2], ref[1], rtol=1e-5, atol=1e-5)
    stem_ids = {id(p) for p in enc.layerlock_units().stem.params}
    assert id(model.dist_token) in stem_ids


@pytest.mark.parametrize("cfg", list(CONFIGS), ids=list(CONFIGS))
@pytest.mark.parametrize("k", range(1, DEPTH))
def test_deeper_blocks_never_run(cfg, k):
    model = tiny_vit(**CONFIGS[cfg])
    enc = TimmViTEncoder(model)

    def boom(mod, _inp):
        raise AssertionError("a block deeper than max(layers) ran")

    ran: list[int] = []
    handles = [b.register_forward_pre_hook(boom) for b in model.blocks[k:]]
    handles += [
        b.register_forward_pre_hook(lambda _m, _i, i=i: ran.append(i)) for i, b in enumerate(model.blocks[:k])
    ]
    try:
        out = enc.forward_prefix(images(), list(range(1, k + 1)))
    finally:
        for h in handles:
            h.remove()
    assert ran == list(range(k))
    assert sorted(out) == list(range(1, k + 1))


def test_forward_prefix_is_differentiable():
    enc = TimmViTEncoder(tiny_vit())
    enc.forward_prefix(images(), [2])[2].sum().backward()
    assert enc.model.blocks[1].attn.qkv.weight.grad is not None
    assert enc.model.blocks[2].attn.qkv.weight.grad is None  # never ran
    assert enc.model.pos_embed.grad is not None


def test_patch_dropout_is_off_for_targets_and_restored():
    # In training mode patch dropout would keep a random subset of tokens; targets need all of them.
    model = tiny_vit(patch_drop_rate=0.5)
    enc = TimmViTEncoder(model)
    x = images()
    with torch.no_grad():
        ref = enc.forward_prefix(x, [2])[2]  # eval mode
        model.train()
        out = enc.forward_prefix(x, [2])[2]
    assert model.patch_drop.training, "forward_prefix must restore the host's train/eval mode"
    assert out.shape == (2, N_PATCHES, DIM)
    torch.testing.assert_close(out, ref)  # no other dropout is configured, so train == eval here


def test_layers_validated():
    enc = TimmViTEncoder(tiny_vit(), decoder_blocks=1)
    with pytest.raises(ValueError, match="1..3"):
        enc.forward_prefix(images(), [4])  # block 4 belongs to the decoder
    with pytest.raises(ValueError):
        enc.forward_prefix(images(), [0])
    with pytest.raises(ValueError):
        enc.forward_prefix(images(), [])


# ------------------------------------------------------------------------------------------- units
def test_units_stem_and_blocks():
    model = tiny_vit()
    enc = TimmViTEncoder(model)
    units = enc.layerlock_units()
    assert isinstance(units, EncoderUnits)
    assert units.stem.name == "stem"
    stem_ids = {id(p) for p in units.stem.params}
    for p in model.patch_embed.parameters():
        assert id(p) in stem_ids
    assert id(model.pos_embed) in stem_ids
    assert id(model.cls_token) in stem_ids
    assert model.patch_embed in units.stem.modules and model.norm_pre in units.stem.modules
    assert units.num_layers == DEPTH
    assert [u.name for u in units.blocks] == [f"block_{i}" for i in range(1, DEPTH + 1)]
    for u, blk in zip(units.blocks, model.blocks):
        assert u.modules == (blk,)
        assert {id(p) for p in u.params} == {id(p) for p in blk.parameters()}
    # every parameter belongs to at most one unit
    all_ids = [id(p) for u in (units.stem, *units.blocks) for p in u.params]
    assert len(all_ids) == len(set(all_ids))


def test_units_reg_tokens_and_no_cls():
    model = tiny_vit(reg_tokens=2)
    stem_ids = {id(p) for p in TimmViTEncoder(model).layerlock_units().stem.params}
    assert id(model.reg_token) in stem_ids and id(model.cls_token) in stem_ids
    model = tiny_vit(class_token=False, global_pool="avg")
    assert model.cls_token is None
    stem = TimmViTEncoder(model).layerlock_units().stem
    assert id(model.pos_embed) in {id(p) for p in stem.params}


@pytest.mark.parametrize("dec", [0, 1, 3])
def test_decoder_blocks_excluded(dec):
    model = tiny_vit()
    enc = TimmViTEncoder(model, decoder_blocks=dec)
    units = enc.layerlock_units()
    assert units.num_layers == enc.num_layers == DEPTH - dec
    unit_ids = {id(p) for u in units.blocks for p in u.params}
    for blk in model.blocks[DEPTH - dec:]:
        assert not any(id(p) in unit_ids for p in blk.parameters())


@pytest.mark.parametrize("dec", [-1, DEPTH, DEPTH + 1])
def test_decoder_blocks_must_leave_a_freezable_block(dec):
    with pytest.raises(EncoderStructureError, match="decoder_blocks"):
        TimmViTEncoder(tiny_vit(), decoder_blocks=dec)


def test_as_layered_encoder():
    model = tiny_vit()
    enc = TimmViTEncoder(model)
    assert as_layered_encoder(enc) is enc
    with pytest.raises(EncoderStructureError, match="TimmViTEncoder"):
        as_layered_encoder(model)


def test_wrapper_forward_calls_model():
    model = tiny_vit()
    enc = TimmViTEncoder(model)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(enc(x), model(x))
    assert set(enc.state_dict()) == {f"model.{k}" for k in model.state_dict()}


# ----------------------------------------------------------------------------------- unsupported
@pytest.mark.parametrize(
    "name, kw, missing, cls_name",
    [
        ("resnet18", {}, "patch_embed", "ResNet"),
        ("convnext_atto", {}, "patch_embed", "ConvNeXt"),
        ("swin_tiny_patch4_window7_224", dict(img_size=32, window_size=2, embed_dim=24, depths=(1, 1),
                                              num_heads=(1, 2)), "blocks", "SwinTransformer"),
    ],
)
def test_unsupported_models_name_missing_attribute(name, kw, missing, cls_name):
    model = timm.create_model(name, pretrained=False, **kw)
    with pytest.raises(EncoderStructureError) as ei:
        TimmViTEncoder(model)
    msg = str(ei.value)
    assert repr(missing) in msg and cls_name in msg


def test_rope_models_rejected():
    model = timm.create_model(
        "eva02_tiny_patch14_224", pretrained=False, img_size=32, patch_size=8, depth=2
    )
    assert model.rope is not None
    with pytest.raises(EncoderStructureError, match="rotary"):
        TimmViTEncoder(model)


def test_blocks_must_be_a_sequence():
    model = tiny_vit()
    model.blocks = model.blocks[0]  # a single module, not a sequence
    with pytest.raises(EncoderStructureError, match="blocks"):
        TimmViTEncoder(model)


def test_missing_timm_raises_missing_dependency(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` raise ImportError
    monkeypatch.delitem(sys.modules, "layerlock_plugin.adapters.timm_vit")
    with pytest.raises(MissingDependencyError, match="pip install timm"):
        importlib.import_module("layerlock_plugin.adapters.timm_vit")
