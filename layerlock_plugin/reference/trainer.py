"""The reference LayerLock trainer: a 4DS-style video ViT MAE, read top to bottom.

Single process (CPU or one GPU)::

    layerlock-train                                   # the main job: tiny model, embedded data
    layerlock-train --method mae --out runs/mae       # the pixel baseline on the same budget
    layerlock-train --resume runs/demo --set train.steps=3000   # continue a run

One step: draw a random mask -> LayerLock plan for this step (freeze on schedule, maybe switch the
target, LR warmup factor) -> targets on the full input from the frozen prefix (no autograd) -> the
student sees the visible tokens only (its frozen prefix also without autograd) and predicts the
targets at the query positions -> L2 loss -> collapse guard -> AdamW step.

A run folder holds ``config.yaml``, ``metrics.jsonl``, ``events.jsonl``, ``checkpoint.pt``,
``probes.json``, ``summary.json`` and ``plots/``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..checkpoint import check_model_state, load_checkpoint, require_keys, save_atomic
from ..controller import LayerLock, LayerLockEvent
from ..errors import CheckpointError, ConfigError
from ..masking import random_masking, subsample_indices
from .config import RunConfig, build_config, dump_config
from .data import DigitsVideoDataset, VideoFolderDataset
from .model import VideoMAE

CHECKPOINT_FORMAT = "layerlock-reference/1"
# Fields that may differ between a checkpoint and the run that resumes it.
RESUMABLE_CHANGES = ("out_dir", "train.steps", "train.log_every", "train.ckpt_every", "train.num_workers",
                     "train.threads", "train.progress", "probe")


class StepBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices as a pure function of the step: epoch ``e`` is a permutation seeded
    by ``(seed, e)``, step ``s`` takes items ``s*B .. (s+1)*B`` of the concatenated epochs. Resuming
    at step ``s`` yields exactly the batches the uninterrupted run would have seen."""

    def __init__(self, num_items: int, batch_size: int, seed: int, start_step: int, end_step: int):
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.start_step, self.end_step = start_step, end_step

    def _epoch(self, e: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + e)
        return torch.randperm(self.num_items, generator=g)

    def batch(self, step: int) -> list[int]:
        first = step * self.batch_size
        out: list[int] = []
        while len(out) < self.batch_size:
            e, i = divmod(first + len(out), self.num_items)
            perm = self._epoch(e)
            take = min(self.batch_size - len(out), self.num_items - i)
            out += perm[i : i + take].tolist()
        return out

    def __iter__(self) -> Iterator[list[int]]:
        return (self.batch(s) for s in range(self.start_step, self.end_step))

    def __len__(self) -> int:
        return max(0, self.end_step - self.start_step)


