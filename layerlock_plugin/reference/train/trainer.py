"""The reference LayerLock trainer: a 4DS-style video ViT MAE, read top to bottom.

Launch it with ``layerlock-train`` (one process, torchrun, multi-node, SLURM: the commands are in
:mod:`layerlock_plugin.reference.cli`); ``train.batch_size`` is the GLOBAL batch of one optimizer step.

Every rank sees the same global batch indices and the same masks (both functions of the global step)
and takes its own rows, so N processes follow the one-process run up to float rounding. Rank 0 alone
logs, prints, plots and probes. ``ddp`` / ``fsdp`` runs checkpoint with torch.distributed.checkpoint
(``dcp/``, see :mod:`~layerlock_plugin.reference.parallel.dcp`) and export ``encoder.pt`` at the end;
one process writes ``checkpoint.pt``.

One step: LayerLock plan for this step (freeze on schedule, maybe switch the target, LR warmup
factor) -> masks for the global batch -> per micro-batch: targets on the full input from the frozen
prefix (no autograd), the student sees the visible tokens only (its frozen prefix also without
autograd) and predicts the targets at the query positions -> L2 loss -> backward -> collapse guard on
the loss averaged over ranks -> AdamW step.

A run folder holds ``config.yaml``, ``metrics.jsonl``, ``events.jsonl``, ``checkpoint.pt`` (or ``dcp/``
and ``encoder.pt``), ``probes.json``, ``summary.json`` and ``plots/``. The pieces, one module each:
:mod:`.run_folder` (where a run may write), :mod:`.budget` (resume and early-stop budgets),
:mod:`~layerlock_plugin.reference.data.sampling` (batches as a function of the step),
:mod:`~layerlock_plugin.reference.parallel.parallelize` (DDP / FSDP2 / SPMD wrapping, and what differs
between devices inside a step), :mod:`.checkpointing`, :mod:`.run_log` (JSONL logs), :mod:`.progress`,
:mod:`.throughput`, :mod:`.stop` (Ctrl-C at a step boundary); after the last step the probes
(:mod:`~layerlock_plugin.reference.eval.trained_run`) and the plots
(:func:`~layerlock_plugin.reference.plots.write_run_plots`).
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ...collapse import MEASURES
from ...controller import LayerLock, LayerLockEvent
from ...schedule import Plan
from ...errors import ConfigError
from ...masking import random_masking, subsample_indices
from ..config import RunConfig, dump_config
from ..data import (BadVideoLog, DigitsVideoDataset, RankBatchSampler, StepBatchSampler, VideoFolderDataset,
                    VideoIndex, build_index, collate_clips)
from ..data.video_shards import VideoShardsDataset
from ..data.device_clips import DeviceClips, fits, storage_dtype
from ..model import VideoMAE
from ..parallel import dcp
from ..parallel.distributed import DistEnv, all_reduce_mean, barrier, check_batch, device_flags, rank_seed, setup
from ..parallel.parallelize import Parallelized, clip_grad_norm
from . import budget
from .checkpointing import Checkpointer
from .late_guard import LateGuard, Pending
from .metric_sinks import check_sinks, open_sinks
from .optim import cosine_with_warmup, param_groups, warn_if_warmup_outlasts_run
from .progress import Progress
from .run_folder import RunFolder, plan_folder, read_jsonl
from .run_log import EVENTS, METRICS, SESSIONS, RunLog
from .stop import StopRequest
from .throughput import Throughput


@dataclass(frozen=True)
class StepScalars:
    """What one training step reports: ``values [len(names)]`` averaged over ranks, on the device (read
    on the host once per log window); ``skipped``: the guard dropped the update; ``guard_pending``: on a
    step whose guard statistics are computed late, this rank's measures and the target's token sample
    (the loop keeps them until the log row, see :mod:`.late_guard`)."""

    names: tuple[str, ...]
    values: torch.Tensor
    skipped: bool
    guard_pending: Pending | None = None


def build_dataset(config: RunConfig, split: str = "train", env: DistEnv | None = None) -> Dataset:
    """The run's dataset. Real video (``folder``, ``shards``) is opened lazily: a folder is indexed once
    (its label file, or one listing on rank 0 shared with the other ranks), a shard stream is set up
    per rank; ``split='train'`` augments, anything else gives the deterministic evaluation clips."""
    env = env or DistEnv("none", 0, 1, 0, torch.device("cpu"), None)
    if config.data_source in ("folder", "shards"):
        per_rank = config.train.batch_size // env.world_size
        if per_rank % config.data.num_clips:
            raise ConfigError("data.num_clips", f"must divide the batch of each rank (train.batch_size / world size "
                                                f"= {per_rank}), got {config.data.num_clips}")
    if config.data_source == "folder":
        return VideoFolderDataset(config.data, train=split == "train", seed=config.seed, index=_index_once(config, env))
    if config.data_source == "shards":
        return VideoShardsDataset(config.data, seed=config.seed, rank=env.rank, world_size=env.world_size,
                                  batch_size=config.train.batch_size // env.world_size // config.data.num_clips,
                                  train=split == "train")
    # the embedded clips are rendered once up front (~1 ms each), so the loop never waits on data
    return DigitsVideoDataset(config.data, split=split, cache=True)


def _index_once(config: RunConfig, env: DistEnv) -> VideoIndex:
    """The folder's index, built by rank 0 alone (no rank opens a video) and sent to the others, so
    every rank indexes the same list even if the file system changes under the run."""
    if not env.distributed:
        return build_index(config.data)
    import torch.distributed as dist

    box: list[Any] = [None, None]
    if env.is_main:
        try:
            box[0] = build_index(config.data)
        except ConfigError as e:  # every rank stops with rank 0's line
            box[1] = e
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise box[1]
    return box[0]


class Trainer:
    """The reference trainer, writing into the run folder ``config.out_dir``.

    ``resume``: a run folder (its ``checkpoint.pt`` or ``dcp/latest``), a ``checkpoint.pt`` file or one
    ``dcp/step_*`` folder; a missing or partial checkpoint is an error. Resuming into the checkpoint's
    own run folder continues that run there; into another folder it forks: the new folder (fresh, as
    for a new run) gets the logs up to the resumed step and its own checkpoints, the source is only read.
    A new run (or fork) into a folder holding a run is refused unless ``overwrite`` (which removes the
    old run's files first). ``extend``: allow ``train.steps`` to differ from the resumed run's budget
    (the LR schedule is recomputed; the change is printed). Nothing is written before :meth:`fit`.
    """

    def __init__(self, config: RunConfig, *, resume: str | Path | None = None, overwrite: bool = False,
                 extend: bool = False, echo: Callable[[str], None] = print, stop: StopRequest | None = None):
        cfg = self.config = config
        if cfg.out_dir is None:
            raise ConfigError("out_dir", "must name the run folder (the CLI picks runs/<method>-<time> when --out is omitted)")
        self.out = Path(cfg.out_dir)
        folder = plan_folder(self.out, resume, overwrite)  # the run folder rules, checked before any write
        checkpoint, self.log_source, self._clear = folder.checkpoint, folder.log_source, folder.clear
        check_sinks(cfg.train)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)

        # where: process group, device, this rank's share of the global batch
        self.env: DistEnv = setup(cfg.train.strategy, cfg.train.device, cfg.train.dist_timeout_s)
        self.echo = echo if self.env.is_main else (lambda s: None)
        self.device = self.env.device
        if self.device.type == "xla" and cfg.guard.policy == "skip":
            raise ConfigError("guard.policy", "'skip' needs a host decision inside every step, which the XLA device "
                                              "does not make (its guard decides at log steps); use warn, raise or off")
        self.micro_batch = check_batch(cfg.train.batch_size, cfg.train.grad_accum, self.env.world_size)

        # what: data, model (wrapped for the strategy before the optimizer exists: FSDP2 replaces the
        # parameters with sharded ones), optimizer, LR curve, LayerLock
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank (FSDP2 does not broadcast them)
        self.dataset = build_dataset(cfg, "train", self.env)
        ll_config = cfg.layerlock()
        max_frozen = cfg.schedule.resolve_max_frozen(cfg.model.depth - cfg.model.decoder_depth)
        latent_layers = range(1, max_frozen + 1) if ll_config.target.kind == "latent" else ()
        self.latent_layers = tuple(latent_layers)
        self.model = VideoMAE(cfg.model, latent_target_layers=latent_layers).to(self.device)
        if cfg.train.activation_checkpointing:
            self.model.set_grad_checkpointing(True)
        if cfg.train.compile:
            for block in self.model.blocks:
                block.compile()  # per block: a freeze event recompiles one block's graph, not the model's
        # ``say`` looks self.echo up at call time: during fit it prints above the progress bar
        self.parallel = Parallelized(self.model, self.env, cfg.train.precision, say=lambda s: self.echo(s))
        # foreach: one fused update over all tensors instead of a Python loop over ~100 small ones (torch picks
        # it by itself on CUDA only); on CPU it is ~25% faster per step and bitwise the same update
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
            foreach=True if self.device.type == "cpu" else None,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_with_warmup(cfg.train.steps, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio)
        )
        warn_if_warmup_outlasts_run(cfg.train.steps, cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio)
        self.layerlock = LayerLock(
            self.model, ll_config, self.optimizer, tubelet=cfg.model.tubelet, total_steps=cfg.train.steps
        )
        self.layerlock.on_event(self._on_event)
        # warn / raise: decided at log rows and checkpoints, no host sync in a step (module late_guard)
        self.late_guard = LateGuard(self.layerlock, self.env, cfg.guard.policy)
        if self.env.world_size > 1:
            torch.manual_seed(rank_seed(cfg.seed, self.env.rank))  # each rank's own dropout stream
        # Shared by every rank: all ranks draw the global batch's masks and keep their own rows.
        self.mask_generator = torch.Generator().manual_seed(cfg.seed + 1)

        # bookkeeping: step, events, logs, throughput, checkpoints, stop requests
        self.step = 0
        self.events: list[dict[str, Any]] = []
        self._resumed_events: list[str] = []
        self.log = RunLog(self.out, enabled=self.env.is_main)
        self.throughput = Throughput(cfg.model, cfg.target.loss_fraction, self.env, cfg.train.peak_tflops,
                                     cfg.train.batch_size, cfg.target.context)
        self.checkpointer = Checkpointer(self)
        self.stop, self.stop_agreed = stop or StopRequest(), False  # signals: see :mod:`.stop`
        self.ckpt_due = False  # train.ckpt_every_minutes passed on some rank (agreed like a stop request)
        self._last_ckpt_time = time.monotonic()
        self.applied_lr = 0.0  # the LR of the last optimizer step, switch-warmup factor included
        self._folder_ready = False
        self._device_clips: DeviceClips | None = None  # the cached clips on the device, put there at the first fit
        # how this session continues the run (sessions.jsonl; the plots mark resumes and extensions)
        self._session = "start" if checkpoint is None else "fork" if self.log_source is not None else "resume"
        if checkpoint is not None:
            self._check_budget(self.checkpointer.resume(checkpoint), extend)

    @property
    def uses_dcp(self) -> bool:
        return self.checkpointer.uses_dcp

    # -- one training step: plan -> masks -> (targets -> student -> loss -> backward) per micro-batch
    #    -> one all-reduce -> guard -> optimizer
    def train_step(self, video: torch.Tensor) -> StepScalars:
        """One optimisation step on this rank's rows ``video [B / world, C, T, H, W]`` of the global batch.

        Returns the step's scalars averaged over ranks, still on the device. Host syncs: none with the
        collapse guard on ``warn``, ``raise`` or ``off`` (decided at log rows, :mod:`.late_guard`), one with
        ``skip`` (its decision gates the update); logging reads the scalars once per log window
        (:class:`.run_log.RunLog`)."""
        plan = self.layerlock.begin_step(self.step)  # freezes on schedule, switches the target, LR warmup
        self.parallel.sync(self.layerlock.heads(plan))  # DDP / readouts follow the trainable set
        visible_idx, query_idx = self.parallel.to_device(*self.masks(video.shape[0]))
        video, visible_idx, query_idx = self.parallel.shard_inputs(video, visible_idx, query_idx)  # XLA SPMD
        accum, mb = self.config.train.grad_accum, self.micro_batch
        loss_sum, parts_sum, targets, heads = None, None, None, ()
        for i in range(accum):
            sl = slice(i * mb, (i + 1) * mb)
            loss, parts, targets = self.forward_backward(video[sl], visible_idx[sl], query_idx[sl], plan,
                                                         last_micro=i == accum - 1)
            heads = tuple(parts)
            d, p = loss.detach() / accum, torch.stack(list(parts.values())) / accum
            loss_sum = d if loss_sum is None else loss_sum + d
            parts_sum = p if parts_sum is None else parts_sum + p
        grad_norm = clip_grad_norm(list(self.model.parameters()), self.config.optim.grad_clip) \
            if self.config.optim.grad_clip > 0 else torch.zeros((), device=self.device)
        guard, pending = self.late_guard.measure(loss_sum, targets)  # on the device, no sync
        names, values = self.reduce(loss_sum, parts_sum, heads, grad_norm, guard)
        if guard is not None and not self.late_guard.deferred:  # 'skip': the step's one sync gates its update
            host = values.tolist()
            self._read_flags(dict(zip(names, host)))
            decision = self.layerlock.end_step(measured=host[len(names) - len(MEASURES):])  # same on every rank
        elif guard is not None:
            decision = self.layerlock.last_decision  # deferred: no skip, decided at the next read
        else:
            decision = self.layerlock.end_step(loss_sum)
        self.applied_lr = self.scheduler.get_last_lr()[0] * self.layerlock.warmup_factor(plan)
        if not decision.skip:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        self.parallel.end_step()  # XLA: the step's graph ends here
        return StepScalars(names, values, decision.skip, pending)

    def _decide_guard_late(self) -> None:
        """The guard's decisions of the steps since the last one (see :mod:`.late_guard`)."""
        self.late_guard.decide(self.log, self.step)

    def reduce(self, loss_sum: torch.Tensor, parts_sum: torch.Tensor, heads: tuple[str, ...], grad_norm: torch.Tensor,
               guard: torch.Tensor | None) -> tuple[tuple[str, ...], torch.Tensor]:
        """One all-reduce (on the device) of everything the step reports: the loss, its parts, the grad
        norm (already global: the mean leaves it), a stop request, a due time-based checkpoint and the
        guard's measures. Every rank then sees the same values, so takes the same guard decision and
        stops or checkpoints at the same step (a flag raised on any rank has a mean above 0)."""
        minutes = self.config.train.ckpt_every_minutes
        due = minutes > 0 and time.monotonic() - self._last_ckpt_time >= 60 * minutes
        flags = device_flags((self.stop.requested, due), self.device)
        parts = [loss_sum.reshape(1).float(), parts_sum.float(), grad_norm.reshape(1).float(), flags]
        names = ("loss", *(f"loss/{h}" for h in heads), "grad_norm", "_stop", "_ckpt_due")
        if guard is not None:
            parts.append(guard.float())
            names += tuple(f"_guard/{m}" for m in MEASURES)
        return names, all_reduce_mean(torch.cat(parts), self.env)

    def _read_flags(self, values: dict[str, float]) -> None:
        self.stop_agreed = values["_stop"] > 0
        self.ckpt_due = values["_ckpt_due"] > 0

    def masks(self, local_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(visible_idx [b, V], query_idx [b, Q])`` of this rank's ``b`` rows, on the CPU. Drawn for the
        GLOBAL batch from the shared generator, so every world size sees the same masks; the queries are
        a random ``target.loss_fraction`` of the masked tokens."""
        cfg = self.config
        visible_idx, masked_idx = random_masking(cfg.train.batch_size, self.model.num_patches, cfg.model.mask_ratio,
                                                 generator=self.mask_generator)
        query_idx = masked_idx
        if cfg.target.loss_fraction < 1.0:
            query_idx = subsample_indices(masked_idx, cfg.target.loss_fraction, generator=self.mask_generator)
        rows = slice(self.env.rank * local_batch, (self.env.rank + 1) * local_batch)
        return visible_idx[rows], query_idx[rows]

    def forward_backward(self, video: torch.Tensor, visible_idx: torch.Tensor, query_idx: torch.Tensor, plan: Plan,
                         last_micro: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """One micro-batch: targets (frozen prefix, full input, no autograd) -> student on the visible
        tokens -> L2 loss at the queries -> backward of ``loss / grad_accum`` (DDP reduces on the last)."""
        ll, accum = self.layerlock, self.config.train.grad_accum
        with self.parallel.autocast():
            targets = ll.targets(video, plan, query_idx, visible_idx)
        with self.parallel.no_sync(last_micro=last_micro), self.parallel.autocast():
            predictions = self.parallel(video, visible_idx, query_idx, heads=list(targets),
                                        frozen_prefix=ll.frozen_prefix(plan))
        loss, parts = ll.loss(predictions, targets)
        # Each micro-batch's mean / accum, summed, is the mean over this rank's rows; DDP and FSDP average
        # gradients over the equal-sized rank shards: the gradient of the global mean.
        (loss / accum).backward()
        return loss, parts, targets

    # -- the loop ----------------------------------------------------------------------------------------
    def fit(self, stop_after: int | None = None) -> dict[str, Any]:
        """Train to ``train.steps``, then probe and plot. ``stop_after`` ends early after that step with
        a checkpoint and nothing else, keeping the LR and freeze schedule of ``train.steps`` (resume
        continues exactly). The first SIGINT (Ctrl-C) does the same after the step in progress."""
        cfg = self.config
        self.check_stop_after(stop_after)
        end = cfg.train.steps if stop_after is None else stop_after
        self._begin()
        try:
            started = time.perf_counter()
            self._train_until(end, started)
            if self.step < cfg.train.steps:
                return {"method": cfg.method, "stopped_at": self.step, "events": self.events,
                        "interrupted": self.stop_agreed}
            return self._finish(time.perf_counter() - started)
        finally:
            self.log.close_sinks()

    def _train_until(self, end: int, started: float) -> None:
        """The loop: steps, a log row every ``train.log_every``, checkpoints on schedule (steps or minutes),
        at ``end`` and when a stop was requested (then the loop ends after that checkpoint)."""
        cfg = self.config
        self.model.train()
        caller_echo = self.echo
        mode = "auto" if cfg.train.progress and self.env.is_main else "off"
        with Progress(self.step, end, cfg.train.steps, mode, caller_echo) as progress, self.stop:
            self.echo = progress.write if self.env.is_main else self.echo  # print above the progress bar
            try:
                self.throughput.start_window()
                batches = iter(self._loader(end))
                while (batch := self.throughput.wait_for(batches)) is not None:
                    out = self.train_step(batch["video"].to(self.device, non_blocking=True))
                    plan = self.layerlock.plan
                    self.throughput.count_step(plan.num_frozen, self.layerlock.target_layers(plan), plan.stem_frozen)
                    self.log.add_step(out.names, out.values, out.skipped)
                    self.late_guard.keep(self.step - 1, out.guard_pending)
                    progress.step()
                    # rows on the cadence only (and at the last step): a stop between two rows leaves its
                    # steps to the checkpoint, so a resumed run logs the uninterrupted run's windows
                    if self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps:
                        self._decide_guard_late()
                        row = self.log.write_row(self.step, {
                            "lr": self.applied_lr, "elapsed_s": round(time.perf_counter() - started, 2),
                            **self.layerlock.metrics()}, self.throughput.end_window())
                        self._read_flags(self.log.last_step)  # with the guard off, stops are seen here
                        progress.row(self.step, row["loss"], int(row["layerlock/num_frozen"]), self.layerlock.heads()[-1])
                    if self.step % cfg.train.ckpt_every == 0 or self.step == end or self.stop_agreed or self.ckpt_due:
                        self.save_checkpoint()
                    if self.stop_agreed:
                        break
            finally:
                self.log.close()
                self.echo = caller_echo

    def _begin(self) -> None:
        """Before the first step: make the folder, say what the resume restored, start the logs; a fork
        writes a checkpoint of the resumed state at once, so its folder never depends on the source."""
        self._prepare_folder()
        for line in self._resumed_events:
            self.echo(f"[layerlock] {line}")
        self._resumed_events = []
        if self.env.is_main:
            dump_config(self.config, self.out / "config.yaml")
        self.log.start(self.step, self.log_source, {"kind": self._session, "train_steps": self.config.train.steps})
        self._session = "continue"  # a later fit() of this trainer goes on in the same process
        if self.env.is_main:
            self.log.sinks = open_sinks(self.out, self.config.train, self.config.to_dict(), self.step)
        if self.log_source is not None:
            self.save_checkpoint()
            self.log_source = None

    def _loader(self, end: int) -> Iterable[dict[str, Any]]:
        """The batches of steps ``self.step .. end - 1`` for this rank. Digits and folders: batches as a
        function of the step (:mod:`~layerlock_plugin.reference.data.sampling`), folder samples keyed by
        (index, epoch); shards: the rank's stream from this step on. Cached clips (the embedded digits) are
        indexed on the training device when they fit there (:mod:`~layerlock_plugin.reference.data.device_clips`).
        Real video passes through a :class:`BadVideoLog` (one line per bad file; ``data.on_bad_video: raise``
        stops here)."""
        cfg, ds = self.config, self.dataset
        pin = self.device.type == "cuda"
        workers = cfg.train.num_workers
        if cfg.data_source == "digits":
            sampler = RankBatchSampler(StepBatchSampler(len(ds), cfg.train.batch_size, cfg.seed, self.step, end),
                                       self.env.rank, self.env.world_size)
            videos = getattr(ds, "cached_videos", None)
            if videos is not None:
                dtype = storage_dtype(self.device, self.parallel.dtype)
                if fits(videos.numel() * dtype.itemsize, self.device):
                    if self._device_clips is None:
                        self._device_clips = DeviceClips(videos, self.device, dtype)
                    return self._device_clips.batches(sampler, self.parallel.to_device)
            return DataLoader(ds, batch_sampler=sampler, num_workers=workers, pin_memory=pin,
                              persistent_workers=workers > 0, generator=self._loader_rng())
        k = cfg.data.num_clips
        if cfg.data_source == "folder":
            sampler = RankBatchSampler(StepBatchSampler(len(ds), cfg.train.batch_size // k, cfg.seed, self.step, end,
                                                        with_epoch=True), self.env.rank, self.env.world_size)
            loader: Iterable[dict[str, Any]] = DataLoader(ds, batch_sampler=sampler, num_workers=workers,
                                                          collate_fn=collate_clips(k), pin_memory=pin,
                                                          generator=self._loader_rng())
        else:
            ds.check_workers(workers)
            ds.start_step = self.step
            loader = itertools.islice(DataLoader(ds, batch_size=ds.batch_size, num_workers=workers,
                                                 collate_fn=collate_clips(k), pin_memory=pin,
                                                          generator=self._loader_rng()), end - self.step)
        log = BadVideoLog(cfg.data.on_bad_video, rank=self.env.rank if self.env.distributed else None)
        return log.wrap(loader)

    def _loader_rng(self) -> torch.Generator:
        """The generator a DataLoader draws its workers' base seed from. Left to the global RNG, that draw
        would shift the dropout / drop-path stream of a resumed run by one (the uninterrupted run draws at
        step 0)."""
        return torch.Generator().manual_seed(self.config.seed)

    def _finish(self, train_seconds: float) -> dict[str, Any]:
        """After the last step: the consolidated encoder (DCP runs), probes, the adaptive schedule's
        verdict, plots and ``summary.json``."""
        cfg = self.config
        summary: dict[str, Any] = {"method": cfg.method, "steps": cfg.train.steps,
                                   "train_seconds": round(train_seconds, 1), "events": self.events}
        if self.uses_dcp:
            # Collective: the consolidated encoder for fine-tuning; rank 0 probes a plain copy of it.
            dcp.export_encoder(self.model, cfg.model, self.out / "encoder.pt", self.env, self.step)
            summary["encoder"] = str(self.out / "encoder.pt")
        if not self.env.is_main:
            return summary
        if cfg.probe_enabled and cfg.data_source == "digits":
            summary["probes"] = self.run_probes()
        if cfg.schedule.kind == "adaptive" and cfg.layerlock().freeze:
            decided = [e for e in self.log.rows(EVENTS) if e["newly_frozen"]]  # a resumed run's too
            summary["adaptive"] = {"events": len(decided)}
            if not decided:
                note = (f"the adaptive schedule decided no freeze event in {cfg.train.steps} steps (no block met its "
                        f"convergence signal and schedule.adaptive.max_pixel_steps is "
                        f"{cfg.schedule.adaptive.max_pixel_steps}): the run stayed on the pixel target")
                summary["adaptive"]["note"] = note
                self.echo(f"note: {note}")
        from ..plots import write_run_plots

        write_run_plots(self.out / "plots", read_jsonl(self.out / METRICS), read_jsonl(self.out / EVENTS), cfg,
                        self.layerlock, sessions=read_jsonl(self.out / SESSIONS))
        self.log.images(self.step, {p.stem: p for p in sorted((self.out / "plots").glob("*.png"))})
        with open(self.out / "summary.json", "w") as f:
            json.dump(summary, f, indent=2)
        return summary

    # -- run folder, budget, events, checkpoints --------------------------------------------------------
    def _prepare_folder(self) -> None:
        """Rank 0 makes the folder (removing an overwritten run's files first); then every rank may write."""
        if self._folder_ready:
            return
        if self.env.is_main:
            if self._clear:
                RunFolder(self.out).clear()
            self.out.mkdir(parents=True, exist_ok=True)
        barrier(self.env)
        self._folder_ready = True

    def _check_budget(self, saved_steps: int, extend: bool) -> None:
        """A resume keeps the run's budget unless extended explicitly (module :mod:`.budget`)."""
        note = budget.check_resume_budget(self.config.train.steps, self.step, saved_steps, extend, self.config.optim)
        if note is not None:
            self.echo(note)
            self._session = "extend"

    def check_stop_after(self, stop_after: int | None) -> None:
        """``stop_after`` must lie after the current step and within ``train.steps`` (``None``: no early stop)."""
        budget.check_stop_after(stop_after, self.step, self.config.train.steps)

    def _on_event(self, event: LayerLockEvent) -> None:
        self.events.append({"step": event.step, "num_frozen": event.num_frozen, "target_layer": event.target_layer,
                            "heads": list(event.heads), "newly_frozen": list(event.newly_frozen),
                            "resumed": event.resumed})
        if event.resumed:  # said when the resumed run starts (a resume refused later says nothing of it)
            self._resumed_events.append(event.describe())
            return
        self.echo(f"[layerlock] {event.describe()}")
        self._prepare_folder()  # also when a caller drives train_step without fit
        self.log.event(self.events[-1])

    def save_checkpoint(self) -> Path:
        self._prepare_folder()
        self._decide_guard_late()  # the checkpoint's guard state covers every step it has trained
        self._last_ckpt_time = time.monotonic()
        return self.checkpointer.save()

    # -- evaluation and plots -----------------------------------------------------------------------------
    def random_init_encoder(self) -> VideoMAE:
        """The run's model with the weights it had before training: built right after
        ``torch.manual_seed(config.seed)`` with the same latent readouts, as ``__init__`` builds it
        (constructing a readout draws from the RNG, so they shift every later initial weight)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            return VideoMAE(self.config.model, latent_target_layers=self.latent_layers).to(self.device)

    def run_probes(self) -> dict[str, Any]:
        """Probe the trained encoder and, with the same probes, the random-init one (same architecture,
        the run's seed, before training): ``{<trained probe keys>..., "random_init": {<keys>...}}``, also
        written to ``probes.json``. A probe reading is only evidence next to that baseline."""
        from ..eval.trained_run import probe_run

        self.echo("[probes] encoding probe videos; linear, attentive and k-NN probes on the trained and the "
                  "random-init encoder ...")
        # A sharded or wrapped model cannot run on rank 0 alone: probe the exported encoder.
        model = dcp.load_encoder(self.out / "encoder.pt").to(self.device) if self.uses_dcp else self.model
        return probe_run(model, self.random_init_encoder, self.config, self.device, self.out / "probes.json",
                         latent_layers=self.latent_layers, say=self.echo)


__all__ = ["Trainer", "StepScalars", "build_dataset"]
