"""Frozen must mean frozen (DESIGN.md pitfalls 1, 2, 11)."""

import pytest
import torch

from layerlock_plugin.controller import LayerLock, LayerLockConfig
from layerlock_plugin.freezing import Freezer
from layerlock_plugin.schedule import ScheduleConfig


def _train_steps(model, opt, n, frozen_prefix_fn=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(4, 6, 8, generator=g)
        loss = (model(x) - x).pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # must tolerate None grads
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_frozen_params_bitwise_unchanged_over_adamw_with_weight_decay(toy_encoder):
    model = toy_encoder
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5)
    _train_steps(model, opt, 5)  # build momentum for every parameter first
    n_groups = len(opt.param_groups)
    group_sizes = [len(g["params"]) for g in opt.param_groups]
    freezer = Freezer(model.layerlock_units(), opt)
    assert freezer.apply(2, stem=True) == ["stem", "block_1", "block_2"]
    frozen = freezer.frozen_parameters()
    assert len(frozen) == 2 + 1 + 2 * 4  # stem weight/bias + pos + 2 blocks x (norm w/b, fc w/b)
    before = [p.detach().clone() for p in frozen]
    trainable_before = model.blocks[3].fc.weight.detach().clone()
    for p in frozen:
        assert not p.requires_grad and p.grad is None and p not in opt.state
    _train_steps(model, opt, 20, seed=1)
    for p, b in zip(frozen, before):
        assert torch.equal(p, b), "a frozen parameter moved (momentum or weight decay drift)"
        assert p.grad is None and p not in opt.state
    # trainable ones did move, and the optimizer's groups are intact
    assert not torch.equal(model.blocks[3].fc.weight, trainable_before)
    assert len(opt.param_groups) == n_groups
    assert [len(g["params"]) for g in opt.param_groups] == group_sizes


def test_dropout_off_in_frozen_blocks_after_model_train(toy_encoder):
    model = toy_encoder
    freezer = Freezer(model.layerlock_units())
    freezer.apply(2, stem=True)
    model.train()  # a host re-enabling train mode must not switch dropout back on in frozen blocks
    x = torch.randn(3, 6, 8)
    out = model.forward_prefix(x, [2])[2]
    again = model.forward_prefix(x, [2])[2]
    assert torch.equal(out, again), "frozen blocks must be deterministic (dropout off)"
    assert not model.blocks[0].training and not model.blocks[1].drop.training
    # an unfrozen block still has dropout active in train mode
    a = model.forward_prefix(x, [3])[3]
    b = model.forward_prefix(x, [3])[3]
    assert not torch.equal(a, b) and model.blocks[2].training


def test_unfreeze_refused_and_bounds(toy_encoder):
    freezer = Freezer(toy_encoder.layerlock_units())
    freezer.apply(3, stem=True)
    with pytest.raises(ValueError, match="cannot unfreeze"):
        freezer.apply(2, stem=True)
    with pytest.raises(ValueError, match="num_frozen must be in 0..4"):
        freezer.apply(5, stem=True)
    assert freezer.apply(3, stem=True) == []


def test_optimizer_built_after_freeze_gets_no_state(toy_encoder):
    ll = LayerLock(toy_encoder, LayerLockConfig(schedule=ScheduleConfig(pixel_steps=0, interval=1, max_frozen=2)))
    ll.begin_step(0)
    opt = torch.optim.AdamW(toy_encoder.parameters(), lr=1e-2, weight_decay=0.1)
    ll.attach_optimizer(opt)
    _train_steps(toy_encoder, opt, 3)
    assert all(p not in opt.state for p in ll.freezer.frozen_parameters())
