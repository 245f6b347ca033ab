"""Frozen-feature probes: motion and appearance classification, dense per-patch depth regression.

The encoder is frozen; only a small read-out is trained on its tokens ``[n, N, D]`` (order ``(t h w)``
on the grid ``(T', H', W')``).

* **Classification** (``motion``, ``appearance``), ``ProbeConfig.kind``:

  - ``'attentive'`` (as in V-JEPA / 4DS / LayerLock): tokens -> LayerNorm (no affine) -> plus a
    fixed 3D sin-cos embedding of the token grid (:func:`~.rope.sincos_pos_embed_3d`; a RoPE encoder
    puts no absolute position in its tokens, the probe knows the layout) -> one
    ``nn.MultiheadAttention(attn_dim, attn_heads, kdim=D, vdim=D)`` from a learned query token ->
    LayerNorm (no affine) -> linear classifier. Trained full batch with AdamW for ``steps`` steps
    (``lr``, cosine decay to 0) from a seeded initialisation. See :class:`AttentiveProbes` for how
    the single-query attention runs on :func:`torch.nn.functional.scaled_dot_product_attention`
    without computing keys and values for every token.
  - ``'linear'``: a multinomial logistic regression (L-BFGS, full batch) on a fixed pooling of the
    tokens, standardised with the probe-train statistics. ``pooling='tokens_pca'``: every token
    projected on the top-``pca_dim`` principal directions, all tokens concatenated (a weight per
    token position); ``'temporal_slots'``: spatial mean per temporal slot, slots concatenated.

* **Dense** (``depth``): the target of each token is the mean depth over the pixels of its tubelet
  (``depth [T, H, W]`` average-pooled by the tubelet to the token grid). The probe is one linear
  ridge regression ``D -> 1`` shared by all tokens, solved in closed form on standardised features
  (whatever ``kind`` is).

Regularisation (``l2`` for the logistic and ridge probes, ``weight_decay`` for the attentive ones) is
a single value or a small grid. With a grid, each probe picks its value on a **held-out split of the
probe-train videos** (``val_fraction`` of them, drawn with ``seed``; held-out accuracy, held-out
cross-entropy breaking ties, ties going to the stronger penalty), then refits on all probe-train
videos with that value. The test set is only ever used for the final score. The chosen values are
reported as ``<task>_l2`` (linear, dense) or ``<task>_weight_decay`` (attentive).

Objectives (``W`` excludes the bias, which is never penalised)::

    logistic:  mean_i CE(x_i W + b, y_i) + l2 / 2 * ||W||^2
    ridge:     mean_j (x_j w + b - y_j)^2 + l2 * ||w||^2       (j runs over every token of every video)
    attentive: mean_i CE(probe(tokens_i), y_i), AdamW with decoupled weight decay on the query and
               the weight matrices (not on biases)

Everything is deterministic for a given seed (zero or seeded initialisation, seeded split, float64
linear solves, full-batch attentive training on one intra-op thread).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, Dataset, Subset

from .. import _validate as v
from .._config import from_dict
from ..errors import ConfigError
from .rope import sincos_pos_embed_3d

__all__ = [
    "ProbeConfig",
    "extract_features",
    "token_depth_targets",
    "pool_temporal_slots",
    "pool_tokens_pca",
    "AttentiveProbes",
    "attentive_inputs",
    "fit_attentive",
    "fit_logistic",
    "fit_ridge",
    "run_probes",
]

Encode = Callable[[torch.Tensor], torch.Tensor]
CLASS_TASKS = ("motion", "appearance")


def _grid_field(field: str, value: Any) -> float | tuple[float, ...]:
    """One non-negative number, or a non-empty list of them (a one-element list becomes the number)."""
    if isinstance(value, (list, tuple)):
        if len(value) == 0:
            raise ConfigError(field, "the grid must hold at least one value, got an empty list")
        grid = tuple(v.non_negative_float(field, x) for x in value)
        return grid if len(grid) > 1 else grid[0]
    return v.non_negative_float(field, value)


@dataclass(frozen=True)
class ProbeConfig:
    """Config of the frozen-feature probes (fields are validated as ``probe.<field>``).

    ``train_videos`` / ``test_videos``: how many videos (the first ones of each dataset) are encoded.
    ``batch_size``: encoding batch size. ``val_fraction`` / ``seed``: the held-out split of the
    probe-train videos on which every grid below is searched (never the test set).

    ``kind``: classification read-out, ``'attentive'`` (default) or ``'linear'``.

    * attentive: ``steps`` full-batch AdamW steps at peak learning rate ``lr`` (cosine decay to 0),
      ``weight_decay`` one value or a grid, ``attn_heads`` heads, ``attn_dim`` width after the
      value/output projection.
    * linear: ``pooling`` (``'tokens_pca'`` with ``pca_dim`` directions, or ``'temporal_slots'``),
      ``max_iter`` L-BFGS iterations, ``l2`` one value or a grid.

    ``l2`` also regularises the dense depth ridge probe (used by both kinds).
    """

    train_videos: int = 512
    test_videos: int = 512
    batch_size: int = 64
    max_iter: int = 100
    l2: float | tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1)
    val_fraction: float = 0.2
    seed: int = 0
    pooling: str = "tokens_pca"
    pca_dim: int = 16
    kind: str = "attentive"
    steps: int = 200
    lr: float = 3e-3
    weight_decay: float | tuple[float, ...] = (0.1, 1.0, 10.0)
    attn_heads: int = 4
    attn_dim: int = 96

    KINDS: ClassVar[tuple[str, ...]] = ("attentive", "linear")

    def __post_init__(self) -> None:
        v.positive_int("probe.train_videos", self.train_videos)
        v.positive_int("probe.test_videos", self.test_videos)
        v.positive_int("probe.batch_size", self.batch_size)
        v.positive_int("probe.max_iter", self.max_iter)
        v.non_negative_int("probe.seed", self.seed)
        v.one_of("probe.pooling", self.pooling, ("tokens_pca", "temporal_slots"))
        v.positive_int("probe.pca_dim", self.pca_dim)
        vf = self.val_fraction
        if isinstance(vf, bool) or not isinstance(vf, (int, float)) or not 0.0 < float(vf) < 1.0:
            raise ConfigError("probe.val_fraction", f"must be a number in (0, 1), got {vf!r}")
        object.__setattr__(self, "val_fraction", float(vf))
        object.__setattr__(self, "l2", _grid_field("probe.l2", self.l2))
        v.one_of("probe.kind", self.kind, self.KINDS)
        v.positive_int("probe.steps", self.steps)
        object.__setattr__(self, "lr", v.positive_float("probe.lr", self.lr))
        object.__setattr__(self, "weight_decay", _grid_field("probe.weight_decay", self.weight_decay))
        v.positive_int("probe.attn_heads", self.attn_heads)
        v.positive_int("probe.attn_dim", self.attn_dim)
        if self.attn_dim % self.attn_heads:
            raise ConfigError(
                "probe.attn_dim", f"must be divisible by probe.attn_heads={self.attn_heads}, got {self.attn_dim}"
            )

    @property
    def l2_grid(self) -> tuple[float, ...]:
        return self.l2 if isinstance(self.l2, tuple) else (self.l2,)

    @property
    def weight_decay_grid(self) -> tuple[float, ...]:
        return self.weight_decay if isinstance(self.weight_decay, tuple) else (self.weight_decay,)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> ProbeConfig:
        return from_dict(cls, d, "probe")


# ---------------------------------------------------------------------------------------------------
# Features and targets


def token_depth_targets(depth: torch.Tensor, tubelet: Sequence[int]) -> torch.Tensor:
    """Mean depth over each tubelet's pixels: ``[n, T, H, W] -> [n, N]``, token order ``(t h w)``."""
    if depth.dim() == 3:
        depth = depth.unsqueeze(0)
    if depth.dim() != 4:
        raise ValueError(f"depth must be [n, T, H, W], got shape {tuple(depth.shape)}")
    pt, ph, pw = (int(x) for x in tubelet)
    n, t, h, w = depth.shape
    if t % pt or h % ph or w % pw:
        raise ValueError(f"depth [T, H, W] = {(t, h, w)} is not divisible by the tubelet {(pt, ph, pw)}")
    pooled = F.avg_pool3d(depth.unsqueeze(1).float(), kernel_size=(pt, ph, pw), stride=(pt, ph, pw))
    return pooled.reshape(n, -1)


