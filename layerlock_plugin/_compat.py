"""The torch APIs that differ between the torch releases this package runs on (torch only).

Tested floor: the oldest torch the test suite runs under (setup.cfg's ``torch>=``). Each probe looks at
the installed torch when it is called, so one checkout runs on every release from the floor up.

* DDP's buffer synchronisation keyword: ``broadcast_buffers`` (every release), deprecated in favour of
  ``forward_sync_buffers`` where that exists (torch 2.14 has it, torch 2.11 does not);
* FSDP2 (``fully_shard``, ``MixedPrecisionPolicy``, ``register_fsdp_forward_method``): public in
  ``torch.distributed.fsdp`` on every tested release; imported here, where an older path would go.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

__all__ = ["ddp_buffer_sync", "ddp_buffer_sync_of", "fsdp2"]


def _ddp_sync_keyword() -> str:
    ddp = torch.nn.parallel.DistributedDataParallel
    return "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters \
        else "broadcast_buffers"


def ddp_buffer_sync(enabled: bool) -> dict[str, bool]:
    """The keyword argument of ``DistributedDataParallel(...)`` that turns the per-forward buffer sync
    on or off, for the installed torch: ``{"forward_sync_buffers": enabled}`` or ``{"broadcast_buffers": enabled}``."""
    return {_ddp_sync_keyword(): enabled}


def ddp_buffer_sync_of(ddp: Any) -> dict[str, bool]:
    """The same keyword read back from a built wrapper (to rebuild one alike)."""
    keyword = _ddp_sync_keyword()
    return {keyword: getattr(ddp, keyword)}


def fsdp2() -> Any:
    """The module holding FSDP2's ``fully_shard``, ``MixedPrecisionPolicy`` and ``register_fsdp_forward_method``."""
    import torch.distributed.fsdp as fsdp

    return fsdp
