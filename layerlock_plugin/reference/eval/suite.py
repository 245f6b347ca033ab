"""Frozen-feature probes: motion and appearance classification, dense per-patch depth regression.

The encoder is frozen; only small read-outs are trained on its tokens ``[n, N, D]`` (order ``(t h w)``
on the grid ``(T', H', W')``).

**Feature normalisation first** (``ProbeConfig.normalize``), with statistics of the probe-train
tokens only: ``'standardize'`` (default: per channel, zero mean and unit variance over all probe-train
tokens), ``'whiten'`` (the probe-train covariance mapped to the identity, ZCA), ``'layer_norm'`` (each
token by its own mean and scale, no affine) or ``'none'``. Trained encoders put most of their variance
in a few directions; a per-token layer norm rescales every token by that dominant scale and drowns the
small directions that carry the labels, per-channel standardisation keeps them.

* **Classification** (``motion``, ``appearance``): every kind in ``ProbeConfig.kinds`` is fitted and
  reported as ``<task>_<kind>_acc``; ``ProbeConfig.kind`` is the headline one, also reported as
  ``<task>_acc``.

  - ``'linear'``: multinomial logistic regression (L-BFGS, full batch) on pooled tokens
    (``pooling``: ``'mean'`` over all tokens, ``'temporal_slots'`` = spatial mean per temporal slot,
    concatenated, or ``'tokens_pca'`` = every token projected on the top-``pca_dim`` principal
    directions, concatenated: a weight per token position).
  - ``'attentive'`` (as in V-JEPA / 4DS / LayerLock): normalised tokens plus a fixed 3D sin-cos
    embedding of the token grid (:func:`~.rope.sincos_pos_embed_3d`; a RoPE encoder puts no absolute
    position in its tokens, the probe knows the layout) -> one ``nn.MultiheadAttention(attn_dim,
    attn_heads, kdim=D, vdim=D)`` from a learned query token -> LayerNorm (no affine) -> linear
    classifier. Trained full batch with AdamW for ``steps`` steps (``lr``, cosine decay to 0) from a
    seeded initialisation. See :class:`AttentiveProbes` for how the single-query attention runs on
    :func:`torch.nn.functional.scaled_dot_product_attention` without keys and values for every token.
  - ``'knn'``: k nearest probe-train neighbours of the pooled features by cosine similarity, votes
    weighted by ``exp(similarity / knn_temperature)`` (DINO's k-NN evaluation).

* **Dense** (``depth``): the target of each token is the mean depth over the pixels of its tubelet
  (``depth [T, H, W]`` average-pooled by the tubelet to the token grid). The probe is one linear
  ridge regression ``D -> 1`` shared by all tokens, solved in closed form.

**Chance** is reported twice per task: ``<task>_chance_uniform = 1 / K`` with ``K`` the dataset's
number of classes (``dataset.num_classes[task]``, not the labels that happen to occur) and
``<task>_chance_majority``, the share of the most frequent class on the test set.

Regularisation (``l2`` for the logistic and ridge probes, ``weight_decay`` for the attentive ones,
``knn_k`` for k-NN) is a single value or a small grid. With a grid, each probe picks its value on a
**held-out split of the probe-train videos** (``val_fraction`` of them, drawn with ``seed``; held-out
accuracy, held-out cross-entropy breaking ties, ties going to the stronger penalty / more neighbours),
then refits on all probe-train videos with that value. The test set is only ever used for the final
score. The chosen values are reported as ``<task>_linear_l2``, ``<task>_attentive_weight_decay``,
``<task>_knn_k`` and ``dense_l2``. The normalisation statistics always come from all probe-train
videos (they use no label).

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
from collections.abc import Callable, Iterator, Mapping, Sequence
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
    "fit_feature_norm",
    "pool_features",
    "pool_temporal_slots",
    "pool_tokens_pca",
    "AttentiveProbes",
    "attentive_inputs",
    "fit_attentive",
    "fit_knn",
    "fit_logistic",
    "fit_ridge",
    "probe_features",
    "probe_report",
    "run_probes",
]

Encode = Callable[[torch.Tensor], torch.Tensor]
CLASS_TASKS = ("motion", "appearance")


def _grid_field(field: str, value: Any, check: Callable[[str, Any], Any] = v.non_negative_float) -> Any:
    """One value, or a non-empty list of them (a one-element list becomes the value)."""
    if isinstance(value, (list, tuple)):
        if len(value) == 0:
            raise ConfigError(field, "the grid must hold at least one value, got an empty list")
        grid = tuple(check(field, x) for x in value)
        return grid if len(grid) > 1 else grid[0]
    return check(field, value)


def _as_grid(value: Any) -> tuple[Any, ...]:
    return value if isinstance(value, tuple) else (value,)


@dataclass(frozen=True)
class ProbeConfig:
    """Config of the frozen-feature probes (fields are validated as ``probe.<field>``).

    ``train_videos`` / ``test_videos``: how many videos (the first ones of each dataset) are encoded.
    ``batch_size``: encoding batch size. ``val_fraction`` / ``seed``: the held-out split of the
    probe-train videos on which every grid below is searched (never the test set).

    ``normalize``: ``'standardize'`` (default), ``'whiten'``, ``'layer_norm'`` or ``'none'`` (see the
    module docstring); ``whiten_eps``: added to the covariance's eigenvalues, relative to their mean.

    ``kinds``: the classification read-outs fitted (each reported), any of ``'linear'``,
    ``'attentive'``, ``'knn'``; ``kind``: the headline one (reported as ``<task>_acc``), one of ``kinds``.

    * linear: ``pooling`` (``'mean'``, ``'temporal_slots'`` or ``'tokens_pca'`` with ``pca_dim``
      directions), ``max_iter`` L-BFGS iterations, ``l2`` one value or a grid.
    * attentive: ``steps`` full-batch AdamW steps at peak learning rate ``lr`` (cosine decay to 0),
      ``weight_decay`` one value or a grid, ``attn_heads`` heads, ``attn_dim`` width after the
      value/output projection.
    * knn: ``knn_k`` neighbours, one value or a grid; ``knn_temperature`` of the vote weights; the
      features are those of the linear probe (``pooling``).

    ``l2`` also regularises the dense depth ridge probe.
    """

    train_videos: int = 512
    test_videos: int = 512
    batch_size: int = 64
    normalize: str = "standardize"
    whiten_eps: float = 1e-4
    kind: str = "attentive"
    kinds: tuple[str, ...] = ("linear", "attentive", "knn")
    max_iter: int = 100
    l2: float | tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1)
    val_fraction: float = 0.2
    seed: int = 0
    pooling: str = "mean"
    pca_dim: int = 16
    steps: int = 200
    lr: float = 3e-3
    weight_decay: float | tuple[float, ...] = (0.1, 1.0, 10.0)
    attn_heads: int = 4
    attn_dim: int = 96
    knn_k: int | tuple[int, ...] = (5, 20, 50)
    knn_temperature: float = 0.07

    KINDS: ClassVar[tuple[str, ...]] = ("linear", "attentive", "knn")
    NORMALIZATIONS: ClassVar[tuple[str, ...]] = ("standardize", "whiten", "layer_norm", "none")
    POOLINGS: ClassVar[tuple[str, ...]] = ("mean", "temporal_slots", "tokens_pca")

    def __post_init__(self) -> None:
        v.positive_int("probe.train_videos", self.train_videos)
        v.positive_int("probe.test_videos", self.test_videos)
        v.positive_int("probe.batch_size", self.batch_size)
        v.one_of("probe.normalize", self.normalize, self.NORMALIZATIONS)
        object.__setattr__(self, "whiten_eps", v.positive_float("probe.whiten_eps", self.whiten_eps))
        kinds = self.kinds
        if isinstance(kinds, str):
            kinds = (kinds,)
        if not isinstance(kinds, (list, tuple)) or len(kinds) == 0:
            raise ConfigError("probe.kinds", f"must be a non-empty list of {', '.join(self.KINDS)}; got {self.kinds!r}")
        kinds = tuple(v.one_of("probe.kinds", k, self.KINDS) for k in kinds)
        if len(set(kinds)) != len(kinds):
            raise ConfigError("probe.kinds", f"must not repeat a kind, got {self.kinds!r}")
        object.__setattr__(self, "kinds", kinds)
        v.one_of("probe.kind", self.kind, self.KINDS)
        if self.kind not in kinds:
            raise ConfigError("probe.kind", f"must be one of probe.kinds {list(kinds)} (the headline probe), got {self.kind!r}")
        v.positive_int("probe.max_iter", self.max_iter)
        v.non_negative_int("probe.seed", self.seed)
        v.one_of("probe.pooling", self.pooling, self.POOLINGS)
        v.positive_int("probe.pca_dim", self.pca_dim)
        vf = self.val_fraction
        if isinstance(vf, bool) or not isinstance(vf, (int, float)) or not 0.0 < float(vf) < 1.0:
            raise ConfigError("probe.val_fraction", f"must be a number in (0, 1), got {vf!r}")
        object.__setattr__(self, "val_fraction", float(vf))
        object.__setattr__(self, "l2", _grid_field("probe.l2", self.l2))
        v.positive_int("probe.steps", self.steps)
        object.__setattr__(self, "lr", v.positive_float("probe.lr", self.lr))
        object.__setattr__(self, "weight_decay", _grid_field("probe.weight_decay", self.weight_decay))
        v.positive_int("probe.attn_heads", self.attn_heads)
        v.positive_int("probe.attn_dim", self.attn_dim)
        if self.attn_dim % self.attn_heads:
            raise ConfigError(
                "probe.attn_dim", f"must be divisible by probe.attn_heads={self.attn_heads}, got {self.attn_dim}"
            )
        object.__setattr__(self, "knn_k", _grid_field("probe.knn_k", self.knn_k, v.positive_int))
        object.__setattr__(self, "knn_temperature", v.positive_float("probe.knn_temperature", self.knn_temperature))

    @property
    def l2_grid(self) -> tuple[float, ...]:
        return _as_grid(self.l2)

    @property
    def weight_decay_grid(self) -> tuple[float, ...]:
        return _as_grid(self.weight_decay)

    @property
    def knn_k_grid(self) -> tuple[int, ...]:
        return _as_grid(self.knn_k)

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


# ---------------------------------------------------------------------------------------------------
# Feature normalisation (probe-train statistics)


def fit_feature_norm(train: torch.Tensor, mode: str = "standardize", eps: float = 1e-4) -> Callable[[torch.Tensor], torch.Tensor]:
    """Fit the normalisation ``mode`` on probe-train tokens ``train [n, N, D]`` (statistics over all
    ``n * N`` tokens); returns ``apply(x [..., D]) -> float32 [..., D]``.

    ``'standardize'``: ``(x - mean) / std`` per channel; ``'whiten'``: ``(x - mean) @ W`` with
    ``W = U (S + eps * mean(S))^-1/2 U^T`` from the covariance ``U S U^T`` (ZCA: the identity covariance,
    the axes kept); ``'layer_norm'``: each token over its own ``D`` values (no statistics);
    ``'none'``: the identity.
    """
    v.one_of("probe.normalize", mode, ProbeConfig.NORMALIZATIONS)
    d = train.shape[-1]
    if mode == "none":
        return lambda x: x.float()
    if mode == "layer_norm":
        return lambda x: F.layer_norm(x.float(), (d,))
    flat = train.reshape(-1, d).double()
    mean = flat.mean(0)
    if mode == "standardize":
        # a channel that is constant on probe-train carries nothing: it maps to 0, not to noise / 1e-6
        std = flat.std(0, unbiased=False)
        inv = torch.where(std > 1e-8 * std.max().clamp_min(1e-30), 1.0 / std, torch.zeros_like(std))
        return lambda x: ((x.double() - mean) * inv).float()
    centred = flat - mean
    cov = centred.T @ centred / centred.shape[0]
    evals, evecs = torch.linalg.eigh(cov)
    evals = evals.clamp_min(0.0)
    w = evecs @ torch.diag((evals + eps * evals.mean().clamp_min(1e-30)).rsqrt()) @ evecs.T
    return lambda x: ((x.double() - mean) @ w).float()


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


def pool_features(train: torch.Tensor, test: torch.Tensor, grid: Sequence[int], pooling: str,
                  pca_dim: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The linear / k-NN probes' inputs: ``[n, N, D]`` tokens -> ``[n, F]`` by ``pooling``
    (``'mean'``: ``F = D``; ``'temporal_slots'``: ``F = T' * D``; ``'tokens_pca'``: ``F = N * pca_dim``)."""
    v.one_of("probe.pooling", pooling, ProbeConfig.POOLINGS)
    if pooling == "tokens_pca":
        return pool_tokens_pca(train, test, pca_dim)
    if pooling == "temporal_slots":
        return pool_temporal_slots(train, grid), pool_temporal_slots(test, grid)
    return train.mean(dim=1), test.mean(dim=1)


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
# k-NN probe


