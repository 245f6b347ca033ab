"""A cache of the random-init probe baseline: the same numbers for every run of one config and seed.

Every run on the embedded digits probes its encoder beside the same architecture at random init
(:mod:`.trained_run`); that baseline is about half of the probes' time, and for one model, data, probe
config and seed it is the same every time. It is stored as one small JSON file per key and reused.

**The key** is a SHA-256 of everything the numbers depend on: the model, data and probe configs, the
seed, the latent readouts (they are part of the model that is built), the device type, the intra-op
thread count and the CPU model (float rounding differs with both: a cached number must be the number
this machine would compute), the torch version, and the source code of the whole ``layerlock_plugin``
package (any code change is a miss, so a stale entry is never read: invalidation needs no version to
bump). A corrupt or unreadable entry counts as a miss and is recomputed.

**Where**: ``$LAYERLOCK_CACHE`` if set (``off`` disables the cache), else ``$XDG_CACHE_HOME/layerlock-plugin``
or ``~/.cache/layerlock-plugin``; entries are ``random_init_probes/<key>.json`` of about 1 KB, written
atomically. Entries of older code stay until removed (``rm -r ~/.cache/layerlock-plugin``).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

__all__ = ["baseline_key", "cache_dir", "load", "store"]

SUBDIR = "random_init_probes"


def cache_dir() -> Path | None:
    """The cache folder, or None when ``LAYERLOCK_CACHE=off``."""
    chosen = os.environ.get("LAYERLOCK_CACHE")
    if chosen is not None:
        return None if chosen.strip().lower() in ("off", "0", "false", "") else Path(chosen)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "layerlock-plugin"


@lru_cache(maxsize=1)
def _source_digest() -> str:
    """SHA-256 over the package's Python sources (relative path and bytes of each, in order)."""
    root = Path(__file__).resolve().parents[2]  # layerlock_plugin/
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def baseline_key(model: dict[str, Any], data: dict[str, Any], probe: dict[str, Any], seed: int,
                 latent_layers: tuple[int, ...], device: torch.device) -> str:
    """The cache key of a random-init baseline (see the module docstring for what it covers)."""
    parts = {"model": model, "data": data, "probe": probe, "seed": seed, "latent_layers": list(latent_layers),
             "device": device.type, "threads": torch.get_num_threads(), "cpu": _cpu_model(),
             "torch": torch.__version__, "source": _source_digest()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def load(key: str) -> dict[str, Any] | None:
    """The cached baseline of ``key``, or None (no cache, a miss, or an unreadable entry)."""
    folder = cache_dir()
    if folder is None:
        return None
    try:
        value = json.loads((folder / SUBDIR / f"{key}.json").read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def store(key: str, results: dict[str, Any]) -> None:
    """Write ``results`` under ``key`` atomically; a cache that cannot be written is skipped silently
    (it only saves time)."""
    folder = cache_dir()
    if folder is None:
        return
    tmp = None
    try:
        (folder / SUBDIR).mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=folder / SUBDIR)
        with os.fdopen(fd, "w") as f:
            json.dump(results, f)
        os.replace(tmp, folder / SUBDIR / f"{key}.json")
    except OSError:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
