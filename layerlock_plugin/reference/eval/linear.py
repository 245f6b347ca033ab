"""Linear probes: multinomial logistic regression (classification) and ridge regression (dense depth).

Objectives (``W`` excludes the bias, which is never penalised)::

    logistic:  mean_i CE(x_i W + b, y_i) + l2 / 2 * ||W||^2
    ridge:     mean_j (x_j w + b - y_j)^2 + l2 * ||w||^2       (j runs over every token of every video)

Both standardise their inputs and solve in float64 (deterministic).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .threads import single_thread

__all__ = ["fit_logistic", "fit_ridge"]


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

    with single_thread():
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