def fit_knn(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, k: int, temperature: float = 0.07
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Weighted k-NN on ``x [n, F]`` (cosine similarity, votes ``exp(sim / temperature)``, DINO's
    k-NN evaluation); returns ``predict(xq [m, F]) -> [m, num_classes]`` log vote shares (a valid
    log-probability, so held-out cross-entropy can break ties like the other probes)."""
    bank = F.normalize(x.double(), dim=1)
    onehot = F.one_hot(y.long(), num_classes).double()
    k = min(int(k), bank.shape[0])

    def predict(xq: torch.Tensor) -> torch.Tensor:
        with _single_thread():
            sim = F.normalize(xq.double(), dim=1) @ bank.T  # [m, n]
            top, idx = sim.topk(k, dim=1)
            weight = ((top - top[:, :1]) / temperature).exp()  # shifted: the largest weight is 1
            votes = torch.einsum("mk,mkc->mc", weight, onehot[idx])
            return (votes / votes.sum(1, keepdim=True)).clamp_min(1e-12).log()

    return predict


# ---------------------------------------------------------------------------------------------------
# Attentive probes


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


def _chance(y_test: torch.Tensor, num_classes: int) -> tuple[float, float]:
    """(uniform chance ``1 / K``, majority-class share of the test labels)."""
    majority = torch.bincount(y_test.long(), minlength=num_classes).max().item() / len(y_test)
    return 1.0 / num_classes, majority


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(1) == y.long()).double().mean().item()


def _linear_or_knn(
    kind: str, x_tr: torch.Tensor, y_tr: torch.Tensor, x_te: torch.Tensor, y_te: torch.Tensor,
    num_classes: int, cfg: ProbeConfig,
) -> tuple[float, float]:
    """``kind`` ``'linear'`` or ``'knn'`` on pooled features: (test accuracy, chosen l2 or k)."""
    if kind == "linear":
        grid: tuple[float, ...] = cfg.l2_grid

        def fit(x: torch.Tensor, y: torch.Tensor, value: float) -> Callable[[torch.Tensor], torch.Tensor]:
            return fit_logistic(x, y, num_classes, value, cfg.max_iter)
    else:
        grid = tuple(float(k) for k in cfg.knn_k_grid)

        def fit(x: torch.Tensor, y: torch.Tensor, value: float) -> Callable[[torch.Tensor], torch.Tensor]:
            return fit_knn(x, y, num_classes, int(value), cfg.knn_temperature)

    def score(fit_idx: torch.Tensor, val_idx: torch.Tensor, value: float) -> float:
        return _held_out_score(fit(x_tr[fit_idx], y_tr[fit_idx], value)(x_tr[val_idx]), y_tr[val_idx])

    chosen = _select_l2(grid, len(y_tr), cfg, score)
    return _accuracy(fit(x_tr, y_tr, chosen)(x_te), y_te), chosen


def _attentive_classification(
    z_tr: torch.Tensor,
    ys_tr: dict[str, torch.Tensor],
    z_te: torch.Tensor,
    ys_te: dict[str, torch.Tensor],
    classes: Mapping[str, int],
    cfg: ProbeConfig,
) -> dict[str, tuple[float, float]]:
    """Attentive probes for every task in ``ys_tr`` (labels ``[n]``, trained together, independently).

    Returns ``{task: (test accuracy, chosen weight decay)}``. With a weight-decay grid, one batched run
    on the fit part of the probe-train split trains a probe per (task, value) and each task keeps the
    value with the best held-out score.
    """
    tasks = list(ys_tr)
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
    return {t: (_accuracy(logits[p, :, : classes[t]], ys_te[t]), chosen[t]) for p, t in enumerate(tasks)}


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


def _task_classes(tasks: Sequence[str], num_classes: Mapping[str, int] | None, parts: Sequence[dict[str, torch.Tensor]]) -> dict[str, int]:
    """``K`` per task from ``num_classes`` (the dataset's class counts), checked against the labels."""
    out = {}
    for task in tasks:
        if num_classes is None or task not in num_classes:
            raise ValueError(
                f"the number of {task} classes is unknown: give num_classes={{'{task}': K}} or a dataset with a "
                f"num_classes dict (chance 1/K needs the dataset's class count, not the labels seen)"
            )
        k = int(num_classes[task])
        top = max(int(p[task].max()) for p in parts)
        if k < 1 or top >= k or min(int(p[task].min()) for p in parts) < 0:
            raise ValueError(f"{task} labels must lie in 0..{k - 1} (num_classes={k}), got labels up to {top}")
        out[task] = k
    return out


def probe_features(
    tr: dict[str, torch.Tensor],
    te: dict[str, torch.Tensor],
    grid: Sequence[int],
    config: ProbeConfig | None = None,
    num_classes: Mapping[str, int] | None = None,
) -> dict[str, float]:
    """Fit every probe on extracted probe-train features and score it on the test ones.

    ``tr`` / ``te``: as returned by :func:`extract_features` (``features [n, N, D]``, labels ``[n]``,
    ``depth_tokens [n, N]``). ``num_classes``: ``{task: K}``. See :func:`run_probes` for what is returned.
    """
    cfg = config or ProbeConfig()
    grid = tuple(int(x) for x in grid)
    num_tokens = math.prod(grid)
    for name, part in (("train", tr), ("test", te)):
        if part["features"].shape[1] != num_tokens:
            raise ValueError(
                f"{name} features have N = {part['features'].shape[1]} tokens, grid {grid} gives {num_tokens}"
            )
    if tr["features"].shape[2] != te["features"].shape[2]:
        raise ValueError("train and test features differ in width D")
    norm = fit_feature_norm(tr["features"], cfg.normalize, cfg.whiten_eps)
    f_tr, f_te = norm(tr["features"]), norm(te["features"])

    out: dict[str, float] = {"train_videos": float(len(f_tr)), "test_videos": float(len(f_te))}
    tasks = [t for t in CLASS_TASKS if t in tr and t in te]
    classes = _task_classes(tasks, num_classes, (tr, te))
    ys_tr = {t: tr[t].reshape(-1).long() for t in tasks}
    ys_te = {t: te[t].reshape(-1).long() for t in tasks}
    for t in tasks:
        out[f"{t}_num_classes"] = float(classes[t])
        out[f"{t}_chance_uniform"], out[f"{t}_chance_majority"] = _chance(ys_te[t], classes[t])
    if tasks and ("linear" in cfg.kinds or "knn" in cfg.kinds):
        x_tr, x_te = pool_features(f_tr, f_te, grid, cfg.pooling, cfg.pca_dim)
        for kind, reg in (("linear", "l2"), ("knn", "k")):
            if kind not in cfg.kinds:
                continue
            for t in tasks:
                acc, chosen = _linear_or_knn(kind, x_tr, ys_tr[t], x_te, ys_te[t], classes[t], cfg)
                out[f"{t}_{kind}_acc"] = acc
                out[f"{t}_{kind}_{reg}"] = chosen
    if tasks and "attentive" in cfg.kinds:
        results = _attentive_classification(
            attentive_inputs(f_tr, grid), ys_tr, attentive_inputs(f_te, grid), ys_te, classes, cfg
        )
        for t, (acc, wd) in results.items():
            out[f"{t}_attentive_acc"] = acc
            out[f"{t}_attentive_weight_decay"] = wd
    for t in tasks:
        out[f"{t}_acc"] = out[f"{t}_{cfg.kind}_acc"]
    if "depth_tokens" in tr and "depth_tokens" in te:
        for name, part in (("train", tr), ("test", te)):
            if part["depth_tokens"].shape[1] != num_tokens:
                raise ValueError(
                    f"{name} depth pooled by the tubelet gives {part['depth_tokens'].shape[1]} tokens, "
                    f"the grid {grid} has {num_tokens}"
                )
        rmse, r2, l2 = _dense(f_tr, tr["depth_tokens"], f_te, te["depth_tokens"], cfg)
        out["dense_rmse"] = rmse
        out["dense_r2"] = r2
        out["dense_l2"] = l2
    return out


def run_probes(
    encode: Encode,
    train_set: Dataset,
    test_set: Dataset,
    grid: Sequence[int],
    tubelet: Sequence[int],
    config: ProbeConfig | None = None,
    *,
    num_classes: Mapping[str, int] | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Encode probe-train/test videos with the frozen ``encode`` and fit every probe.

    ``num_classes``: ``{task: K}``; default ``train_set.num_classes`` (the dataset's class counts).
    Returns, per classification task (``motion``, ``appearance``; a task whose label is missing from
    the items is skipped): ``<task>_acc`` (the headline ``kind``), ``<task>_<kind>_acc`` for every kind
    in ``kinds`` (test accuracy in [0, 1]), ``<task>_chance_uniform`` (``1 / K``),
    ``<task>_chance_majority`` (majority-class share on test), ``<task>_num_classes`` and the chosen
    regularisation (``<task>_linear_l2``, ``<task>_attentive_weight_decay``, ``<task>_knn_k``); then
    ``dense_rmse`` / ``dense_r2`` (per-token depth, in the dataset's depth units) with ``dense_l2``,
    and the number of videos used (``train_videos`` / ``test_videos``).
    """
    cfg = config or ProbeConfig()
    grid = tuple(int(x) for x in grid)
    tubelet = tuple(int(x) for x in tubelet)
    if len(grid) != 3 or len(tubelet) != 3:
        raise ValueError(f"grid and tubelet must be (T, H, W) triples, got {grid} and {tubelet}")
    if num_classes is None:
        num_classes = getattr(train_set, "num_classes", None)
    tr = extract_features(encode, train_set, cfg.train_videos, cfg.batch_size, tubelet=tubelet, progress=progress)
    te = extract_features(encode, test_set, cfg.test_videos, cfg.batch_size, tubelet=tubelet, progress=progress)
    return probe_features(tr, te, grid, cfg, num_classes)


def probe_report(probes: Mapping[str, Any], kind: str) -> str:
    """The main job's probe lines: each task's headline probe beside the random-init encoder and chance,
    then every probe kind (``trained / random init``).

    ``probes``: :func:`run_probes`' keys plus a ``random_init`` dict of the same keys (what
    ``Trainer.run_probes`` returns)."""
    base = probes.get("random_init", {})
    parts, kinds = [], []
    for task in ("motion", "appearance"):
        if f"{task}_acc" not in probes:
            continue
        parts.append(f"{task} {probes[f'{task}_acc']:.3f} (random init {base.get(f'{task}_acc', float('nan')):.3f}, "
                     f"uniform chance {probes[f'{task}_chance_uniform']:.3f}, "
                     f"majority {probes[f'{task}_chance_majority']:.3f})")
        kinds.append(f"{task} " + ", ".join(
            f"{k} {probes[key]:.3f} / {base.get(key, float('nan')):.3f}"
            for k in ("linear", "attentive", "knn") if (key := f"{task}_{k}_acc") in probes))
    if "dense_r2" in probes:
        parts.append(f"depth R2 {probes['dense_r2']:.3f} (random init {base.get('dense_r2', float('nan')):.3f}; "
                     f"RMSE {probes['dense_rmse']:.3f} vs {base.get('dense_rmse', float('nan')):.3f})")
    lines = [f"probes (frozen features, {kind} classifier): " + "; ".join(parts)]
    if kinds:
        lines.append("  every probe kind, trained / random init: " + "; ".join(kinds))
    return "\n".join(lines)
