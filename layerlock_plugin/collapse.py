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
from collections.abc import Sequence
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
def token_sample(features: torch.Tensor, sample_tokens: int = 256) -> torch.Tensor:
    """``features [..., D]`` -> an evenly strided sample ``[S, D]`` (float32, detached) of at most
    ``sample_tokens`` of its tokens: what the feature statistics are measured on."""
    x = features.detach().reshape(-1, features.shape[-1]).float()
    if x.shape[0] > sample_tokens:
        x = x[torch.linspace(0, x.shape[0] - 1, sample_tokens, device=x.device).long()]
    return x


@torch.no_grad()
def sample_stats(x: torch.Tensor) -> torch.Tensor:
    """``[feature_std, effective_rank]`` of a token sample ``x [S, D]`` (:func:`token_sample`) as a 2-vector on
    its device, no host sync. The effective rank needs the sample's singular values (``svdvals``)."""
    rms = x.pow(2).mean().sqrt().clamp_min(1e-12)
    std = x.std(dim=0, unbiased=False).mean() / rms
    centred = x - x.mean(dim=0, keepdim=True)
    s = torch.linalg.svdvals(centred)
    total = s.sum()
    p = s / total.clamp_min(1e-12)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    erank = torch.where(total > 0, torch.exp(entropy) / min(x.shape), torch.zeros_like(entropy))
    return torch.stack([std, erank])


def feature_stat_tensors(features: torch.Tensor, sample_tokens: int = 256) -> torch.Tensor:
    """``features [..., D]`` -> ``[feature_std, effective_rank]`` as a 2-vector on the features' device
    (no host sync), measured on an evenly strided sample of at most ``sample_tokens`` tokens."""
    return sample_stats(token_sample(features, sample_tokens))


def feature_stats(features: torch.Tensor, sample_tokens: int = 256) -> dict[str, float]:
    """``features [..., D]`` -> ``{'feature_std', 'effective_rank'}`` (host floats)."""
    std, erank = feature_stat_tensors(features, sample_tokens).tolist()
    return {"feature_std": std, "effective_rank": erank}


#: The entries of :meth:`CollapseGuard.measure`'s vector.
MEASURES = ("nonfinite", "measured", "feature_std", "effective_rank", "relative_loss")


class CollapseGuard:
    """Checks a step's loss and latent target against :class:`GuardConfig` and applies its policy.

    Two halves, so that a host can fold the guard into the one all-reduce and the one host transfer it
    does per step anyway: :meth:`measure` (on the device, no sync) and :meth:`decide` (on the host, from
    the measures averaged over ranks, so every rank decides the same without a collective of its own).
    :meth:`check` does both, with its own all-reduce when ``torch.distributed`` is initialised.
    """

    def __init__(self, config: GuardConfig):
        self.config = config
        self.below = 0  # consecutive checks below threshold
        self.trips = 0
        self.last_stats: dict[str, float] = {}

    def measure(self, step: int, loss: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor | None:
        """``[len(MEASURES)]`` float vector on ``loss``'s device (None with policy ``off``): whether the loss
        is non-finite, whether the target was measured this step (every ``guard.every`` steps) and then its
        statistics. ``loss``: scalar; ``target [..., D]``: the latent target (None for pixels)."""
        pending = self.measure_deferred(step, loss, target)
        return None if pending is None else self.complete(*pending)

    def measure_deferred(self, step: int, loss: torch.Tensor, target: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """:meth:`measure` without its costly part: ``(measures, sample)`` where ``measures`` is the
        ``[len(MEASURES)]`` vector with ``feature_std`` and ``effective_rank`` still 0, and ``sample [S, D]``
        the target's token sample they are to be computed from by :meth:`complete` (None when this step is
        not measured). A host that decides late (at its log steps) keeps the sample, small and on the
        device, and runs the spectrum there instead of in every measured step. None with policy ``off``."""
        if self.config.policy == "off":
            return None
        loss = loss.detach().float()
        nonfinite = (~torch.isfinite(loss)).float().reshape(())
        zero = torch.zeros((), device=loss.device)
        if target is None or step % self.config.every:
            return torch.stack([nonfinite, zero, zero, zero, zero]), None
        sample = token_sample(target, self.config.sample_tokens)
        var = target.detach().float().reshape(-1, target.shape[-1]).var(dim=0).mean().to(loss.device)
        relative = loss.reshape(()) / var.clamp_min(1e-12)
        return torch.stack([nonfinite, torch.ones((), device=loss.device), zero, zero, relative]), sample

    @staticmethod
    def complete(measures: torch.Tensor, sample: torch.Tensor | None) -> torch.Tensor:
        """The full :meth:`measure` vector ``[len(MEASURES)]`` from :meth:`measure_deferred`'s pair ``(measures
        [len(MEASURES)], sample [S, D] or None)``: the sample's statistics filled in (on the device, no sync)."""
        if sample is None:
            return measures
        stats = sample_stats(sample).to(measures.device)
        i = MEASURES.index("feature_std")
        return torch.cat([measures[:i], stats, measures[i + 2:]])

    def decide(self, step: int, measures: Sequence[float]) -> GuardDecision:
        """Thresholds and policy on host values of :meth:`measure` (averaged over ranks by the caller: a
        non-finite loss on any rank then reads above 0 everywhere)."""
        cfg = self.config
        decision = GuardDecision()
        if cfg.policy == "off":
            return decision
        m = dict(zip(MEASURES, (float(x) for x in measures)))
        reasons = ["non-finite loss"] if m["nonfinite"] > 0 else []
        if m["measured"] > 0:
            stats = {k: m[k] for k in ("feature_std", "effective_rank", "relative_loss")}
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
        if not reasons:
            return decision
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

    def check(self, step: int, loss: torch.Tensor, target: torch.Tensor | None = None) -> GuardDecision:
        """Check one step: :meth:`measure`, averaged over ranks (one all-reduce on ``loss``'s device), one
        host transfer, :meth:`decide`. ``loss`` is the scalar loss; ``target [B, Q, D]`` the latent target."""
        measures = self.measure(step, loss, target)
        if measures is None:
            return GuardDecision()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(measures)
            measures = measures / dist.get_world_size()
        return self.decide(step, measures.tolist())

    def state_dict(self) -> dict:
        """Trip counters and the latest statistics (plain data)."""
        return {"below": self.below, "trips": self.trips, "last_stats": dict(self.last_stats)}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""
        self.below = int(state["below"])
        self.trips = int(state["trips"])
        self.last_stats = dict(state.get("last_stats", {}))

