"""Probing a trained run: its encoder beside the same architecture at random init, with the same probes.

A probe reading is only evidence next to that baseline, so the trainer ends every run on the embedded
digits with :func:`probe_run` (``probes.json``, and the main job's probe line, :func:`~.suite.probe_report`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..data import DigitsVideoDataset
from ..model import VideoMAE
from . import baseline_cache
from .config import ProbeConfig
from .suite import run_probes

if TYPE_CHECKING:  # the run config imports this package's ProbeConfig
    from ..config import RunConfig

__all__ = ["probe_encoder", "probe_run"]


def probe_encoder(encoder: VideoMAE, train_set: DigitsVideoDataset, test_set: DigitsVideoDataset,
                  tubelet: Sequence[int], probe: ProbeConfig, device: torch.device) -> dict[str, float]:
    """Every probe on ``encoder``'s final tokens ``[B, N, D]`` (computed in eval mode on ``device``; its
    train/eval mode is restored): :func:`~.suite.run_probes`' keys."""
    was_training = encoder.training
    encoder.eval()

    def encode(video: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            tokens = encoder.encode(video.to(device))
        # XLA: the probes train on the CPU (their many small steps would each be a new graph)
        return tokens.cpu() if device.type == "xla" else tokens

    try:
        return run_probes(encode, train_set, test_set, encoder.grid, tubelet, probe)
    finally:
        encoder.train(was_training)


def probe_run(trained: VideoMAE, random_init: Callable[[], VideoMAE], config: RunConfig, device: torch.device,
              out_file: Path, latent_layers: tuple[int, ...] = (), say: Callable[[str], None] = lambda s: None
              ) -> dict[str, Any]:
    """Probe the ``trained`` encoder, then the one ``random_init()`` builds (after the first is probed),
    with ``config.probe`` on the train / test splits of the run's digits data: ``{<trained probe
    keys>..., "random_init": {<keys>...}}``, also written to ``out_file`` (``probes.json``).

    The random-init results come from :mod:`.baseline_cache` when a run of the same config, seed
    (``latent_layers``: the readouts ``random_init()`` builds), code and machine computed them before
    (``say`` tells which)."""
    train_set, test_set = DigitsVideoDataset(config.data, "train"), DigitsVideoDataset(config.data, "test")
    tubelet = config.model.tubelet
    results: dict[str, Any] = probe_encoder(trained, train_set, test_set, tubelet, config.probe, device)
    run = config.to_dict()
    key = baseline_cache.baseline_key(run["model"], run["data"], run["probe"], config.seed, latent_layers, device)
    cached = baseline_cache.load(key)
    if cached is None:
        cached = probe_encoder(random_init(), train_set, test_set, tubelet, config.probe, device)
        baseline_cache.store(key, cached)
    else:
        say(f"[probes] random-init baseline from the cache ({baseline_cache.cache_dir()}; same config, seed, "
            "code and machine; LAYERLOCK_CACHE=off recomputes it)")
    results["random_init"] = cached
    with open(out_file, "w") as f:
        json.dump(results, f, indent=2)
    return results
