"""Which clips a step trains on, as a pure function of the step (so resume needs no sampler state).

Every rank computes the same global batch of dataset indices and keeps its own rows; together the
ranks' rows are the global batch, so N processes see what one process would.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class StepBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices as a pure function of the step: epoch ``e`` is a permutation seeded
    by ``(seed, e)``, step ``s`` takes items ``s*B .. (s+1)*B`` of the concatenated epochs. Resuming
    at step ``s`` yields exactly the batches the uninterrupted run would have seen."""

    def __init__(self, num_items: int, batch_size: int, seed: int, start_step: int, end_step: int,
                 with_epoch: bool = False):
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.start_step, self.end_step = start_step, end_step
        self.with_epoch = with_epoch  # yield (index, epoch) keys: a dataset that draws per epoch needs it

    def _epoch(self, e: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + e)
        return torch.randperm(self.num_items, generator=g)

    def batch(self, step: int) -> list[int]:
        return [i for i, _ in self.batch_keys(step)]

    def batch_keys(self, step: int) -> list[tuple[int, int]]:
        """``(index, epoch)`` of each item of step ``step``'s batch."""
        first = step * self.batch_size
        out: list[tuple[int, int]] = []
        while len(out) < self.batch_size:
            e, i = divmod(first + len(out), self.num_items)
            perm = self._epoch(e)
            take = min(self.batch_size - len(out), self.num_items - i)
            out += [(j, e) for j in perm[i : i + take].tolist()]
        return out

    def __iter__(self) -> Iterator[list[int]] | Iterator[list[tuple[int, int]]]:
        if self.with_epoch:
            return (self.batch_keys(s) for s in range(self.start_step, self.end_step))
        return (self.batch(s) for s in range(self.start_step, self.end_step))

    def __len__(self) -> int:
        return max(0, self.end_step - self.start_step)


class RankBatchSampler(Sampler[list[int]]):
    """This rank's rows of each global batch: rows ``rank*b .. (rank+1)*b`` of ``StepBatchSampler``'s
    batch, ``b = B / world_size``. The ranks' slices are disjoint and together are the global batch
    (a DistributedSampler whose split is a function of the step, so resume needs nothing else)."""

    def __init__(self, steps: StepBatchSampler, rank: int, world_size: int):
        self.steps, self.rank, self.world_size = steps, rank, world_size
        self.local = steps.batch_size // world_size

    def __iter__(self) -> Iterator[list[int]]:
        lo = self.rank * self.local
        return (b[lo : lo + self.local] for b in self.steps)

    def __len__(self) -> int:
        return len(self.steps)


__all__ = ["StepBatchSampler", "RankBatchSampler"]
