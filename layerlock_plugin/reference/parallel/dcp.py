"""Distributed checkpoints (``torch.distributed.checkpoint``) for ``ddp`` / ``fsdp`` runs.

Layout in the run folder::

    dcp/step_00000120/            one checkpoint: DCP shards + .metadata (model, optimizer), written
                                  by every rank in parallel (FSDP shards are never gathered)
        trainer.pt                step, config, scheduler, LayerLock state, shared mask RNG (rank 0)
        rng_rank{r}.pt            each rank's own torch RNG (dropout / drop-path streams)
    dcp/latest                    name of the newest COMPLETE checkpoint, replaced atomically
    encoder.pt                    consolidated single-file encoder for fine-tuning (end of training)

``latest`` is written only after every rank finished its part, so a job killed mid-save leaves the
previous checkpoint as ``latest``; a folder without its metadata or trainer state is refused as
partial, never silently ignored. Small files go through :func:`save_atomic` and load with
``weights_only=True``.

Resume order (DESIGN pitfall 3): the caller re-applies the LayerLock plan from ``trainer.pt`` first;
:func:`load_model_and_optimizer` then loads weights and optimizer state into the already-frozen model,
so frozen parameters never get optimizer state back.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from ...checkpoint import load_checkpoint, require_keys, save_atomic
from ...errors import CheckpointError
from .distributed import DistEnv, barrier

DCP_DIR = "dcp"
LATEST = "latest"
TRAINER_FILE = "trainer.pt"
ENCODER_FORMAT = "layerlock-encoder/1"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def has_dcp(run_dir: str | Path) -> bool:
    return (Path(run_dir) / DCP_DIR / LATEST).is_file()


def resolve(path: str | Path) -> Path:
    """A run folder (-> its latest complete checkpoint) or one ``dcp/step_*`` folder -> that folder,
    checked complete. Raises :class:`CheckpointError` for anything missing or partial."""
    path = Path(path)
    if (path / DCP_DIR).is_dir() or (path / DCP_DIR / LATEST).exists():
        pointer = path / DCP_DIR / LATEST
        if not pointer.is_file():
            raise CheckpointError(f"{path / DCP_DIR} holds no complete distributed checkpoint (no '{LATEST}' "
                                  f"pointer: the job stopped before its first save finished); nothing was loaded")
        path = path / DCP_DIR / pointer.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"distributed checkpoint {path} does not exist")
    missing = [n for n in (".metadata", TRAINER_FILE) if not (path / n).is_file()]
    if missing:
        raise CheckpointError(f"distributed checkpoint {path} is partial (missing {', '.join(missing)}); "
                              f"resume from a complete one (see {path.parent / LATEST})")
    return path


def read_trainer_state(ckpt_dir: Path) -> dict[str, Any]:
    state = load_checkpoint(ckpt_dir / TRAINER_FILE)
    require_keys(state, ["format", "config", "step", "scheduler", "layerlock", "mask_rng", "world_size"],
                 ckpt_dir / TRAINER_FILE)
    return state


def save(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         trainer_state: dict[str, Any], env: DistEnv, rng: dict[str, torch.Tensor], keep: int = 2) -> Path:
    """Collective: every rank writes its shards and its ``rng`` (generator states), rank 0 the trainer state
    and then ``latest``; then the complete checkpoints beyond the newest ``keep`` are removed."""
    root = Path(run_dir) / DCP_DIR
    ckpt_dir = root / step_dir_name(step)
    if env.is_main and ckpt_dir.exists():  # a re-save of the same step (e.g. after a resume)
        shutil.rmtree(ckpt_dir)
    barrier(env)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(ckpt_dir))
    save_atomic(rng, ckpt_dir / f"rng_rank{env.rank}.pt")
    if env.is_main:
        save_atomic({**trainer_state, "world_size": env.world_size}, ckpt_dir / TRAINER_FILE)
    barrier(env)  # every rank's files are on disk before latest points at them
    if env.is_main:
        tmp = root / f".{LATEST}.tmp"
        tmp.write_text(ckpt_dir.name + "\n")
        os.replace(tmp, root / LATEST)
        done = sorted(p for p in root.glob("step_*") if p.is_dir())
        for old in [p for p in done if p.name < ckpt_dir.name][: max(0, len(done) - keep)]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(env)
    return ckpt_dir


def load_model_and_optimizer(ckpt_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Collective: load weights and optimizer state in place (resharded to this run's layout)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    try:
        dcp.load(state, checkpoint_id=str(ckpt_dir))
    except Exception as e:  # DCP raises CheckpointException / RuntimeError for missing keys or bad files
        first = str(e).strip().splitlines()
        raise CheckpointError(f"distributed checkpoint {ckpt_dir} does not fit this model/optimizer or is "
                              f"damaged ({type(e).__name__}: {first[0] if first else ''}); nothing was resumed") from e
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def load_rng(ckpt_dir: Path, env: DistEnv, saved_world_size: int) -> dict[str, torch.Tensor] | None:
    """This rank's saved generator states; None when the world size changed (the streams cannot match)."""
    if saved_world_size != env.world_size:
        return None
    return load_checkpoint(ckpt_dir / f"rng_rank{env.rank}.pt")


def encoder_keys(model_cfg: Any, keys: list[str]) -> list[str]:
    """Keys of the encoder part of a :class:`VideoMAE` state dict (stem + encoder blocks)."""
    enc = model_cfg.depth - model_cfg.decoder_depth
    keep = ("patch_embed.", "pos_embed") + tuple(f"blocks.{i}." for i in range(enc))
    return [k for k in keys if k.startswith(keep)]


def export_encoder(model: torch.nn.Module, model_cfg: Any, path: Path, env: DistEnv, step: int) -> dict[str, torch.Tensor] | None:
    """Collective: gather the full encoder weights to rank 0 and write them as one file
    ``{"format", "model_config", "step", "encoder"}``; returns the full model state dict on rank 0."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if env.is_main:
        enc = {k: full[k] for k in encoder_keys(model_cfg, list(full))}
        save_atomic({"format": ENCODER_FORMAT, "model_config": model_cfg.to_dict(), "step": step, "encoder": enc}, path)
    barrier(env)
    return full if env.is_main else None


def load_encoder(path: str | Path):
    """A :class:`VideoMAE` with the exported encoder weights (decoder and readouts left at init)."""
    from ..model import ModelConfig, VideoMAE

    state = load_checkpoint(path)
    require_keys(state, ["format", "model_config", "encoder"], path)
    if state["format"] != ENCODER_FORMAT:
        raise CheckpointError(f"{path} has format {state['format']!r}, expected {ENCODER_FORMAT!r}")
    cfg = ModelConfig.from_dict({k: tuple(v) if isinstance(v, list) else v for k, v in state["model_config"].items()})
    model = VideoMAE(cfg)
    missing, unexpected = model.load_state_dict(state["encoder"], strict=False)
    wanted = set(encoder_keys(cfg, list(model.state_dict())))
    if unexpected or wanted & set(missing):
        raise CheckpointError(f"{path} does not match its model config: missing {sorted(wanted & set(missing))[:5]}, "
                              f"unexpected {unexpected[:5]}")
    return model


__all__ = ["save", "resolve", "has_dcp", "read_trainer_state", "load_model_and_optimizer", "load_rng",
           "export_encoder", "load_encoder", "encoder_keys"]
