"""Process group, device and backend: the ONE place where the reference trainer decides where it runs.

Launch (every process runs the same command; torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``)::

    torchrun --standalone --nproc_per_node=2 -m layerlock_plugin.reference.cli --set train.strategy=ddp

Backend: NCCL when the run uses CUDA (one GPU per process, ``cuda:LOCAL_RANK``), gloo on CPU.

TPU (PyTorch/XLA, ``train.device: xla``): one process per host drives every XLA device of the host, with
no process group; ``train.strategy: spmd`` partitions each step over them (see :mod:`.xla`). torch_xla is
imported only on that path.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ...errors import ConfigError

LAUNCH_HINT = ("launch it with torchrun, e.g. `torchrun --standalone --nproc_per_node=2 -m "
               "layerlock_plugin.reference.cli --set train.strategy=ddp`")


@dataclass(frozen=True)
class DistEnv:
    """Where this process runs: ``rank`` of ``world_size`` processes, on ``device``."""

    strategy: str
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: no process group (strategy 'none', and XLA)
    mesh: Any = None  # XLA SPMD: the device mesh the global batch is sharded over

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, prints, writes plots and runs probes."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def _launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def pick_device(want: str, local_rank: int = 0) -> torch.device:
    """``train.device`` -> a torch device (``cuda:LOCAL_RANK`` for one GPU per process)."""
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device", "is 'cuda' but torch sees no CUDA device; use 'cpu' or 'auto'")
    if want in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def setup(strategy: str, device: str, timeout_s: int = 600) -> DistEnv:
    """Join (or create) the process group for ``strategy`` and pick the device.

    ``none`` is one process and refuses to run under a multi-process launch (it would silently train
    N independent copies). ``ddp`` / ``fsdp`` need a process group: an existing one, or the torchrun
    environment to create it from.
    """
    if strategy not in ("none", "ddp", "fsdp", "spmd"):
        raise ConfigError("train.strategy", f"must be one of 'none', 'ddp', 'fsdp', 'spmd'; got {strategy!r}")
    from . import xla

    if xla.requested(device):
        # One process drives every XLA device of the host; 'spmd' partitions the step over them.
        if strategy in ("ddp", "fsdp"):
            raise ConfigError("train.strategy", f"{strategy!r} is for CPU / GPU process groups; on XLA use 'spmd' or 'none'")
        mesh = xla.use_spmd() if strategy == "spmd" else None  # before any tensor exists on the device
        return DistEnv(strategy, 0, 1, 0, xla.device(), None, mesh)
    if strategy == "spmd":
        raise ConfigError("train.strategy", "'spmd' is PyTorch/XLA's data parallel: it needs train.device=xla")
    if strategy == "none":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            raise ConfigError("train.strategy", f"is 'none' but this is one of WORLD_SIZE={world} processes; "
                                                "set train.strategy=ddp or fsdp")
        return DistEnv("none", 0, 1, 0, pick_device(device), None)
    if not (dist.is_available() and (dist.is_initialized() or _launched_by_torchrun())):
        raise ConfigError("train.strategy", f"{strategy!r} needs a torch.distributed process group and none "
                                            f"was found (no torchrun environment); {LAUNCH_HINT}")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if not dist.is_initialized():
        # NCCL takes CUDA tensors only: with both backends in the group a stray CPU tensor goes through
        # gloo instead of failing or hanging the job (the trainer's own collectives are on the GPU).
        backend = "cpu:gloo,cuda:nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=dev if dev.type == "cuda" else None)
    backend = dist.get_backend()
    return DistEnv(strategy, dist.get_rank(), dist.get_world_size(), local_rank, dev, str(backend))


def check_batch(batch_size: int, grad_accum: int, world_size: int) -> int:
    """The per-process micro-batch: ``batch_size`` (the global batch of one optimizer step) split over
    ``world_size`` processes and ``grad_accum`` micro-steps, which must divide it evenly (uneven
    shards would weight samples differently from a one-process run)."""
    if batch_size % (world_size * grad_accum):
        raise ConfigError("train.batch_size", f"{batch_size} (the global batch) must be divisible by world size "
                                              f"x train.grad_accum = {world_size} x {grad_accum}")
    return batch_size // (world_size * grad_accum)


def rank_seed(seed: int, rank: int) -> int:
    """Seed of a rank's own torch RNG (dropout, drop-path): different per rank, rank 0 keeps ``seed``."""
    return seed + 1_000_003 * rank


def all_reduce_mean(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Mean over ranks of a small tensor (a copy; the input is untouched). Runs under every process group,
    one process included, so a one-GPU check exercises the same NCCL call as a cluster job."""
    out = values.detach().clone()
    if env.distributed:
        dist.all_reduce(out)
        out /= env.world_size
    return out


def device_flags(flags: Sequence[float], device: torch.device) -> torch.Tensor:
    """Host scalars as a float vector ``[len(flags)]`` made on ``device`` by fills (each value a kernel
    argument): unlike ``torch.tensor([...], device=cuda)``, no pageable host-to-device copy that waits for
    the GPU. Zeros cost nothing beyond the allocation."""
    out = torch.zeros(len(flags), device=device)
    for i, value in enumerate(flags):
        if value:
            out[i].fill_(float(value))
    return out


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def teardown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["DistEnv", "setup", "pick_device", "check_batch", "rank_seed", "all_reduce_mean", "device_flags", "barrier",
           "teardown"]
