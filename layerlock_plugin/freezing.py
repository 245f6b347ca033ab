"""Freezing mechanics: make frozen mean frozen (DESIGN.md pitfalls 1, 2 and 11).

When a unit freezes, each of its parameters gets ``requires_grad=False`` and ``grad=None``, and its
optimizer state (AdamW moments, step counts) is dropped. The parameter stays in its param group, so
group order and metadata, and with them the host's optimizer checkpoints and schedulers, stay valid;
torch optimizers skip parameters whose ``grad`` is None, so neither momentum nor weight decay can
move a frozen weight. Frozen modules run in eval mode (dropout and drop-path off): a forward pre-hook
puts them back in eval mode at every call, so a host's later ``model.train()`` cannot undo it.
"""

from __future__ import annotations

import torch
from torch import nn

from .encoder import EncoderUnits, FreezeUnit


def _stay_in_eval(module: nn.Module, args) -> None:
    if module.training:
        module.eval()


class Freezer:
    """Freezes the stem and the first blocks of an encoder, monotonically."""

    def __init__(self, units: EncoderUnits, optimizer: torch.optim.Optimizer | None = None):
        self.units = units
        self.optimizers: list[torch.optim.Optimizer] = [optimizer] if optimizer is not None else []
        self.num_frozen = 0
        self.stem_frozen = False
        self._hooks: list = []

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Also drop frozen parameters' state from ``optimizer`` (e.g. one built after a freeze)."""
        self.optimizers.append(optimizer)
        for p in self.frozen_parameters():
            optimizer.state.pop(p, None)

    def frozen_units(self) -> list[FreezeUnit]:
        """The frozen units, stem first."""
        return ([self.units.stem] if self.stem_frozen else []) + list(self.units.blocks[: self.num_frozen])

    def frozen_parameters(self) -> list[nn.Parameter]:
        """Every parameter of the frozen units."""
        return [p for u in self.frozen_units() for p in u.params]

    def apply(self, num_frozen: int, stem: bool) -> list[str]:
        """Freeze blocks ``1..num_frozen`` (and the stem if ``stem``); returns newly frozen unit names.

        Unfreezing is refused: LayerLock schedules only ever freeze more.
        """
        if not 0 <= num_frozen <= self.units.num_layers:
            raise ValueError(f"num_frozen must be in 0..{self.units.num_layers}, got {num_frozen}")
        if num_frozen < self.num_frozen or (self.stem_frozen and not stem):
            raise ValueError(
                f"cannot unfreeze: {self.num_frozen} blocks (stem={self.stem_frozen}) are frozen, "
                f"asked for {num_frozen} (stem={stem}). Resume into a freshly built model instead."
            )
        new: list[FreezeUnit] = []
        if stem and not self.stem_frozen:
            new.append(self.units.stem)
        new += list(self.units.blocks[self.num_frozen : num_frozen])
        for unit in new:
            self._freeze(unit)
        self.num_frozen, self.stem_frozen = num_frozen, stem or self.stem_frozen
        return [u.name for u in new]

    def _freeze(self, unit: FreezeUnit) -> None:
        for p in unit.params:
            p.requires_grad_(False)
            p.grad = None
            for opt in self.optimizers:
                opt.state.pop(p, None)
        for m in unit.modules:
            m.eval()
            self._hooks.append(m.register_forward_pre_hook(_stay_in_eval))

    def remove_hooks(self) -> None:
        """Remove the eval-mode pre-hooks of the frozen modules (their weights stay frozen)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
