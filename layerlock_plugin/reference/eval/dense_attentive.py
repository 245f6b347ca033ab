"""The attentive depth readout (4DS style), beside the per-token ridge probe.

The ridge probe reads each token's depth from that token alone, linearly. 4DS reads dense tasks with an
attention readout: learned queries, one per output position, cross-attend to all frozen tokens, so a
token's depth can come from context (the background plane's slope is a property of the whole clip).

    z [n, N, D]  features standardised with probe-train statistics plus the fixed 3D sin-cos table
                 (exactly the attentive classifier's inputs, :func:`~.attentive.attentive_inputs`)
    depth [n, N] the mean depth of each token's tubelet, standardised with probe-train statistics

Trained with AdamW on minibatches, early-stopped on the held-out probe-train videos (``val_fraction``):
the readout overfits 512 probe videos within a few hundred steps, so how long it trains is chosen like
every other probe's regularisation, on held-out probe-train data, never on the test set.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..model.rope import sincos_pos_embed_3d
from .attentive import attentive_inputs
from .threads import single_thread

__all__ = ["AttentiveDenseReadout", "fit_attentive_dense", "attentive_depth"]


class AttentiveDenseReadout(nn.Module):
    """One query per output token position cross-attending to the frozen tokens: ``z [n, N, D] -> [n, N]``.

    Head ``h``'s logit for query ``j`` and token ``i`` is ``q_{h,j} . k_{h,i} / sqrt(d_h) + b_h(i - j)``. The
    queries are learned from the position, ``W_q e_j`` with ``e`` the fixed 3D sin-cos table of the grid;
    keys and values are projections of the tokens; ``b_h`` is a learned bias per head and relative offset
    (``(2T'-1)(2H'-1)(2W'-1)`` values, T5 / Swin style), initialised as a Gaussian locality kernel with a
    width per head (0.5, 1, 2, 4 tokens, cycling): at initialisation each head pools around the query's own
    position at its own scale, and training learns where else to look and which content to read. The
    output is linear in the attended values (output projection, then ``Linear(dim, 1)``): with all
    attention on the query's own token it is a per-token linear readout, the ridge probe's family. No
    parameter per position pair, so it has few parameters to overfit with.
    """

    def __init__(self, in_dim: int, grid: Sequence[int], heads: int = 4, dim: int = 96, seed: int = 0):
        super().__init__()
        grid = tuple(int(g) for g in grid)
        if dim % heads:
            raise ValueError(f"the attention width {dim} must be divisible by the number of heads {heads}")
        self.heads, self.dim = heads, dim
        self.register_buffer("pos", sincos_pos_embed_3d(grid, dim)[0].clone(), persistent=False)  # [N, dim]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.q = nn.Linear(dim, dim)
            self.kv = nn.Linear(in_dim, 2 * dim)
            self.proj = nn.Linear(dim, dim)
            self.out = nn.Linear(dim, 1)
        coords = torch.stack(torch.meshgrid(*[torch.arange(g) for g in grid], indexing="ij"), -1).reshape(-1, 3)
        span = [2 * g - 1 for g in grid]
        offset = coords[None] - coords[:, None] + torch.tensor(grid) - 1  # [N, N, 3], each in 0..2g-2
        self.register_buffer("offset_idx", (offset[..., 0] * span[1] + offset[..., 1]) * span[2] + offset[..., 2],
                             persistent=False)  # [N, N] index into the flattened offset table
        rel = torch.stack(torch.meshgrid(*[torch.arange(s) - (s - 1) // 2 for s in span], indexing="ij"), -1)
        dist2 = rel.reshape(-1, 3).pow(2).sum(-1).float()  # squared grid distance of every offset
        widths = torch.tensor([(0.5, 1.0, 2.0, 4.0)[h % 4] for h in range(heads)])
        self.bias = nn.Parameter(-dist2[None] / (2 * widths[:, None] ** 2))  # [heads, prod(span)]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        n, num, _ = z.shape
        h, dh = self.heads, self.dim // self.heads
        q = self.q(self.pos).view(1, num, h, dh).transpose(1, 2)  # [1, h, N, dh]
        k, v = self.kv(z).view(n, num, 2, h, dh).permute(2, 0, 3, 1, 4)  # [n, h, N, dh] each
        bias = self.bias[:, self.offset_idx].unsqueeze(0)  # [1, h, N, N], added to the logits
        y = F.scaled_dot_product_attention(q.expand(n, -1, -1, -1), k, v, attn_mask=bias)
        y = self.proj(y.transpose(1, 2).reshape(n, num, self.dim))
        return self.out(y).squeeze(-1)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: the weight matrices decay, biases and the position-bias table do not."""
        decay = [p for name, p in self.named_parameters() if p.dim() >= 2 and name != "bias"]
        rest = [p for name, p in self.named_parameters() if not (p.dim() >= 2 and name != "bias")]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def fit_attentive_dense(z: torch.Tensor, y: torch.Tensor, grid: Sequence[int], *, weight_decay: float = 0.05,
                        steps: int = 400, lr: float = 1e-3, batch_size: int = 128, heads: int = 4, dim: int = 96,
                        val_fraction: float = 0.2, check_every: int = 25, seed: int = 0):
    """Train an :class:`AttentiveDenseReadout` on ``z [n, N, D]`` (attentive inputs) and standardised targets
    ``y [n, N]``. A ``val_fraction`` share of the videos (drawn with ``seed``) is held out; AdamW (cosine
    decay to 0) runs on minibatches of ``batch_size`` of the others, the held-out MSE is read every
    ``check_every`` steps and the weights with the lowest one are kept. Returns ``(predict, best_step)``.

    Minibatches, not the full batch: the key/value projections of every token dominate the cost
    (``n N D dim`` per step). One intra-op thread, deterministic for a given seed."""
    model = AttentiveDenseReadout(z.shape[-1], grid, heads, dim, seed)
    opt = torch.optim.AdamW(model.param_groups(weight_decay), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1.0 + math.cos(math.pi * i / steps)))
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(z), generator=g)
    n_val = max(1, round(val_fraction * len(z)))
    val_idx, fit_idx = perm[:n_val], perm[n_val:]
    best, best_step, best_state = math.inf, 0, copy.deepcopy(model.state_dict())
    with single_thread():
        for step in range(1, steps + 1):
            idx = fit_idx[torch.randint(0, len(fit_idx), (min(batch_size, len(fit_idx)),), generator=g)]
            loss = F.mse_loss(model(z[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % check_every == 0 or step == steps:
                with torch.no_grad():
                    held = F.mse_loss(model(z[val_idx]), y[val_idx]).item()
                if held < best:
                    best, best_step, best_state = held, step, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    model.requires_grad_(False)

    def predict(zq: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), single_thread():
            return model(zq)

    return predict, best_step


def attentive_depth(f_tr: torch.Tensor, d_tr: torch.Tensor, f_te: torch.Tensor, d_te: torch.Tensor,
                    grid: Sequence[int], cfg) -> dict[str, float]:
    """The attentive depth probe on normalised features ``[n, N, D]`` and token depths ``[n, N]`` with the
    :class:`~.config.ProbeConfig` ``cfg``: ``dense_attentive_r2``, ``dense_attentive_rmse`` (test videos,
    depth units) and ``dense_attentive_steps`` (the early-stopping step)."""
    z_tr, z_te = attentive_inputs(f_tr, grid), attentive_inputs(f_te, grid)
    mean, std = d_tr.float().mean(), d_tr.float().std().clamp_min(1e-6)
    predict, best_step = fit_attentive_dense(
        z_tr, (d_tr.float() - mean) / std, grid, weight_decay=cfg.dense_weight_decay, steps=cfg.dense_steps,
        lr=cfg.dense_lr, batch_size=cfg.dense_batch_size, heads=cfg.attn_heads, dim=cfg.attn_dim,
        val_fraction=cfg.val_fraction, seed=cfg.seed)
    pred = predict(z_te).double() * std + mean
    target = d_te.double()
    sse = (pred - target).pow(2).sum().item()
    sst = (target - target.mean()).pow(2).sum().item()
    return {"dense_attentive_r2": 1.0 - sse / sst if sst > 0 else 0.0,
            "dense_attentive_rmse": math.sqrt(sse / target.numel()), "dense_attentive_steps": float(best_step)}
