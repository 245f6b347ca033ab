"""The k-NN probe: DINO's weighted k nearest neighbours by cosine similarity."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .threads import single_thread

__all__ = ["fit_knn"]


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
        with single_thread():
            sim = F.normalize(xq.double(), dim=1) @ bank.T  # [m, n]
            top, idx = sim.topk(k, dim=1)
            weight = ((top - top[:, :1]) / temperature).exp()  # shifted: the largest weight is 1
            votes = torch.einsum("mk,mkc->mc", weight, onehot[idx])
            return (votes / votes.sum(1, keepdim=True)).clamp_min(1e-12).log()

    return predict
