"""``layerlock-train``: the reference trainer's command line.

Run folders (see :mod:`.train.run_folder`): a new run goes into ``--out`` (a fresh ``runs/<method>-<time>``
when omitted), which must be new or empty unless ``--overwrite``; ``--resume RUN`` continues RUN in RUN
and writes nowhere else; ``--resume RUN --out NEW`` forks the resumed state into NEW. A resume keeps the
run's budget: ``--stop-after N`` stops early keeping the schedule, ``--extend N`` trains to N steps and
says how the LR schedule changes. Bad input exits with code 2 and one line naming the field.

Single process (CPU or one GPU)::

    layerlock-train                                   # the main job: tiny model, embedded data
    layerlock-train --method mae --out runs/mae       # the pixel baseline on the same budget
    layerlock-train --resume runs/demo                # continue a stopped run, in its folder

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
    # resume: the same command with --resume runs/vit_g (loads runs/vit_g/dcp/latest); on one node, e.g.
    torchrun --standalone --nproc_per_node=2 -m layerlock_plugin.reference.cli --resume runs/ddp

The trainer it runs: :mod:`layerlock_plugin.reference.train.trainer`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from ..errors import ConfigError, LayerLockError
from .config import apply_overrides, build_config, dump_config, load_yaml
from .train.checkpointing import check_same_config, checkpoint_progress
from .train.run_folder import RunFolder, default_run_dir, resume_source
from .train.stop import StopRequest

PROG = "layerlock-train"
MODULE = "layerlock_plugin.reference.cli"  # torchrun -m MODULE: the launch form that needs no console script
EPILOG = """examples:
  layerlock-train --out runs/demo                  # main job: tiny LayerLock run on the embedded digits videos
  layerlock-train --method mae --out runs/mae      # the pixel-MAE baseline, same budget
  layerlock-train --set schedule.interval=100 --set target.mode=multi --set optim.lr=1e-3
  layerlock-train --out runs/a --stop-after 600    # stop at step 600 keeping the 1500-step schedule
  layerlock-train --resume runs/a                  # ... and continue it exactly, in runs/a
  layerlock-train --resume runs/a --out runs/b     # continue a copy in runs/b; runs/a is not touched
  layerlock-train --resume runs/demo --extend 3000 # train a finished run longer (prints the new LR curve)
  layerlock-train --config vit_g --dry-run --world-size 256 --set train.strategy=fsdp   # size, FLOPs, memory
  torchrun --standalone --nproc_per_node=2 -m layerlock_plugin.reference.cli --set train.strategy=ddp  # or fsdp
  torchrun --standalone --nproc_per_node=2 -m layerlock_plugin.reference.cli --resume runs/ddp   # continue it
packaged configs: tiny (default), vit_b, vit_l, vit_g, vit_4ds_e
methods: layerlock | mae | freeze-only | latent-naive (the collapse control)"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line (argparse would print the usage block first)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = _Parser(prog=PROG, description="Pretrain a video ViT MAE with LayerLock (reference trainer).",
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config file, or the name of a packaged one (default: tiny)")
    p.add_argument("--method", help="layerlock | mae | freeze-only | latent-naive")
    p.add_argument("--steps", type=int, help="total training steps (train.steps)")
    p.add_argument("--out", help="run folder (out_dir); default for a new run: a fresh runs/<method>-<time>")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in --out even if it holds a run: the old run's files are removed first")
    p.add_argument("--seed", type=int)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.lr=1e-3 (repeatable)")
    p.add_argument("--resume", metavar="RUN_DIR_OR_CHECKPOINT",
                   help="continue a run from its checkpoint, in its own folder (its config is used unless "
                        "--config is given); with --out NEW, continue a copy in NEW and leave the run untouched. "
                        "'auto' (with --out DIR; for requeued cluster jobs): continue DIR's newest complete "
                        "checkpoint if it has one, else start DIR fresh; the command line's config must match")
    p.add_argument("--stop-after", type=int, metavar="N",
                   help="stop after step N with a checkpoint, keeping the LR / freeze schedule of train.steps")
    p.add_argument("--extend", type=int, metavar="N",
                   help="with --resume: train the run to N steps (more than its budget); the LR schedule is "
                        "recomputed for N steps and the change is printed")
    probe = p.add_mutually_exclusive_group()
    probe.add_argument("--no-probe", action="store_true", help="skip the frozen-feature probes at the end")
    probe.add_argument("--probe", action="store_true",
                       help="run the probes at the end (turns them back on for a run started with --no-probe)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in CI logs)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--dry-run", action="store_true",
                   help="build the model on the meta device and print its size, the freeze timeline and per-phase "
                        "FLOPs / memory estimates, without allocating or training")
    p.add_argument("--world-size", type=int, default=1,
                   help="processes to assume for the --dry-run memory estimate (default 1)")
    return p.parse_args(argv)


