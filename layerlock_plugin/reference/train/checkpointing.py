"""Saving and resuming the reference trainer: one ``checkpoint.pt`` (one process) or DCP (``ddp`` / ``fsdp``).

Both hold the step, the config, model and optimizer state, the LR scheduler, the LayerLock state, the
shared mask generator and the RNG of every device the process uses (CPU, and the CUDA generator of its
GPU), so dropout and drop-path continue exactly on a GPU too. Resume restores in the order that keeps
freezing consistent (DESIGN pitfall 3): weights, then the LayerLock plan (re-freezes what was frozen),
then optimizer state, scheduler and RNG. A checkpoint of another config is refused naming the fields
that differ; only the fields in :data:`RESUMABLE_CHANGES` may change.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ...checkpoint import check_model_state, load_checkpoint, require_keys, save_atomic
from ...errors import CheckpointError
from ..parallel import dcp
from .run_folder import CHECKPOINT_FILE, HISTORY_PREFIX, resume_source

CHECKPOINT_FORMAT = "layerlock-reference/1"
DCP_FORMAT = "layerlock-reference-dcp/1"
# Fields that may differ between a checkpoint and the run that resumes it (train.steps only explicitly:
# see :mod:`.budget`).
RESUMABLE_CHANGES = ("out_dir", "train.steps", "train.log_every", "train.ckpt_every", "train.ckpt_every_minutes",
                     "train.keep_last", "train.tensorboard", "train.wandb", "train.num_workers",
                     "train.threads", "train.progress", "probe", "train.activation_checkpointing",
                     "train.compile", "train.peak_tflops", "train.dist_timeout_s")


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's generators: the CPU one, and its GPU's (CUDA) or XLA device's when it runs there."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    if device.type == "xla":
        from ..parallel import xla

        state["xla"] = xla.rng_state()
    return state


def restore_rng(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda":
        if "cuda" not in state:
            raise CheckpointError("the checkpoint holds no CUDA generator state (it was written on CPU); a GPU run "
                                  "cannot continue its dropout / drop-path streams exactly")
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
    if device.type == "xla" and "xla" in state:
        from ..parallel import xla

        xla.set_rng_state(state["xla"])


def config_diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two nested config dicts differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in config_diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def check_same_config(saved: dict[str, Any], current: dict[str, Any], source: Path) -> None:
    diffs = [d for d in config_diff(saved, current)
             if not any(d == c or d.startswith(c + ".") for c in RESUMABLE_CHANGES)]
    if diffs:
        raise CheckpointError(f"{source} was written by a run with a different config; differing fields: "
                              f"{', '.join(diffs)}. Resume with the checkpoint's config (omit --config).")


def config_from_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw config dict stored in a run's checkpoint (for ``--resume`` without ``--config``):
    ``checkpoint.pt`` of a one-process run, or the latest complete DCP checkpoint of a ddp/fsdp run."""
    path = Path(path)
    if path.is_dir() and ((path / dcp.DCP_DIR).is_dir() or path.parent.name == dcp.DCP_DIR):
        return dcp.read_trainer_state(dcp.resolve(path))["config"]
    file = path / "checkpoint.pt" if path.is_dir() else path
    ckpt = load_checkpoint(file)
    require_keys(ckpt, ["config"], file)
    return ckpt["config"]


def checkpoint_progress(path: Path) -> tuple[int, dict[str, Any], int]:
    """``(step, config, world size)`` of a checkpoint: a run folder's newest complete one, a
    ``checkpoint*.pt`` file or one ``dcp/step_*`` folder (for DCP only the small trainer state is read)."""
    if path.is_dir() and ((path / dcp.DCP_DIR).is_dir() or path.parent.name == dcp.DCP_DIR):
        state = dcp.read_trainer_state(dcp.resolve(path))
    else:
        file = path / CHECKPOINT_FILE if path.is_dir() else path
        state = load_checkpoint(file)
        require_keys(state, ["step", "config"], file)
    return int(state["step"]), state["config"], int(state.get("world_size", 1))


