"""The run's JSONL logs: ``metrics.jsonl``, ``events.jsonl``, ``throughput.jsonl`` (rank 0 writes them).

A metrics row carries the step count after its step and the mean of every per-step scalar since the
previous row; throughput goes to its own file so that ``metrics.jsonl`` of a run and of its resume are
identical. On resume the rows written after the resumed checkpoint (a killed run may have logged past
it, or torn its last line) are dropped, so the logs match those of the uninterrupted run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any

from .run_folder import read_jsonl

METRICS, EVENTS, THROUGHPUT = "metrics.jsonl", "events.jsonl", "throughput.jsonl"


class RunLog:
    """Writes the logs of one run folder; with ``enabled=False`` (ranks other than 0) it only averages."""

    def __init__(self, folder: Path, enabled: bool):
        self.folder, self.enabled = folder, enabled
        self._files: dict[str, IO[str]] = {}
        self._window: list[dict[str, float]] = []
        self._speed: list[dict[str, float]] = []

    def start(self, step: int, source: Path | None = None) -> None:
        """Fresh logs at step 0; else the rows of ``source`` (the resumed run's folder, this one unless
        forking) up to the checkpoint at ``step``. Rows carry the step count after their step; an event
        the step it happened in, which a checkpoint of that step count has not done yet."""
        if not self.enabled:
            return
        source = source or self.folder
        keep = {METRICS: lambda r: r["step"] <= step, THROUGHPUT: lambda r: r["step"] <= step,
                EVENTS: lambda r: r["step"] < step and not r.get("resumed")}
        for name, kept in keep.items():
            rows = [r for r in read_jsonl(source / name) if kept(r)] if step > 0 else []
            (self.folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    def _write(self, name: str, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if name not in self._files:
            self._files[name] = open(self.folder / name, "a")
        self._files[name].write(json.dumps(row) + "\n")
        self._files[name].flush()

    def event(self, record: dict[str, Any]) -> None:
        self._write(EVENTS, record)

    def add_step(self, scalars: dict[str, float], speed: dict[str, float]) -> None:
        """One step's scalars (loss, grad norm, ...) and throughput numbers, for the next row's means."""
        self._window.append(scalars)
        self._speed.append(speed)

    def write_row(self, step: int, extra: dict[str, Any]) -> dict[str, Any]:
        """Average the steps since the last row into a metrics row (plus ``extra``) and a throughput row."""
        keys = sorted({k for r in self._window for k in r})
        row: dict[str, Any] = {"step": step}
        for k in keys:
            values = [r[k] for r in self._window if k in r]
            row[k] = sum(values) / len(values)
        row.update(extra)
        self._write(METRICS, row)
        if self._speed:
            mean = {k: sum(r[k] for r in self._speed) / len(self._speed) for k in self._speed[-1] if k != "peak_mem_gb"}
            mean["peak_mem_gb"] = self._speed[-1]["peak_mem_gb"]
            self._write(THROUGHPUT, {"step": step, **{k: round(v, 6) for k, v in mean.items()}})
        self._window, self._speed = [], []
        return row

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def rows(self, name: str = METRICS) -> list[dict[str, Any]]:
        return read_jsonl(self.folder / name)