def _check_flags(args: argparse.Namespace) -> None:
    if args.extend is not None:
        if not args.resume:
            raise ConfigError("--extend", "continues a run: use it with --resume RUN")
        if args.steps is not None:
            raise ConfigError("--extend", "already sets train.steps; drop --steps")
    if args.world_size < 1:
        raise ConfigError("--world-size", f"must be a positive integer, got {args.world_size}")
    if args.world_size != 1 and not args.dry_run:
        raise ConfigError("--world-size", "sizes a --dry-run only; a real run takes its world size from torchrun")
    if args.stop_after is not None and args.stop_after < 1:
        raise ConfigError("--stop-after", f"must be a positive step number, got {args.stop_after}")


def _named_out_dir(args: argparse.Namespace) -> str | None:
    named = [o.split("=", 1)[1].strip() for o in args.overrides if o.split("=", 1)[0].strip() == "out_dir" and "=" in o]
    return args.out if args.out is not None else (named[-1] if named else None)


def _names_out_dir(args: argparse.Namespace) -> bool:
    return _named_out_dir(args) is not None


def _rank0_print(*a, **kw) -> None:
    """``print`` on rank 0 of a torchrun job (and in a plain process): every rank runs the CLI."""
    if os.environ.get("RANK", "0") == "0":
        print(*a, **kw)


def resolve_auto_resume(args: argparse.Namespace, echo=_rank0_print) -> str | None:
    """``--resume auto``: resume ``--out DIR`` from its newest complete checkpoint, or start it fresh when it
    has none (a run stopped before its first checkpoint is replaced; files that are not a run's are still
    refused). The config is the command line's (a requeued job repeats its command), checked against the
    checkpoint's. Rewrites ``args`` accordingly; returns ``"resume"``, ``"fresh"`` or None (not auto)."""
    if args.resume != "auto":
        return None
    out = _named_out_dir(args)
    if out is None:
        raise ConfigError("--resume", "auto needs the run folder it continues: add --out DIR")
    folder = RunFolder(Path(out))
    if folder.has_checkpoint():
        args.resume, args.config = out, args.config or "tiny"
        return "resume"
    args.resume = None
    if folder.holds_run():
        args.overwrite = True
        echo(f"{PROG}: --resume auto: {out} holds no complete checkpoint (the run stopped before its first one); "
             "starting it again from step 0")
    else:
        echo(f"{PROG}: --resume auto: no checkpoint in {out}; starting a new run there")
    return "fresh"