def build_dataset(config: RunConfig, split: str = "train") -> Dataset:
    if config.data_source == "folder":
        return VideoFolderDataset.from_config(config.data)
    # the embedded clips are rendered once up front (~1 ms each), so the loop never waits on data
    return DigitsVideoDataset(config.data, split=split, cache=True)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norms and learned tokens (1-D or token-shaped parameters)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or name.endswith(("token", "pos_embed")) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_with_warmup(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two nested config dicts differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


class Trainer:
    def __init__(self, config: RunConfig, *, resume: str | Path | None = None, echo: Callable[[str], None] = print):
        self.config = config
        self.echo = echo
        cfg = config
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.seed)
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        want = cfg.train.device
        if want == "cuda" and not torch.cuda.is_available():
            raise ConfigError("train.device", "is 'cuda' but torch sees no CUDA device; use 'cpu' or 'auto'")
        self.device = torch.device("cuda" if want in ("cuda", "auto") and torch.cuda.is_available() else "cpu")

        self.dataset = build_dataset(cfg, "train")
        ll_config = cfg.layerlock()
        max_frozen = cfg.schedule.resolve_max_frozen(cfg.model.depth - cfg.model.decoder_depth)
        latent_layers = range(1, max_frozen + 1) if ll_config.target.kind == "latent" else ()
        self.model = VideoMAE(cfg.model, latent_target_layers=latent_layers).to(self.device)
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas)
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_with_warmup(cfg.train.steps, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio)
        )
        self.layerlock = LayerLock(
            self.model, ll_config, self.optimizer, tubelet=cfg.model.tubelet, total_steps=cfg.train.steps
        )
        self.layerlock.on_event(self._on_event)
        self.mask_generator = torch.Generator().manual_seed(cfg.seed + 1)
        self.step = 0
        self.events: list[dict[str, Any]] = []
        if resume is not None:
            self._resume(Path(resume))

    # -- events, logging, checkpoints ------------------------------------------------------------------
    def _on_event(self, event: LayerLockEvent) -> None:
        self.events.append({"step": event.step, "num_frozen": event.num_frozen, "target_layer": event.target_layer,
                            "heads": list(event.heads), "newly_frozen": list(event.newly_frozen),
                            "resumed": event.resumed})
        self.echo(f"[layerlock] {event.describe()}")
        if not event.resumed:
            with open(self.out / "events.jsonl", "a") as f:
                f.write(json.dumps(self.events[-1]) + "\n")

    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.to_dict(),
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "layerlock": self.layerlock.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "mask": self.mask_generator.get_state()},
        }

    def save_checkpoint(self) -> Path:
        return save_atomic(self.checkpoint_state(), self.out / "checkpoint.pt")

    def _resume(self, path: Path) -> None:
        """Restore everything in the order that keeps freezing consistent: model weights, then the
        LayerLock plan (re-freezes what was frozen), then optimizer state, scheduler and RNG."""
        file = path / "checkpoint.pt" if path.is_dir() else path
        ckpt = load_checkpoint(file, map_location=self.device)
        require_keys(ckpt, ["format", "config", "step", "model", "optimizer", "scheduler", "layerlock", "rng"], file)
        if ckpt["format"] != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{file} has format {ckpt['format']!r}, expected {CHECKPOINT_FORMAT!r}")
        diffs = [d for d in _diff(ckpt["config"], self.config.to_dict())
                 if not any(d == c or d.startswith(c + ".") for c in RESUMABLE_CHANGES)]
        if diffs:
            raise CheckpointError(f"{file} was written by a run with a different config; differing fields: "
                                  f"{', '.join(diffs)}. Resume with the checkpoint's config (omit --config).")
        check_model_state(self.model, ckpt["model"], str(file))
        self.model.load_state_dict(ckpt["model"])
        self.layerlock.load_state_dict(ckpt["layerlock"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"]["torch"].cpu())
        self.mask_generator.set_state(ckpt["rng"]["mask"].cpu())
        self.step = int(ckpt["step"])
        if self.layerlock.next_step != self.step:
            raise CheckpointError(f"{file}: LayerLock state is at step {self.layerlock.next_step}, trainer at {self.step}")

    # -- one training step ----------------------------------------------------------------------------
    def train_step(self, video: torch.Tensor) -> dict[str, float]:
        """One optimisation step on ``video [B, C, T, H, W]``; returns scalars for logging."""
        cfg = self.config
        model, ll = self.model, self.layerlock
        plan = ll.begin_step(self.step)
        visible_idx, masked_idx = random_masking(
            video.shape[0], model.num_patches, cfg.model.mask_ratio, generator=self.mask_generator, device=video.device
        )
        query_idx = masked_idx
        if cfg.target.loss_fraction < 1.0:
            query_idx = subsample_indices(masked_idx, cfg.target.loss_fraction, generator=self.mask_generator).to(video.device)
        targets = ll.targets(video, plan, query_idx)
        predictions = model(video, visible_idx, query_idx, heads=list(targets), frozen_prefix=ll.frozen_prefix(plan))
        loss, parts = ll.loss(predictions, targets)
        loss.backward()
        grad_norm = 0.0
        if cfg.optim.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip))
        decision = ll.end_step(loss, targets)
        if not decision.skip:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        return {"loss": float(loss.detach()), **{f"loss/{k}": v for k, v in parts.items()},
                "grad_norm": grad_norm, "skipped": float(decision.skip)}

    # -- the loop ----------------------------------------------------------------------------------------
    def fit(self, stop_after: int | None = None) -> dict[str, Any]:
        """Train to ``train.steps``, then probe and plot. ``stop_after`` ends early after that step with
        a checkpoint and nothing else, as a preempted job would (resume continues exactly)."""
        cfg = self.config
        end = cfg.train.steps if stop_after is None else min(stop_after, cfg.train.steps)
        self.out.mkdir(parents=True, exist_ok=True)
        if self.step == 0 and (self.out / "checkpoint.pt").exists():
            self.echo(f"warning: {self.out} holds an earlier run; starting over in it (use --resume to continue it)")
        dump_config(cfg, self.out / "config.yaml")
        for name in ("metrics.jsonl", "events.jsonl"):
            # a fresh run starts new logs; a resumed one drops rows written after its checkpoint
            kept = [r for r in read_jsonl(self.out / name) if r["step"] <= self.step and not r.get("resumed")]
            (self.out / name).write_text("".join(json.dumps(r) + "\n" for r in kept if self.step > 0))
        sampler = StepBatchSampler(len(self.dataset), cfg.train.batch_size, cfg.seed, self.step, end)
        loader = DataLoader(self.dataset, batch_sampler=sampler, num_workers=cfg.train.num_workers)
        self.model.train()
        started = time.perf_counter()
        window: list[dict[str, float]] = []
        bar = _progress(range(self.step, end), cfg.train.progress, self.step, cfg.train.steps)
        caller_echo = self.echo
        if hasattr(bar, "write"):  # print above the progress bar, not through it
            self.echo = bar.write
        with open(self.out / "metrics.jsonl", "a") as metrics_file:
            for batch, _ in zip(loader, bar):
                window.append(self.train_step(batch["video"].to(self.device)))
                if self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps:
                    row = self._log_row(window, started)
                    metrics_file.write(json.dumps(row) + "\n")
                    metrics_file.flush()
                    window = []
                    if hasattr(bar, "set_postfix"):
                        bar.set_postfix(loss=f"{row['loss']:.4f}", frozen=int(row["layerlock/num_frozen"]),
                                        target=self.layerlock.heads()[-1])
                if self.step % cfg.train.ckpt_every == 0 or self.step == end:
                    self.save_checkpoint()
        if hasattr(bar, "close"):
            bar.close()
        self.echo = caller_echo
        if self.step < cfg.train.steps:
            return {"method": cfg.method, "stopped_at": self.step, "events": self.events}
        train_seconds = time.perf_counter() - started
        summary: dict[str, Any] = {"method": cfg.method, "steps": cfg.train.steps, "train_seconds": round(train_seconds, 1),
                                   "events": self.events}
        if cfg.probe_enabled and cfg.data_source == "digits":
            summary["probes"] = self.run_probes()
        self.write_plots()
        with open(self.out / "summary.json", "w") as f:
            json.dump(summary, f, indent=2)
        return summary

    def _log_row(self, window: list[dict[str, float]], started: float) -> dict[str, Any]:
        keys = {k for r in window for k in r}
        row: dict[str, Any] = {"step": self.step}
        row.update({k: sum(r[k] for r in window if k in r) / sum(1 for r in window if k in r) for k in sorted(keys)})
        row["lr"] = self.scheduler.get_last_lr()[0]
        row["elapsed_s"] = round(time.perf_counter() - started, 2)
        row.update(self.layerlock.metrics())
        return row

    # -- evaluation and plots -----------------------------------------------------------------------------
    def run_probes(self) -> dict[str, float]:
        from .probes import run_probes

        cfg = self.config
        self.echo("[probes] encoding probe videos and fitting probes ...")
        model = self.model
        was_training = model.training
        model.eval()

        def encode(video: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return model.encode(video.to(self.device))

        try:
            results = run_probes(encode, DigitsVideoDataset(cfg.data, "train"), DigitsVideoDataset(cfg.data, "test"),
                                 model.grid, cfg.model.tubelet, cfg.probe)
        finally:
            model.train(was_training)
        with open(self.out / "probes.json", "w") as f:
            json.dump(results, f, indent=2)
        return results

    def write_plots(self) -> None:
        from .plots import plot_collapse_stats, plot_loss, plot_schedule

        rows = read_jsonl(self.out / "metrics.jsonl")
        events = [e for e in read_jsonl(self.out / "events.jsonl")]
        plots = self.out / "plots"
        plot_loss(rows, events, plots / "loss.png", title=f"{self.config.method}: training loss")
        steps = list(range(self.config.train.steps))
        plans = [self.layerlock.plan_at(s) for s in steps]
        plot_schedule(steps, [p.num_frozen for p in plans],
                      [0 if self.layerlock.heads(p) == ["pixels"] else p.target_layer for p in plans],
                      plots / "schedule.png", total_steps=self.config.train.steps)
        plot_collapse_stats(rows, plots / "collapse.png")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _progress(iterable: range, enabled: bool, initial: int, total: int):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, initial=initial, total=total, desc="layerlock", unit="step", dynamic_ncols=True)


def config_from_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw config dict stored in a run's checkpoint (for ``--resume`` without ``--config``)."""
    path = Path(path)
    file = path / "checkpoint.pt" if path.is_dir() else path
    ckpt = load_checkpoint(file)
    require_keys(ckpt, ["config"], file)
    return ckpt["config"]


__all__ = ["Trainer", "StepBatchSampler", "build_config", "config_from_checkpoint"]
