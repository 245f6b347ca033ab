"""LayerLock for V-JEPA-style trainers (context encoder, predictor, EMA target encoder, multi-block masks).

LayerLock's V-JEPA variant (paper, "Extension to V-JEPA"): the target is the **EMA teacher's** output of
block ``k`` (block 1 at first), and as training goes on the student's blocks ``1..k`` freeze from the
input side while the target moves deeper. The EMA teacher is kept. :class:`LayerLockAdapter` gives a
V-JEPA train step everything this needs; the step changes in a handful of lines::

    layerlock = LayerLockAdapter(encoder, target_encoder, predictor, optimizer, LayerLockConfig(...))
    for step in range(start, total):
        plan = layerlock.begin_step(step)                      # + freeze on schedule, switch warmup
        ...scheduler.step(); wd_scheduler.step()               # V-JEPA's own LR / WD schedules
        h = layerlock.targets(clips, masks_pred)               # replaces forward_target(clips)
        z = forward_context(clips, h)                          # unchanged
        loss = loss_fn(z, h)                                   # unchanged
        loss.backward()
        if not layerlock.end_step(loss, h).skip:               # + collapse guard
            optimizer.step()
        optimizer.zero_grad()
        layerlock.update_teacher(next(momentum_scheduler))     # replaces the zip(...) EMA loop

What it does:

* **Targets** (:meth:`LayerLockAdapter.targets`): the teacher runs its patch embedding and blocks
  ``1..k`` only (truncated forward, eval mode, no autograd) on the full clip; the output of block ``k``
  gets V-JEPA's affine-free ``F.layer_norm`` (``target.layer_norm``) and is gathered at the prediction
  masks. ``teacher_norm=True`` applies the encoder's own final norm first, as V-JEPA's ``out_layers``
  do. ``k = max(1, plan.target_layer)``: block 1 before the first freeze, then the newest frozen block.
* **Freezing** of the student's stem (patch embedding, positions) and blocks ``1..k`` by the core
  :class:`~layerlock_plugin.freezing.Freezer` through the :class:`~layerlock_plugin.controller.LayerLock`
  controller (``requires_grad=False``, ``grad=None``, AdamW state dropped, eval mode kept). A frozen
  prefix needs no ``torch.no_grad()`` in the student: its input and weights need no gradient, so autograd
  records nothing for it.
* **EMA** (:class:`NamedEMA`): pairs teacher and student parameters by *name* (``module.`` /
  ``_orig_mod.`` / ``backbone.`` wrappers stripped), refuses different architectures naming the first
  mismatch, and updates with ``torch._foreach_mul_`` / ``torch._foreach_add_`` (V-JEPA's formula
  ``t = m * t + (1 - m) * s``). Rule for the teacher's copies of **frozen** student units
  (``teacher_frozen``): ``"follow"`` (default) keeps updating them, so they converge geometrically
  (factor ``m`` per step) to the frozen student weights and the layer-``k`` target settles on the
  frozen student's own ``h_k``, as in LayerLock for MAE; ``"stop"`` freezes them too, so the target
  prefix stops moving at the freeze event (and the update skips them).
* **Switch warmup** on top of the trainer's own LR / WD schedules (the core ``LRScaler`` scales ``lr``
  inside ``optimizer.step()`` only, so V-JEPA's ``WarmupCosineSchedule`` / ``CosineWDSchedule`` keep
  their values), **collapse guard** on every step's targets, ``layerlock/*`` **metrics**,
  ``state_dict()`` / ``load_state_dict()`` for the trainer's checkpoint.
* **Masks**: V-JEPA index lists (``[B, K]`` per mask config, a list of them, or several configs
  concatenated along the batch, ``[M*B, K]``) and boolean masks ``[B, N]`` (True = the token is in the
  set, i.e. predicted for ``masks_pred``; every row must select the same number of tokens).
* **DDP** (the core's :class:`~layerlock_plugin.integration.LayerLockDDP`, re-exported here): V-JEPA wraps
  the encoder with ``static_graph=True``, which breaks when parameters stop requiring gradients.
  ``LayerLockDDP(encoder, static_graph=True)`` is a drop-in for ``DistributedDataParallel(encoder,
  static_graph=True)`` that rebuilds the DDP wrapper (collectively, on every rank at the same step) when
  the set of trainable parameters changes; its ``state_dict`` keys are DDP's (``module.*``).

Encoders: V-JEPA's ``VisionTransformer`` (from the ``vjepa`` distribution, or a look-alike with
``patch_embed``, ``pos_embed``, ``blocks``, ``norm`` and ``interpolate_pos_encoding``) is wrapped by
:class:`~layerlock_plugin.adapters.vjepa_encoders.VJEPAEncoder`, V-JEPA 2's (``vjepa2``, RoPE inside
attention) by :class:`~layerlock_plugin.adapters.vjepa_encoders.VJEPA2Encoder`; a timm ``VisionTransformer`` by
:class:`~layerlock_plugin.adapters.timm_vit.TimmViTEncoder`; anything that implements the layered-encoder
protocol is used as is. ``MultiMaskWrapper`` / DDP / ``torch.compile`` wrappers are looked through.

Install: ``pip install -e ".[vjepa]" && pip install --no-deps vjepa==0.1.2`` (the ``vjepa``
distribution's declared pins conflict with this stack; its model code imports fine with torch, timm,
einops). This module itself does not import ``vjepa``: it works on the modules you pass.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from layerlock_plugin import _validate as v
from layerlock_plugin.checkpoint import strip_wrapper_prefixes
from layerlock_plugin.collapse import GuardDecision
from layerlock_plugin.controller import LayerLock, LayerLockConfig
from layerlock_plugin.encoder import LayeredEncoder
from layerlock_plugin.errors import CheckpointError, ConfigError, EncoderStructureError
from layerlock_plugin.integration import LayerLockDDP  # noqa: F401  (re-exported: V-JEPA's DDP line)
from layerlock_plugin.masking import mask_to_indices
from layerlock_plugin.schedule import Plan, Schedule
from layerlock_plugin.targets import gather_tokens, prefix_outputs

from .vjepa_encoders import INSTALL_HINT, VJEPA2Encoder, VJEPAEncoder, as_layered, require_vjepa, require_vjepa2, unwrap

__all__ = [
    "LayerLockAdapter",
    "LayerLockDDP",
    "NamedEMA",
    "VJEPA2Encoder",
    "VJEPAEncoder",
    "as_layered",
    "layer_targets",
    "normalize_masks",
    "require_vjepa",
    "require_vjepa2",
    "unwrap",
    "INSTALL_HINT",
]

TEACHER_FROZEN_RULES = ("follow", "stop")

# ---------------------------------------------------------------------------------- masks
def normalize_masks(masks: Any, batch: int, num_tokens: int, field: str = "masks_pred") -> tuple[list[torch.Tensor], bool]:
    """Turn V-JEPA masks into a list of index tensors ``[B_i, K_i]`` (``B_i`` a multiple of ``batch``).

    Accepts an index tensor ``[B, K]`` or ``[M*B, K]`` (``M`` mask configs concatenated along the batch),
    a list/tuple of those (one per mask config, V-JEPA's collator output), or boolean ``[B, N]`` masks
    (True = token selected; each row the same count). Returns ``(masks, was_list)``.
    """
    was_list = isinstance(masks, (list, tuple))
    items = list(masks) if was_list else [masks]
    if not items:
        raise ValueError(f"{field}: empty list of masks")
    out = []
    for i, m in enumerate(items):
        where = f"{field}[{i}]" if was_list else field
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"{where}: expected a tensor, got {type(m).__name__}")
        if m.dtype == torch.bool:
            if m.dim() != 2 or m.shape[1] != num_tokens:
                raise ValueError(f"{where}: a boolean mask must be [B, {num_tokens}] (one flag per token), got {list(m.shape)}")
            try:
                m = mask_to_indices(m)
            except ValueError as e:
                raise ValueError(f"{where}: {e}; use index masks for ragged sets") from None
        elif m.dtype.is_floating_point or m.dtype.is_complex:
            raise TypeError(f"{where}: index masks must be an integer tensor, got {m.dtype}")
        if m.dim() != 2:
            raise ValueError(f"{where}: index masks must be [B, K], got shape {list(m.shape)}")
        if m.shape[0] == 0 or m.shape[0] % batch:
            raise ValueError(
                f"{where}: {m.shape[0]} mask rows for a batch of {batch} clips; expected B or M*B rows "
                f"(M mask configs concatenated along the batch)"
            )
        if m.numel():
            lo, hi = int(m.min()), int(m.max())
            if lo < 0 or hi >= num_tokens:
                bad = hi if hi >= num_tokens else lo
                raise ValueError(
                    f"{where}: token index {bad} is outside the encoder's {num_tokens} tokens "
                    f"(allowed 0..{num_tokens - 1})"
                )
        out.append(m.long())
    return out, was_list


@torch.no_grad()
def layer_targets(
    encoder: LayeredEncoder, clips: torch.Tensor, masks: Any, layer: int, *, layer_norm: bool = True
) -> list[torch.Tensor] | torch.Tensor:
    """Block ``layer``'s output of ``encoder`` on the full ``clips`` at ``masks`` (no autograd, eval mode).

    ``clips [B, C, T, H, W]``; ``masks`` as in :func:`normalize_masks`, or None for every token (``[B, N, D]``).
    Returns ``[B_i, K_i, D]`` per mask (a list if ``masks`` was a list, like V-JEPA's
    ``apply_masks(..., concat=False)``), with an
    affine-free ``F.layer_norm`` over ``D`` when ``layer_norm``. Runs the stem and blocks
    ``1..layer`` only.
    """
    units = encoder.layerlock_units()
    depth = units.num_layers
    if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= depth:
        raise ConfigError(
            "target_layer", f"{layer!r} is beyond the target encoder's depth: it has {depth} blocks (allowed 1..{depth})"
        )
    h = prefix_outputs(encoder, clips, [layer])[layer]  # [B, N, D]
    if layer_norm:  # per token, so normalising before or after the gather is the same
        h = F.layer_norm(h, h.shape[-1:])
    if masks is None:
        return h
    index, was_list = normalize_masks(masks, h.shape[0], h.shape[1])
    out = []
    for m in index:
        reps = m.shape[0] // h.shape[0]
        out.append(gather_tokens(h.repeat(reps, 1, 1) if reps > 1 else h, m))
    return out if was_list else out[0]


def _flat(items: Sequence[Any]) -> list[torch.Tensor]:
    """Tensors of a nested list, in order."""
    return [t for x in items for t in (_flat(x) if isinstance(x, (list, tuple)) else [x])]


# ---------------------------------------------------------------------------------- EMA


def _named(module: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters by name, wrappers (DDP, compile, MultiMaskWrapper, our layered-encoder wrappers) removed."""
    inner = unwrap(module)
    if isinstance(inner, VJEPAEncoder) or type(inner).__name__ == "TimmViTEncoder":
        inner = inner.model
    return {strip_wrapper_prefixes(n): p for n, p in inner.named_parameters()}


class NamedEMA:
    """EMA of a student into a teacher, pairing parameters by name, updated with ``torch._foreach_*``.

    ``update(m)`` sets ``t = m * t + (1 - m) * s`` for every pair (V-JEPA's momentum update), except the
    pairs in ``skip`` (ids of student parameters). Raises :class:`EncoderStructureError` naming the first
    parameter that only one side has, or the first shape/dtype mismatch, and when teacher and student
    share parameters.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module):
        s, t = _named(student), _named(teacher)
        only_s, only_t = [n for n in s if n not in t], [n for n in t if n not in s]
        if only_s or only_t:
            first = f"{only_s[0]!r} is in the encoder but not in the target encoder" if only_s else (
                f"{only_t[0]!r} is in the target encoder but not in the encoder")
            raise EncoderStructureError(
                f"EMA: encoder and target encoder have different architectures: {first} "
                f"({len(only_s)} names only in the encoder, {len(only_t)} only in the target encoder)"
            )
        for n, ps in s.items():
            pt = t[n]
            if ps.shape != pt.shape or ps.dtype != pt.dtype:
                raise EncoderStructureError(
                    f"EMA: {n!r} is {tuple(ps.shape)} {ps.dtype} in the encoder but {tuple(pt.shape)} {pt.dtype} "
                    f"in the target encoder"
                )
            if ps is pt or ps.data_ptr() == pt.data_ptr():
                raise EncoderStructureError(
                    f"EMA: encoder and target encoder share the parameter {n!r}; pass target_encoder="
                    f"copy.deepcopy(encoder)"
                )
        self.names = list(s)
        self.pairs = [(s[n], t[n]) for n in self.names]
        self._cache: tuple[frozenset[int], dict] | None = None

    def _groups(self, skip: frozenset[int]) -> dict:
        """``{(device, dtype): ([teacher params], [student params])}`` without the skipped pairs, cached per
        ``skip`` set. Parameters, not their ``.data``: ``module.to(...)`` swaps ``.data`` under a parameter."""
        if self._cache is None or self._cache[0] != skip:
            groups: dict = defaultdict(lambda: ([], []))
            for ps, pt in self.pairs:
                if id(ps) not in skip:
                    g = groups[(pt.device, pt.dtype)]
                    g[0].append(pt)
                    g[1].append(ps)
            self._cache = (skip, dict(groups))
        return self._cache[1]

    @torch.no_grad()
    def update(self, momentum: float, skip: frozenset[int] = frozenset()) -> None:
        m = float(momentum)
        if not 0.0 <= m <= 1.0:
            raise ConfigError("momentum", f"must be in [0, 1], got {momentum!r}")
        for teacher, student in self._groups(skip).values():
            torch._foreach_mul_(teacher, m)
            torch._foreach_add_(teacher, student, alpha=1.0 - m)


# ---------------------------------------------------------------------------------- the adapter
class LayerLockAdapter:
    """LayerLock for a V-JEPA train step (see the module docstring for the loop).

    Args:
        encoder: the context encoder (V-JEPA ``VisionTransformer``, possibly inside ``MultiMaskWrapper``,
            DDP / :class:`LayerLockDDP` or ``torch.compile``; a timm ViT; or a layered encoder).
        target_encoder: the EMA teacher, same architecture (``copy.deepcopy(encoder)``). ``None`` uses the
            student's own layers as targets without EMA: the collapse-control baseline, not a method.
        predictor: optional; when it is V-JEPA's predictor, its output width is checked against the
            encoder's embedding width.
        optimizer: the trainer's optimizer (frozen parameters' state is dropped; the switch warmup scales
            its ``lr`` inside ``step()``). More can be added with ``self.layerlock.attach_optimizer``.
        config: :class:`LayerLockConfig`; ``target.kind`` must be ``"latent"``, ``target.mode``
            ``"single"`` and ``target.loss_fraction`` 1 (the mask collator picks the predicted tokens).
        teacher_frozen: ``"follow"`` or ``"stop"``: the EMA rule for the teacher's copies of frozen
            student units (module docstring).
        teacher_norm: apply the teacher's final ``norm`` to ``h_k`` before the affine-free layer norm
            (V-JEPA's ``out_layers`` convention); default: the raw block output, as LayerLock defines ``h_k``.
        fixed_target_layer: always target this block (baselines, e.g. with ``config.freeze=False``:
            ``fixed_target_layer=depth`` and ``teacher_norm=True`` is V-JEPA's own target).
        total_steps: warns when the schedule would not finish within the run.
        schedule: a core :class:`~layerlock_plugin.schedule.Schedule` overriding ``config.schedule``.
    """

    def __init__(
        self,
        encoder: nn.Module,
        target_encoder: nn.Module | None,
        predictor: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        config: LayerLockConfig | None = None,
        *,
        teacher_frozen: str = "follow",
        teacher_norm: bool = False,
        fixed_target_layer: int | None = None,
        total_steps: int | None = None,
        schedule: Schedule | None = None,
    ):
        self.config = config or LayerLockConfig()
        t = self.config.target
        v.one_of("target.kind", t.kind, ("latent",))  # V-JEPA has no pixel decoder
        v.one_of("target.mode", t.mode, ("single",))  # one predictor output per token
        if t.loss_fraction != 1.0:
            raise ConfigError("target.loss_fraction", "must be 1.0 for V-JEPA: the mask collator (cfgs_mask) decides which tokens are predicted")
        self.teacher_frozen = v.one_of("teacher_frozen", teacher_frozen, TEACHER_FROZEN_RULES)
        self.teacher_norm = v.boolean("teacher_norm", teacher_norm)
        self.student = as_layered(encoder)
        self.self_target = target_encoder is None
        self.teacher = as_layered(target_encoder if target_encoder is not None else encoder, teacher_norm)
        # pairing by name first: it names the first differing parameter, which says more than a depth count
        self.ema = None if self.self_target else NamedEMA(encoder, target_encoder)
        depth = self.student.layerlock_units().num_layers
        if self.teacher.layerlock_units().num_layers != depth:
            raise EncoderStructureError(
                f"encoder has {depth} blocks but target encoder has {self.teacher.layerlock_units().num_layers}"
            )
        if fixed_target_layer is not None:
            v.positive_int("fixed_target_layer", fixed_target_layer)
            if fixed_target_layer > depth:
                raise ConfigError("fixed_target_layer", f"{fixed_target_layer} is beyond the encoder's depth (allowed 1..{depth})")
        self.fixed_target_layer = fixed_target_layer
        if predictor is not None:
            proj = getattr(unwrap(predictor), "predictor_proj", None)
            width = getattr(self.student, "embed_dim", None)
            if isinstance(proj, nn.Linear) and width is not None and proj.out_features != width:
                raise ConfigError(
                    "predictor", f"outputs {proj.out_features} channels but the encoder's tokens have {width}"
                )
        self.layerlock = LayerLock(self.student, self.config, optimizer, schedule=schedule, total_steps=total_steps)
        self.last_momentum: float | None = None

    # -- plan and targets ------------------------------------------------------------------
    @property
    def plan(self) -> Plan:
        return self.layerlock.plan

    def begin_step(self, step: int) -> Plan:
        """Apply the plan of ``step`` (freeze what is due, set the switch-warmup LR factor)."""
        return self.layerlock.begin_step(step)

    def target_layer(self, plan: Plan | None = None) -> int:
        """Teacher block whose output is the target: block 1 before the first freeze, then the newest
        frozen block (or ``fixed_target_layer``)."""
        if self.fixed_target_layer is not None:
            return self.fixed_target_layer
        return max(1, (plan or self.plan).target_layer)

    def targets(self, clips: torch.Tensor | Sequence[torch.Tensor], masks_pred: Any = None, plan: Plan | None = None) -> Any:
        """V-JEPA's ``forward_target`` for LayerLock: teacher block ``k`` (truncated forward, no autograd),
        affine-free layer norm, gathered at ``masks_pred``. ``clips [B, C, T, H, W]`` -> ``[B_i, K_i, D]``
        per mask (a list if ``masks_pred`` is a list), or all tokens ``[B, N, D]`` without ``masks_pred``
        (V-JEPA 2's ``forward_target``: its ``loss_fn`` applies the masks). V-JEPA 2's multi-sequence
        batches, a list of clip tensors (one per frames-per-clip), give a list with one result per clip
        (``masks_pred`` then one entry per clip)."""
        if isinstance(clips, (list, tuple)):
            masks = [None] * len(clips) if masks_pred is None else list(masks_pred)
            if len(masks) != len(clips):
                raise ValueError(f"masks_pred: {len(masks)} entries for {len(clips)} clip tensors (one per clip tensor)")
            return [self.targets(c, m, plan) for c, m in zip(clips, masks)]
        return layer_targets(self.teacher, clips, masks_pred, self.target_layer(plan), layer_norm=self.config.target.layer_norm)

    # -- after backward ----------------------------------------------------------------------
    def end_step(self, loss: torch.Tensor, targets: torch.Tensor | Sequence[torch.Tensor] | None = None) -> GuardDecision:
        """Collapse guard on this step's loss and targets (every stage: V-JEPA targets are latent from
        step 0; nested lists, as :meth:`targets` gives for V-JEPA 2, are flattened). Skip ``optimizer.step()``
        when the returned decision says ``skip``."""
        return self.layerlock.end_step(loss, _flat(targets) if isinstance(targets, (list, tuple)) else targets)

    def frozen_student_ids(self) -> frozenset[int]:
        return frozenset(id(p) for p in self.layerlock.freezer.frozen_parameters())

    def update_teacher(self, momentum: float) -> None:
        """Momentum update of the teacher by parameter name (replaces V-JEPA's ``zip`` loop). With
        ``teacher_frozen="stop"`` the teacher's copies of frozen student units are left as they are."""
        if self.ema is None:
            raise ConfigError("target_encoder", "is None (own-layer targets): there is no teacher to update")
        skip = self.frozen_student_ids() if self.teacher_frozen == "stop" else frozenset()
        self.ema.update(momentum, skip)
        self.last_momentum = float(momentum)

    def metrics(self) -> dict[str, float]:
        out = self.layerlock.metrics()
        out["layerlock/target_layer"] = float(self.target_layer())
        if self.last_momentum is not None:
            out["layerlock/ema_momentum"] = self.last_momentum
        return out

    # -- checkpointing ------------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        return {"teacher_frozen": self.teacher_frozen, "teacher_norm": self.teacher_norm,
                "fixed_target_layer": self.fixed_target_layer, "self_target": self.self_target}

    def state_dict(self) -> dict[str, Any]:
        """Plain data (``weights_only`` loadable). The teacher's weights are the trainer's to save."""
        return {"format": "layerlock-vjepa/1", "adapter": self._identity(), "layerlock": self.layerlock.state_dict(),
                "last_momentum": self.last_momentum}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore and re-apply the freezing of the last completed step. Call after loading the model
        weights and *before* ``optimizer.load_state_dict``."""
        if not isinstance(state, dict) or state.get("format") != "layerlock-vjepa/1":
            got = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise CheckpointError(f"not a LayerLock V-JEPA adapter state (format {got!r}, expected 'layerlock-vjepa/1')")
        ours, saved = self._identity(), state.get("adapter") or {}
        diffs = [f"{k}: checkpoint {saved.get(k)!r} vs adapter {ours[k]!r}" for k in ours if saved.get(k) != ours[k]]
        if diffs:
            raise CheckpointError("LayerLock V-JEPA state was saved with different adapter settings; " + "; ".join(diffs))
        self.layerlock.load_state_dict(state["layerlock"])
        self.last_momentum = state.get("last_momentum")