def check_folder_holds_one_run(run_dir: Path, saved: dict[str, Any], checkpoint: Path) -> None:
    """Refuse a run folder whose ``config.yaml`` and checkpoint (config ``saved``) belong to different runs
    (e.g. a checkpoint copied in from another run): resuming would continue the other run and mix both
    runs' logs in one folder. Fields a resume may change (:data:`RESUMABLE_CHANGES`: ``--extend`` rewrites
    ``train.steps`` in config.yaml before the next checkpoint) are not compared. No config.yaml: nothing
    to compare (a checkpoint file outside a run folder)."""
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        return
    try:
        folder = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as e:
        raise CheckpointError(f"{path} is not readable YAML ({type(e).__name__}); the run folder was edited or "
                              "damaged, so which run it holds is unknown") from None
    # config.yaml is the YAML dump of the same dict: compare it with the checkpoint's in the same form
    saved = yaml.safe_load(yaml.safe_dump(saved, sort_keys=False))
    diffs = [d for d in config_diff(folder, saved)
             if not any(d == c or d.startswith(c + ".") for c in RESUMABLE_CHANGES)]
    if diffs:
        what = (checkpoint.name if checkpoint.is_file() else f"{dcp.DCP_DIR}/{checkpoint.name}"
                if checkpoint.parent.name == dcp.DCP_DIR else f"{dcp.DCP_DIR}/" if (checkpoint / dcp.DCP_DIR).is_dir()
                else CHECKPOINT_FILE)
        raise CheckpointError(f"{run_dir}: its config.yaml and {what} belong to different runs; differing fields: "
                              f"{', '.join(diffs[:8])}{' ...' if len(diffs) > 8 else ''}. Resuming would continue "
                              "the checkpoint's run in this folder and mix both runs' logs; nothing was written")


