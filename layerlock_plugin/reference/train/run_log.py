"""The run's JSONL logs: ``metrics.jsonl``, ``events.jsonl``, ``throughput.jsonl`` (rank 0 writes them).

A metrics row carries the step count after its step and the mean of every per-step scalar since the
previous row; throughput goes to its own file so that ``metrics.jsonl`` of a run and of its resume are
identical. Rows come at multiples of ``train.log_every`` and at the last step only: a checkpoint between
two rows (``--stop-after``, a signal, ``train.ckpt_every`` off the cadence) carries the steps logged
since the last row (:meth:`RunLog.pending`), and the resumed run averages them into its next row, so
its windows are the uninterrupted run's. On resume the rows written after the resumed checkpoint (a
killed run may have logged past it, or torn its last line) are dropped, so the logs match those of the
uninterrupted run (``elapsed_s`` and the timing in ``throughput.jsonl`` aside: the first row after a
resume times only the steps run since the resume).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any

import torch

from .run_folder import read_jsonl

METRICS, EVENTS, THROUGHPUT = "metrics.jsonl", "events.jsonl", "throughput.jsonl"
#: One row per session that trained the run: where it started, resumed, was extended or forked (the plots mark
#: them). Kept apart from events.jsonl, which must equal the uninterrupted run's.
SESSIONS = "sessions.jsonl"


class RunLog:
    """Writes the logs of one run folder; with ``enabled=False`` (ranks other than 0) it only averages."""

    def __init__(self, folder: Path, enabled: bool):
        self.folder, self.enabled = folder, enabled
        self.sinks: list[Any] = []  # TensorBoard / W&B (see :mod:`.metric_sinks`), opened by the trainer
        self._files: dict[str, IO[str]] = {}
        # (names, values [len(names)] on the device, or host floats restored from a checkpoint, skipped)
        self._window: list[tuple[tuple[str, ...], torch.Tensor | list[float], bool]] = []
        self.last_step: dict[str, float] = {}
        self._host: list[dict[str, float]] | None = None  # the window's values once read (window_values)

    def start(self, step: int, source: Path | None = None, session: dict[str, Any] | None = None) -> None:
        """Fresh logs at step 0; else the rows of ``source`` (the resumed run's folder, this one unless
        forking) up to the checkpoint at ``step``. Rows carry the step count after their step; an event
        the step it happened in, which a checkpoint of that step count has not done yet. ``session``
        (``{"kind": "start" | "resume" | "extend" | "fork", "train_steps": N}``) is appended to
        ``sessions.jsonl`` at ``step``."""
        if not self.enabled:
            return
        source = source or self.folder
        keep = {METRICS: lambda r: r["step"] <= step, THROUGHPUT: lambda r: r["step"] <= step,
                EVENTS: lambda r: r["step"] < step and not r.get("resumed"), SESSIONS: lambda r: r["step"] <= step}
        for name, kept in keep.items():
            rows = [r for r in read_jsonl(source / name) if kept(r)] if step > 0 else []
            (self.folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        if session is not None:
            self._write(SESSIONS, {"step": step, **session})

    def _write(self, name: str, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if name not in self._files:
            self._files[name] = open(self.folder / name, "a")
        self._files[name].write(json.dumps(row) + "\n")
        self._files[name].flush()

    def event(self, record: dict[str, Any]) -> None:
        self._write(EVENTS, record)

    def pending(self) -> list[dict[str, Any]]:
        """The steps logged since the last row as plain data for a checkpoint (``weights_only``
        loadable): ``[{"names": [...], "values": [...], "skipped": bool}, ...]`` (one host transfer)."""
        return [{"names": list(names), "values": [values[n] for n in names], "skipped": bool(skipped)}
                for (names, _, skipped), values in zip(self._window, self.window_values())]

    def restore_pending(self, entries: list[dict[str, Any]]) -> None:
        """Start the window with a checkpoint's :meth:`pending` steps (a resume between two rows)."""
        self._window = [(tuple(e["names"]), [float(v) for v in e["values"]], bool(e["skipped"])) for e in entries]
        self._host = None

    def add_step(self, names: tuple[str, ...], values: torch.Tensor, skipped: bool) -> None:
        """One step's scalars ``values [len(names)]`` (on the device: read only at the next row, so steps
        between rows cost no host sync) and whether its update was skipped."""
        self._window.append((names, values, skipped))
        self._host = None

    @property
    def window_length(self) -> int:
        """Steps added since the last row."""
        return len(self._window)

    def patch_step(self, index: int, names: tuple[str, ...], values: torch.Tensor) -> None:
        """Overwrite the scalars ``names`` of the window's step ``index`` (0 = oldest) with ``values
        [len(names)]`` (on the device; copied there, no host read): a value computed after its step."""
        step_names, old, skipped = self._window[index]
        new = old.clone()
        for name, value in zip(names, values):
            new[step_names.index(name)].copy_(value)
        self._window[index] = (step_names, new, skipped)
        self._host = None

    def window_values(self) -> list[dict[str, float]]:
        """The host values of every step since the last row, oldest first (``{name: value}``; names with
        ``_`` included). The window is read back in one transfer, on the first call only."""
        if self._host is None:
            # The head set (hence the names) changes at a target switch: the steps are grouped by their
            # names, all groups read back in one transfer. Steps restored from a checkpoint are host
            # values already.
            host: list[dict[str, float]] = [{} for _ in self._window]
            groups: dict[tuple[str, ...], list[int]] = {}
            for i, (names, values, _) in enumerate(self._window):
                if isinstance(values, list):
                    host[i] = dict(zip(names, values))
                else:
                    groups.setdefault(names, []).append(i)
            flat = torch.cat([torch.stack([self._window[i][1] for i in idx]).reshape(-1)
                              for idx in groups.values()]).tolist() if groups else []
            offset = 0
            for names, idx in groups.items():
                for i in idx:
                    host[i] = dict(zip(names, flat[offset: offset + len(names)]))
                    offset += len(names)
            self._host = host
        return self._host

    def write_row(self, step: int, extra: dict[str, Any], speed: dict[str, Any] | None = None) -> dict[str, Any]:
        """Average the steps since the last row into a metrics row (plus ``extra``; one host transfer) and
        write ``speed`` as the throughput row. Names starting with ``_`` are not logged; the last step's
        values, those included, are kept in :attr:`last_step`. Each name is averaged over the steps that
        have it."""
        row: dict[str, Any] = {"step": step}
        if self._window:
            sums: dict[str, list[float]] = {}
            for values in self.window_values():
                for name, x in values.items():
                    sums.setdefault(name, []).append(x)
            self.last_step = dict(self.window_values()[-1])
            row.update({k: sum(xs) / len(xs) for k, xs in sorted(sums.items()) if not k.startswith("_")})
            row["skipped"] = sum(float(w[2]) for w in self._window) / len(self._window)
        row.update(extra)
        self._write(METRICS, row)
        for sink in self.sinks:
            sink.scalars(step, row)
        if speed is not None:
            self._write(THROUGHPUT, {"step": step, **{k: (None if v is None else round(v, 6)) for k, v in speed.items()}})
            for sink in self.sinks:
                sink.scalars(step, speed, prefix="throughput/")
        self._window, self._host = [], None
        return row

    def images(self, step: int, images: dict[str, Path]) -> None:
        for sink in self.sinks:
            sink.images(step, images)

    def close(self) -> None:
        """Close the JSONL files (they reopen on the next write)."""
        for f in self._files.values():
            f.close()
        self._files.clear()

    def close_sinks(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []

    def rows(self, name: str = METRICS) -> list[dict[str, Any]]:
        return read_jsonl(self.folder / name)