def resolve_config(args: argparse.Namespace):
    """The run's config: a file (or the checkpoint's config when resuming), ``--set`` overrides, the
    shortcut flags; ``out_dir`` is the resumed run's folder or, for a new run, a fresh default."""
    resume_dir = None
    if args.resume:
        from .train.checkpointing import config_from_checkpoint

        checkpoint, resume_dir = resume_source(args.resume)
        if resume_dir is None and not _names_out_dir(args):
            raise ConfigError("--out", f"--resume {args.resume} is a checkpoint outside a run folder; name the folder "
                                       "the resumed run writes into with --out NEW")
        raw = load_yaml(args.config) if args.config else config_from_checkpoint(checkpoint)
    else:
        raw = load_yaml(args.config or "tiny")
    overrides = list(args.overrides)
    for flag, key in (("method", "method"), ("steps", "train.steps"), ("extend", "train.steps"), ("out", "out_dir"),
                      ("seed", "seed")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.no_probe or args.probe:
        overrides.append(f"probe.enabled={str(args.probe).lower()}")
    if args.no_progress:
        overrides.append("train.progress=false")
    if args.resume and not _names_out_dir(args):
        overrides.append(f"out_dir={resume_dir}")  # the run continues where it lies, wherever it was first
    raw = apply_overrides(raw, overrides)
    if getattr(args, "dry_run", False) and (raw.get("data") or {}).get("source") in ("folder", "shards"):
        # The cost does not depend on the data: size the run without needing its video folder.
        raw["data"] = {"source": "digits", "num_videos": 1}
    config = build_config(raw)
    if config.out_dir is None and not (args.print_config or args.dry_run):
        import dataclasses

        config = dataclasses.replace(config, out_dir=str(default_run_dir(config.method)))
    return config


class _PackageWarnings:
    """The package's own warnings (e.g. a schedule longer than the run) as one line each, not a Python
    warning with a file path; other packages' warnings are left as they are. Until :meth:`release`, they
    are held back: a command refused for bad input prints its one error line and nothing else."""

    def __init__(self) -> None:
        self.package = str(Path(__file__).resolve().parents[1])
        self.held: list[str] | None = []
        self.quiet = False  # ranks other than 0 say nothing

    def show(self, message, category, filename, lineno, file=None, line=None):  # noqa: ANN001 (warnings' signature)
        if not str(Path(filename).resolve()).startswith(self.package):
            return self.default(message, category, filename, lineno, file, line)
        text = f"{PROG}: warning: {message}"
        if self.quiet:
            return None
        if self.held is not None:
            self.held.append(text)
        else:
            print(text, file=sys.stderr)

    def release(self, show: bool = True) -> None:
        """Print what was held back (``show=False``: drop it, e.g. on ranks other than 0) and print later
        warnings at once (or never, without ``show``)."""
        for text in (self.held or []) if show else []:
            print(text, file=sys.stderr)
        self.held, self.quiet = None, not show

    @contextmanager
    def installed(self) -> Iterator[_PackageWarnings]:
        self.default = warnings.showwarning
        warnings.showwarning = self.show
        try:
            yield self
        finally:
            warnings.showwarning = self.default


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with _PackageWarnings().installed() as package_warnings:
        try:
            return _run(args, package_warnings)
        except LayerLockError as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 2
        except OSError as e:  # a folder that cannot be created, a full disk, ...
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 2


def continue_command(out_dir: str | Path, world_size: int = 1, local_world_size: int | None = None) -> str:
    """The command that continues a stopped run in ``out_dir``: the same launcher it ran under (one
    process: the console script; a torchrun job on one node: torchrun with as many processes)."""
    folder = shlex.quote(str(out_dir))
    if world_size <= 1:
        return f"{PROG} --resume {folder}"
    local = local_world_size or world_size
    if world_size > local:  # several nodes: the launch line holds the rendezvous, which only the user knows
        return (f"the job's torchrun command on each of its {world_size // local} nodes with --resume {folder} "
                f"(the module form: torchrun ... -m {MODULE} --resume {folder})")
    return f"torchrun --standalone --nproc_per_node={world_size} -m {MODULE} --resume {folder}"


def _in_process_group() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def check_resume(args: argparse.Namespace, config, auto: bool = False) -> bool:
    """Everything that can refuse a resume, from the checkpoint's step and config alone, before the trainer,
    the model or the data exist (a refusal takes the seconds of reading a checkpoint): the run folder rules,
    a folder whose config.yaml and checkpoint belong to different runs (checked first: it is the real
    problem when anything else differs too), another config, a ddp / fsdp run outside torchrun, the budget
    and ``--stop-after``. Returns True when ``--resume auto`` finds the run finished (nothing to do)."""
    from .train import budget
    from .train.checkpointing import check_folder_holds_one_run
    from .train.run_folder import plan_folder

    plan_folder(Path(config.out_dir), args.resume, args.overwrite)
    checkpoint, run_dir = resume_source(args.resume)
    step, saved, world_size = checkpoint_progress(checkpoint)
    if run_dir is not None:
        check_folder_holds_one_run(run_dir, saved, checkpoint)
    check_same_config(saved, config.to_dict(), checkpoint)  # also for a finished run
    if auto and step >= config.train.steps and saved["train"]["steps"] == config.train.steps:
        _rank0_print(f"{PROG}: --resume auto: {config.out_dir} finished at step {step}; nothing to do")
        return True
    if config.train.strategy in ("ddp", "fsdp") and "WORLD_SIZE" not in os.environ and not _in_process_group():
        raise ConfigError("--resume", f"{args.resume} is a {config.train.strategy} run of {world_size} processes: "
                                      f"continue it under torchrun, e.g. `{continue_command(args.resume, world_size)}`")
    budget.check_resume_budget(config.train.steps, step, int(saved["train"]["steps"]), args.extend is not None,
                               config.optim)
    budget.check_stop_after(args.stop_after, step, config.train.steps)
    return False


def _run(args: argparse.Namespace, package_warnings: _PackageWarnings) -> int:
    auto = resolve_auto_resume(args)
    _check_flags(args)
    config = resolve_config(args)
    if args.resume and (auto == "resume" or not (args.print_config or args.dry_run)):
        if check_resume(args, config, auto == "resume"):
            return 0
    if args.print_config:
        dump_config(config, "/dev/stdout")
        return 0
    if args.dry_run:
        from .dryrun import dry_run

        dry_run(config, world_size=args.world_size)
        package_warnings.release()
        return 0
    from .parallel.distributed import teardown
    from .train.trainer import Trainer
    from .parallel.xla import device_kind as xla_kind

    started = time.perf_counter()
    trainer = None
    stop = StopRequest()
    try:
        stop.__enter__()  # from here a SIGTERM / SIGUSR1 / Ctrl-C stops at the first step boundary
        trainer = Trainer(config, resume=args.resume, overwrite=args.overwrite, extend=args.extend is not None,
                          stop=stop)
        trainer.check_stop_after(args.stop_after)
        package_warnings.release(show=trainer.env.is_main)  # the run is valid: worth saying, once
        env = trainer.env
        trainer.echo(f"{PROG}: method={config.method} model="
                     f"{sum(p.numel() for p in trainer.model.parameters()) / 1e6:.2f}M "
                     f"params, {config.train.steps} steps x {config.train.batch_size} clips, run folder {config.out_dir}"
                     + (f", {env.world_size} processes ({config.train.strategy}, {env.backend})" if env.distributed else "")
                     + (f", on {env.device} ({xla_kind()}{', spmd' if env.mesh is not None else ''})"
                        if env.device.type == "xla" else "")
                     + (f", resuming at step {trainer.step}" if args.resume else ""))
        if args.resume and not config.probe_enabled:
            trainer.echo("note: probes are off in this run's config (probe.enabled: false, e.g. from --no-probe); "
                         "add --probe to run them at the end")
        summary = trainer.fit(stop_after=args.stop_after)
    finally:
        stop.__exit__()
        if trainer is not None:
            teardown(trainer.env)
    code = trainer.stop.exit_code if summary.get("interrupted") else 0
    if not trainer.env.is_main:
        return code
    if "stopped_at" in summary:
        why = f"by {trainer.stop.signal_name}" if summary["interrupted"] else "as asked (--stop-after)"
        local = int(os.environ.get("LOCAL_WORLD_SIZE", trainer.env.world_size))
        print(f"stopped after step {summary['stopped_at']} {why}; checkpoint written. Continue with: "
              f"{continue_command(config.out_dir, trainer.env.world_size if trainer.env.distributed else 1, local)}")
        return code
    wall = time.perf_counter() - started
    print(f"done in {wall:.0f} s (training {summary['train_seconds']:.0f} s). Run folder: {config.out_dir}")
    if "probes" in summary:
        from .eval import probe_report

        print(probe_report(summary["probes"], config.probe.kind))
    return 0


if __name__ == "__main__":
    sys.exit(main())