def extract_features(
    encode: Encode,
    dataset: Dataset,
    num: int,
    batch_size: int,
    *,
    tubelet: Sequence[int] | None = None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Encode the first ``num`` videos of ``dataset`` (fewer if it is shorter) under ``torch.no_grad()``.

    Returns ``features`` float32 ``[n, N, D]`` and every other tensor field of the items stacked
    (``motion [n]``, ``appearance [n]``, ``depth [n, T, H, W]``). With ``tubelet``, ``depth`` is
    replaced by ``depth_tokens [n, N]`` (see :func:`token_depth_targets`) so full-resolution depth
    maps are never kept in memory.
    """
    n = min(int(num), len(dataset))  # type: ignore[arg-type]
    if n <= 0:
        raise ValueError("extract_features: the dataset is empty (or num <= 0)")
    loader = DataLoader(Subset(dataset, range(n)), batch_size=int(batch_size), shuffle=False, num_workers=0)
    it: Any = loader
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(loader, desc="encode", unit="batch")
    feats: list[torch.Tensor] = []
    fields: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for batch in it:
            tokens = encode(batch["video"])
            if tokens.dim() != 3:
                raise ValueError(f"encode must return tokens [B, N, D], got shape {tuple(tokens.shape)}")
            feats.append(tokens.detach().float().cpu())
            for key, val in batch.items():
                if key == "video" or not isinstance(val, torch.Tensor):
                    continue
                if key == "depth" and tubelet is not None:
                    fields.setdefault("depth_tokens", []).append(token_depth_targets(val, tubelet))
                else:
                    fields.setdefault(key, []).append(val.cpu())
    out = {"features": torch.cat(feats)}
    out.update({k: torch.cat(vs) for k, vs in fields.items()})
    return out


def pool_temporal_slots(features: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """``[n, N, D]`` tokens ``(t h w)`` -> ``[n, T' * D]``: spatial mean per temporal slot, concatenated."""
    t, h, w = (int(x) for x in grid)
    n, num_tokens, d = features.shape
    if num_tokens != t * h * w:
        raise ValueError(f"features have N = {num_tokens} tokens but grid {tuple(grid)} gives {t * h * w}")
    return features.reshape(n, t, h * w, d).mean(dim=2).reshape(n, t * d)


def pool_tokens_pca(train: torch.Tensor, test: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n, N, D]`` -> ``[n, N * k]``: every token projected on the top-``k`` principal directions of
    the probe-train tokens, all tokens concatenated in ``(t h w)`` order.

    Still a linear read-out of the frozen tokens, but one with a weight per token *position*: a
    RoPE encoder carries no absolute position in its token features, so any pooling over space
    (like :func:`pool_temporal_slots`) cannot tell where, and hence which way, something moved.
    """
    flat = train.reshape(-1, train.shape[-1]).double()
    mean = flat.mean(0)
    k = min(k, flat.shape[1])
    # principal directions from the D x D covariance (cheap: D is the model width)
    _, vecs = torch.linalg.eigh(torch.cov(flat.T))
    basis = vecs[:, -k:].flip(-1)

    def project(x: torch.Tensor) -> torch.Tensor:
        return ((x.double() - mean) @ basis).reshape(x.shape[0], -1).float()

    return project(train), project(test)


# ---------------------------------------------------------------------------------------------------
# Linear probes


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """Run tiny, latency-bound solves on one intra-op thread (restored afterwards).

    The logistic probes are a few hundred small matmuls; with several OpenMP threads they are
    dominated by thread wake-ups and slow down by >10x when another process shares the cores.
    """
    before = torch.get_num_threads()
    if before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before > 1:
            torch.set_num_threads(before)


def _standardiser(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False).clamp_min(1e-6)
    return mean, std


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, max_iter: int = 100
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Multinomial logistic regression (L-BFGS, full batch); returns ``predict(x) -> logits``."""
    x = x.double()
    mean, std = _standardiser(x)
    xs = (x - mean) / std
    y = y.long()
    weight = torch.zeros(xs.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    onehot = F.one_hot(y, num_classes).to(torch.float64)
    n = xs.shape[0]

    def closure() -> torch.Tensor:
        # loss and gradient in closed form: cheaper than autograd for this tiny, latency-bound problem
        w, b = weight.detach(), bias.detach()
        logp = torch.log_softmax(xs @ w + b, dim=1)
        loss = -(onehot * logp).sum() / n + 0.5 * l2 * w.pow(2).sum()
        g = (logp.exp() - onehot) / n
        weight.grad = xs.T @ g + l2 * w
        bias.grad = g.sum(0)
        return loss

    with _single_thread():
        opt.step(closure)
    w, b = weight.detach(), bias.detach()

    def predict(xq: torch.Tensor) -> torch.Tensor:
        return ((xq.double() - mean) / std) @ w + b

    return predict


def fit_ridge(x: torch.Tensor, y: torch.Tensor, l2: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Ridge regression ``[M, D] -> [M]`` in closed form on standardised features; returns ``predict``."""
    x = x.double()
    y = y.double()
    mean, std = _standardiser(x)
    xs = (x - mean) / std
    y_mean = y.mean()
    m, d = xs.shape
    gram = xs.T @ xs / m + l2 * torch.eye(d, dtype=torch.float64)
    rhs = xs.T @ (y - y_mean) / m
    # A tiny jitter keeps l2 = 0 solvable when a feature is constant (its standardised column is 0).
    w = torch.linalg.solve(gram + 1e-10 * torch.eye(d, dtype=torch.float64), rhs)

    def predict(xq: torch.Tensor) -> torch.Tensor:
        return ((xq.double() - mean) / std) @ w + y_mean

    return predict


# ---------------------------------------------------------------------------------------------------
# Attentive probes


def attentive_inputs(features: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Inputs of the attentive probes: ``[n, N, D]`` tokens ``(t h w)`` -> LayerNorm over ``D`` (no
    affine) plus the fixed 3D sin-cos embedding of ``grid`` (float32)."""
    grid = tuple(int(g) for g in grid)
    n, num_tokens, d = features.shape
    if num_tokens != math.prod(grid):
        raise ValueError(f"features have N = {num_tokens} tokens but grid {grid} gives {math.prod(grid)}")
    x = F.layer_norm(features.float(), (d,))
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
    with _single_thread():
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
        with torch.no_grad(), _single_thread():
            return model(zq.float())

    return predict


def _split(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    n_val = max(1, int(round(val_fraction * n)))
    return perm[n_val:], perm[:n_val]


def _pick(scores: dict[float, float]) -> float:
    """The value with the best held-out score; ties go to the larger (stronger) penalty."""
    best_value, best = None, -math.inf
    for value in sorted(scores, reverse=True):
        if scores[value] > best + 1e-12:
            best_value, best = value, scores[value]
    assert best_value is not None
    return best_value


def _small_grid_choice(grid: tuple[float, ...], n: int) -> float | None:
    """The value to use without a search (one value, or too few videos to hold some out), else None."""
    if len(grid) == 1:
        return grid[0]
    if n < 10:  # too few probe-train videos to hold some out: take the middle of the grid
        return sorted(grid)[(len(grid) - 1) // 2]
    return None


def _select_l2(
    grid: tuple[float, ...], n: int, cfg: ProbeConfig, score: Callable[[torch.Tensor, torch.Tensor, float], float]
) -> float:
    """Pick the grid value with the best held-out score (ties go to the larger penalty)."""
    fixed = _small_grid_choice(grid, n)
    if fixed is not None:
        return fixed
    fit_idx, val_idx = _split(n, cfg.val_fraction, cfg.seed)
    return _pick({l2: score(fit_idx, val_idx, l2) for l2 in grid})


def _held_out_score(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Held-out accuracy; held-out cross-entropy breaks ties between equally accurate values."""
    y = y.long()
    acc = (logits.argmax(1) == y).double().mean().item()
    return acc - 1e-6 * F.cross_entropy(logits.double(), y).item()


def _classification(
    x_tr: torch.Tensor, y_tr: torch.Tensor, x_te: torch.Tensor, y_te: torch.Tensor, cfg: ProbeConfig
) -> tuple[float, float, float]:
    """Returns (test accuracy, chance = majority-class frequency on test, chosen l2)."""
    num_classes = int(max(int(y_tr.max()), int(y_te.max()))) + 1

    def score(fit_idx: torch.Tensor, val_idx: torch.Tensor, l2: float) -> float:
        predict = fit_logistic(x_tr[fit_idx], y_tr[fit_idx], num_classes, l2, cfg.max_iter)
        return _held_out_score(predict(x_tr[val_idx]), y_tr[val_idx])

    l2 = _select_l2(cfg.l2_grid, len(y_tr), cfg, score)
    predict = fit_logistic(x_tr, y_tr, num_classes, l2, cfg.max_iter)
    acc = (predict(x_te).argmax(1) == y_te).double().mean().item()
    chance = torch.bincount(y_te.long(), minlength=num_classes).max().item() / len(y_te)
    return acc, chance, l2


def _attentive_classification(
    z_tr: torch.Tensor,
    ys_tr: dict[str, torch.Tensor],
    z_te: torch.Tensor,
    ys_te: dict[str, torch.Tensor],
    cfg: ProbeConfig,
) -> dict[str, tuple[float, float, float]]:
    """Attentive probes for every task in ``ys_tr`` (labels ``[n]``, trained together, independently).

    Returns ``{task: (test accuracy, chance = majority-class frequency on test, chosen weight decay)}``.
    With a weight-decay grid, one batched run on the fit part of the probe-train split trains a probe
    per (task, value) and each task keeps the value with the best held-out score.
    """
    tasks = list(ys_tr)
    classes = {t: int(max(int(ys_tr[t].max()), int(ys_te[t].max()))) + 1 for t in tasks}
    kw = dict(steps=cfg.steps, lr=cfg.lr, heads=cfg.attn_heads, dim=cfg.attn_dim, seed=cfg.seed)
    grid = cfg.weight_decay_grid
    n = len(z_tr)
    fixed = _small_grid_choice(grid, n)
    if fixed is not None:
        chosen = {t: fixed for t in tasks}
    else:
        fit_idx, val_idx = _split(n, cfg.val_fraction, cfg.seed)
        pairs = [(t, wd) for t in tasks for wd in grid]
        predict = fit_attentive(
            z_tr[fit_idx],
            torch.stack([ys_tr[t][fit_idx] for t, _ in pairs]),
            [classes[t] for t, _ in pairs],
            [wd for _, wd in pairs],
            **kw,
        )
        logits = predict(z_tr[val_idx])
        chosen = {
            t: _pick({wd: _held_out_score(logits[p, :, : classes[t]], ys_tr[t][val_idx])
                      for p, (tp, wd) in enumerate(pairs) if tp == t})
            for t in tasks
        }
    predict = fit_attentive(
        z_tr, torch.stack([ys_tr[t] for t in tasks]), [classes[t] for t in tasks], [chosen[t] for t in tasks], **kw
    )
    logits = predict(z_te)
    out = {}
    for p, t in enumerate(tasks):
        y = ys_te[t].long()
        acc = (logits[p, :, : classes[t]].argmax(1) == y).double().mean().item()
        chance = torch.bincount(y, minlength=classes[t]).max().item() / len(y)
        out[t] = (acc, chance, chosen[t])
    return out


def _dense(
    f_tr: torch.Tensor, d_tr: torch.Tensor, f_te: torch.Tensor, d_te: torch.Tensor, cfg: ProbeConfig
) -> tuple[float, float, float]:
    """Returns (test RMSE, test R^2, chosen l2). Splits for l2 selection are by video, not by token."""
    dim = f_tr.shape[-1]

    def score(fit_idx: torch.Tensor, val_idx: torch.Tensor, l2: float) -> float:
        predict = fit_ridge(f_tr[fit_idx].reshape(-1, dim), d_tr[fit_idx].reshape(-1), l2)
        err = predict(f_tr[val_idx].reshape(-1, dim)) - d_tr[val_idx].reshape(-1).double()
        return -err.pow(2).mean().item()

    l2 = _select_l2(cfg.l2_grid, len(f_tr), cfg, score)
    predict = fit_ridge(f_tr.reshape(-1, dim), d_tr.reshape(-1), l2)
    target = d_te.reshape(-1).double()
    err = predict(f_te.reshape(-1, dim)) - target
    sse = err.pow(2).sum().item()
    sst = (target - target.mean()).pow(2).sum().item()
    rmse = math.sqrt(sse / target.numel())
    r2 = 1.0 - sse / sst if sst > 0 else (1.0 if sse == 0 else 0.0)
    return rmse, r2, l2


def run_probes(
    encode: Encode,
    train_set: Dataset,
    test_set: Dataset,
    grid: Sequence[int],
    tubelet: Sequence[int],
    config: ProbeConfig | None = None,
    *,
    progress: bool = False,
) -> dict[str, float]:
    """Encode probe-train/test videos with the frozen ``encode`` and fit the three probes.

    Returns test ``motion_acc`` / ``appearance_acc`` (in [0, 1]) with ``motion_chance`` /
    ``appearance_chance`` (majority-class frequency on test), ``dense_rmse`` / ``dense_r2`` (per-token
    depth, in the dataset's depth units), the regularisation each probe chose (``<task>_weight_decay``
    for attentive classification probes, ``<task>_l2`` for linear ones and ``dense_l2``) and the
    number of videos used (``train_videos`` / ``test_videos``). A task whose label is missing from the
    items is skipped.
    """
    cfg = config or ProbeConfig()
    grid = tuple(int(x) for x in grid)
    tubelet = tuple(int(x) for x in tubelet)
    if len(grid) != 3 or len(tubelet) != 3:
        raise ValueError(f"grid and tubelet must be (T, H, W) triples, got {grid} and {tubelet}")
    tr = extract_features(encode, train_set, cfg.train_videos, cfg.batch_size, tubelet=tubelet, progress=progress)
    te = extract_features(encode, test_set, cfg.test_videos, cfg.batch_size, tubelet=tubelet, progress=progress)
    num_tokens = math.prod(grid)
    for name, part in (("train", tr), ("test", te)):
        if part["features"].shape[1] != num_tokens:
            raise ValueError(
                f"{name} features have N = {part['features'].shape[1]} tokens, grid {grid} gives {num_tokens}"
            )
    if tr["features"].shape[2] != te["features"].shape[2]:
        raise ValueError("train and test features differ in width D")

    out: dict[str, float] = {"train_videos": float(len(tr["features"])), "test_videos": float(len(te["features"]))}
    tasks = [t for t in CLASS_TASKS if t in tr and t in te]
    if tasks and cfg.kind == "attentive":
        results = _attentive_classification(
            attentive_inputs(tr["features"], grid),
            {t: tr[t].reshape(-1) for t in tasks},
            attentive_inputs(te["features"], grid),
            {t: te[t].reshape(-1) for t in tasks},
            cfg,
        )
        for task, (acc, chance, wd) in results.items():
            out[f"{task}_acc"] = acc
            out[f"{task}_chance"] = chance
            out[f"{task}_weight_decay"] = wd
    elif tasks:
        if cfg.pooling == "tokens_pca":
            x_tr, x_te = pool_tokens_pca(tr["features"], te["features"], cfg.pca_dim)
        else:
            x_tr = pool_temporal_slots(tr["features"], grid)
            x_te = pool_temporal_slots(te["features"], grid)
        for task in tasks:
            acc, chance, l2 = _classification(x_tr, tr[task].reshape(-1), x_te, te[task].reshape(-1), cfg)
            out[f"{task}_acc"] = acc
            out[f"{task}_chance"] = chance
            out[f"{task}_l2"] = l2
    if "depth_tokens" in tr and "depth_tokens" in te:
        for name, part in (("train", tr), ("test", te)):
            if part["depth_tokens"].shape[1] != num_tokens:
                raise ValueError(
                    f"{name} depth pooled by tubelet {tubelet} gives {part['depth_tokens'].shape[1]} tokens, "
                    f"the grid {grid} has {num_tokens}"
                )
        rmse, r2, l2 = _dense(tr["features"], tr["depth_tokens"], te["features"], te["depth_tokens"], cfg)
        out["dense_rmse"] = rmse
        out["dense_r2"] = r2
        out["dense_l2"] = l2
    return out
