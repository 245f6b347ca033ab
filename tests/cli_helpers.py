"""Drive the installed ``layerlock-train`` as a user would: a subprocess, its exit code and its output."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

#: A few seconds of training: events at steps 6, 10, 14 (warmup 3 < interval 4, so no warmup warning).
TINY_SETS = [
    "data.num_videos=64", "train.batch_size=8", "train.steps=24", "train.log_every=1", "train.ckpt_every=100",
    "schedule.pixel_steps=6", "schedule.interval=4", "schedule.max_frozen=3", "warmup.steps=3",
    "optim.warmup_steps=3", "guard.every=2", "train.threads=1",
    "probe.train_videos=48", "probe.test_videos=48", "probe.max_iter=20",
]


def tiny_args(*extra: str, probe: bool = False) -> list[str]:
    args = [a for s in TINY_SETS for a in ("--set", s)] + ["--no-progress"]
    return args + ([] if probe else ["--no-probe"]) + list(extra)


def command() -> list[str]:
    exe = shutil.which("layerlock-train")
    return [exe] if exe else [sys.executable, "-m", "layerlock_plugin.reference.cli"]


def run_cli(args: list[str], cwd: Path, timeout: float = 240, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}
    return subprocess.run(command() + [str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env, **kw)


def checksums(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` (relative path -> sha256): a folder is unchanged when these are equal."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def rows(path: Path, drop=("elapsed_s",)) -> list[dict]:
    """JSONL rows without the wall-clock fields (which differ between any two runs)."""
    return [{k: v for k, v in json.loads(line).items() if k not in drop}
            for line in path.read_text().splitlines() if line.strip()]
