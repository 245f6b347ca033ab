"""Prototype of the attentive dense (depth) readout, 4DS style, beside the per-token ridge probe.

The ridge probe reads each token's depth from that token alone, linearly. 4DS reads dense tasks with an
attention readout: learned queries, one per output position, cross-attend to all frozen tokens. Here:

    z [n, N, D]  (features standardised with probe-train statistics, plus the fixed 3D sin-cos table,
                  exactly the attentive classifier's inputs)
    q [N, dim]   learned, initialised with the 3D sin-cos table of the grid at width ``dim``
    out = MultiheadAttention(dim, heads, kdim=D, vdim=D)(q, z, z)  -> LayerNorm -> Linear(dim, 1)
    depth [n, N] (the mean depth of each token's tubelet, standardised with probe-train statistics)

Trained full batch with AdamW (cosine decay to 0) on the mean squared error; the weight decay is picked
from a grid on a held-out 20% of the probe-train videos, then the readout is refitted on all of them.
Reported: R² and RMSE on the test videos (in depth units), like the ridge probe.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from layerlock_plugin.reference.eval.attentive import attentive_inputs
from layerlock_plugin.reference.eval.suite import _pick, _split
from layerlock_plugin.reference.eval.threads import single_thread as _single_thread
from layerlock_plugin.reference.model.rope import sincos_pos_embed_3d


class AttentiveDenseReadout(nn.Module):
    """One query per output token position cross-attending to the frozen tokens: ``z [n, N, D] -> [n, N]``.

    Head ``h``'s logit for query ``j`` and token ``i`` is ``q_{h,j} . k_{h,i} / sqrt(d_h) + b_h(i - j)``. The
    queries are learned from the position, ``W_q e_j`` with ``e`` the fixed 3D sin-cos table of the grid;
    keys and values are projections of the tokens; ``b_h`` is a learned bias per head and relative offset
    (``(2T'-1)(2H'-1)(2W'-1)`` values, T5 / Swin style), initialised as a Gaussian locality kernel with a width
    per head (0.5, 1, 2, 4 tokens, cycling): at initialisation each head pools around the query's own
    position at its own scale, and training learns where else to look and which content to read. The
    output is linear in the attended values (``Linear(dim, 1)`` after the output projection): with all
    attention on the query's own token it is a per-token linear readout, the ridge probe's family. Few
    parameters (no table per position pair), so 512 probe videos do not overfit it."""

    def __init__(self, in_dim: int, grid: Sequence[int], heads: int = 4, dim: int = 96, seed: int = 0):
        super().__init__()
        grid = tuple(int(g) for g in grid)
        self.heads, self.dim = heads, dim
        self.register_buffer("pos", sincos_pos_embed_3d(grid, dim)[0].clone(), persistent=False)  # [N, dim]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.q = nn.Linear(dim, dim)
            self.kv = nn.Linear(in_dim, 2 * dim)
            self.proj = nn.Linear(dim, dim)
            self.out = nn.Linear(dim, 1)
        coords = torch.stack(torch.meshgrid(*[torch.arange(g) for g in grid], indexing="ij"), -1).reshape(-1, 3)
        offset = coords[None] - coords[:, None] + torch.tensor(grid) - 1  # [N, N, 3] in 0..2g-2
        span = [2 * g - 1 for g in grid]
        self.register_buffer("offset_idx", (offset[..., 0] * span[1] + offset[..., 1]) * span[2] + offset[..., 2],
                             persistent=False)  # [N, N] index into the flattened offset table
        rel = torch.stack(torch.meshgrid(*[torch.arange(s) - (s - 1) // 2 for s in span], indexing="ij"), -1)
        dist2 = rel.reshape(-1, 3).pow(2).sum(-1).float()  # [prod(span)]
        widths = torch.tensor([(0.5, 1.0, 2.0, 4.0)[h % 4] for h in range(heads)])
        self.bias = nn.Parameter(-dist2[None] / (2 * widths[:, None] ** 2))  # [heads, prod(span)]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        n, num, _ = z.shape
        h, dh = self.heads, self.dim // self.heads
        q = self.q(self.pos).view(1, num, h, dh).transpose(1, 2)  # [1, h, N, dh]
        k, v = self.kv(z).view(n, num, 2, h, dh).permute(2, 0, 3, 1, 4)  # [n, h, N, dh] each
        mask = self.bias[:, self.offset_idx].unsqueeze(0)  # [1, h, N, N]
        y = F.scaled_dot_product_attention(q.expand(n, -1, -1, -1), k, v, attn_mask=mask)
        y = self.proj(y.transpose(1, 2).reshape(n, num, self.dim))
        return self.out(y).squeeze(-1)

    def param_groups(self, weight_decay: float) -> list[dict]:
        decay = [p for n, p in self.named_parameters() if p.dim() >= 2 and n != "bias"]
        rest = [p for n, p in self.named_parameters() if not (p.dim() >= 2 and n != "bias")]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def fit_attentive_dense(z: torch.Tensor, y: torch.Tensor, grid: Sequence[int], weight_decay: float, *,
                        steps: int = 400, lr: float = 1e-3, heads: int = 4, dim: int = 96, seed: int = 0,
                        batch_size: int = 128, val_fraction: float = 0.2, check_every: int = 25):
    """Train on ``z [n, N, D]`` (attentive inputs) and standardised targets ``y [n, N]`` with AdamW on
    minibatches of ``batch_size`` videos (drawn with ``seed``), early-stopped on held-out probe-train videos:
    a ``val_fraction`` share of the videos is held out, the held-out MSE is read every ``check_every``
    steps, and the weights with the lowest one are kept. Returns ``(predict, best_step)``.

    Minibatches, not the full batch: the key/value projections of every token dominate the cost
    (``n N D dim`` per step). Early stopping: the readout overfits 512 probe videos within a few hundred
    steps (held-out R² falls as training goes on), so how long it trains is chosen like every other
    probe's regularisation, on held-out probe-train data."""
    import copy

    model = AttentiveDenseReadout(z.shape[-1], grid, heads, dim, seed)
    opt = torch.optim.AdamW(model.param_groups(weight_decay), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1.0 + math.cos(math.pi * i / steps)))
    fit_idx, val_idx = _split(len(z), val_fraction, seed)
    g = torch.Generator().manual_seed(seed)
    best, best_step, best_state = math.inf, 0, copy.deepcopy(model.state_dict())
    with _single_thread():
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
        with torch.no_grad(), _single_thread():
            return model(zq)

    return predict, best_step


def attentive_depth(f_tr: torch.Tensor, d_tr: torch.Tensor, f_te: torch.Tensor, d_te: torch.Tensor,
                    grid: Sequence[int], *, weight_decay: float = 0.05, steps: int = 400, lr: float = 1e-3,
                    val_fraction: float = 0.2, seed: int = 0) -> dict[str, float]:
    """The attentive depth probe on normalised features ``[n, N, D]`` and token depths ``[n, N]``:
    ``{'dense_attentive_r2', 'dense_attentive_rmse', 'dense_attentive_steps'}`` on the test videos."""
    z_tr, z_te = attentive_inputs(f_tr, grid), attentive_inputs(f_te, grid)
    mean, std = d_tr.float().mean(), d_tr.float().std().clamp_min(1e-6)
    predict, best_step = fit_attentive_dense(z_tr, (d_tr.float() - mean) / std, grid, weight_decay, steps=steps,
                                             lr=lr, seed=seed, val_fraction=val_fraction)
    pred = predict(z_te).double() * std + mean
    target = d_te.double()
    sse = (pred - target).pow(2).sum().item()
    sst = (target - target.mean()).pow(2).sum().item()
    return {"dense_attentive_r2": 1.0 - sse / sst, "dense_attentive_rmse": math.sqrt(sse / target.numel()),
            "dense_attentive_steps": float(best_step)}


def probe_suite(tr: dict[str, torch.Tensor], te: dict[str, torch.Tensor], grid: Sequence[int], cfg,
                num_classes: dict[str, int], tasks: Sequence[str], dense_attentive: bool = True) -> dict[str, float]:
    """Every probe of ``layerlock_plugin.reference.probes`` on any classification ``tasks`` (not only motion
    and appearance), plus the attentive depth readout. ``tr``/``te`` as ``extract_features`` returns them."""
    from layerlock_plugin.reference.eval.features import fit_feature_norm, pool_features
    from layerlock_plugin.reference.eval.suite import _attentive_classification, _chance, _dense, _linear_or_knn

    norm = fit_feature_norm(tr["features"], cfg.normalize, cfg.whiten_eps)
    f_tr, f_te = norm(tr["features"]), norm(te["features"])
    out: dict[str, float] = {}
    ys_tr = {t: tr[t].reshape(-1).long() for t in tasks}
    ys_te = {t: te[t].reshape(-1).long() for t in tasks}
    for t in tasks:
        out[f"{t}_chance_uniform"], out[f"{t}_chance_majority"] = _chance(ys_te[t], num_classes[t])
    x_tr, x_te = pool_features(f_tr, f_te, grid, cfg.pooling, cfg.pca_dim)
    for kind in ("linear", "knn"):
        if kind in cfg.kinds:
            for t in tasks:
                out[f"{t}_{kind}_acc"] = _linear_or_knn(kind, x_tr, ys_tr[t], x_te, ys_te[t], num_classes[t], cfg)[0]
    if "attentive" in cfg.kinds:
        res = _attentive_classification(attentive_inputs(f_tr, grid), ys_tr, attentive_inputs(f_te, grid), ys_te,
                                        {t: num_classes[t] for t in tasks}, cfg)
        for t, (acc, _) in res.items():
            out[f"{t}_attentive_acc"] = acc
    for t in tasks:
        out[f"{t}_acc"] = out[f"{t}_{cfg.kind}_acc"]
    if "depth_tokens" in tr:
        rmse, r2, _ = _dense(f_tr, tr["depth_tokens"], f_te, te["depth_tokens"], cfg)
        out["dense_r2"], out["dense_rmse"] = r2, rmse
        if dense_attentive:
            out.update(attentive_depth(f_tr, tr["depth_tokens"], f_te, te["depth_tokens"], grid, seed=cfg.seed))
    return out
