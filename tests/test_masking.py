"""Token masks: shapes, partition, order, determinism, tube structure, format conversion, errors."""

from __future__ import annotations

import pytest
import torch

from layerlock_plugin.masking import (
    indices_to_mask,
    mask_to_indices,
    num_masked,
    random_masking,
    subsample_indices,
    tube_masking,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_partition(vis: torch.Tensor, msk: torch.Tensor, n: int) -> None:
    both = torch.cat([vis, msk], dim=1).sort(dim=1).values
    assert torch.equal(both, torch.arange(n).expand_as(both))  # disjoint and covering
    for idx in (vis, msk):
        assert idx.dtype == torch.long
        assert torch.equal(idx, idx.sort(dim=1).values)  # sorted ascending


@pytest.mark.parametrize("n, ratio, m", [(64, 0.95, 61), (10, 0.5, 5), (10, 0.25, 3), (1568, 0.9, 1411)])
def test_random_masking_shapes_partition_sorted(n, ratio, m):
    vis, msk = random_masking(4, n, ratio, generator=gen())
    assert num_masked(n, ratio) == m
    assert vis.shape == (4, n - m) and msk.shape == (4, m)
    assert_partition(vis, msk, n)


def test_random_masking_is_seeded_and_per_sample():
    a = random_masking(8, 50, 0.6, generator=gen(1))
    b = random_masking(8, 50, 0.6, generator=gen(1))
    c = random_masking(8, 50, 0.6, generator=gen(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    assert len({tuple(r.tolist()) for r in a[1]}) > 1  # samples get different masks


def test_tube_masking_same_spatial_mask_at_every_time():
    t, h, w = 4, 3, 5
    vis, msk = tube_masking(3, (t, h, w), 0.6, generator=gen())
    assert msk.shape == (3, t * num_masked(h * w, 0.6))
    assert_partition(vis, msk, t * h * w)
    mask = indices_to_mask(msk, t * h * w).view(3, t, h * w)
    assert torch.equal(mask, mask[:, :1].expand_as(mask))
    assert not torch.equal(mask[0], mask[1]) or not torch.equal(mask[1], mask[2])


def test_mask_indices_roundtrip():
    vis, msk = random_masking(5, 40, 0.75, generator=gen())
    mask = indices_to_mask(msk, 40)
    assert mask.dtype == torch.bool and mask.shape == (5, 40)
    assert mask.sum(1).tolist() == [30] * 5
    assert torch.equal(mask_to_indices(mask), msk)
    assert torch.equal(mask_to_indices(~mask), vis)


def test_subsample_indices():
    _, msk = random_masking(4, 100, 0.9, generator=gen())
    sub = subsample_indices(msk, 0.1, generator=gen(3))
    assert sub.shape == (4, 9)
    assert torch.equal(sub, sub.sort(1).values)
    assert all(set(s.tolist()) <= set(m.tolist()) for s, m in zip(sub, msk))
    assert torch.equal(sub, subsample_indices(msk, 0.1, generator=gen(3)))
    assert subsample_indices(msk, 1e-6).shape == (4, 1)  # at least one
    assert torch.equal(subsample_indices(msk, 1.0), msk)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: random_masking(2, 10, 0.0), "mask_ratio"),
        (lambda: random_masking(2, 10, 1.0), "mask_ratio"),
        (lambda: random_masking(2, 10, 0.99), "at least one"),
        (lambda: random_masking(2, 10, 0.01), "at least one"),
        (lambda: random_masking(0, 10, 0.5), "batch_size"),
        (lambda: tube_masking(2, (2, 3), 0.5), "grid"),
        (lambda: indices_to_mask(torch.tensor([[0, 10]]), 10), "0..9"),
        (lambda: mask_to_indices(torch.tensor([[True, False], [True, True]])), "same number"),
        (lambda: mask_to_indices(torch.ones(2, 3)), "bool"),
        (lambda: subsample_indices(torch.arange(4).view(1, 4), 0.0), "fraction"),
    ],
)
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
