"""Throughput of the training loop: clips/s, tokens/s, MFU (when the device's peak is known), peak memory.

MFU = model FLOPs of a step (the analytic count of :func:`.dryrun.step_flops`, which already credits
LayerLock for the backward passes the frozen blocks skip) / step time / (peak FLOP/s x processes).
Peak FLOP/s: ``train.peak_tflops`` if set, else a table of dense bf16 peaks of common GPUs; on a CPU or an
unknown device MFU is not reported (no guessed number). Peak memory: ``torch.cuda.max_memory_allocated``
on GPU; on CPU the process's peak resident set size (includes the interpreter and libraries).
"""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

import torch

from .distributed import DistEnv
from .dryrun import Tokens, step_flops

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, matched on the device name.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}


def device_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H100" in name and "PCIe" in name:
        return 756.0
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def peak_memory_bytes(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(rss if sys.platform == "darwin" else rss * 1024)


class Throughput:
    """Times steps and turns them into throughput numbers (per step; the trainer averages a window)."""

    def __init__(self, model_cfg: Any, loss_fraction: float, env: DistEnv, peak_tflops: float, global_batch: int,
                 context: str = "full"):
        self.model_cfg, self.loss_fraction, self.env, self.context = model_cfg, loss_fraction, env, context
        self.global_batch = global_batch
        self.tokens = Tokens.of(model_cfg, loss_fraction).n
        peak = peak_tflops or device_peak_tflops(env.device)
        self.peak = peak * 1e12 if peak else None
        self._t0 = 0.0

    def _sync(self) -> None:
        if self.env.device.type == "cuda":
            torch.cuda.synchronize(self.env.device)

    def start_step(self) -> None:
        self._sync()
        self._t0 = time.perf_counter()

    def end_step(self, num_frozen: int, target_layers: list[int], stem_frozen: bool) -> dict[str, float]:
        self._sync()
        dt = time.perf_counter() - self._t0
        clips = self.global_batch / dt
        out = {"step_s": dt, "clips_per_s": clips, "tokens_per_s": clips * self.tokens,
               "peak_mem_gb": peak_memory_bytes(self.env.device) / 2**30}
        if self.peak:
            flops = step_flops(self.model_cfg, num_frozen, target_layers, self.loss_fraction, stem_frozen,
                               self.context)["total"]
            out["mfu"] = flops * self.global_batch / dt / (self.peak * self.env.world_size)
        return out


__all__ = ["Throughput", "device_peak_tflops", "peak_memory_bytes", "PEAK_BF16_TFLOPS"]
