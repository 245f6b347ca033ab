"""Pixel targets follow VideoMAE's per-patch normalisation: each colour channel of a patch separately."""

import torch
from einops import rearrange

from layerlock_plugin.targets import patchify, pixel_targets


def _per_channel(patches: torch.Tensor, channels: int) -> torch.Tensor:
    """``[B, N, P]`` in ``(... c)`` layout -> ``[B, N, P / C, C]``."""
    return patches.reshape(*patches.shape[:-1], -1, channels)


def test_video_targets_are_normalised_per_colour_channel_within_the_patch():
    g = torch.Generator().manual_seed(0)
    # channels with very different offsets and scales: a joint normalisation leaves each one biased
    video = torch.rand(2, 3, 4, 8, 8, generator=g) * torch.tensor([1.0, 5.0, 0.1]).view(1, 3, 1, 1, 1)
    video = video + torch.tensor([0.0, 2.0, -1.0]).view(1, 3, 1, 1, 1)
    tubelet = (2, 4, 4)
    t = _per_channel(pixel_targets(video, tubelet), 3)  # [B, N, 32, 3]
    torch.testing.assert_close(t.mean(dim=-2), torch.zeros(2, 8, 3), atol=1e-4, rtol=0)
    torch.testing.assert_close(t.std(dim=-2, unbiased=True), torch.ones(2, 8, 3), atol=1e-3, rtol=0)
    # VideoMAE's own formula on its own layout: '(t p0) (h p1) (w p2) -> (t h w) (p0 p1 p2) c'
    sq = rearrange(video, "b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2) c", p0=2, p1=4, p2=4)
    want = (sq - sq.mean(dim=-2, keepdim=True)) / (sq.var(dim=-2, unbiased=True, keepdim=True).sqrt() + 1e-6)
    torch.testing.assert_close(t, want)


def test_image_targets_are_normalised_per_colour_channel_and_keep_the_layout():
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 8, 8, generator=g) * torch.tensor([1.0, 4.0, 0.5]).view(1, 3, 1, 1)
    t = pixel_targets(images, (4, 4))
    assert t.shape == patchify(images, (4, 4)).shape == (2, 4, 48)
    c = _per_channel(t, 3)
    torch.testing.assert_close(c.mean(dim=-2), torch.zeros(2, 4, 3), atol=1e-4, rtol=0)
    torch.testing.assert_close(c.std(dim=-2, unbiased=True), torch.ones(2, 4, 3), atol=1e-3, rtol=0)
    # unnormalised targets are the patches themselves
    torch.testing.assert_close(pixel_targets(images, (4, 4), normalize=False), patchify(images, (4, 4)))


def test_a_single_channel_patch_is_normalised_over_all_its_pixels():
    video = torch.rand(1, 1, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    t = pixel_targets(video, (2, 4, 4))
    p = patchify(video, (2, 4, 4))
    want = (p - p.mean(-1, keepdim=True)) / (p.var(-1, unbiased=True, keepdim=True).sqrt() + 1e-6)
    torch.testing.assert_close(t, want)
