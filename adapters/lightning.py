"""LayerLock as a (PyTorch) Lightning callback: ``Trainer(callbacks=[LayerLockCallback()])``.

How a LightningModule takes part (pick one; the callback looks in this order):

1. it (or one of its submodules, e.g. a :class:`~layerlock_plugin.adapters.lightly_mae.LayerLockMAE`)
   already holds a controller as ``.layerlock`` -> the callback drives that controller;
2. it exposes ``.layerlock_encoder`` (a layered encoder, or a timm ``VisionTransformer`` which is
   wrapped in :class:`~layerlock_plugin.adapters.timm_vit.TimmViTEncoder`) -> the callback builds a
   :class:`~layerlock_plugin.controller.LayerLock` from its ``config`` and sets ``pl_module.layerlock``
   in ``setup``. The module's ``training_step`` then calls ``self.layerlock.targets(x, None, query_idx)``
   (the current plan) and ``self.layerlock.frozen_prefix()``, and keeps one readout per head name.

What the callback does:

* ``setup``: find or build the controller (before any checkpoint is restored).
* ``on_load_checkpoint``: restore ``checkpoint["layerlock"]`` (absent: start from scratch, e.g. a
  checkpoint written without LayerLock) and re-apply the freezing of the restored step. Lightning
  calls it *before* ``configure_optimizers`` and before the optimizer state is loaded (its order in
  ``Trainer._run``: setup -> restore weights + callbacks' ``on_load_checkpoint`` -> strategy setup
  (optimizers, DDP wrapping) -> ``on_fit_start`` -> optimizer/loop state), so frozen parameters are
  already frozen when the optimizer and DDP are built.
* ``on_fit_start``: attach every optimizer of the trainer (switch-warmup LR factor via optimizer step
  hooks, optimizer state of frozen parameters dropped). Param groups are left as they are: frozen
  parameters stay in their groups with ``grad=None`` (torch optimizers skip them), so no group
  surgery is needed and optimizer checkpoints stay loadable.
* ``on_train_batch_start``: ``begin_step(trainer.global_step)`` (freezing, target switch, warmup).
* ``on_before_backward`` / ``on_before_optimizer_step``: collapse guard on the loss and the latent
  targets of this step; policy ``skip`` drops every gradient so the optimizer step changes nothing.
  Frozen parameters' gradients are set to None before every step (a DDP reducer may write zeros).
* ``on_train_batch_end``: logs ``layerlock/*`` with ``pl_module.log``.
* ``on_save_checkpoint``: ``checkpoint["layerlock"] = controller.state_dict()``.

DDP: parameters that stop requiring grad after DDP was built, and readout heads that are not used
yet, make the default DDP (``find_unused_parameters=False``) fail at the next backward. Use
``Trainer(strategy="ddp_find_unused_parameters_true")`` (or ``DDPStrategy(find_unused_parameters=True)``);
the callback refuses plain DDP with an error saying so. (Rebuilding DDP at each freeze event is the
cheaper alternative the reference trainer may use; Lightning offers no public hook to re-wrap.)
Tested here on CPU: single process, and 2-process DDP (gloo, ``ddp_find_unused_parameters_true``) across
two freeze events (tests/test_lightning_ddp.py: frozen blocks never move again, weights identical on
both ranks). Lightning's FSDP strategy with this callback is untested.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from layerlock_plugin.controller import LayerLock, LayerLockConfig
from layerlock_plugin.encoder import LayeredEncoder
from layerlock_plugin.errors import ConfigError, EncoderStructureError, MissingDependencyError, install_extra
from layerlock_plugin.integration import skip_update

try:
    try:
        import pytorch_lightning as pl  # installed with lightly
    except ImportError:
        import lightning.pytorch as pl  # type: ignore[no-redef]
except ImportError as exc:  # pragma: no cover - exercised only without Lightning
    raise MissingDependencyError(
        "layerlock_plugin.adapters.lightning needs pytorch-lightning (or lightning): " + install_extra("lightly")
    ) from exc

__all__ = ["LayerLockCallback", "find_controller"]

CHECKPOINT_KEY = "layerlock"


def find_controller(pl_module: nn.Module) -> LayerLock | None:
    """The :class:`LayerLock` held as ``.layerlock`` by ``pl_module`` or one of its submodules."""
    for m in pl_module.modules():
        ll = m.__dict__.get("layerlock")
        if isinstance(ll, LayerLock):
            return ll
    return None


def _as_encoder(obj: Any) -> LayeredEncoder:
    if isinstance(obj, LayeredEncoder):
        return obj
    if type(obj).__module__.startswith("timm."):
        from layerlock_plugin.adapters.timm_vit import TimmViTEncoder

        return TimmViTEncoder(obj)
    if type(obj).__module__.startswith("lightly.") and hasattr(obj, "vit"):
        from layerlock_plugin.adapters.timm_vit import TimmViTEncoder

        return TimmViTEncoder(obj.vit)
    raise EncoderStructureError(
        f"LayerLockCallback: pl_module.layerlock_encoder is a {type(obj).__name__}, which neither implements "
        f"the layered-encoder protocol (layerlock_units(), forward_prefix()) nor is a timm ViT / lightly "
        f"MaskedVisionTransformerTIMM"
    )


class LayerLockCallback(pl.Callback):
    """Adds LayerLock to a LightningModule (see the module docstring for what the module provides).

    Args:
        config: LayerLock config used when the callback builds the controller from
            ``pl_module.layerlock_encoder``. Must be None when the module brings its own controller
            (e.g. a ``LayerLockMAE``), whose config is used.
        tubelet: patch size for pixel targets, ``(1, p, p)`` for images, ``(t, p, p)`` for videos (only
            when the callback builds the controller).
        log_every_n_steps: ``layerlock/*`` metrics are logged every this many batches (``on_step``).
        verbose: print freeze / switch events.
    """

    def __init__(
        self,
        config: LayerLockConfig | None = None,
        *,
        tubelet: tuple[int, int, int] | None = None,
        log_every_n_steps: int = 1,
        verbose: bool = True,
    ):
        super().__init__()
        if isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or log_every_n_steps < 1:
            raise ConfigError("log_every_n_steps", f"must be a positive integer, got {log_every_n_steps!r}")
        self.config = config
        self.tubelet = tubelet
        self.log_every_n_steps = log_every_n_steps
        self.verbose = verbose
        self.controller: LayerLock | None = None
        self.events: list = []
        self._loss: torch.Tensor | None = None

    # ---------------------------------------------------------------------------- wiring
    def _controller(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> LayerLock:
        if self.controller is not None:
            return self.controller
        ll = find_controller(pl_module)
        if ll is not None:
            if self.config is not None and self.config != ll.config:
                raise ConfigError(
                    "LayerLockCallback.config",
                    "the LightningModule already holds a LayerLock controller with a different config; "
                    "pass config=None to the callback (the module's controller is used)",
                )
        else:
            if not hasattr(pl_module, "layerlock_encoder"):
                raise EncoderStructureError(
                    f"LayerLockCallback: {type(pl_module).__name__} has neither a LayerLock controller as "
                    f".layerlock (e.g. a LayerLockMAE submodule) nor a .layerlock_encoder attribute; add "
                    f"`self.layerlock_encoder = <your ViT>` in __init__"
                )
            total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
            ll = LayerLock(_as_encoder(pl_module.layerlock_encoder), self.config, tubelet=self.tubelet, total_steps=total)
            pl_module.layerlock = ll
        ll.on_event(self._on_event)
        self.controller = ll
        return ll

    def _on_event(self, event) -> None:
        self.events.append(event)
        if self.verbose:
            print(f"[layerlock] {event.describe()}")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._controller(trainer, pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ll = self._controller(trainer, pl_module)
        self._check_strategy(trainer)
        for opt in trainer.optimizers:
            ll.attach_optimizer(getattr(opt, "optimizer", opt))  # LightningOptimizer / wrapped; once each

    @staticmethod
    def _check_strategy(trainer: pl.Trainer) -> None:
        """Refuse a DDP wrapper (built by the strategy before ``on_fit_start``) without find_unused_parameters."""
        model = getattr(trainer.strategy, "model", None)
        if isinstance(model, DistributedDataParallel) and not model.find_unused_parameters:
            raise ConfigError(
                "Trainer.strategy",
                "LayerLock freezes parameters during training and pre-creates readout heads that are unused "
                "until their target switch; plain DDP (find_unused_parameters=False) fails at the first freeze. "
                "Use Trainer(strategy='ddp_find_unused_parameters_true') or "
                "DDPStrategy(find_unused_parameters=True)",
            )

    # ---------------------------------------------------------------------------- steps
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        ll = self._controller(trainer, pl_module)
        ll.begin_step(trainer.global_step)
        self._loss = None

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        self._loss = loss.detach()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        ll = self._controller(trainer, pl_module)
        for p in ll.freezer.frozen_parameters():
            p.grad = None
        if self._loss is None:
            return
        skip_update(ll.end_step(self._loss, ll.last_targets), optimizer)  # the targets the module computed

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx % self.log_every_n_steps:
            return
        ll = self._controller(trainer, pl_module)
        for name, value in ll.metrics().items():
            pl_module.log(name, float(value), on_step=True, on_epoch=False, prog_bar=False, logger=True)

    # ---------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = self._controller(trainer, pl_module).state_dict()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            return  # a checkpoint without LayerLock state: start the schedule from the restored step
        self._controller(trainer, pl_module).load_state_dict(state)
