"""Attentive probes (as in V-JEPA / 4DS / LayerLock): a learned query attends over the frozen tokens.

Normalised tokens plus a fixed 3D sin-cos embedding of the token grid (:func:`attentive_inputs`; a RoPE
encoder puts no absolute position in its tokens, the probe knows the layout) -> one
``nn.MultiheadAttention(attn_dim, attn_heads, kdim=D, vdim=D)`` from a learned query token -> LayerNorm
(no affine) -> linear classifier, trained full batch with AdamW (decoupled weight decay on the query and
the weight matrices, not on biases) from a seeded initialisation.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..model.rope import sincos_pos_embed_3d
from .threads import single_thread

__all__ = ["AttentiveProbes", "attentive_inputs", "fit_attentive"]


def attentive_inputs(features: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Inputs of the attentive probes: ``[n, N, D]`` tokens ``(t h w)`` (already normalised, see
    :func:`fit_feature_norm`) plus the fixed 3D sin-cos embedding of ``grid`` (float32)."""
    grid = tuple(int(g) for g in grid)
    n, num_tokens, d = features.shape
    if num_tokens != math.prod(grid):
        raise ValueError(f"features have N = {num_tokens} tokens but grid {grid} gives {math.prod(grid)}")
    x = features.float()
    return x + sincos_pos_embed_3d(grid, d).to(x)


