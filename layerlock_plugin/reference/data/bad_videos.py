"""Bad videos: how a sample that cannot be decoded keeps the batch whole and is never silent.

A data-loader worker never raises for a bad file: the dataset tries the sample's video, and when it is
missing, empty, corrupt, has no video stream or is too short (``short_video: skip``) it draws a
replacement video from the same (seed, epoch, index) and tries that (at most :data:`MAX_TRIES` videos),
and reports what it skipped in the sample's ``bad`` field (``"path: reason"`` lines). The batch keeps its
shape and the epoch its length: the hole is filled by another video of the dataset, and counted.

:class:`BadVideoLog` reads those fields in the training process, says one line per bad file (with the
running count) and, under ``data.on_bad_video: raise`` or when no good video was found, stops the run with
one :class:`~layerlock_plugin.errors.DataError` line instead of a crashed worker's traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from ...errors import DataError

__all__ = ["BadVideoLog", "MAX_TRIES", "bad_fields"]

MAX_TRIES = 8  # videos tried for one sample before the run stops: a dataset this broken needs a look


def bad_fields(bad: list[str], failed: bool) -> dict[str, Any]:
    """The two fields every real-video sample carries: ``bad`` (``"path: reason"`` lines, ``""`` when the
    sample's own video was good) and ``failed`` (no video gave a clip; the clip is zeros)."""
    return {"bad": "\n".join(bad), "failed": torch.tensor(failed)}


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class BadVideoLog:
    """Checks each batch's ``bad`` / ``failed`` fields (and removes them from the batch).

    ``policy``: ``data.on_bad_video`` (``'replace'``: one line per bad file, the count grows;
    ``'raise'``: :class:`DataError` at the first one). ``say``: where the lines go (every rank's stderr by
    default: a bad file on rank 3 is as worth knowing as one on rank 0). ``count``: bad videos seen."""

    def __init__(self, policy: str = "replace", say: Callable[[str], None] = _stderr, rank: int | None = None):
        self.policy, self.say = policy, say
        self.where = "" if rank is None else f" (rank {rank})"
        self.count = 0
        self.files: set[str] = set()

    def check(self, batch: dict[str, Any]) -> dict[str, Any]:
        bad, failed = batch.pop("bad", None), batch.pop("failed", None)
        lines = [line for entry in (bad or ()) for line in entry.splitlines() if line]
        if lines and self.policy == "raise":
            raise DataError(f"bad video {lines[0]} (data.on_bad_video is 'raise'; 'replace' trains on another video "
                            "in its place)")
        for line in lines:
            self.count += 1
            path = line.split(": ", 1)[0]
            if path not in self.files:
                self.files.add(path)
                self.say(f"warning: bad video {line}; replaced by another video of the dataset "
                         f"({self.count} bad so far{self.where})")
        if failed is not None and bool(torch.as_tensor(failed).any()):
            raise DataError(f"no decodable video in {MAX_TRIES} tries for one sample (last: {lines[-1] if lines else '?'}); "
                            "check the data")
        return batch

    def wrap(self, batches: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for batch in batches:
            yield self.check(batch)
