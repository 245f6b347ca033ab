"""``LayerLockHook``: drives LayerLock inside mmengine's runner (mmaction2's ``tools/train.py``).

Config (registered in mmaction2's ``HOOKS`` and mmengine's root ``HOOKS``)::

    custom_hooks = [dict(type='LayerLockHook',
                         schedule=dict(pixel_steps=160_000, interval=10_000, max_frozen=8),
                         target=dict(kind='latent', mode='single', loss_fraction=1.0),
                         warmup=dict(steps=2_000, start_factor=0.01),
                         guard=dict(policy='warn'))]

Every key is a field of :class:`layerlock_plugin.controller.LayerLockConfig` (``freeze``, ``schedule``,
``target``, ``warmup``, ``guard``; ``schedule.kind`` picks the explicit or adaptive schedule), plus
``method`` (``'layerlock'`` | ``'mae'`` | ``'freeze-only'`` | ``'latent-naive'``). Unknown keys and bad
values are refused when the hook is built, naming ``LayerLockHook.<key>``; the checks that need the
model (model type, ``max_frozen`` against the backbone depth) run in ``before_run``, before any data
is loaded or any step is taken.

What happens when (mmengine calls ``before_run`` -> weights init -> ``load_or_resume`` (which calls
``after_load_checkpoint`` and loads the optimizer state) -> ``before_train`` -> per iteration
``before_train_iter`` / ``train_step`` / ``after_train_iter``):

* ``before_run``: check the model is :class:`~.model.LayerLockVideoMAE`, build the controller on its
  backbone and hand it to the model.
* ``after_load_checkpoint``: keep ``checkpoint['layerlock']`` (a checkpoint without it is tolerated).
* ``before_train``: attach the optimizer(s) of the ``OptimWrapper`` (frozen parameters' state freed,
  switch warmup as optimizer step hooks, so it multiplies whatever LR mmengine's param schedulers set
  without changing their schedule); on resume re-apply the plan of the restored iteration.
  The saved optimizer state never holds frozen parameters (their state was dropped before saving),
  so loading it before the re-applied freeze is consistent.
* ``before_train_iter``: ``begin_step(runner.iter)``: freeze what is due, switch the target, set the
  warmup factor; the readout heads in use train, the others are switched off
  (:func:`~layerlock_plugin.integration.set_active_heads`); when the set of trainable parameters
  changed and the model is wrapped in (MM)DistributedDataParallel, the wrapper is rebuilt with the
  same class and arguments (:class:`~layerlock_plugin.integration.DDPSync`: DDP cannot follow a change
  of ``requires_grad``).
* the model's ``loss`` runs the collapse guard before backward; under ``guard.policy='skip'`` an
  optimizer step pre-hook drops that step's gradients
  (:func:`~layerlock_plugin.integration.skip_update`), so the update does nothing.
* ``after_train_iter``: ``layerlock/*`` scalars into the MessageHub (``train/layerlock/...``), from
  where mmengine's LoggerHook writes them to the log and every visualizer backend (TensorBoard, ...).
* ``before_save_checkpoint``: ``checkpoint['layerlock'] = controller.state_dict()``; the MessageHub's
  history buffers are stored as plain lists (and rebuilt in ``after_load_checkpoint``) so that the
  file loads with ``torch.load(weights_only=True)``, which mmengine 0.10.7 uses implicitly on
  torch >= 2.6 (see :mod:`.compat`).

Parameter groups stay as mmengine built them: a frozen parameter keeps its place in its group with
``grad=None`` (torch optimizers skip it), so optimizer checkpoints and schedulers stay valid.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from layerlock_plugin.controller import LayerLock, LayerLockConfig
from layerlock_plugin.errors import CheckpointError, ConfigError
from layerlock_plugin.integration import DDPSync, set_active_heads, skip_update

from mmaction.registry import HOOKS
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.optim import OptimWrapperDict
from mmengine.registry import HOOKS as ROOT_HOOKS

from .compat import message_hub_from_plain, message_hub_to_plain
from .model import LayerLockVideoMAE

__all__ = ["LayerLockHook"]

_PREFIX = "LayerLockHook"


def _prefixed(e: ConfigError) -> ConfigError:
    """The same error with the field named as the user wrote it in the config (``LayerLockHook.x``)."""
    message = str(e)[len(e.field) + 2 :] if str(e).startswith(e.field + ": ") else str(e)
    field = e.field if e.field.startswith(_PREFIX) or e.field.startswith("model") else f"{_PREFIX}.{e.field}"
    return ConfigError(field, message)


class LayerLockHook(Hook):
    """LayerLock for mmengine runners: see the module docstring."""

    priority = "NORMAL"

    def __init__(self, method: str | None = None, **config: Any):
        try:
            cfg = LayerLockConfig.from_dict(config, prefix=_PREFIX)
            self.config = cfg.with_method(method) if method is not None else cfg
        except ConfigError as e:
            raise (e if e.field.startswith(_PREFIX) else _prefixed(e)) from None
        self.controller: LayerLock | None = None
        self._loaded_state: dict | None = None
        self._ddp: DDPSync | None = None

    # -- helpers -------------------------------------------------------------------------------------
    @staticmethod
    def _model(runner) -> LayerLockVideoMAE:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        if not isinstance(model, LayerLockVideoMAE):
            raise ConfigError(
                "model.type",
                f"LayerLockHook needs the LayerLock pretraining model, model=dict(type='LayerLockVideoMAE', "
                f"backbone=dict(type='VisionTransformer', ...)); got {type(model).__name__}",
            )
        return model

    @staticmethod
    def _optimizers_of(runner) -> list[torch.optim.Optimizer]:
        wrapper = runner.optim_wrapper
        wrappers = list(wrapper.values()) if isinstance(wrapper, OptimWrapperDict) else [wrapper]
        return [w.optimizer for w in wrappers]

    def _log(self, runner, message: str) -> None:
        runner.logger.info(f"[layerlock] {message}")

    # -- mmengine hook points ---------------------------------------------------------------------------
    def before_run(self, runner) -> None:
        model = self._model(runner)
        try:
            self.controller = LayerLock(model.encoder, self.config, tubelet=model.encoder.tubelet,
                                        total_steps=runner.max_iters)
        except ConfigError as e:
            raise _prefixed(e) from None
        model.attach_layerlock(self.controller)
        self.controller.on_event(lambda event: self._log(runner, event.describe()))
        if isinstance(runner.model, DistributedDataParallel):  # rebuilt when the trainable set changes
            self._ddp = DDPSync(runner.model)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        message_hub_from_plain(checkpoint)  # before mmengine's resume hands it to the MessageHub
        self._loaded_state = checkpoint.get("layerlock")

    def before_train(self, runner) -> None:
        ll = self._require()
        for opt in self._optimizers_of(runner):
            if not any(opt is o for o in ll.optimizers):
                ll.attach_optimizer(opt)
                opt.register_step_pre_hook(self._skip_if_tripped)
        self._check_heads_optimized(runner)
        it = runner.iter
        state, self._loaded_state = self._loaded_state, None
        if it > 0:
            if state is not None:
                if int(state.get("next_step", -1)) != it:
                    raise CheckpointError(
                        f"checkpoint['layerlock'] was saved at step {state.get('next_step')} but the runner "
                        f"resumes at iteration {it}; the checkpoint is inconsistent"
                    )
                ll.load_state_dict(state)
            elif ll.schedule.state_dict():  # state beyond the config (the adaptive schedule's decided events)
                raise CheckpointError(
                    f"resuming at iteration {it} from a checkpoint without a 'layerlock' entry: the adaptive "
                    f"schedule's decided events cannot be recomputed; resume from a checkpoint written "
                    f"with LayerLockHook"
                )
            else:
                warnings.warn(
                    f"LayerLockHook: the resumed checkpoint has no 'layerlock' entry; re-deriving the "
                    f"freezing plan from iteration {it} (collapse-guard history starts afresh)",
                    stacklevel=2,
                )
                ll.begin_step(it - 1)
            self._log(runner, f"resumed at iteration {it}: {ll.plan.num_frozen} blocks frozen, "
                              f"target {', '.join(ll.heads())}")
        elif state is not None:
            self._log(runner, "checkpoint['layerlock'] ignored: load_from loads weights only, the "
                              "schedule starts at iteration 0")
        self._sync(runner)

    def before_train_iter(self, runner, batch_idx: int, data_batch: Any = None) -> None:
        self._require().begin_step(runner.iter)
        self._sync(runner)

    def after_train_iter(self, runner, batch_idx: int, data_batch: Any = None, outputs: Any = None) -> None:
        for key, value in self._require().metrics().items():
            runner.message_hub.update_scalar(f"train/{key}", value)

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if self.controller is not None:
            checkpoint["layerlock"] = self.controller.state_dict()
        message_hub_to_plain(checkpoint)  # so that mmengine's torch.load(weights_only=True) can read it

    # -- internals ----------------------------------------------------------------------------------------
    def _require(self) -> LayerLock:
        if self.controller is None:
            raise RuntimeError("LayerLockHook: before_run has not run (the hook must be registered with the runner)")
        return self.controller

    def _check_heads_optimized(self, runner) -> None:
        """Every readout must be in an optimizer, else it would stay at its random init while it is the target."""
        held = {id(p) for opt in self._optimizers_of(runner) for g in opt.param_groups for p in g["params"]}
        for name, p in self._model(runner).readouts.named_parameters():
            if id(p) not in held:
                raise ConfigError("optim_wrapper", f"the optimizer does not hold readouts.{name}: its constructor "
                                  f"skipped it (was requires_grad switched off before the optimizer was built?)")

    def _skip_if_tripped(self, optimizer, args, kwargs) -> None:
        """Optimizer step pre-hook: under ``guard.policy='skip'`` a tripped step updates nothing."""
        skip_update(self._require().last_decision, optimizer)

    def _sync(self, runner) -> None:
        """Readout heads in use train, others not; rebuild DDP when the trainable set changed."""
        set_active_heads(self._model(runner).readouts, self._require().heads())
        if self._ddp is not None and self._ddp.stale:
            runner.model = None  # the only reference: the old reducer and its hooks go in rebuild()
            runner.model = self._ddp.rebuild()
            self._log(runner, f"rebuilt {type(runner.model).__name__} for the new set of trained parameters")


for _registry in (HOOKS, ROOT_HOOKS):
    _registry.register_module(module=LayerLockHook)
