"""Wrap the reference model for a strategy, and keep the wrapping consistent with LayerLock's plan.

``none``: the model itself. ``ddp``: the core's :class:`~layerlock_plugin.integration.LayerLockDDP`, a
``DistributedDataParallel`` rebuilt whenever the set of trainable parameters changes (a freeze event
or a new readout head): DDP registers its gradient hooks and buckets for the parameters that require
grad when it is built, a frozen block's parameters must leave them (``find_unused_parameters`` would
pay a graph walk every step), and there are only about ``max_frozen`` such events in a run. ``fsdp``: FSDP2 ``fully_shard`` on the
patch embedding (the stem unit), on every block (the freezing unit: a frozen block is a whole FSDP
group whose parameters all stop requiring grad) and on the root; with ``bf16`` precision the policy
keeps bf16 parameters for compute and reduces gradients in fp32. FSDP2 needs no rebuild: groups
whose parameters are all frozen are all-gathered for forward and skipped in backward.

Readout heads: the model builds every ``layer_k`` readout up front, so the optimizer holds them from
step 0; only the heads of the current plan are used in a step. Under ``ddp`` / ``fsdp`` the others
get ``requires_grad=False`` (they would get no gradient anyway: AdamW skips a parameter whose grad
is None, so this changes no update), which keeps DDP from waiting for gradients that never come.

``spmd`` (PyTorch/XLA): the model itself, parameters replicated on every device of the mesh; the step's
inputs are sharded over the mesh's ``data`` axis (:meth:`Parallelized.shard_inputs`) and the XLA
partitioner inserts the gradient all-reduce.

What else differs between devices inside a step lives here too, so that the trainer's step reads the
same everywhere: how the step's indices reach the device (:meth:`Parallelized.to_device`) and how a
step ends (:meth:`Parallelized.end_step`: the XLA graph is cut and run there).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..._compat import ddp_buffer_sync, fsdp2
from ...integration import LayerLockDDP, set_active_heads
from .distributed import DistEnv
from ..model import VideoMAE


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """``train.precision`` -> the autocast dtype (None = fp32). ``auto``: bf16 on GPU and TPU, fp32 on CPU
    (PJRT's CPU device included)."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    if precision == "auto" and device.type == "xla":
        from . import xla

        return torch.bfloat16 if xla.device_kind() == "TPU" else None
    return None


def apply_fsdp(model: VideoMAE, param_dtype: torch.dtype | None) -> None:
    """FSDP2 in place: the stem, each block, then the root (readouts, query token, decoder norm)."""
    fsdp = fsdp2()
    MixedPrecisionPolicy, fully_shard = fsdp.MixedPrecisionPolicy, fsdp.fully_shard  # noqa: N806
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else MixedPrecisionPolicy()
    fully_shard(model.patch_embed, mp_policy=mp)
    for block in model.blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    # The latent targets come from forward_prefix, not forward: give it the root's unshard hooks.
    fsdp.register_fsdp_forward_method(model, "forward_prefix")
    # FSDP2 warns that the root returns views (the readouts' reshaped outputs); nothing modifies
    # them in place, so the warning is noise on every step.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


class Parallelized:
    """The model as the train step calls it, for one strategy.

    Build it after the model and before the optimizer (FSDP2 replaces the parameters with sharded
    ones). Call :meth:`sync` after every ``LayerLock.begin_step`` (cheap unless the plan changed) and
    :meth:`end_step` after the optimizer step. ``say`` prints a line for the user (the SPMD layout of
    the first batch).
    """

    def __init__(self, model: VideoMAE, env: DistEnv, precision: str = "auto",
                 say: Callable[[str], None] = lambda line: None):
        self.model, self.env, self.say = model, env, say
        self.dtype = autocast_dtype(precision, env.device)
        self._ddp: LayerLockDDP | None = None
        self.input_sharding: str | None = None  # spmd: the first batch's layout over the devices, as XLA says it
        if env.strategy == "fsdp":
            apply_fsdp(model, self.dtype)

    @property
    def rebuilds(self) -> int:
        """DDP wrappers built so far: the first one and one per change of the trainable set."""
        return 0 if self._ddp is None else 1 + self._ddp.rebuilds

    @property
    def module(self) -> nn.Module:
        """What ``forward`` runs: the DDP wrapper, or the (possibly sharded) model itself."""
        return self._ddp if self._ddp is not None else self.model

    def sync(self, heads: Sequence[str]) -> bool:
        """Make the wrapping match the trainable set (frozen blocks and active ``heads``); returns True
        when the DDP wrapper was (re)built or, under fsdp, the active heads changed. Every rank calls it
        with the same plan, so DDP rebuilds are collective-safe."""
        if self.env.strategy == "none":
            return False
        changed = set_active_heads(self.model.readouts, heads)
        if self.env.strategy != "ddp":
            return changed
        if self._ddp is None:
            ids = [self.env.device.index] if self.env.device.type == "cuda" else None
            # buffers are constants (RoPE tables): no sync per forward
            self._ddp = LayerLockDDP(self.model, device_ids=ids, **ddp_buffer_sync(False))
            return True
        return self._ddp.sync()

    def to_device(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Host tensors (the step's token indices ``[b, K]``) copied to the device: pinned and
        non-blocking on CUDA (the copy does not wait for the GPU); on XLA they arrive as data (drawn on
        the CPU, so no index computation enters the graph)."""
        device = self.env.device
        if device.type == "cuda":
            return tuple(t.pin_memory().to(device, non_blocking=True) for t in tensors)
        return tuple(t.to(device) for t in tensors)

    def shard_inputs(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Under ``spmd``: shard each ``[B, ...]`` input over the mesh's ``data`` axis (in place, returned
        for convenience; the first batch's layout is said once); otherwise the tensors unchanged."""
        if self.env.mesh is not None:
            from . import xla

            for t in tensors:
                xla.shard_batch(t, self.env.mesh)
            if self.input_sharding is None:
                self.input_sharding = xla.sharding_spec(tensors[0])
                self.say(f"[xla] spmd over {self.env.mesh.size()} devices: each batch [B, C, T, H, W] sharded as "
                         f"{self.input_sharding}, parameters replicated")
        return tensors

    def end_step(self) -> None:
        """After the optimizer step. On XLA the step's graph ends here (``torch_xla.sync``): one program
        per plan, reused until the next freeze event. Elsewhere nothing to do."""
        if self.env.device.type == "xla":
            from . import xla

            xla.sync()

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.dtype)

    def no_sync(self, last_micro: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step.
        (FSDP2 reduce-scatters each micro-batch; deferring it would hold unsharded gradients.)"""
        if self._ddp is not None and not last_micro:
            return self._ddp.no_sync()
        return contextlib.nullcontext()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


def clip_grad_norm(params: Sequence[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm and return it (a 0-d tensor on the gradients' device: no host sync);
    tolerates None grads and FSDP2's sharded (DTensor) gradients, whose local norms are combined across
    ranks before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=params[0].device if params else "cpu")
    total = torch.nn.utils.get_total_norm(grads)
    full = getattr(total, "full_tensor", None)
    if full is not None:  # a DTensor with a pending (partial) reduction across ranks
        total = full()
    torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, total)
    return total


__all__ = ["Parallelized", "apply_fsdp", "autocast_dtype", "clip_grad_norm"]
