"""``layerlock-train``: the reference trainer's command line."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from ..errors import ConfigError, LayerLockError
from .config import apply_overrides, build_config, dump_config, load_yaml

EPILOG = """examples:
  layerlock-train                                  # main job: tiny LayerLock run on the embedded digits videos
  layerlock-train --method mae --out runs/mae      # the pixel-MAE baseline, same budget
  layerlock-train --set schedule.interval=100 --set target.mode=multi
  layerlock-train --resume runs/demo --set train.steps=3000
  layerlock-train --config vit_g --dry-run --world-size 256   # size, freeze timeline, FLOPs, memory; no allocation
  torchrun --standalone --nproc_per_node=2 -m layerlock_plugin.reference.cli --set train.strategy=ddp  # or fsdp
packaged configs: tiny (default), vit_b, vit_l, vit_g, vit_4ds_e
methods: layerlock | mae | freeze-only | latent-naive (the collapse control)"""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="layerlock-train", description="Pretrain a video ViT MAE with LayerLock (reference trainer).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML config file, or the name of a packaged one (default: tiny)")
    p.add_argument("--method", help="layerlock | mae | freeze-only | latent-naive")
    p.add_argument("--steps", type=int, help="total training steps (train.steps)")
    p.add_argument("--out", help="run folder (out_dir)")
    p.add_argument("--seed", type=int)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.lr=1e-3 (repeatable)")
    p.add_argument("--resume", metavar="RUN_DIR_OR_CHECKPOINT",
                   help="continue a run from its checkpoint (its config is used unless --config is given)")
    p.add_argument("--no-probe", action="store_true", help="skip the frozen-feature probes at the end")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in CI logs)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--dry-run", action="store_true",
                   help="build the model on the meta device and print its size, the freeze timeline and per-phase "
                        "FLOPs / memory estimates, without allocating or training")
    p.add_argument("--world-size", type=int, default=1,
                   help="processes to assume for the --dry-run memory estimate (default 1)")
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace):
    if args.resume and not args.config:
        from .trainer import config_from_checkpoint

        raw = config_from_checkpoint(args.resume)
    else:
        raw = load_yaml(args.config or "tiny")
    overrides = list(args.overrides)
    for flag, key in (("method", "method"), ("steps", "train.steps"), ("out", "out_dir"), ("seed", "seed")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.no_probe:
        overrides.append("probe.enabled=false")
    if args.no_progress:
        overrides.append("train.progress=false")
    raw = apply_overrides(raw, overrides)
    if getattr(args, "dry_run", False) and (raw.get("data") or {}).get("source") == "folder":
        # The cost does not depend on the data: size the run without needing its video folder.
        raw["data"] = {"source": "digits", "num_videos": 1}
    return build_config(raw)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    trainer = None
    try:
        config = resolve_config(args)
        if args.print_config:
            dump_config(config, "/dev/stdout")
            return 0
        if args.dry_run:
            from .dryrun import dry_run

            if args.world_size < 1:
                raise ConfigError("--world-size", f"must be a positive integer, got {args.world_size}")
            dry_run(config, world_size=args.world_size)
            return 0
        from .trainer import Trainer

        started = time.perf_counter()
        trainer = Trainer(config, resume=args.resume)
        trainer.echo(f"layerlock-train: method={config.method} model="
                     f"{sum(p.numel() for p in trainer.model.parameters()) / 1e6:.2f}M "
                     f"params, {config.train.steps} steps x {config.train.batch_size} clips, run folder {config.out_dir}"
                     + (f", {trainer.env.world_size} processes ({config.train.strategy}, {trainer.env.backend})"
                        if trainer.env.distributed else "")
                     + (f", resuming at step {trainer.step}" if args.resume else ""))
        summary = trainer.fit()
    except LayerLockError as e:
        print(f"layerlock-train: error: {e}", file=sys.stderr)
        return 2
    finally:
        if trainer is not None:
            from .distributed import teardown

            teardown(trainer.env)
    if trainer.env.is_main:
        wall = time.perf_counter() - started
        print(f"done in {wall:.0f} s (training {summary['train_seconds']:.0f} s). Run folder: {config.out_dir}")
        if "probes" in summary:
            from .probes import probe_report

            print(probe_report(summary["probes"], config.probe.kind))
    return 0


if __name__ == "__main__":
    sys.exit(main())
