"""``LayerLockTrainer``: LayerLock for VideoMAE pretraining under the Hugging Face ``Trainer``.

A ``run_mae``-style script changes its model class and its trainer class::

    model = LayerLockVideoMAEForPreTraining(config)          # was VideoMAEForPreTraining(config)
    trainer = LayerLockTrainer(model=model, args=training_args, train_dataset=ds, data_collator=collate,
                               layerlock=LayerLockConfig(schedule=ScheduleConfig(...)), mask_ratio=0.9)
    trainer.train(resume_from_checkpoint=...)
    trainer.save_encoder("encoder/")                         # VideoMAEModel weights for fine-tuning

HF's callbacks cannot change the loop, so the work is split: :class:`LayerLockCallback` runs at the
loop's events, the subclass owns the loss, the optimizer, the checkpoint and the logs.

* ``on_step_begin``: ``begin_step(state.global_step)``: freeze what is due, switch the target, set the
  switch-warmup factor (an optimizer step hook: HF's LR scheduler keeps its own schedule).
* ``compute_loss``: masks (the batch's ``bool_masked_pos`` if it has one, each row the same count; else
  tube masks drawn from a generator seeded by ``(mask_seed, step, micro-batch, rank)``, so a resumed run
  draws the masks of the uninterrupted one), ``target.loss_fraction`` of the masked tokens as queries,
  targets (VideoMAE's own pixel labels, then block ``k`` of the frozen prefix on the full clip, no
  autograd), the student through the (DDP-wrapped) model, MSE per head.
* ``on_pre_optimizer_step``: frozen parameters' and unused readouts' gradients dropped (DDP may write
  zeros), collapse guard on the last micro-batch (policy ``skip`` drops every gradient).
* ``create_optimizer``: HF's optimizer with LayerLock's frozen parameters kept in their groups (HF skips
  parameters that do not require grad), so its layout is the same whenever it is built: fresh, or on
  resume after the frozen set was restored; every readout is in it from the start.
* ``train(resume_from_checkpoint=...)``: restores ``layerlock.pt`` of the checkpoint and re-applies the
  frozen set *before* HF builds the optimizer and loads its state; ``save_model`` (which HF calls for every
  checkpoint) writes ``layerlock.pt`` atomically beside the weights.
* ``log``: ``layerlock/*`` metrics join every training log (``report_to``: TensorBoard, W&B, ...).

DDP: ``TrainingArguments.ddp_find_unused_parameters`` must not be False (frozen blocks and unused readouts
get no gradient); HF's default (None) is True without gradient checkpointing. The check runs in
``on_train_begin``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from layerlock_plugin import _validate as v
from layerlock_plugin.checkpoint import load_checkpoint, save_atomic
from layerlock_plugin.controller import LayerLock, LayerLockConfig
from layerlock_plugin.errors import CheckpointError, ConfigError, MissingDependencyError
from layerlock_plugin.integration import skip_update
from layerlock_plugin.masking import mask_to_indices, num_masked, subsample_indices, tube_masking
from layerlock_plugin.targets import PIXELS, gather_tokens

from ._compat import INSTALL_HINT
from .videomae import LayerLockVideoMAEForPreTraining, videomae_pixel_targets

try:
    import accelerate  # noqa: F401  (transformers' Trainer needs it; its own error does not name our extra)
except ImportError as exc:
    raise MissingDependencyError(f"LayerLockTrainer needs accelerate (transformers' Trainer does): {INSTALL_HINT}") from exc
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import get_last_checkpoint

__all__ = ["LayerLockCallback", "LayerLockTrainer", "STATE_FILE"]

STATE_FILE = "layerlock.pt"  # in every checkpoint folder, beside HF's trainer_state.json


class LayerLockCallback(TrainerCallback):
    """The loop events of LayerLock (module docstring); built and registered by :class:`LayerLockTrainer`."""

    def __init__(self, trainer: LayerLockTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        ddp = self.trainer.model_wrapped
        if isinstance(ddp, DistributedDataParallel) and (not ddp.find_unused_parameters or ddp.static_graph):
            raise ConfigError("TrainingArguments.ddp_find_unused_parameters",
                              "must be True under DDP (and ddp static_graph off): LayerLock freezes blocks during "
                              "training and its unused readouts get no gradient")

    def on_step_begin(self, args, state, control, **kwargs):
        self.trainer.layerlock.begin_step(state.global_step)
        self.trainer.micro_batch, self.trainer.last_loss, self.trainer.last_targets = 0, None, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        trainer, ll = self.trainer, self.trainer.layerlock
        active = set(ll.heads())
        idle = [p for h, m in trainer.model.readouts().items() if h not in active for p in m.parameters()]
        for p in [*ll.freezer.frozen_parameters(), *idle]:
            p.grad = None
        if trainer.last_loss is not None:
            decision = ll.end_step(trainer.last_loss, trainer.last_targets)
            for opt in ll.optimizers:
                skip_update(decision, opt)


class LayerLockTrainer(Trainer):
    """transformers' ``Trainer`` that pretrains a :class:`LayerLockVideoMAEForPreTraining` with LayerLock.

    Args (besides ``Trainer``'s, passed through):
        layerlock: :class:`LayerLockConfig`, or its plain-dict form (``LayerLockConfig.from_dict``).
        mask_ratio: tube-mask ratio of the spatial tokens when a batch brings no ``bool_masked_pos``.
        mask_seed: seed of the per-step mask generator (default: ``args.seed``).
        verbose: print freeze events / target switches (main process).

    Attributes: ``layerlock`` (the controller), ``events`` (every event seen).
    """

    def __init__(self, model=None, args=None, *trainer_args, layerlock: LayerLockConfig | dict | None = None,
                 mask_ratio: float = 0.9, mask_seed: int | None = None, verbose: bool = True, **trainer_kwargs):
        if not isinstance(model, LayerLockVideoMAEForPreTraining):
            raise ConfigError("model", f"LayerLockTrainer needs LayerLockVideoMAEForPreTraining (a drop-in subclass of "
                                       f"VideoMAEForPreTraining with LayerLock's readouts), got {type(model).__name__}")
        config = layerlock if isinstance(layerlock, LayerLockConfig) else LayerLockConfig.from_dict(layerlock)
        if config.target.kind == "pixels" and config.target.normalize_pixels != model.config.norm_pix_loss:
            raise ConfigError("target.normalize_pixels", f"must equal the model's config.norm_pix_loss "
                                                         f"({model.config.norm_pix_loss}): pixel targets are VideoMAE's own")
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        encoder = model.layerlock_encoder
        total = self.args.max_steps if self.args.max_steps > 0 else None
        self.layerlock = LayerLock(encoder, config, tubelet=encoder.tubelet, total_steps=total)
        self.mask_ratio = v.fraction("mask_ratio", mask_ratio, allow_one=False)
        spatial = (model.config.image_size // model.config.patch_size) ** 2
        try:
            num_masked(spatial, self.mask_ratio)
        except ValueError as e:
            raise ConfigError("mask_ratio", f"{e} (tube masks: the ratio applies to the {spatial} tokens of a frame)") from None
        self.mask_seed = self.args.seed if mask_seed is None else int(mask_seed)
        self.events: list = []
        self.layerlock.on_event(self._on_event)
        self.verbose = verbose
        self.micro_batch, self.last_loss, self.last_targets = 0, None, None
        self.loss_is_scaled_for_ga = False  # a per-batch mean: HF divides it by the accumulation steps
        self.add_callback(LayerLockCallback(self))

    def _on_event(self, event) -> None:
        self.events.append(event)
        if self.verbose and self.is_world_process_zero():
            print(f"[layerlock] {event.describe()}")

    # -- the optimizer: a layout that does not depend on when it is built --------------------------
    def create_optimizer(self, model=None):
        """HF's optimizer, with LayerLock's frozen parameters in their groups (they have no state and no
        gradient, so they never move); attached to the controller (switch warmup, state freeing)."""
        frozen = [p for p in self.layerlock.freezer.frozen_parameters() if not p.requires_grad]
        for p in frozen:
            p.requires_grad_(True)
        try:
            optimizer = super().create_optimizer(model)
        finally:
            for p in frozen:
                p.requires_grad_(False)
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
        held = {id(p) for g in inner.param_groups for p in g["params"]}
        missing = [h for h, m in self.model.readouts().items() if any(id(p) not in held for p in m.parameters())]
        if missing:
            raise ConfigError("optimizers", f"the optimizer does not hold the readouts {missing}; build it from "
                                            f"model.parameters() before training (every readout requires grad)")
        self.layerlock.attach_optimizer(inner)
        return optimizer

    # -- one step -----------------------------------------------------------------------------------
    def _generator(self) -> torch.Generator:
        """One stream per (mask_seed, step, micro-batch, rank): resume redraws the same masks, ranks differ."""
        seed = ((self.mask_seed * 1_000_003 + self.state.global_step) * 9_973 + self.micro_batch) * 101 + self.args.process_index
        return torch.Generator().manual_seed(seed % (2**63 - 1))

    def _masks(self, inputs: dict, pixel_values: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(visible [B, V], masked [B, M])`` sorted token indices of this micro-batch."""
        encoder = self.model.layerlock_encoder
        b, t, _, h, w = pixel_values.shape
        pt, ph, pw = encoder.tubelet
        grid = (t // pt, h // ph, w // pw)
        given = inputs.get("bool_masked_pos")
        if given is not None:
            n = grid[0] * grid[1] * grid[2]
            if given.dtype != torch.bool or tuple(given.shape) != (b, n):
                raise ConfigError("bool_masked_pos", f"must be a bool [B={b}, N={n}] tensor (True = masked), got "
                                                     f"{given.dtype} {tuple(given.shape)}")
            counts = given.sum(dim=1)
            if bool((counts != counts[0]).any()) or not 0 < int(counts[0]) < n:
                raise ConfigError("bool_masked_pos", f"every row must mask the same number of tokens, between 1 and "
                                                     f"{n - 1} (VideoMAE's encoder keeps [B, V, D]); got {counts.tolist()}")
            return mask_to_indices(~given), mask_to_indices(given)
        return tube_masking(b, grid, self.mask_ratio, generator=gen, device=pixel_values.device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """LayerLock's loss for one micro-batch (``inputs["pixel_values"] [B, T, C, H, W]``): the mean over the
        plan's heads of the MSE at the query tokens."""
        pixel_values = inputs["pixel_values"]
        ll, plan = self.layerlock, self.layerlock.plan
        gen = self._generator()
        visible, masked = self._masks(inputs, pixel_values, gen)
        query = subsample_indices(masked, ll.config.target.loss_fraction, generator=gen)
        self.micro_batch += 1
        if ll.target_layers(plan):
            targets = ll.targets(pixel_values, plan, query, visible)
        else:
            targets = {PIXELS: gather_tokens(videomae_pixel_targets(self.model.config, pixel_values), query)}
        preds = model(pixel_values=pixel_values, visible_idx=visible, query_idx=query, heads=list(targets),
                      frozen_prefix=ll.frozen_prefix(plan))
        loss, _ = ll.loss(preds, targets)
        self.last_loss, self.last_targets = loss.detach(), targets
        return (loss, preds) if return_outputs else loss

    # -- logs, checkpoints, resume ---------------------------------------------------------------------
    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """HF's ``log`` with ``layerlock/*`` added to training logs (those with a ``loss``)."""
        if "loss" in logs:
            logs.update(self.layerlock.metrics())
        super().log(logs, *args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """HF's ``save_model``, plus ``layerlock.pt`` (the controller's state) beside the weights."""
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            save_atomic({"global_step": self.state.global_step, "layerlock": self.layerlock.state_dict()},
                        Path(output_dir or self.args.output_dir) / STATE_FILE)

    def save_encoder(self, output_dir: str | os.PathLike) -> None:
        """Save the pretrained encoder as a ``VideoMAEModel`` (``save_pretrained``): it loads into
        ``VideoMAEForVideoClassification.from_pretrained`` with only the classifier new (and ``fc_norm``
        when ``config.use_mean_pooling``)."""
        if not self.args.should_save:
            return
        config = self.model.config
        architectures = config.architectures  # save_pretrained rewrites the config the models share
        try:
            self.model.videomae.save_pretrained(output_dir)
        finally:
            config.architectures = architectures

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """HF's ``train``; on resume the LayerLock state of the checkpoint is restored first (module docstring)."""
        path = resume_from_checkpoint
        if path is True:
            path = get_last_checkpoint(self.args.output_dir) or path  # HF names the error when there is none
        if isinstance(path, (str, os.PathLike)):
            self._restore(Path(path))
        return super().train(path if path else resume_from_checkpoint, *args, **kwargs)

    def _restore(self, folder: Path) -> None:
        # transformers 5.x's Trainer resumes with model.load_state_dict(<the raw file>, strict=False), without
        # the key renaming that save_pretrained applied (VideoMAE's attention q_bias / v_bias): those weights
        # would silently keep their init (HF logs them as missing). Loading through from_pretrained renames
        # them; HF's own load afterwards rewrites the same values for the keys it finds.
        if (folder / "config.json").is_file():
            self.model.load_state_dict(type(self.model).from_pretrained(folder).state_dict())
        step = TrainerState.load_from_json(str(folder / "trainer_state.json")).global_step
        ll = self.layerlock
        if (folder / STATE_FILE).is_file():
            saved = load_checkpoint(folder / STATE_FILE)
            if int(saved.get("global_step", -1)) != step or int(saved["layerlock"].get("next_step", -1)) != step:
                raise CheckpointError(f"{folder / STATE_FILE} was saved at step {saved.get('global_step')} but "
                                      f"trainer_state.json says {step}; the checkpoint is inconsistent")
            ll.load_state_dict(saved["layerlock"])
        elif ll.schedule.state_dict():
            raise CheckpointError(f"{folder} has no {STATE_FILE}: the adaptive schedule's decided events cannot be "
                                  f"recomputed; resume from a checkpoint written by LayerLockTrainer")
        elif step > 0:
            warnings.warn(f"LayerLockTrainer: {folder} has no {STATE_FILE}; re-deriving the freezing plan from step "
                          f"{step} (collapse-guard history starts afresh)", stacklevel=3)
            ll.begin_step(step - 1)
