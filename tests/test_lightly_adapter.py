"""LayerLockMAE: LayerLock on lightly's image MAE modules (tiny models: img 32, patch 8, depth 4, dim 48)."""

from __future__ import annotations

import importlib
import sys
import warnings

import pytest
import torch

timm = pytest.importorskip("timm")
pytest.importorskip("lightly")

from lightly.models import utils as lightly_utils  # noqa: E402
from lightly.models.modules import MAEDecoderTIMM, MaskedVisionTransformerTIMM  # noqa: E402

from layerlock_plugin.adapters.lightly_mae import LayerLockMAE  # noqa: E402
from layerlock_plugin.collapse import GuardConfig  # noqa: E402
from layerlock_plugin.controller import LayerLockConfig  # noqa: E402
from layerlock_plugin.errors import EncoderStructureError, MissingDependencyError  # noqa: E402
from layerlock_plugin.schedule import ScheduleConfig  # noqa: E402
from layerlock_plugin.targets import TargetConfig  # noqa: E402
from layerlock_plugin.warmup import WarmupConfig  # noqa: E402

DEPTH, DIM, PATCH, IMG = 4, 48, 8, 32
N = (IMG // PATCH) ** 2


def tiny_vit(**kw) -> torch.nn.Module:
    args = dict(pretrained=False, img_size=IMG, patch_size=PATCH, depth=DEPTH, embed_dim=DIM, num_heads=3)
    args.update(kw)
    return timm.create_model("vit_tiny_patch16_224", **args)


def tiny_decoder(num_prefix_tokens: int = 1) -> MAEDecoderTIMM:
    with warnings.catch_warnings():  # lightly 1.6 marks MAEDecoderTIMM deprecated (still its MAE example)
        warnings.simplefilter("ignore")
        return MAEDecoderTIMM(num_patches=N, patch_size=PATCH, embed_dim=DIM, decoder_embed_dim=32,
                              decoder_depth=1, decoder_num_heads=2, num_prefix_tokens=num_prefix_tokens)


def config(**kw) -> LayerLockConfig:
    return LayerLockConfig(schedule=ScheduleConfig(pixel_steps=3, interval=3, max_frozen=2),
                           warmup=WarmupConfig(steps=2), guard=GuardConfig(every=1), **kw)


def tiny_mae(cfg: LayerLockConfig | None = None, seed: int = 0, **vit_kw) -> LayerLockMAE:
    torch.manual_seed(seed)
    vit = tiny_vit(**vit_kw)
    backbone = MaskedVisionTransformerTIMM(vit=vit)
    return LayerLockMAE(backbone, tiny_decoder(vit.num_prefix_tokens), cfg or config(), mask_ratio=0.75)


def images(b: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def timm_block_output(vit, x: torch.Tensor, k: int) -> torch.Tensor:
    """Block k's output (patch tokens) during timm's own full forward, in eval mode."""
    outs = []
    h = vit.blocks[k - 1].register_forward_hook(lambda _m, _i, o: outs.append(o))
    was = vit.training
    vit.eval()
    try:
        with torch.no_grad():
            vit(x)
    finally:
        h.remove()
        vit.train(was)
    return outs[0][:, vit.num_prefix_tokens:]


# ------------------------------------------------------------------------------------- structure
def test_readouts_precreated_and_masks_keep_prefix():
    mae = tiny_mae()
    assert sorted(mae.readouts) == ["layer_1", "layer_2"]
    keep, mask = mae.random_mask(5)
    assert keep.shape == (5, 1 + N // 4) and mask.shape == (5, N - N // 4)
    assert (keep[:, 0] == 0).all() and (mask >= 1).all()
    # every sequence position exactly once
    allidx = torch.cat([keep, mask], 1).sort(1).values
    assert torch.equal(allidx, torch.arange(N + 1).expand(5, -1))
    # no duplicate keys in the state dict: the TimmViTEncoder lives in the controller only
    assert not any(k.startswith("encoder.") for k in mae.state_dict())


@pytest.mark.parametrize("kw", [dict(), dict(reg_tokens=2), dict(class_token=False, global_pool="avg")],
                         ids=["cls", "reg2", "no_cls"])
def test_masks_and_student_match_lightly_encode(kw):
    mae = tiny_mae(**kw).eval()
    keep, mask = mae.random_mask(3)
    assert keep.shape[1] == mae.num_prefix_tokens + N // 4
    x = images(3)
    with torch.no_grad():
        ours = mae.forward_encoder(x, keep, frozen_prefix=0)
        lightly_out = mae.backbone.encode(images=x, idx_keep=keep)
    torch.testing.assert_close(ours, lightly_out)


def test_pixel_targets_match_lightly_patchify():
    cfg = config(target=TargetConfig(normalize_pixels=False))
    mae = tiny_mae(cfg)
    mae.layerlock.begin_step(0)
    x = images()
    out = mae(x)
    expected = lightly_utils.get_at_index(lightly_utils.patchify(x, PATCH), out.idx_mask - 1)
    assert list(out.targets) == ["pixels"]
    torch.testing.assert_close(out.targets["pixels"], expected)
    assert out.predictions["pixels"].shape == expected.shape


@pytest.mark.parametrize("k", [1, 2])
def test_latent_targets_equal_timm_intermediate_at_masked_positions(k):
    cfg = config(target=TargetConfig(layer_norm=False))
    mae = tiny_mae(cfg)
    mae.train()  # targets must still come from eval mode on the full image
    step = 3 + 3 * (k - 1)
    mae.layerlock.begin_step(step)
    assert mae.layerlock.heads() == [f"layer_{k}"]
    x = images()
    out = mae(x)
    full = timm_block_output(mae.backbone.vit, x, k)
    expected = lightly_utils.get_at_index(full, out.idx_mask - 1)
    torch.testing.assert_close(out.targets[f"layer_{k}"], expected)
    assert not out.targets[f"layer_{k}"].requires_grad
    assert out.predictions[f"layer_{k}"].shape == (4, N - N // 4, DIM)


def test_target_never_runs_deeper_blocks():
    mae = tiny_mae()
    mae.layerlock.begin_step(3)  # target layer_1
    calls = []
    hooks = [b.register_forward_hook(lambda m, i, o, j=j: calls.append((j, i[0].shape[1])))
             for j, b in enumerate(mae.backbone.vit.blocks, 1)]
    mae.layerlock.targets(images(), None, torch.zeros(4, 3, dtype=torch.long))
    for h in hooks:
        h.remove()
    assert calls == [(1, N + 1)]  # full (unmasked) sequence, block 1 only


def test_frozen_prefix_runs_without_autograd():
    mae = tiny_mae()
    mae.layerlock.begin_step(6)  # 2 frozen blocks, stem frozen
    grads = []
    hooks = [b.register_forward_hook(lambda m, i, o, j=j: grads.append((j, o.requires_grad)))
             for j, b in enumerate(mae.backbone.vit.blocks, 1)]
    keep, _ = mae.random_mask(2)
    mae.forward_encoder(images(2), keep)
    for h in hooks:
        h.remove()
    assert grads == [(1, False), (2, False), (3, True), (4, True)]


# ------------------------------------------------------------------------------------- training
def test_training_crosses_freeze_and_switch_frozen_blocks_unchanged():
    mae = tiny_mae()
    opt = torch.optim.AdamW(mae.parameters(), lr=1e-3, weight_decay=0.05)
    mae.layerlock.attach_optimizer(opt)
    events = []
    mae.layerlock.on_event(events.append)
    vit = mae.backbone.vit
    snapshot = {}
    heads_seen = []
    for step in range(10):
        mae.layerlock.begin_step(step)
        if step == 6:  # right after the second freeze: blocks 1, 2 and the stem are frozen
            snapshot = {n: p.detach().clone() for n, p in vit.named_parameters()
                        if n.startswith(("blocks.0.", "blocks.1.", "patch_embed", "pos_embed", "cls_token"))}
            trainable = vit.blocks[2].mlp.fc1.weight.detach().clone()
        out = mae(images(seed=step))
        heads_seen.append(tuple(out.targets))
        assert torch.isfinite(out.loss)
        out.loss.backward()
        assert not mae.layerlock.end_step(out.loss, out.targets).skip
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert [(e.step, e.num_frozen) for e in events] == [(3, 1), (6, 2)]
    assert heads_seen[0] == ("pixels",) and heads_seen[4] == ("layer_1",) and heads_seen[-1] == ("layer_2",)
    assert len(snapshot) > 10
    for n, p in vit.named_parameters():
        if n in snapshot:
            assert torch.equal(p, snapshot[n]), n
            assert not p.requires_grad and p not in opt.state
    assert not torch.equal(vit.blocks[2].mlp.fc1.weight, trainable)  # block 3 still trains
    m = mae.layerlock.metrics()
    assert m["layerlock/num_frozen"] == 2 and m["layerlock/target_layer"] == 2
    assert "layerlock/feature_std" in m  # collapse guard ran on the latent target


def test_mae_baseline_method_uses_pixels_only():
    mae = tiny_mae(config().with_method("mae"))
    assert len(mae.readouts) == 0
    mae.layerlock.begin_step(9)
    assert mae.layerlock.heads() == ["pixels"] and mae.layerlock.frozen_prefix() == 0
    assert torch.isfinite(mae(images()).loss)


def test_loss_fraction_shrinks_queries():
    mae = tiny_mae(config(target=TargetConfig(loss_fraction=0.25)))
    mae.layerlock.begin_step(4)
    out = mae(images())
    assert out.idx_mask.shape[1] == 3 and out.targets["layer_1"].shape == (4, 3, DIM)


def test_sparse_target_context_runs_on_queries_and_visible_patches():
    """target.context=sparse through LayerLockMAE: the target equals the timm wrapper's prefix pass on the
    queried + visible patches; with every masked patch queried it equals the full-context target."""
    sparse = tiny_mae(config(target=TargetConfig(loss_fraction=0.25, context="sparse")))
    sparse.layerlock.begin_step(4)  # 1 block frozen: target h_1
    out = sparse(images())
    query = out.idx_mask - 1
    context = torch.cat([query, out.idx_keep[:, 1:] - 1], dim=1)
    sparse.eval()
    with torch.no_grad():
        ref = sparse.layerlock.encoder.forward_prefix(images(), [1], token_idx=context)[1][:, : query.shape[1]]
    torch.testing.assert_close(out.targets["layer_1"], torch.nn.functional.layer_norm(ref, ref.shape[-1:]))
    everything = tiny_mae(config(target=TargetConfig(context="sparse")))
    full = tiny_mae(config())
    for m in (everything, full):
        m.layerlock.begin_step(4)
    keep, mask = full.random_mask(4, "cpu")
    a = everything(images(), keep, mask).targets["layer_1"]
    b = full(images(), keep, mask).targets["layer_1"]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)
    with pytest.raises(ValueError, match="idx_keep: must start with the 1 prefix token"):
        everything(images(), keep.flip(1), mask)


# ------------------------------------------------------------------------------------- errors
def test_unsupported_timm_structure_through_entry_point():
    vit = tiny_vit()
    backbone = MaskedVisionTransformerTIMM(vit=vit)
    vit.blocks = vit.blocks[0]  # not a sequence of blocks any more
    with pytest.raises(EncoderStructureError, match="blocks"):
        LayerLockMAE(backbone, tiny_decoder(), config())


def test_non_lightly_backbone_rejected():
    with pytest.raises(EncoderStructureError, match="MaskedVisionTransformerTIMM"):
        LayerLockMAE(tiny_vit(), tiny_decoder(), config())


def test_missing_lightly_raises_missing_dependency(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightly.models", None)
    monkeypatch.delitem(sys.modules, "layerlock_plugin.adapters.lightly_mae")
    with pytest.raises(MissingDependencyError, match=r'layerlock-plugin\[lightly\]'):
        importlib.import_module("layerlock_plugin.adapters.lightly_mae")


# ------------------------------------------------------------------ lightly's current decoder
def current_decoder(num_prefix_tokens: int = 1):
    from lightly.models.modules import MaskedVisionTransformerDecoderTIMM

    return MaskedVisionTransformerDecoderTIMM(num_patches=N, embed_dim=32, depth=1, num_heads=2,
                                              num_prefix_tokens=num_prefix_tokens)


def test_current_decoder_builds_without_deprecation_and_decodes_as_lightlys_mae_example():
    torch.manual_seed(0)
    vit = tiny_vit()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # MaskedVisionTransformerDecoderTIMM is not deprecated
        mae = LayerLockMAE(MaskedVisionTransformerTIMM(vit=vit), current_decoder(), config(), mask_ratio=0.75)
    assert mae.pixel_head.out_features == PATCH * PATCH * 3 and mae.decoder_embed.in_features == DIM
    mae.eval()
    keep, mask = mae.random_mask(2)
    x = images(2)
    with torch.no_grad():
        ours = mae.forward_decoder(mae.forward_encoder(x, keep), keep, mask, ["pixels"])["pixels"]
        # lightly's MAE example with the current decoder: embed, mask tokens, positions, decode, predict
        tokens = mae.decoder_embed(mae.backbone.encode(images=x, idx_keep=keep))
        full = lightly_utils.repeat_token(mae.decoder.mask_token, (2, mae.sequence_length))
        decoded = mae.decoder.decode(mae.decoder.add_pos_embed(lightly_utils.set_at_index(full, keep, tokens)))
        expected = mae.pixel_head(lightly_utils.get_at_index(decoded, mask))
    torch.testing.assert_close(ours, expected)


def test_current_decoder_trains_across_a_switch_with_own_heads_and_both_decoders_are_refused_mixed():
    torch.manual_seed(0)
    vit = tiny_vit()
    embed, head = torch.nn.Linear(DIM, 32), torch.nn.Linear(32, PATCH * PATCH * 3)
    mae = LayerLockMAE(MaskedVisionTransformerTIMM(vit=vit), current_decoder(), config(), decoder_embed=embed,
                       pixel_head=head)
    assert mae.decoder_embed is embed and mae.pixel_head is head
    optimizer = torch.optim.AdamW(mae.parameters(), lr=1e-3)
    mae.layerlock.attach_optimizer(optimizer)
    before = {n: p.detach().clone() for n, p in mae.named_parameters()}
    for step in range(5):  # pixels at 0-2, layer_1 from step 3
        mae.layerlock.begin_step(step)
        out = mae(images(4, seed=step))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert list(out.targets) == ["layer_1"] and torch.isfinite(out.loss)
    moved = {n for n, p in mae.named_parameters() if not torch.equal(p, before[n])}
    assert {"pixel_head.weight", "decoder_embed.weight", "readouts.layer_1.weight"} <= moved
    with pytest.raises(EncoderStructureError, match="only with MaskedVisionTransformerDecoderTIMM"):
        LayerLockMAE(MaskedVisionTransformerTIMM(vit=tiny_vit()), tiny_decoder(), config(), pixel_head=head)


def test_both_decoders_give_the_same_step_with_the_same_weights():
    """The current decoder path (decoder_embed -> mask tokens -> add_pos_embed -> decode -> pixel head) computes
    what MAEDecoderTIMM's embed / decode / predict compute, given the same weights."""
    torch.manual_seed(0)
    vit = tiny_vit()
    old = LayerLockMAE(MaskedVisionTransformerTIMM(vit=vit), tiny_decoder(), config())
    new = LayerLockMAE(MaskedVisionTransformerTIMM(vit=vit), current_decoder(), config())
    d_old, d_new = old.decoder, new.decoder
    with torch.no_grad():
        new.decoder_embed.load_state_dict(d_old.decoder_embed.state_dict())
        new.pixel_head.load_state_dict(d_old.decoder_pred.state_dict())
        d_new.mask_token.copy_(d_old.mask_token)
        d_new.pos_embed.copy_(d_old.decoder_pos_embed)
        d_new.blocks.load_state_dict(d_old.decoder_blocks.state_dict())
        d_new.norm.load_state_dict(d_old.decoder_norm.state_dict())
        new.readouts.load_state_dict(old.readouts.state_dict())
    x = images(3)
    keep, mask = old.random_mask(3)
    for step in (0, 3):  # pixels, then layer_1
        old.layerlock.begin_step(step)
        new.layerlock.begin_step(step)
        a, b = old(x, keep, mask), new(x, keep, mask)
        assert list(a.predictions) == list(b.predictions)
        for h in a.predictions:
            torch.testing.assert_close(a.predictions[h], b.predictions[h])
        torch.testing.assert_close(a.loss, b.loss)
