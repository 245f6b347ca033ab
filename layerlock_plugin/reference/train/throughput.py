"""Throughput of the training loop over a log window: step time, clips/s, tokens/s, MFU, peak memory, and
the share of the window the loop waited for data (``data_wait_frac``: host time in the loader's ``next``;
on a GPU that wait is hidden while the device still has queued work, so it is an upper bound of starving).

Timing covers a whole window of steps (``train.log_every``), so the device is synchronised once per
window, at the log step, and never inside a step. MFU = model FLOPs of the window's steps (the analytic
count of :func:`~layerlock_plugin.reference.dryrun.step_flops`, which already credits LayerLock for the
backward passes the frozen blocks skip) / time / (peak FLOP/s x processes). Peak FLOP/s: ``train.peak_tflops`` if set, else a table
of dense bf16 peaks of common GPUs; on a CPU or an unknown device MFU is not reported (no guessed number).
Peak memory: ``torch.cuda.max_memory_allocated``, reset at every change of frozen depth, so each phase
reports its own peak; on a CPU there is no allocator peak and it is reported as not measured (null).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch

from ..parallel.distributed import DistEnv
from ..dryrun import Tokens, step_flops

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, matched on the device name in
# this order (the first entry whose every part is in the name): the NVL and PCIe variants of a chip first.
PEAK_BF16_TFLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H100", "NVL"), 835.0), (("H100", "PCIe"), 756.0), (("H100",), 989.0),
    (("H200", "NVL"), 835.0), (("H200",), 989.0), (("GH200",), 989.0),
    (("H800", "PCIe"), 756.0), (("H800",), 989.0),
    (("A100",), 312.0), (("L40S",), 362.0), (("A10G",), 70.0), (("L4",), 121.0),
)


def device_peak_tflops(device: torch.device) -> float | None:
    """The card's dense bf16 peak, or None (CPU, XLA, a card not in :data:`PEAK_BF16_TFLOPS`)."""
    if device.type != "cuda":
        return None
    words = torch.cuda.get_device_name(device).replace("-", " ").split()
    return next((v for parts, v in PEAK_BF16_TFLOPS if all(p in words for p in parts)), None)


def peak_memory_bytes(device: torch.device) -> float | None:
    """The allocator's peak since the last reset on CUDA; None (not measured) elsewhere."""
    return float(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


class Throughput:
    """Counts the steps of a window and turns them into throughput numbers at its end."""

    def __init__(self, model_cfg: Any, loss_fraction: float, env: DistEnv, peak_tflops: float, global_batch: int,
                 context: str = "full"):
        self.model_cfg, self.loss_fraction, self.env, self.context = model_cfg, loss_fraction, env, context
        self.global_batch = global_batch
        self.tokens = Tokens.of(model_cfg, loss_fraction).n
        peak = peak_tflops or device_peak_tflops(env.device)
        self.peak = peak * 1e12 if peak else None
        self._t0, self._steps, self._flops, self._depth, self._wait = 0.0, 0, 0.0, -1, 0.0
        self._flops_of: dict[tuple[int, tuple[int, ...], bool], float] = {}

    def _sync(self) -> None:
        if self.env.device.type == "cuda":
            torch.cuda.synchronize(self.env.device)
        elif self.env.device.type == "xla":
            from ..parallel import xla

            xla.wait()

    def start_window(self) -> None:
        self._sync()
        self._t0, self._steps, self._flops, self._wait = time.perf_counter(), 0, 0.0, 0.0

    def wait_for(self, batches: Iterator[Any]) -> Any:
        """The next batch of ``batches`` (None at the end), its host wait counted into the window's
        ``data_wait_frac``: the share of the window's wall time the loop spent waiting for data."""
        started = time.perf_counter()
        batch = next(batches, None)
        self._wait += time.perf_counter() - started
        return batch

    def count_step(self, num_frozen: int, target_layers: list[int], stem_frozen: bool) -> None:
        """A step of the window with this plan (host arithmetic only, no sync)."""
        if num_frozen != self._depth and self.env.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.env.device)  # a new phase: its own peak
        self._depth = num_frozen
        key = (num_frozen, tuple(target_layers), stem_frozen)
        if key not in self._flops_of:
            self._flops_of[key] = step_flops(self.model_cfg, num_frozen, list(target_layers), self.loss_fraction,
                                             stem_frozen, self.context)["total"]
        self._steps += 1
        self._flops += self._flops_of[key]

    def end_window(self) -> dict[str, float | None]:
        """Means over the window's steps (one device sync); then a new window starts."""
        self._sync()
        elapsed = time.perf_counter() - self._t0
        dt = elapsed / max(self._steps, 1)
        clips = self.global_batch / dt
        peak = peak_memory_bytes(self.env.device)
        out: dict[str, float | None] = {"step_s": dt, "clips_per_s": clips, "tokens_per_s": clips * self.tokens,
                                        "peak_mem_gb": None if peak is None else peak / 2**30,
                                        "data_wait_frac": self._wait / elapsed if elapsed > 0 else 0.0}
        if self.peak:
            devices = self.env.world_size * (self.env.mesh.size() if self.env.mesh is not None else 1)
            out["mfu"] = self._flops / max(self._steps, 1) * self.global_batch / dt / (self.peak * devices)
        if self.env.device.type == "xla":
            from ..parallel import xla

            out["xla_compiles"] = xla.compile_count()  # graphs compiled so far: flat between freeze events
        self.start_window()
        return out


__all__ = ["Throughput", "device_peak_tflops", "peak_memory_bytes", "PEAK_BF16_TFLOPS"]
