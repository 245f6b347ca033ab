"""What the probes read: frozen encoder tokens, their targets, normalisation and pooling.

Tokens are ``[n, N, D]`` (order ``(t h w)`` on the grid ``(T', H', W')``). Normalisation comes first,
with statistics of the probe-train tokens only (:func:`fit_feature_norm`); the linear and k-NN probes
then read pooled features (:func:`pool_features`), the attentive probes every token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from ... import _validate as v
from .config import ProbeConfig

__all__ = ["Encode", "extract_features", "token_depth_targets", "fit_feature_norm", "pool_features",
           "pool_temporal_slots", "pool_tokens_pca"]

#: a frozen encoder: ``video [B, C, T, H, W] -> tokens [B, N, D]``
Encode = Callable[[torch.Tensor], torch.Tensor]


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
