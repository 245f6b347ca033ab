"""Tiny, latency-bound probe solves on one intra-op thread."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["single_thread"]


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run tiny, latency-bound solves on one intra-op thread (restored afterwards).

    The logistic probes are a few hundred small matmuls; with several OpenMP threads they are
    dominated by thread wake-ups and slow down by >10x when another process shares the cores.
    """
    before = torch.get_num_threads()
    if before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before > 1:
            torch.set_num_threads(before)
