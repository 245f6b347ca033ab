"""The reference LayerLock trainer: a 4DS-style video ViT MAE, read top to bottom.

Single process (CPU or one GPU)::

    layerlock-train                                   # the main job: tiny model, embedded data
    layerlock-train --method mae --out runs/mae       # the pixel baseline on the same budget
    layerlock-train --resume runs/demo --set train.steps=3000   # continue a run

Several processes (torchrun; ``train.batch_size`` is the GLOBAL batch of one optimizer step)::

    # one node, 2 processes (gloo on CPU, NCCL with one GPU per process)
    torchrun --standalone --nproc_per_node=2 -m layerlock_plugin.reference.cli \
        --set train.strategy=ddp --out runs/ddp            # or train.strategy=fsdp
    # the console script works too
    torchrun --standalone --nproc_per_node=8 --no-python layerlock-train --config vit_l --set train.device=cuda
    # multi-node: the same command on every node (rendezvous on the first node's host)
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HEAD:29500 \
        --rdzv_id=$JOB_ID -m layerlock_plugin.reference.cli --config vit_g --set train.strategy=fsdp
    # SLURM: one torchrun per node, srun starts them
    srun --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 bash -c 'torchrun --nnodes=$SLURM_NNODES \
        --nproc_per_node=8 --rdzv_backend=c10d --rdzv_id=$SLURM_JOB_ID \
        --rdzv_endpoint=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1):29500 \
        -m layerlock_plugin.reference.cli --config vit_g --set train.strategy=fsdp --out runs/vit_g'
    # resume: the same command with --resume runs/vit_g (loads runs/vit_g/dcp/latest)

Every rank sees the same global batch indices and the same masks (both functions of the global step)
and takes its own rows, so N processes follow the one-process run up to float rounding. Rank 0 alone
logs, prints, plots and probes. ``ddp`` / ``fsdp`` runs checkpoint with torch.distributed.checkpoint
(``dcp/``, see :mod:`.dcp`) and export ``encoder.pt`` at the end; one process writes ``checkpoint.pt``.

One step: LayerLock plan for this step (freeze on schedule, maybe switch the target, LR warmup
factor) -> masks for the global batch -> per micro-batch: targets on the full input from the frozen
prefix (no autograd), the student sees the visible tokens only (its frozen prefix also without
autograd) and predicts the targets at the query positions -> L2 loss -> backward -> collapse guard on
the loss averaged over ranks -> AdamW step.

A run folder holds ``config.yaml``, ``metrics.jsonl``, ``events.jsonl``, ``checkpoint.pt`` (or ``dcp/``
and ``encoder.pt``), ``probes.json``, ``summary.json`` and ``plots/``.
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
from . import dcp
from .config import RunConfig, build_config, dump_config
from .data import DigitsVideoDataset, VideoFolderDataset
from .distributed import DistEnv, all_reduce_mean, check_batch, rank_seed, setup
from .model import VideoMAE
from .parallelize import Parallelized, clip_grad_norm
from .throughput import Throughput

CHECKPOINT_FORMAT = "layerlock-reference/1"
DCP_FORMAT = "layerlock-reference-dcp/1"
# Fields that may differ between a checkpoint and the run that resumes it.
RESUMABLE_CHANGES = ("out_dir", "train.steps", "train.log_every", "train.ckpt_every", "train.num_workers",
                     "train.threads", "train.progress", "probe", "train.activation_checkpointing",
                     "train.compile", "train.peak_tflops", "train.dist_timeout_s")


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


class RankBatchSampler(Sampler[list[int]]):
    """This rank's rows of each global batch: rows ``rank*b .. (rank+1)*b`` of ``StepBatchSampler``'s
    batch, ``b = B / world_size``. The ranks' slices are disjoint and together are the global batch
    (a DistributedSampler whose split is a function of the step, so resume needs nothing else)."""

    def __init__(self, steps: StepBatchSampler, rank: int, world_size: int):
        self.steps, self.rank, self.world_size = steps, rank, world_size
        self.local = steps.batch_size // world_size

    def __iter__(self) -> Iterator[list[int]]:
        lo = self.rank * self.local
        return (b[lo : lo + self.local] for b in self.steps)

    def __len__(self) -> int:
        return len(self.steps)


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
    """The reference trainer. ``resume``: a run folder (its ``checkpoint.pt`` or ``dcp/latest``), a
    ``checkpoint.pt`` file or one ``dcp/step_*`` folder; a missing or partial checkpoint is an error."""

    def __init__(self, config: RunConfig, *, resume: str | Path | None = None, echo: Callable[[str], None] = print):
        self.config = config
        cfg = config
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.env: DistEnv = setup(cfg.train.strategy, cfg.train.device, cfg.train.dist_timeout_s)
        self.echo = echo if self.env.is_main else (lambda s: None)
        self.device = self.env.device
        self.micro_batch = check_batch(cfg.train.batch_size, cfg.train.grad_accum, self.env.world_size)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank (FSDP2 does not broadcast them)
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)

        self.dataset = build_dataset(cfg, "train")
        ll_config = cfg.layerlock()
        max_frozen = cfg.schedule.resolve_max_frozen(cfg.model.depth - cfg.model.decoder_depth)
        latent_layers = range(1, max_frozen + 1) if ll_config.target.kind == "latent" else ()
        self.model = VideoMAE(cfg.model, latent_target_layers=latent_layers).to(self.device)
        if cfg.train.activation_checkpointing:
            self.model.set_grad_checkpointing(True)
        if cfg.train.compile:
            for block in self.model.blocks:
                block.compile()  # per block: a freeze event recompiles one block's graph, not the model's
        # Wrap before the optimizer exists: FSDP2 replaces the parameters with sharded ones.
        self.parallel = Parallelized(self.model, self.env, cfg.train.precision)
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
        if self.env.world_size > 1:
            torch.manual_seed(rank_seed(cfg.seed, self.env.rank))  # each rank's own dropout stream
        # Shared by every rank: all ranks draw the global batch's masks and keep their own rows.
        self.mask_generator = torch.Generator().manual_seed(cfg.seed + 1)
        self.step = 0
        self.events: list[dict[str, Any]] = []
        self.throughput = Throughput(cfg.model, cfg.target.loss_fraction, self.env, cfg.train.peak_tflops,
                                     cfg.train.batch_size, cfg.target.context)
        if resume is not None:
            self._resume(Path(resume))

    @property
    def uses_dcp(self) -> bool:
        return self.env.strategy != "none"

    # -- events, logging, checkpoints ------------------------------------------------------------------
    def _on_event(self, event: LayerLockEvent) -> None:
        self.events.append({"step": event.step, "num_frozen": event.num_frozen, "target_layer": event.target_layer,
                            "heads": list(event.heads), "newly_frozen": list(event.newly_frozen),
                            "resumed": event.resumed})
        self.echo(f"[layerlock] {event.describe()}")
        if not event.resumed and self.env.is_main:
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
        if not self.uses_dcp:
            return save_atomic(self.checkpoint_state(), self.out / "checkpoint.pt")
        trainer_state = {"format": DCP_FORMAT, "config": self.config.to_dict(), "step": self.step,
                         "scheduler": self.scheduler.state_dict(), "layerlock": self.layerlock.state_dict(),
                         "mask_rng": self.mask_generator.get_state()}
        return dcp.save(self.out, self.step, self.model, self.optimizer, trainer_state, self.env)

    def _check_config(self, saved: dict[str, Any], source: Path) -> None:
        diffs = [d for d in _diff(saved, self.config.to_dict())
                 if not any(d == c or d.startswith(c + ".") for c in RESUMABLE_CHANGES)]
        if diffs:
            raise CheckpointError(f"{source} was written by a run with a different config; differing fields: "
                                  f"{', '.join(diffs)}. Resume with the checkpoint's config (omit --config).")

    def _resume(self, path: Path) -> None:
        """Restore everything in the order that keeps freezing consistent: model weights, then the
        LayerLock plan (re-freezes what was frozen), then optimizer state, scheduler and RNG."""
        if not path.exists():
            raise CheckpointError(f"checkpoint {path} does not exist; nothing to resume (a resume never starts fresh)")
        if path.is_dir() and ((path / dcp.DCP_DIR).is_dir() or path.parent.name == dcp.DCP_DIR):
            return self._resume_dcp(path)
        file = path / "checkpoint.pt" if path.is_dir() else path
        if self.uses_dcp:
            raise CheckpointError(f"{path} holds no distributed checkpoint (dcp/latest) but train.strategy is "
                                  f"{self.env.strategy!r}; a one-process checkpoint.pt resumes with train.strategy=none")
        ckpt = load_checkpoint(file, map_location=self.device)
        require_keys(ckpt, ["format", "config", "step", "model", "optimizer", "scheduler", "layerlock", "rng"], file)
        if ckpt["format"] != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{file} has format {ckpt['format']!r}, expected {CHECKPOINT_FORMAT!r}")
        self._check_config(ckpt["config"], file)
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

    def _resume_dcp(self, path: Path) -> None:
        """DCP resume: the plan is re-applied (and the wrapping synced) before the optimizer state loads,
        so frozen parameters get none back; weights and optimizer state reshard to this run's layout."""
        if not self.uses_dcp:
            raise CheckpointError(f"{path} holds a distributed checkpoint; resume it with train.strategy=ddp or "
                                  "fsdp under torchrun (any world size that divides the batch)")
        ckpt_dir = dcp.resolve(path)
        state = dcp.read_trainer_state(ckpt_dir)
        if state["format"] != DCP_FORMAT:
            raise CheckpointError(f"{ckpt_dir} has format {state['format']!r}, expected {DCP_FORMAT!r}")
        self._check_config(state["config"], ckpt_dir)
        self.layerlock.load_state_dict(state["layerlock"])
        self.parallel.sync(self.layerlock.heads())
        dcp.load_model_and_optimizer(ckpt_dir, self.model, self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self.mask_generator.set_state(state["mask_rng"].cpu())
        if not dcp.load_rng(ckpt_dir, self.env, int(state["world_size"])):
            self.echo(f"note: {ckpt_dir} was written by {state['world_size']} processes, this run has "
                      f"{self.env.world_size}: per-rank dropout RNG streams start fresh")
        self.step = int(state["step"])
        if self.layerlock.next_step != self.step:
            raise CheckpointError(f"{ckpt_dir}: LayerLock state is at step {self.layerlock.next_step}, trainer at {self.step}")

    # -- one training step ----------------------------------------------------------------------------
    def train_step(self, video: torch.Tensor) -> dict[str, float]:
        """One optimisation step on this rank's rows ``video [B / world, C, T, H, W]`` of the global
        batch; returns scalars (averaged over ranks) for logging."""
        cfg, env = self.config, self.env
        model, ll = self.model, self.layerlock
        plan = ll.begin_step(self.step)
        self.parallel.sync(ll.heads(plan))
        # Masks of the GLOBAL batch from the shared generator, so any world size sees the same masks.
        visible_idx, masked_idx = random_masking(
            cfg.train.batch_size, model.num_patches, cfg.model.mask_ratio, generator=self.mask_generator
        )
        query_idx = masked_idx
        if cfg.target.loss_fraction < 1.0:
            query_idx = subsample_indices(masked_idx, cfg.target.loss_fraction, generator=self.mask_generator)
        rows = slice(env.rank * video.shape[0], (env.rank + 1) * video.shape[0])
        visible_idx, query_idx = visible_idx[rows].to(video.device), query_idx[rows].to(video.device)
        accum, mb = cfg.train.grad_accum, self.micro_batch
        loss_sum, parts_sum, targets = None, None, None
        for i in range(accum):
            sl = slice(i * mb, (i + 1) * mb)
            with self.parallel.autocast():
                targets = ll.targets(video[sl], plan, query_idx[sl], visible_idx[sl])
            with self.parallel.no_sync(last_micro=i == accum - 1), self.parallel.autocast():
                predictions = self.parallel(video[sl], visible_idx[sl], query_idx[sl], heads=list(targets),
                                            frozen_prefix=ll.frozen_prefix(plan))
            loss, parts = ll.loss(predictions, targets)
            # Each micro-batch's mean / accum, summed, is the mean over this rank's rows; DDP and FSDP
            # average gradients over the equal-sized rank shards: the gradient of the global mean.
            (loss / accum).backward()
            d = loss.detach() / accum
            loss_sum = d if loss_sum is None else loss_sum + d
            p = torch.tensor([v / accum for v in parts.values()])
            parts_sum = p if parts_sum is None else parts_sum + p
        # One all-reduce for the logged loss, its parts and the guard's finite check: every rank sees the
        # global mean and so takes the same guard decision.
        means = all_reduce_mean(torch.cat([loss_sum.reshape(1).float().cpu(), parts_sum]).to(self.device), env).cpu()
        global_loss = means[0]
        grad_norm = 0.0
        if cfg.optim.grad_clip > 0:
            grad_norm = clip_grad_norm(list(model.parameters()), cfg.optim.grad_clip)
        decision = ll.end_step(global_loss, targets)
        if not decision.skip:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        return {"loss": float(global_loss), **{f"loss/{k}": float(v) for k, v in zip(parts, means[1:])},
                "grad_norm": grad_norm, "skipped": float(decision.skip)}

    # -- the loop ----------------------------------------------------------------------------------------
    def fit(self, stop_after: int | None = None) -> dict[str, Any]:
        """Train to ``train.steps``, then probe and plot. ``stop_after`` ends early after that step with
        a checkpoint and nothing else, as a preempted job would (resume continues exactly)."""
        cfg, main = self.config, self.env.is_main
        end = cfg.train.steps if stop_after is None else min(stop_after, cfg.train.steps)
        if main:
            self._start_logs()
        sampler = RankBatchSampler(StepBatchSampler(len(self.dataset), cfg.train.batch_size, cfg.seed, self.step, end),
                                   self.env.rank, self.env.world_size)
        loader = DataLoader(self.dataset, batch_sampler=sampler, num_workers=cfg.train.num_workers,
                            pin_memory=self.device.type == "cuda", persistent_workers=cfg.train.num_workers > 0)
        self.model.train()
        started = time.perf_counter()
        window: list[dict[str, float]] = []
        bar = _progress(range(self.step, end), cfg.train.progress and main, self.step, cfg.train.steps)
        caller_echo = self.echo
        if hasattr(bar, "write"):  # print above the progress bar, not through it
            self.echo = bar.write
        metrics_file = open(self.out / "metrics.jsonl", "a") if main else None
        # Throughput goes to its own file: metrics.jsonl stays identical between a run and its resume.
        speed_file = open(self.out / "throughput.jsonl", "a") if main else None
        speed: list[dict[str, float]] = []
        try:
            for batch, _ in zip(loader, bar):
                self.throughput.start_step()
                window.append(self.train_step(batch["video"].to(self.device, non_blocking=True)))
                plan = self.layerlock.plan
                speed.append(self.throughput.end_step(plan.num_frozen, self.layerlock.selector.layers(plan),
                                                      plan.stem_frozen))
                if self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps:
                    row = self._log_row(window, started)
                    window = []
                    if metrics_file is not None and speed_file is not None:
                        metrics_file.write(json.dumps(row) + "\n")
                        metrics_file.flush()
                        mean = {k: sum(r[k] for r in speed) / len(speed) for k in speed[-1] if k != "peak_mem_gb"}
                        mean["peak_mem_gb"] = speed[-1]["peak_mem_gb"]
                        speed_file.write(json.dumps({"step": self.step, **{k: round(v, 6) for k, v in mean.items()}}) + "\n")
                        speed_file.flush()
                    speed = []
                    if hasattr(bar, "set_postfix"):
                        bar.set_postfix(loss=f"{row['loss']:.4f}", frozen=int(row["layerlock/num_frozen"]),
                                        target=self.layerlock.heads()[-1])
                if self.step % cfg.train.ckpt_every == 0 or self.step == end:
                    self.save_checkpoint()
        finally:
            for f in (metrics_file, speed_file):
                if f is not None:
                    f.close()
            if hasattr(bar, "close"):
                bar.close()
            self.echo = caller_echo
        if self.step < cfg.train.steps:
            return {"method": cfg.method, "stopped_at": self.step, "events": self.events}
        train_seconds = time.perf_counter() - started
        summary: dict[str, Any] = {"method": cfg.method, "steps": cfg.train.steps, "train_seconds": round(train_seconds, 1),
                                   "events": self.events}
        if self.uses_dcp:
            # Collective: the consolidated encoder for fine-tuning; rank 0 probes a plain copy of it.
            dcp.export_encoder(self.model, cfg.model, self.out / "encoder.pt", self.env, self.step)
            summary["encoder"] = str(self.out / "encoder.pt")
            if not main:
                return summary
        if cfg.probe_enabled and cfg.data_source == "digits":
            summary["probes"] = self.run_probes()
        self.write_plots()
        with open(self.out / "summary.json", "w") as f:
            json.dump(summary, f, indent=2)
        return summary

    def _start_logs(self) -> None:
        """Rank 0: write config.yaml, start fresh logs or drop rows written after the resumed checkpoint."""
        if self.step == 0 and ((self.out / "checkpoint.pt").exists() or dcp.has_dcp(self.out)):
            self.echo(f"warning: {self.out} holds an earlier run; starting over in it (use --resume to continue it)")
        dump_config(self.config, self.out / "config.yaml")
        for name in ("metrics.jsonl", "events.jsonl", "throughput.jsonl"):
            kept = [r for r in read_jsonl(self.out / name) if r["step"] <= self.step and not r.get("resumed")]
            (self.out / name).write_text("".join(json.dumps(r) + "\n" for r in kept if self.step > 0))

    def _log_row(self, window: list[dict[str, float]], started: float) -> dict[str, Any]:
        keys = {k for r in window for k in r}
        row: dict[str, Any] = {"step": self.step}
        row.update({k: sum(r[k] for r in window if k in r) / sum(1 for r in window if k in r) for k in sorted(keys)})
        row["lr"] = self.scheduler.get_last_lr()[0]
        row["elapsed_s"] = round(time.perf_counter() - started, 2)
        row.update(self.layerlock.metrics())
        return row

    # -- evaluation and plots -----------------------------------------------------------------------------
    def random_init_encoder(self) -> VideoMAE:
        """The run's model with the weights it had before training: built right after
        ``torch.manual_seed(config.seed)`` with the same latent readouts, as ``__init__`` builds it
        (constructing a readout draws from the RNG, so they shift every later initial weight)."""
        latent = [k for k in range(1, self.model.encoder_depth) if VideoMAE.latent_head(k) in self.model.readouts]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            return VideoMAE(self.config.model, latent_target_layers=latent).to(self.device)

    def run_probes(self) -> dict[str, Any]:
        """Probe the trained encoder and, with the same probes, the random-init one (same architecture,
        the run's seed, before training): ``{<trained probe keys>..., "random_init": {<keys>...}}``, also
        written to ``probes.json``. A probe reading is only evidence next to that baseline."""
        from .probes import run_probes

        cfg = self.config
        self.echo("[probes] encoding probe videos; linear, attentive and k-NN probes on the trained and the "
                  "random-init encoder ...")
        # A sharded or wrapped model cannot run on rank 0 alone: probe the exported encoder.
        model = dcp.load_encoder(self.out / "encoder.pt").to(self.device) if self.uses_dcp else self.model
        train_set, test_set = DigitsVideoDataset(cfg.data, "train"), DigitsVideoDataset(cfg.data, "test")

        def probe(encoder: VideoMAE) -> dict[str, float]:
            was_training = encoder.training
            encoder.eval()

            def encode(video: torch.Tensor) -> torch.Tensor:
                with torch.no_grad():
                    return encoder.encode(video.to(self.device))

            try:
                return run_probes(encode, train_set, test_set, encoder.grid, cfg.model.tubelet, cfg.probe)
            finally:
                encoder.train(was_training)

        results: dict[str, Any] = probe(model)
        results["random_init"] = probe(self.random_init_encoder())
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
        if self.config.schedule.kind == "adaptive":
            from ..schedule import FreezeSchedule
            from .plots import plot_adaptive_signals

            # the decided events next to what the explicit schedule with the same fields would have done
            explicit = FreezeSchedule(self.config.schedule, self.layerlock.schedule.num_layers).events()
            plot_adaptive_signals(rows, events, plots / "adaptive_signals.png", explicit_events=explicit,
                                  total_steps=self.config.train.steps)


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
    """The raw config dict stored in a run's checkpoint (for ``--resume`` without ``--config``):
    ``checkpoint.pt`` of a one-process run, or the latest complete DCP checkpoint of a ddp/fsdp run."""
    path = Path(path)
    if path.is_dir() and ((path / dcp.DCP_DIR).is_dir() or path.parent.name == dcp.DCP_DIR):
        return dcp.read_trainer_state(dcp.resolve(path))["config"]
    file = path / "checkpoint.pt" if path.is_dir() else path
    ckpt = load_checkpoint(file)
    require_keys(ckpt, ["config"], file)
    return ckpt["config"]


__all__ = ["Trainer", "StepBatchSampler", "RankBatchSampler", "build_config", "config_from_checkpoint"]
