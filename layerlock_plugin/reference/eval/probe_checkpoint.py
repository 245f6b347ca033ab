"""One command: probe an encoder on an embedded suite, each task beside random init and chance.

    python -m layerlock_plugin.reference.eval runs/demo                 # a run folder (or its checkpoint.pt)
    python -m layerlock_plugin.reference.eval runs/demo --suite evidence

Any encoder of the project's layered-encoder protocol (``layerlock_units()`` and ``forward_prefix()``,
:mod:`layerlock_plugin.encoder`) can be probed from Python with :func:`probe_on_suite`: the reference ViT
reads a clip ``[B, C, T, H, W]`` at once; an image encoder (a timm ViT through ``TimmViTEncoder``) reads
each frame (``frames=True``), its tokens stacked frame by frame on a ``(T, h, w)`` grid. Tasks that did not
pass the suite's calibration (:mod:`.suites`) are printed ``[uncalibrated]``: no verdict may rest on them.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ...errors import ConfigError, LayerLockError
from ..data import DigitsVideoConfig, DigitsVideoDataset
from .config import ProbeConfig
from .suite import run_probes
from .suites import SUITES, calibration_marks, suite_of

__all__ = ["encoder_tokens", "probe_on_suite", "suite_report", "main"]

#: the probes of the evidence suite (the attentive depth readout beside the ridge one)
SUITE_PROBES = {"packaged": {}, "evidence": {"dense_kinds": ("ridge", "attentive")}}


def encoder_tokens(encoder: Any, frames: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """``encode(video [B, C, T, H, W]) -> tokens [B, N, D]``: the last freezable block's output of a
    layered encoder, under ``no_grad`` in eval mode. ``frames``: feed every frame as an image
    (``[B*T, C, H, W]``) and stack the tokens frame by frame."""
    last = encoder.layerlock_units().num_layers
    encoder.eval()

    def encode(video: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if not frames:
                return encoder.forward_prefix(video, [last])[last]
            b, c, t, h, w = video.shape
            tokens = encoder.forward_prefix(video.transpose(1, 2).reshape(b * t, c, h, w), [last])[last]
            return tokens.reshape(b, t * tokens.shape[1], tokens.shape[2])

    return encode


def _grid_and_tubelet(encode, video: torch.Tensor, tubelet: Sequence[int] | None, frames: bool):
    """The token grid and the tubelet it tiles the clip with (from one clip's token count when not given)."""
    c, t, h, w = video.shape
    if tubelet is None:
        n = encode(video[None]).shape[1]
        per_frame = n // t if frames else None
        if frames:
            side = math.isqrt(per_frame)
            if side * side != per_frame or h % side:
                raise ConfigError("tubelet", f"cannot infer a square patch grid from {per_frame} tokens per frame")
            tubelet = (1, h // side, w // side)
        else:
            raise ConfigError("tubelet", "give the tubelet (t, h, w) of a video encoder")
    tubelet = tuple(int(x) for x in tubelet)
    return (t // tubelet[0], h // tubelet[1], w // tubelet[2]), tubelet


def probe_on_suite(encoder: Any, suite: str, *, random_init: Any | None = None, frames: bool = False,
                   tubelet: Sequence[int] | None = None, probe: ProbeConfig | None = None,
                   videos: int = 512) -> dict[str, Any]:
    """Probe ``encoder`` (and ``random_init``, the same architecture before training, when given) on the
    embedded ``suite`` with ``videos`` probe-train and as many test clips (the suite's probe config unless
    ``probe`` is given): ``{'suite', 'trained': {probe keys}, 'random_init': {...}, 'marks': {task: ...}}``."""
    if suite not in SUITES:
        raise ConfigError("suite", f"must be one of {', '.join(SUITES)}; got {suite!r}")
    data = DigitsVideoConfig(**{**SUITES[suite]["data"], "num_videos": videos, "num_test_videos": videos})
    train, test = DigitsVideoDataset(data, "train"), DigitsVideoDataset(data, "test")
    cfg = probe or ProbeConfig(**{**SUITE_PROBES.get(suite, {}), "train_videos": videos, "test_videos": videos})
    encode = encoder_tokens(encoder, frames)
    grid, tubelet = _grid_and_tubelet(encode, train[0]["video"], tubelet, frames)
    out: dict[str, Any] = {"suite": suite, "trained": run_probes(encode, train, test, grid, tubelet, cfg)}
    if random_init is not None:
        out["random_init"] = run_probes(encoder_tokens(random_init, frames), train, test, grid, tubelet, cfg)
    tasks = [k[: -len("_num_classes")] for k in out["trained"] if k.endswith("_num_classes")]
    out["marks"] = calibration_marks(data, tasks + ["depth"] + (["depth_attentive"] if "attentive" in cfg.dense_kinds else []))
    return out


def suite_report(result: dict[str, Any]) -> str:
    """A table: each task's headline score, random init, chance and its calibration mark."""
    trained, base, marks = result["trained"], result.get("random_init", {}), result["marks"]
    lines = [f"suite {result['suite']} ({SUITES[result['suite']]['architecture']} calibration):",
             f"{'task':<22} {'trained':>8} {'random init':>12} {'chance 1/K':>11} {'majority':>9}  calibration"]
    for task, mark in marks.items():
        key = {"depth": "dense_r2", "depth_attentive": "dense_attentive_r2"}.get(task, f"{task}_acc")
        if key not in trained:
            continue
        chance = ("-", "-") if task.startswith("depth") else (f"{trained[f'{task}_chance_uniform']:.3f}",
                                                              f"{trained[f'{task}_chance_majority']:.3f}")
        label = task + (" R2" if task.startswith("depth") else "")
        lines.append(f"{label:<22} {trained[key]:>8.3f} {base.get(key, float('nan')):>12.3f} {chance[0]:>11} "
                     f"{chance[1]:>9}  {mark}")
    return "\n".join(lines)


def _load_run(path: Path):
    """The trained encoder of a one-process run (folder or ``checkpoint.pt``), the same architecture at the
    run's seed before training, and the run's config."""
    from ...checkpoint import load_checkpoint
    from ..config import build_config
    from ..model import VideoMAE

    file = path / "checkpoint.pt" if path.is_dir() else path
    ckpt = load_checkpoint(file)
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise ConfigError("checkpoint", f"{file} is not a reference-trainer checkpoint (no 'config' / 'model')")
    config = build_config(ckpt["config"])
    layers = sorted({int(k.split(".")[1].split("_")[1]) for k in ckpt["model"]
                     if k.startswith("readouts.layer_") and k.endswith(".weight")})
    model = VideoMAE(config.model, latent_target_layers=layers)
    model.load_state_dict(ckpt["model"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        init = VideoMAE(config.model)
    return model, init, config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m layerlock_plugin.reference.eval",
                                description="Probe a reference-trainer checkpoint on an embedded suite: each task "
                                            "beside the same architecture at random init and chance.")
    p.add_argument("checkpoint", help="a run folder or its checkpoint.pt")
    p.add_argument("--suite", default=None, help=f"one of {', '.join(SUITES)} (default: the run's own data, "
                                                 "when it renders a suite, else evidence)")
    p.add_argument("--videos", type=int, default=512, help="probe-train clips, and as many test clips (default 512)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.videos < 16:
        print(f"error: --videos must be at least 16, got {args.videos}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, init, config = _load_run(Path(args.checkpoint))
        suite = args.suite or suite_of(config.data) or "evidence"
        grid_ok = dataclasses.replace(DigitsVideoConfig(), **SUITES.get(suite, {"data": {}})["data"])
        if (config.model.img_size, config.model.num_frames) != (grid_ok.size, grid_ok.num_frames):
            raise ConfigError("checkpoint", f"the model reads {config.model.num_frames} x {config.model.img_size} px "
                                            f"clips, the {suite} suite has {grid_ok.num_frames} x {grid_ok.size} px")
        result = probe_on_suite(model, suite, random_init=init, tubelet=config.model.tubelet, videos=args.videos)
    except (ConfigError, LayerLockError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(suite_report(result))
    return 0
