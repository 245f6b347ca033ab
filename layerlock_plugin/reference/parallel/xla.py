"""PyTorch/XLA for the reference trainer: TPU, or PJRT's CPU device (``PJRT_DEVICE=CPU``) in tests.

Only this module imports ``torch_xla``, and only when ``train.device: xla`` asks for it (or ``auto``
finds ``PJRT_DEVICE`` set); the CPU/GPU path never does. The XLA environment is separate (torch-xla
2.9.0 needs torch 2.9.0): ``bash scripts/setup_xla_env.sh`` builds it.

How the step stays one compiled program between freeze events:

* the step ends with ``torch_xla.sync()`` (the graph of one step is cut there and executed);
* nothing in the step reads a device value on the host: the collapse guard's measures stay on the
  device and are read with the log row (so its decision comes at log steps; ``guard.policy: skip``,
  which needs a per-step host decision, is refused), indices are drawn on the CPU and only copied in;
* a freeze event changes the program (``requires_grad``, fewer parameters in the optimizer step, a new
  target head), so XLA compiles once more per event and then reuses it: the compile count is logged
  (``torch_xla.debug.metrics``) and tested.

Data parallel: SPMD (``train.strategy: spmd``), the mode PyTorch/XLA recommends for TPU pods since 2.x
(one process per host, the compiler partitions one global program over all devices; FSDPv2 is built on
it). Here the global batch is sharded over a 1-D ``data`` mesh of every device and the parameters are
replicated, so the gradient all-reduce is inserted by the partitioner; the loss is that of one device.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ...errors import ConfigError

INSTALL_HINT = ("train.device=xla needs PyTorch/XLA (torch-xla 2.9.0 with torch 2.9.0, a separate environment): "
                "bash scripts/setup_xla_env.sh, then run with PJRT_DEVICE=TPU (or CPU)")


def requested(device: str) -> bool:
    """``train.device`` asks for XLA: ``xla``, or ``auto`` with ``PJRT_DEVICE`` set."""
    return device == "xla" or (device == "auto" and bool(os.environ.get("PJRT_DEVICE")))


def _torch_xla():
    try:
        import torch_xla
    except ImportError as e:
        raise ConfigError("train.device", INSTALL_HINT) from e
    return torch_xla


def device() -> torch.device:
    return _torch_xla().device()


def device_kind() -> str:
    """``TPU``, ``CPU`` (PJRT's CPU device, as in the tests), ...: the PJRT device type."""
    _torch_xla()
    import torch_xla.runtime as xr

    return xr.device_type()


def wait() -> None:
    """Block until the device has run everything queued (``torch_xla.sync`` only launches): for timing."""
    import torch_xla.core.xla_model as xm

    xm.wait_device_ops()


def sync() -> None:
    """Cut and run the step's graph (``torch_xla.sync``)."""
    _torch_xla().sync()


def compile_count() -> int:
    """Graphs compiled so far in this process."""
    import torch_xla.debug.metrics as met

    data = met.metric_data("CompileTime")
    return int(data[0]) if data else 0


def use_spmd() -> Any:
    """Switch this process to SPMD and return the 1-D ``data`` mesh over every device. Call once, before
    any tensor is created on the XLA device."""
    _torch_xla()
    import numpy as np
    import torch_xla.distributed.spmd as xs
    import torch_xla.runtime as xr

    xr.use_spmd()
    n = xr.global_runtime_device_count()
    return xs.Mesh(np.arange(n), (n,), ("data",))


def shard_batch(tensor: torch.Tensor, mesh: Any) -> torch.Tensor:
    """Shard dimension 0 (the batch) over the mesh's ``data`` axis; the other dimensions are replicated."""
    import torch_xla.distributed.spmd as xs

    xs.mark_sharding(tensor, mesh, ("data",) + (None,) * (tensor.dim() - 1))
    return tensor


def sharding_spec(tensor: torch.Tensor) -> str:
    """How ``tensor`` is laid out over the devices, in XLA's notation (``{devices=[2,1,...]0,1}``: dimension
    0 split in 2; ``{replicated}``; empty before a sharding is known)."""
    import torch_xla

    return torch_xla._XLAC._get_xla_sharding_spec(tensor)


def to_cpu(obj: Any) -> Any:
    """A state dict (nested dicts / lists of tensors) with every tensor copied to the CPU, for torch.save."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def rng_state() -> torch.Tensor:
    """The XLA device's RNG seed (dropout, drop-path; an unsigned 64-bit value) as ``[2]`` int64 halves
    (high, low 32 bits), to save beside the CPU generator."""
    import torch_xla.core.xla_model as xm

    seed = int(xm.get_rng_state())
    return torch.tensor([seed >> 32, seed & 0xFFFFFFFF], dtype=torch.int64)


def set_rng_state(state: torch.Tensor) -> None:
    import torch_xla.core.xla_model as xm

    high, low = (int(x) for x in state.tolist())
    xm.set_rng_state((high << 32) | low)
