"""The integration kit: the pieces every host integration needs besides the controller (torch only).

* **DDP across freeze events.** DDP registers the parameters that require grad when it is built (and
  ``static_graph=True`` also records which of them get one); both go stale when LayerLock freezes a
  block or switches readout heads. The policy, :class:`DDPSync`: when the trainable set has changed,
  drop the wrapper and build a new one of the same class with the same arguments. It is collective
  but safe: plans are a pure function of the step, so every rank rebuilds at the same step; freeze
  events are few (one per frozen block), so the cost is a handful of rebuilds per run.
  :class:`LayerLockDDP` is the drop-in ``DistributedDataParallel`` built on it; hosts whose runner owns
  the wrapper (mmengine) apply :class:`DDPSync` to that wrapper.
* **Active readout heads** (:func:`set_active_heads`): only the heads of the current plan train.
* **Skipping a tripped step** (:func:`skip_update`): under ``guard.policy='skip'`` every gradient is
  dropped, so the coming ``optimizer.step()`` changes nothing (torch optimizers skip ``grad=None``).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ._compat import ddp_buffer_sync_of
from .collapse import GuardDecision

__all__ = ["DDPSync", "LayerLockDDP", "ddp_arguments", "set_active_heads", "skip_update", "trainable_key"]


def trainable_key(module: nn.Module) -> tuple[bool, ...]:
    """``requires_grad`` of every parameter of ``module`` in order: the set a DDP wrapper is built for."""
    return tuple(p.requires_grad for p in module.parameters())


def ddp_arguments(ddp: DistributedDataParallel) -> dict[str, Any]:
    """The constructor arguments that shaped ``ddp``, read back so that it can be rebuilt alike
    (mmengine's ``MMDistributedDataParallel`` adds ``detect_anomalous_params``)."""
    kwargs = {"device_ids": ddp.device_ids, "output_device": ddp.output_device, **ddp_buffer_sync_of(ddp),
              "process_group": ddp.process_group, "find_unused_parameters": ddp.find_unused_parameters,
              "gradient_as_bucket_view": ddp.gradient_as_bucket_view, "static_graph": ddp.static_graph,
              "bucket_cap_mb": ddp.bucket_bytes_cap / (1024 * 1024)}
    if hasattr(ddp, "detect_anomalous_params"):
        kwargs["detect_anomalous_params"] = ddp.detect_anomalous_params
    return kwargs


class DDPSync:
    """Keeps a DDP wrapper consistent with the trainable set of its module (module docstring).

    Args:
        ddp: the wrapper as built now (by the host or by :class:`LayerLockDDP`).
        build: ``module -> new wrapper``; default: ``type(ddp)(module, **ddp_arguments(ddp))``.

    Use: when :attr:`stale`, drop every reference to the old wrapper, then call :meth:`rebuild`.
    """

    def __init__(self, ddp: DistributedDataParallel, build: Callable[[nn.Module], nn.Module] | None = None):
        self.module: nn.Module = ddp.module
        kwargs = ddp_arguments(ddp) if build is None else {}
        self.build = build or (lambda module: type(ddp)(module, **kwargs))
        self.key = trainable_key(self.module)
        self.rebuilds = 0

    @property
    def stale(self) -> bool:
        """Whether parameters started or stopped requiring grad since the wrapper was built."""
        return trainable_key(self.module) != self.key

    def rebuild(self) -> nn.Module:
        """A new wrapper for the current trainable set. The old one must be unreferenced by now: it is
        collected first, so that no gradient hook of its reducer can fire an all-reduce again."""
        gc.collect()
        self.key = trainable_key(self.module)
        self.rebuilds += 1
        return self.build(self.module)


class LayerLockDDP(nn.Module):
    """``DistributedDataParallel`` that survives freeze events: a drop-in for
    ``DistributedDataParallel(module, **ddp_kwargs)`` (e.g. V-JEPA's ``static_graph=True``).

    :meth:`sync` (also run by every ``forward``) rebuilds the wrapper when the trainable set changed;
    call it yourself before entering :meth:`no_sync`. ``state_dict`` keys are DDP's (``module.*``);
    :attr:`rebuilds` counts the rebuilds after the first build.
    """

    def __init__(self, module: nn.Module, **ddp_kwargs: Any):
        super().__init__()
        self.module = module
        self.ddp_kwargs = dict(ddp_kwargs)
        build = lambda m: DistributedDataParallel(m, **self.ddp_kwargs)  # noqa: E731
        ddp = build(module)
        self._sync = DDPSync(ddp, build)
        object.__setattr__(self, "ddp", ddp)  # outside the module tree: state_dict keys stay "module.*"

    @property
    def rebuilds(self) -> int:
        """Rebuilds since the first build (one per change of the trainable set)."""
        return self._sync.rebuilds

    def sync(self) -> bool:
        """Rebuild the DDP wrapper if the trainable set changed since it was built; returns whether it did."""
        if not self._sync.stale:
            return False
        object.__setattr__(self, "ddp", None)  # the old reducer and its hooks go before the new ones come
        object.__setattr__(self, "ddp", self._sync.rebuild())
        return True

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """DDP's forward, after :meth:`sync`."""
        self.sync()
        return self.ddp(*args, **kwargs)

    def no_sync(self):
        """DDP's ``no_sync`` context (gradient accumulation) of the current wrapper."""
        return self.ddp.no_sync()


def set_active_heads(readouts: Mapping[str, nn.Module], heads: Iterable[str]) -> bool:
    """The readouts named in ``heads`` require grad, the others not (their ``grad`` is dropped).

    Returns whether any readout parameter changed its ``requires_grad`` (a DDP wrapper must then be
    rebuilt). Raises ``KeyError`` naming an unknown head.
    """
    heads = list(heads)
    unknown = [h for h in heads if h not in readouts]
    if unknown:
        raise KeyError(f"no readout for heads {unknown}; have {list(readouts)}")
    changed = False
    for name, head in readouts.items():
        on = name in heads
        for p in head.parameters():
            changed |= p.requires_grad != on
            p.requires_grad_(on)
            if not on:
                p.grad = None
    return changed


def skip_update(decision: GuardDecision, optimizer: torch.optim.Optimizer) -> bool:
    """If the guard's ``decision`` says skip, drop every gradient of ``optimizer`` so that its next
    ``step()`` changes nothing (not even AdamW's step counts); returns whether it did."""
    if decision.skip:
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
    return decision.skip