class AttentiveProbes(nn.Module):
    """``P`` independent attentive classifiers over the same inputs, trained in one batched pass.

    Probe ``p`` is a learned query token ``q_p [dim]``, an ``nn.MultiheadAttention(dim, heads,
    kdim=D, vdim=D)`` from that query to the inputs ``z [n, N, D]`` (see :func:`attentive_inputs`),
    then ``LayerNorm`` (no affine) and a linear classifier ``dim -> C_p``. The parameters are those
    modules' own (``self.attn[p]``, ``self.query[p]``, ``self.classifier[p]``; PyTorch's
    initialisation, queries ``N(0, 0.02^2)``), and ``forward`` returns what
    ``attn[p](q_p, z, z)`` would, but computed without materialising keys and values:

    with a single query, head h's logit for token i is ``(W_q q + b_q)_h . (W_k,h z_i + b_k,h) /
    sqrt(d_h)`` = ``u_h . z_i`` + a constant that the softmax drops, where ``u_h = W_k,h^T (W_q q +
    b_q)_h / sqrt(d_h)`` is a ``D``-vector computed from the parameters alone; and its output is
    ``W_v,h (sum_i a_hi z_i) + b_v,h``. So the attention is one
    :func:`~torch.nn.functional.scaled_dot_product_attention` call with the ``P * heads`` vectors
    ``u`` as queries and the shared inputs as keys and values, ``O(n N D P heads)`` instead of
    ``O(n N D dim P)`` for the key/value projections of every token.

    Each probe has its own parameter tensors (stacked in ``forward``) so that AdamW can give each
    its own weight decay (:meth:`param_groups`); with the summed loss their training is independent.
    Logits of classes ``>= num_classes[p]`` are -1e9 (probability 0).
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: Sequence[int],
        heads: int = 4,
        dim: int = 96,
        seed: int = 0,
    ):
        super().__init__()
        if len(num_classes) == 0 or min(num_classes) < 1:
            raise ValueError(f"num_classes must list at least one probe with >= 1 class, got {list(num_classes)}")
        if dim % heads:
            raise ValueError(f"the attention width {dim} must be divisible by the number of heads {heads}")
        self.in_dim, self.heads, self.dim = int(in_dim), int(heads), int(dim)
        self.num_classes = tuple(int(c) for c in num_classes)
        c_max = max(self.num_classes)
        self.register_buffer("class_mask", torch.stack([torch.arange(c_max) >= c for c in self.num_classes]))
        probes = range(len(self.num_classes))
        # PyTorch's own initialisation, drawn from ``seed`` without touching the caller's RNG state
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.attn = nn.ModuleList(
                [nn.MultiheadAttention(dim, heads, kdim=in_dim, vdim=in_dim, batch_first=True) for _ in probes]
            )
            self.query = nn.ParameterList([nn.Parameter(0.02 * torch.randn(dim)) for _ in probes])
            self.classifier = nn.ModuleList([nn.Linear(dim, c_max) for _ in probes])

    def _projections(self, p: int) -> tuple[torch.Tensor, ...]:
        m = self.attn[p]
        if m._qkv_same_embed_dim:
            wq, wk, wv = m.in_proj_weight.chunk(3)
        else:
            wq, wk, wv = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
        bq, _, bv = m.in_proj_bias.chunk(3)
        return wq, bq, wk, wv, bv, m.out_proj.weight, m.out_proj.bias

    def param_groups(self, weight_decay: Sequence[float]) -> list[dict[str, Any]]:
        """AdamW groups: probe ``p``'s query and weight matrices decay by ``weight_decay[p]``, biases not."""
        if len(weight_decay) != len(self.num_classes):
            raise ValueError(f"need one weight decay per probe ({len(self.num_classes)}), got {len(weight_decay)}")
        groups = []
        for p, wd in enumerate(weight_decay):
            layers = [*self.attn[p].parameters(), *self.classifier[p].parameters()]
            decay = [self.query[p]] + [t for t in layers if t.dim() >= 2]
            groups.append({"params": decay, "weight_decay": float(wd)})
            groups.append({"params": [t for t in layers if t.dim() < 2], "weight_decay": 0.0})
        return groups

    def pooled(self, z: torch.Tensor) -> torch.Tensor:
        """``z [n, N, D]`` -> the attention outputs ``[P, n, dim]`` (``attn[p](q_p, z, z)``)."""
        n, _, d = z.shape
        if d != self.in_dim:
            raise ValueError(f"inputs have width {d}, the probes were built for {self.in_dim}")
        num, h, dh = len(self.num_classes), self.heads, self.dim // self.heads
        wq, bq, wk, wv, bv, wo, bo = (torch.stack(t) for t in zip(*(self._projections(p) for p in range(num))))
        qv = torch.einsum("pij,pj->pi", wq, torch.stack(list(self.query))) + bq  # [P, dim]
        u = torch.einsum("phe,phek->phk", qv.view(num, h, dh), wk.view(num, h, dh, d)) / math.sqrt(dh)
        kv = z.unsqueeze(1)  # [n, 1, N, D]: one key/value "head" shared by all P * heads queries
        # The math kernel composes matmul + softmax, so backward skips the input gradients that the
        # fused CPU kernel computes (z needs none); it is the faster one for this single-query shape.
        ctx = sdpa_kernel(SDPBackend.MATH) if z.device.type == "cpu" else contextlib.nullcontext()
        with ctx:
            pooled = F.scaled_dot_product_attention(u.reshape(1, 1, num * h, d), kv, kv, scale=1.0)
        pooled = pooled.view(n, num, h, d)
        values = torch.einsum("nphk,phek->pnhe", pooled, wv.view(num, h, dh, d)) + bv.view(num, 1, h, dh)
        return torch.baddbmm(bo.unsqueeze(1), values.reshape(num, n, self.dim), wo.transpose(1, 2))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``z [n, N, D]`` -> logits ``[P, n, max(num_classes)]``."""
        x = F.layer_norm(self.pooled(z), (self.dim,))
        w = torch.stack([c.weight for c in self.classifier])
        b = torch.stack([c.bias for c in self.classifier])
        logits = torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))
        return logits.masked_fill(self.class_mask[:, None, :], -1e9)


def fit_attentive(
    z: torch.Tensor,
    labels: torch.Tensor,
    num_classes: Sequence[int],
    weight_decay: Sequence[float],
    *,
    steps: int = 200,
    lr: float = 3e-3,
    heads: int = 4,
    dim: int = 96,
    seed: int = 0,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Train ``P`` attentive probes on ``z [n, N, D]`` (see :func:`attentive_inputs`), probe ``p`` on
    ``labels[p]`` (``labels [P, n]``) with ``num_classes[p]`` classes and ``weight_decay[p]``.

    Full batch, ``steps`` AdamW steps, learning rate ``lr`` with cosine decay to 0, initialisation
    drawn from ``seed`` (the global RNG is left as it was). Runs on one intra-op thread: deterministic,
    and not slowed down >10x by OpenMP waits when another process shares the cores (measured here:
    ~20 ms per step on one thread, ~0.5 s on two with a busy second core). Returns
    ``predict(z) -> logits [P, n, max(num_classes)]``.
    """
    labels = labels.long()
    if labels.dim() == 1:
        labels = labels.unsqueeze(0)
    if labels.shape != (len(num_classes), z.shape[0]):
        raise ValueError(f"labels must be [P={len(num_classes)}, n={z.shape[0]}], got {tuple(labels.shape)}")
    z = z.float()
    model = AttentiveProbes(z.shape[-1], num_classes, heads, dim, seed=seed)
    opt = torch.optim.AdamW(model.param_groups(weight_decay), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1.0 + math.cos(math.pi * i / steps)))
    n = z.shape[0]
    with single_thread():
        for _ in range(steps):
            logits = model(z)
            # the sum over probes of each probe's mean cross-entropy
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") / n
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.requires_grad_(False)

    def predict(zq: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), single_thread():
            return model(zq.float())

    return predict
