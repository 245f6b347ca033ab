"""Checkpoint files: written atomically, loaded with ``weights_only=True``, refused with a clear error
when missing, truncated, corrupt or from another model. Never executes code from data."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash at any point leaves either the old file or the new one, never a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint dict with ``weights_only=True``; any failure becomes a :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated / foreign files
        raise CheckpointError(
            f"checkpoint {path} is truncated, corrupt or not a weights-only torch checkpoint "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); nothing was loaded"
        ) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict")
    return obj


def require_keys(checkpoint: Mapping, keys: list[str], path: str | os.PathLike = "checkpoint") -> None:
    """Refuse a checkpoint that lacks any of ``keys``, naming them and what it holds."""
    missing = [k for k in keys if k not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} lacks the entries {missing}; found {sorted(checkpoint)}")


def check_model_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Refuse a state dict ``{name: tensor}`` from a different model, naming the missing, unexpected and
    shape-mismatched keys (``[shape]`` of each side) before anything is loaded."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        def few(xs: list[str]) -> str:
            return ", ".join(xs[:5]) + (f" (+{len(xs) - 5} more)" if len(xs) > 5 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {few(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {few(shapes)}")
        raise CheckpointError(f"{source} is from a different model; " + "; ".join(parts))


#: Prefixes that wrappers add to parameter names: DDP / FSDP1 (``module.``), ``torch.compile`` (``_orig_mod.``).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_wrapper_prefixes(name: str) -> str:
    """``name`` as the unwrapped model calls it: leading ``module.`` / ``_orig_mod.`` (in any order and
    number) removed, and ``._orig_mod.`` of a compiled submodule collapsed, e.g.
    ``module._orig_mod.blocks.0.attn.qkv.weight`` -> ``blocks.0.attn.qkv.weight``."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name.replace("._orig_mod.", ".")

