"""Shared tiny fixtures. Tests use tiny models so the suite runs in minutes on 2 CPU cores."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
import torch
from torch import nn

from layerlock_plugin.encoder import EncoderUnits, FreezeUnit, check_layers

# Under pytest-xdist (README's `-n 2`) the workers already share the cores: one intra-op thread each, since
# more threads per worker only contend (and tiny models gain nothing from them).
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)
# The random-init probe baselines the runs cache (reference/eval/baseline_cache.py) go to a folder of this
# test session, inherited by every subprocess: nothing is written to the user's cache.
os.environ["LAYERLOCK_CACHE"] = tempfile.mkdtemp(prefix="layerlock-test-cache-")
atexit.register(shutil.rmtree, os.environ["LAYERLOCK_CACHE"], True)


class ToyBlock(nn.Module):
    """A residual MLP block with dropout, so train/eval mode is observable."""

    def __init__(self, dim: int, p: float = 0.5):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)
        self.drop = nn.Dropout(p)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x + self.drop(torch.tanh(self.fc(self.norm(x))))


class ToyEncoder(nn.Module):
    """Tokens ``[B, N, F] -> [B, N, D]``: a linear stem with a learned position parameter, then blocks.

    Implements the layered-encoder protocol; the last ``decoder_blocks`` blocks are not freezable.
    """

    def __init__(self, in_dim=8, dim=16, depth=5, decoder_blocks=1, tokens=6, p=0.5):
        super().__init__()
        self.stem = nn.Linear(in_dim, dim)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(ToyBlock(dim, p) for _ in range(depth))
        self.head = nn.Linear(dim, in_dim)
        self.encoder_depth = depth - decoder_blocks

    def layerlock_units(self) -> EncoderUnits:
        return EncoderUnits(
            stem=FreezeUnit("stem", (self.stem,), (self.pos,)),
            blocks=tuple(FreezeUnit(f"block_{i + 1}", (b,)) for i, b in enumerate(self.blocks[: self.encoder_depth])),
        )

    def forward_prefix(self, x, layers):
        layers = check_layers(layers, self.encoder_depth)
        h = self.stem(x) + self.pos
        out = {}
        for i, blk in enumerate(self.blocks[: layers[-1]], start=1):
            h = blk(h)
            if i in layers:
                out[i] = h
        return out

    def forward(self, x):
        h = self.stem(x) + self.pos
        for blk in self.blocks:
            h = blk(h)
        return self.head(h)


def perturbed_copy(module: nn.Module, scale: float = 0.05) -> nn.Module:
    """A frozen deep copy of ``module`` with every parameter shifted by ``scale`` x N(0, 1) (a teacher that
    differs from its student)."""
    import copy

    other = copy.deepcopy(module)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn_like(p))
            p.requires_grad_(False)
    return other


def vjepa_step(ex, adapter, encoder, predictor, optimizer, collator, seed: int) -> torch.Tensor:
    """One V-JEPA train step (the example's tiny modules, random clips seeded by ``seed``) through the adapter;
    the optimizer steps unless the guard says skip. Returns the loss."""
    torch.manual_seed(seed)
    (clips,), masks_enc, masks_pred = collator([(c,) for c in torch.rand(4, 3, ex.FRAMES, ex.CROP, ex.CROP)])
    h = adapter.targets(clips, masks_pred)
    z = predictor(encoder(clips, masks_enc), h, masks_enc, masks_pred)
    loss = sum((zi - hi).abs().mean() for zi, hi in zip(z, h)) / len(z)
    loss.backward()
    if not adapter.end_step(loss, h).skip:
        optimizer.step()
    optimizer.zero_grad()
    return loss


def stop_and_resume(main, ckpt, steps: int, stop: int) -> tuple[dict, dict, dict]:
    """An example's ``main`` uninterrupted, then stopped after ``stop`` steps (checkpoint at ``ckpt``) and
    resumed; asserts the losses and the encoder / teacher / predictor weights are bitwise those of the
    uninterrupted run. Returns ``(full, resumed, checkpoint at the stop)``."""
    full = main(["--steps", str(steps), "--quiet"])
    first = main(["--steps", str(steps), "--quiet", "--ckpt", str(ckpt), "--stop-at", str(stop)])
    mid = torch.load(ckpt, weights_only=True)
    second = main(["--steps", str(steps), "--quiet", "--ckpt", str(ckpt)])
    assert first["losses"] + second["losses"] == full["losses"]
    for key in ("encoder", "target_encoder", "predictor"):
        a, b = full[key].state_dict(), second[key].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{key} differs after resume"
    return full, second, mid


@pytest.fixture
def toy_encoder():
    torch.manual_seed(0)
    return ToyEncoder()


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (use with ``pytestmark = pytest.mark.usefixtures("one_thread")``):
    tiny models run many times faster that way on shared cores than with torch's default thread pool."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

