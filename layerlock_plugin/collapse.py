"""Collapse guard: cheap statistics of latent targets and features, thresholds and a policy.

Statistics (all scale-invariant, computed on a sample of at most ``sample_tokens`` tokens):

``feature_std``     mean over channels of the std across tokens, divided by the RMS of the features.
                    About 1 for varied features; 0 when every token has the same vector.
``effective_rank``  exp(entropy of the normalised singular values) of the centred token sample,
                    divided by ``min(tokens, channels)``: 1 = isotropic, -> 0 as features collapse
                    onto few directions (Roy & Vetterli, 2007).
``relative_loss``   latent loss divided by the mean per-channel variance of the target (a loss that
                    looks small only because the target has no variance is not progress).

Policies: ``warn`` (log once per trip), ``raise`` (:class:`CollapseError`), ``skip`` (the caller
skips the optimizer step when ``decision.skip``), ``off``. A non-finite loss always trips. Under
torch.distributed every rank takes the same decision (the trip flag is all-reduced).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from . import _validate as v
from .errors import CollapseError

log = logging.getLogger("layerlock")


@dataclass(frozen=True)
class GuardConfig:
    """Thresholds are trip-if-below; a trip needs ``patience`` consecutive checks below threshold."""

    policy: str = "warn"
    every: int = 10
    min_feature_std: float = 0.05
    min_effective_rank: float = 0.02
    patience: int = 3
    sample_tokens: int = 256

    def __post_init__(self) -> None:
        if self.policy is False:
            # YAML 1.1 (PyYAML, mmengine configs read from YAML, `--set guard.policy=off`) reads a bare
            # `off` as the boolean false; it can only mean the policy "off".
            object.__setattr__(self, "policy", "off")
        v.one_of("guard.policy", self.policy, ("warn", "raise", "skip", "off"))
        v.positive_int("guard.every", self.every)
        v.fraction("guard.min_feature_std", self.min_feature_std, allow_zero=True)
        v.fraction("guard.min_effective_rank", self.min_effective_rank, allow_zero=True)
        v.positive_int("guard.patience", self.patience)
        v.positive_int("guard.sample_tokens", self.sample_tokens)


@dataclass
class GuardDecision:
    """What the guard concluded at one step. ``skip`` tells the caller not to apply this update."""

    tripped: bool = False
    skip: bool = False
    reasons: list[str] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def feature_stats(features: torch.Tensor, sample_tokens: int = 256) -> dict[str, float]:
    """``features [..., D]`` -> ``{'feature_std', 'effective_rank'}`` on an evenly strided token sample."""
    x = features.detach().reshape(-1, features.shape[-1]).float()
    if x.shape[0] > sample_tokens:
        x = x[torch.linspace(0, x.shape[0] - 1, sample_tokens, device=x.device).long()]
    rms = x.pow(2).mean().sqrt().clamp_min(1e-12)
    std = x.std(dim=0, unbiased=False).mean() / rms
    centred = x - x.mean(dim=0, keepdim=True)
    s = torch.linalg.svdvals(centred)
    p = s / s.sum().clamp_min(1e-12)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    erank = float(torch.exp(entropy)) / min(x.shape) if s.sum() > 0 else 0.0
    return {"feature_std": float(std), "effective_rank": erank}


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if any rank says True (all ranks must take the same decision)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


class CollapseGuard:
    """Checks a step's loss and latent target against :class:`GuardConfig` and applies its policy."""

    def __init__(self, config: GuardConfig):
        self.config = config
        self.below = 0  # consecutive checks below threshold
        self.trips = 0
        self.last_stats: dict[str, float] = {}

    def check(self, step: int, loss: torch.Tensor, target: torch.Tensor | None = None) -> GuardDecision:
        """Check one step. ``loss`` is the scalar loss; ``target [B, Q, D]`` the latent target (or None)."""
        cfg = self.config
        decision = GuardDecision()
        if cfg.policy == "off":
            return decision
        reasons = []
        if not bool(torch.isfinite(loss.detach()).all()):
            reasons.append(f"non-finite loss ({float(loss.detach())})")
        measured = target is not None and step % cfg.every == 0
        if measured:
            stats = feature_stats(target, cfg.sample_tokens)
            var = target.detach().float().reshape(-1, target.shape[-1]).var(dim=0).mean()
            stats["relative_loss"] = float(loss.detach()) / max(float(var), 1e-12)
            self.last_stats = stats
            decision.stats = dict(stats)
            low = []
            if stats["feature_std"] < cfg.min_feature_std:
                low.append(f"target feature_std {stats['feature_std']:.4f} < {cfg.min_feature_std}")
            if stats["effective_rank"] < cfg.min_effective_rank:
                low.append(f"target effective_rank {stats['effective_rank']:.4f} < {cfg.min_effective_rank}")
            self.below = self.below + 1 if low else 0
            if self.below >= cfg.patience:
                reasons += low
        tripped = _any_rank(bool(reasons), loss.device)
        if not tripped:
            return decision
        if not reasons:
            reasons = ["another rank tripped the guard"]
        self.trips += 1
        decision.tripped = True
        decision.reasons = reasons
        message = f"layerlock collapse guard tripped at step {step}: " + "; ".join(reasons)
        if cfg.policy == "raise":
            raise CollapseError(message)
        if cfg.policy == "skip":
            decision.skip = True
        log.warning(message + ("" if cfg.policy != "skip" else " (optimizer step skipped)"))
        return decision

    def state_dict(self) -> dict:
        """Trip counters and the latest statistics (plain data)."""
        return {"below": self.below, "trips": self.trips, "last_stats": dict(self.last_stats)}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""
        self.below = int(state["below"])
        self.trips = int(state["trips"])
        self.last_stats = dict(state.get("last_stats", {}))

