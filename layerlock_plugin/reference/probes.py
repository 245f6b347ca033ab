"""Frozen-feature probes: motion and appearance classification, dense per-patch depth regression.

The encoder is frozen; only a linear read-out is trained on its tokens.

* **Classification** (``motion``, ``appearance``): tokens ``[n, N, D]`` (order ``(t h w)`` on the
  grid ``(T', H', W')``) are mean-pooled over space *separately for each temporal slot* and the
  slots are concatenated, giving ``[n, T' * D]``. A time-averaged feature cannot tell "first half
  brighter" from "second half brighter"; this one can, so motion stays linearly readable. The
  probe is a multinomial logistic regression fitted full-batch with L-BFGS on features
  standardised with the probe-train statistics.
* **Dense** (``depth``): the target of each token is the mean depth over the pixels of its tubelet
  (``depth [T, H, W]`` average-pooled by the tubelet to the token grid). The probe is one linear
  ridge regression ``D -> 1`` shared by all tokens, solved in closed form on standardised features.

Regularisation (``ProbeConfig.l2``) is a single value or a small grid. With a grid, each probe
picks its value on a **held-out split of the probe-train videos** (``val_fraction`` of them, drawn
with ``seed``), then refits on all probe-train videos with that value. The test set is only ever
used for the final score. The chosen values are reported as ``<task>_l2``.

Objectives (``W`` excludes the bias, which is never penalised)::

    logistic: mean_i CE(x_i W + b, y_i) + l2 / 2 * ||W||^2
    ridge:    mean_j (x_j w + b - y_j)^2 + l2 * ||w||^2       (j runs over every token of every video)

Everything is deterministic for a given seed (zero initialisation, seeded split, float64 solves).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from .. import _validate as v
from .._config import from_dict
from ..errors import ConfigError

__all__ = [
    "ProbeConfig",
    "extract_features",
    "token_depth_targets",
    "pool_temporal_slots",
    "fit_logistic",
    "fit_ridge",
    "run_probes",
]

Encode = Callable[[torch.Tensor], torch.Tensor]
CLASS_TASKS = ("motion", "appearance")


@dataclass(frozen=True)
class ProbeConfig:
    """Config of the frozen-feature probes (fields are validated as ``probe.<field>``).

    ``train_videos`` / ``test_videos``: how many videos (the first ones of each dataset) are encoded.
    ``batch_size``: encoding batch size. ``max_iter``: L-BFGS iterations of the logistic probes.
    ``l2``: one non-negative penalty, or a grid chosen on a held-out ``val_fraction`` of the
    probe-train videos (never on the test set). ``seed`` draws that split.
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
        l2 = self.l2
        if isinstance(l2, (list, tuple)):
            if len(l2) == 0:
                raise ConfigError("probe.l2", "the grid must hold at least one value, got an empty list")
            grid = tuple(v.non_negative_float("probe.l2", x) for x in l2)
            object.__setattr__(self, "l2", grid if len(grid) > 1 else grid[0])
        else:
            object.__setattr__(self, "l2", v.non_negative_float("probe.l2", l2))

    @property
    def l2_grid(self) -> tuple[float, ...]:
        return self.l2 if isinstance(self.l2, tuple) else (self.l2,)

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


def _split(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    n_val = max(1, int(round(val_fraction * n)))
    return perm[n_val:], perm[:n_val]


def _select_l2(
    grid: tuple[float, ...], n: int, cfg: ProbeConfig, score: Callable[[torch.Tensor, torch.Tensor, float], float]
) -> float:
    """Pick the grid value with the best held-out score (ties go to the larger penalty)."""
    if len(grid) == 1:
        return grid[0]
    if n < 10:  # too few probe-train videos to hold some out: take the middle of the grid
        return sorted(grid)[(len(grid) - 1) // 2]
    fit_idx, val_idx = _split(n, cfg.val_fraction, cfg.seed)
    best_l2, best = None, -math.inf
    for l2 in sorted(grid, reverse=True):  # larger first so that ties keep the larger penalty
        s = score(fit_idx, val_idx, l2)
        if s > best + 1e-12:
            best_l2, best = l2, s
    assert best_l2 is not None
    return best_l2


def _classification(
    x_tr: torch.Tensor, y_tr: torch.Tensor, x_te: torch.Tensor, y_te: torch.Tensor, cfg: ProbeConfig
) -> tuple[float, float, float]:
    """Returns (test accuracy, chance = majority-class frequency on test, chosen l2)."""
    num_classes = int(max(int(y_tr.max()), int(y_te.max()))) + 1

    def score(fit_idx: torch.Tensor, val_idx: torch.Tensor, l2: float) -> float:
        predict = fit_logistic(x_tr[fit_idx], y_tr[fit_idx], num_classes, l2, cfg.max_iter)
        logits = predict(x_tr[val_idx])
        acc = (logits.argmax(1) == y_tr[val_idx]).double().mean().item()
        # held-out accuracy first; held-out cross-entropy breaks ties between equally accurate values
        return acc - 1e-6 * F.cross_entropy(logits, y_tr[val_idx].long()).item()

    l2 = _select_l2(cfg.l2_grid, len(y_tr), cfg, score)
    predict = fit_logistic(x_tr, y_tr, num_classes, l2, cfg.max_iter)
    acc = (predict(x_te).argmax(1) == y_te).double().mean().item()
    chance = torch.bincount(y_te.long(), minlength=num_classes).max().item() / len(y_te)
    return acc, chance, l2


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
    """Encode probe-train/test videos with the frozen ``encode`` and fit the three linear probes.

    Returns test ``motion_acc`` / ``appearance_acc`` (in [0, 1]) with ``motion_chance`` /
    ``appearance_chance`` (majority-class frequency on test), ``dense_rmse`` / ``dense_r2`` (per-token
    depth, in the dataset's depth units), the regularisation each probe chose (``<task>_l2``) and the
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
    if any(t in tr and t in te for t in CLASS_TASKS):
        if cfg.pooling == "tokens_pca":
            x_tr, x_te = pool_tokens_pca(tr["features"], te["features"], cfg.pca_dim)
        else:
            x_tr = pool_temporal_slots(tr["features"], grid)
            x_te = pool_temporal_slots(te["features"], grid)
        for task in CLASS_TASKS:
            if task in tr and task in te:
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