class Checkpointer:
    """Saves and restores a trainer's state: model, optimizer, LR scheduler, LayerLock, mask generator, RNG."""

    def __init__(self, trainer: Any):
        self.t = trainer
        self.saved_step: int | None = None  # step of the newest checkpoint.pt this run wrote or resumed from

    @property
    def uses_dcp(self) -> bool:
        return self.t.env.strategy in ("ddp", "fsdp")

    def _common(self) -> dict[str, Any]:
        t = self.t
        return {"config": t.config.to_dict(), "step": t.step, "scheduler": t.scheduler.state_dict(),
                "layerlock": t.layerlock.state_dict(), "log_window": t.log.pending()}

    def save(self) -> Path:
        t = self.t
        keep = t.config.train.keep_last
        if not self.uses_dcp:
            model, optim = t.model.state_dict(), t.optimizer.state_dict()
            if t.device.type == "xla":  # XLA tensors are saved from CPU copies
                from ..parallel.xla import to_cpu

                model, optim = to_cpu(model), to_cpu(optim)
            state = {"format": CHECKPOINT_FORMAT, **self._common(), "model": model, "optimizer": optim,
                     "rng": {**rng_state(t.device), "mask": t.mask_generator.get_state()}}
            return self._save_file(state, keep)
        trainer_state = {"format": DCP_FORMAT, **self._common(), "mask_rng": t.mask_generator.get_state()}
        return dcp.save(t.out, t.step, t.model, t.optimizer, trainer_state, t.env, rng_state(t.device), keep)

    def _save_file(self, state: dict[str, Any], keep: int) -> Path:
        """``checkpoint.pt`` is always the newest; with ``keep > 1`` the one it replaces stays as
        ``checkpoint.step_<step>.pt`` (a hard link: no copy), and the oldest beyond ``keep`` are removed
        only once the new one is complete."""
        out = self.t.out
        current = out / CHECKPOINT_FILE
        if keep > 1 and self.saved_step is not None and self.saved_step != state["step"] and current.is_file():
            older = out / f"{HISTORY_PREFIX}{self.saved_step:08d}.pt"
            older.unlink(missing_ok=True)
            os.link(current, older)
        path = save_atomic(state, current)
        self.saved_step = state["step"]
        history = sorted(out.glob(f"{HISTORY_PREFIX}*.pt"))
        for old in history[: max(0, len(history) - (keep - 1))]:
            old.unlink()
        return path

    def resume(self, path: Path) -> int:
        """Restore from ``path`` (see :func:`.run_folder.resume_source`); returns the resumed run's budget
        (``train.steps`` of its config)."""
        if path.is_dir() and ((path / dcp.DCP_DIR).is_dir() or path.parent.name == dcp.DCP_DIR):
            return self._resume_dcp(path)
        t = self.t
        file = path / "checkpoint.pt" if path.is_dir() else path
        if self.uses_dcp:
            raise CheckpointError(f"{path} holds no distributed checkpoint (dcp/latest) but train.strategy is "
                                  f"{t.env.strategy!r}; a one-process checkpoint.pt resumes with train.strategy=none")
        ckpt = load_checkpoint(file, map_location="cpu" if t.device.type == "xla" else t.device)
        require_keys(ckpt, ["format", "config", "step", "model", "optimizer", "scheduler", "layerlock", "rng"], file)
        if ckpt["format"] != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{file} has format {ckpt['format']!r}, expected {CHECKPOINT_FORMAT!r}")
        self._check_folder(path, ckpt["config"])
        check_same_config(ckpt["config"], t.config.to_dict(), file)
        check_model_state(t.model, ckpt["model"], str(file))
        t.model.load_state_dict(ckpt["model"])
        t.layerlock.load_state_dict(ckpt["layerlock"])
        t.optimizer.load_state_dict(ckpt["optimizer"])
        t.scheduler.load_state_dict(ckpt["scheduler"])
        restore_rng(ckpt["rng"], t.device)
        t.mask_generator.set_state(ckpt["rng"]["mask"].cpu())
        if file.name == CHECKPOINT_FILE:
            self.saved_step = int(ckpt["step"])
        return self._resumed_at(int(ckpt["step"]), ckpt["config"], file, ckpt.get("log_window"))

    def _resume_dcp(self, path: Path) -> int:
        """DCP resume: the plan is re-applied (and the wrapping synced) before the optimizer state loads,
        so frozen parameters get none back; weights and optimizer state reshard to this run's layout."""
        t = self.t
        if not self.uses_dcp:
            raise CheckpointError(f"{path} holds a distributed checkpoint; resume it with train.strategy=ddp or "
                                  "fsdp under torchrun (any world size that divides the batch)")
        ckpt_dir = dcp.resolve(path)
        state = dcp.read_trainer_state(ckpt_dir)
        if state["format"] != DCP_FORMAT:
            raise CheckpointError(f"{ckpt_dir} has format {state['format']!r}, expected {DCP_FORMAT!r}")
        self._check_folder(path, state["config"])
        check_same_config(state["config"], t.config.to_dict(), ckpt_dir)
        t.layerlock.load_state_dict(state["layerlock"])
        t.parallel.sync(t.layerlock.heads())
        dcp.load_model_and_optimizer(ckpt_dir, t.model, t.optimizer)
        t.scheduler.load_state_dict(state["scheduler"])
        t.mask_generator.set_state(state["mask_rng"].cpu())
        rng = dcp.load_rng(ckpt_dir, t.env, int(state["world_size"]))
        if rng is None:
            t.echo(f"note: {ckpt_dir} was written by {state['world_size']} processes, this run has "
                   f"{t.env.world_size}: per-rank dropout RNG streams start fresh")
        else:
            restore_rng(rng, t.device)
        return self._resumed_at(int(state["step"]), state["config"], ckpt_dir, state.get("log_window"))

    @staticmethod
    def _check_folder(path: Path, saved_config: dict[str, Any]) -> None:
        run_dir = resume_source(path)[1]
        if run_dir is not None:
            check_folder_holds_one_run(run_dir, saved_config, path)

    def _resumed_at(self, step: int, saved_config: dict[str, Any], source: Path, log_window: list | None) -> int:
        t = self.t
        t.step = step
        # the steps since the last log row (checkpoints written before there was such a field: none)
        t.log.restore_pending(log_window or [])
        t._guard_decided = step  # a deferred guard decided the restored steps before the checkpoint
        if t.layerlock.next_step != step:
            raise CheckpointError(f"{source}: LayerLock state is at step {t.layerlock.next_step}, trainer at {step}")
        return int(saved_config["train"]["steps"])
