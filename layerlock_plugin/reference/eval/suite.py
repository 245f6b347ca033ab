"""The probe suite: every probe fitted on one encoder's features, regularisation picked on held-out
probe-train videos, chance reported beside each score (:func:`run_probes`, :func:`probe_features`), and
the main job's probe line (:func:`probe_report`). The protocol: :mod:`layerlock_plugin.reference.eval`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .attentive import attentive_inputs, fit_attentive
from .config import ProbeConfig
from .features import Encode, extract_features, fit_feature_norm, pool_features
from .knn import fit_knn
from .linear import fit_logistic, fit_ridge

__all__ = ["CLASS_TASKS", "probe_features", "probe_report", "run_probes"]

CLASS_TASKS = ("motion", "appearance")


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
    if parts:
        lines.append(READING)
    return "\n".join(lines)


#: What one run's probe line lets a user conclude (the calibration behind it: docs/evaluation.md).
READING = (
    "  reading it: depth is where pretraining beats random init here; compare runs on depth R2. Motion is "
    "calibrated, but random init reads it best (its attentive probe differences raw frames; every pretrained "
    "encoder at this scale, pixel MAE included, is below it): below random init means frame detail was "
    "discarded, not that nothing was learned. Appearance is weak evidence (an encoder trained on the digit "
    "labels does not beat random init). The numbers vary with thread count and CPU (float rounding, which "
    "training amplifies; motion by a few hundredths): compare methods over several seeds (docs/evaluation.md).")
