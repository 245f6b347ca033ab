"""Small-scale reproduction of the paper's comparison: same model, data and step budget, several seeds.

Every run is the reference trainer (``layerlock_plugin.reference.train.Trainer``) on the packaged tiny
config (6-block video ViT, 4 encoder + 2 decoder blocks, embedded moving-digits videos) with only the
method, the seed, the step budget and explicit ``--set`` overrides changed; probes on (attentive motion /
appearance probes, ridge depth probe on frozen encoder tokens). The evaluation is the trainer's own and
is the same for every method.

Variants (``--methods``): ``mae``, ``freeze-only``, ``layerlock``, ``latent-naive`` (the paper's
comparison; naive latent prediction must collapse), the ablations ``layerlock-no-warmup``
(``warmup.steps=0``) and ``layerlock-multi`` (``target.mode=multi``), and the cost knobs ``mae-q25``,
``layerlock-q25`` (queries and loss on 25% of the masked positions) and ``layerlock-q25-sparse`` (the same
with the target pass on the queried + visible tokens only, ``target.context=sparse``).

The freezing schedule keeps the tiny config's shape for any ``--steps``: pixels for 40% of the run, then
one more block frozen every 2/15 of the run until 3 of the 4 encoder blocks are frozen (at 1500 steps:
events at 600, 800, 1000, exactly the packaged config). ``--config FILE --schedule config`` runs another
config (e.g. ``configs/evidence.yaml``) with its own schedule and step budget as they are.

    python benchmarks/reproduction.py --quick                 # minutes: tiny budget, 1 seed, CI smoke
    python benchmarks/reproduction.py                         # full: 4 methods x 3 seeds x 1500 steps
    python benchmarks/reproduction.py --methods layerlock layerlock-no-warmup layerlock-multi --tag ablations

Writes ``benchmarks/results/reproduction[-TAG].json`` (every run, aggregated mean and std, provenance),
``.md`` (the table) and ``collapse[-TAG].png`` (collapse statistics of the latent target over time).
Run folders go to ``runs/bench/reproduction[-TAG]/<variant>-s<seed>``; a run whose folder already holds a
``summary.json`` for the same config is read back rather than retrained (delete the folder to redo it).

``--merge-from results/reproduction-TAG.json`` adds the runs of an earlier results file to the table (for a
method run later in the same protocol: the file's steps and ``--set`` overrides must equal this call's, its
variants must not be among ``--methods``); the merged file's provenance is kept in the output.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    RESULTS, aggregate_seeds, count_plan_flops, figure, paired_markdown, paired_table, provenance, run_flops,
    save_figure, seeds_markdown, write_json)

from layerlock_plugin.collapse import feature_stats  # noqa: E402
from layerlock_plugin.reference.config import load_config  # noqa: E402
from layerlock_plugin.reference.data import DigitsVideoDataset  # noqa: E402
from layerlock_plugin.reference.train.run_folder import read_jsonl  # noqa: E402
from layerlock_plugin.reference.train import Trainer  # noqa: E402

#: variant name -> (trainer method, extra overrides)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "mae": ("mae", []),
    "freeze-only": ("freeze-only", []),
    "layerlock": ("layerlock", []),
    "latent-naive": ("latent-naive", []),
    "layerlock-no-warmup": ("layerlock", ["warmup.steps=0"]),
    "layerlock-multi": ("layerlock", ["target.mode=multi"]),
    # the latent target's cost knobs: queries on 25% of the masked positions, target pass over all tokens
    # or over the queried + visible ones only (and MAE with the same queries, for the comparison)
    "mae-q25": ("mae", ["target.loss_fraction=0.25"]),
    "layerlock-q25": ("layerlock", ["target.loss_fraction=0.25"]),
    "layerlock-q25-sparse": ("layerlock", ["target.loss_fraction=0.25", "target.context=sparse"]),
    # the paper's "5% patches": queries and loss on 5% of the masked positions (every phase), with the
    # target pass over all tokens or over the queried + visible ones only (sparse context)
    "layerlock-5pct": ("layerlock", ["target.loss_fraction=0.05"]),
    "layerlock-5pct-sparse": ("layerlock", ["target.loss_fraction=0.05", "target.context=sparse"]),
    # position: 3D RoPE inside attention (q and k per head) or none (a fixed 3D sin-cos embedding instead)
    "mae-rope-attention": ("mae", ["model.rope=attention"]),
    "mae-rope-none": ("mae", ["model.rope=none", "model.pos_embed=sincos"]),
    "layerlock-rope-attention": ("layerlock", ["model.rope=attention"]),
    "layerlock-rope-none": ("layerlock", ["model.rope=none", "model.pos_embed=sincos"]),
}
PAPER_METHODS = ["mae", "freeze-only", "layerlock", "latent-naive"]
# Columns of the table: (key in probes.json, header, higher is better)
METRICS = [("motion_acc", "motion acc", True), ("appearance_acc", "appearance acc", True),
           ("turn_acc", "turn acc", True), ("dense_r2", "depth R²", True),
           ("dense_attentive_r2", "depth R² (attentive)", True), ("dense_rmse", "depth RMSE", False)]
STATS = [("final_loss", "final loss"), ("encoder_feature_std", "enc. feature std"),
         ("encoder_effective_rank", "enc. eff. rank")]

QUICK_SETS = ["data.num_videos=64", "train.batch_size=8", "probe.train_videos=48", "probe.test_videos=48",
              "probe.steps=20", "probe.weight_decay=1.0", "probe.l2=0.01", "train.log_every=2", "guard.every=2",
              "probe.dense_steps=10"]


def schedule_sets(steps: int) -> list[str]:
    """The packaged schedule's shape (pixels 40%, a freeze every 2/15 of the run, 3 blocks) at ``steps``."""
    pixel, interval = round(0.4 * steps), max(1, round(steps * 2 / 15))
    warm = max(1, round(40 * steps / 1500))
    return [f"schedule.pixel_steps={pixel}", f"schedule.interval={interval}", "schedule.max_frozen=3",
            f"warmup.steps={warm}", f"optim.warmup_steps={max(1, round(100 * steps / 1500))}"]


def run_overrides(variant: str, seed: int, steps: int, out: Path, extra: list[str], threads: int,
                  schedule: str = "shape") -> list[str]:
    method, variant_sets = VARIANTS[variant]
    shape = schedule_sets(steps) if schedule == "shape" else []
    # variant-specific overrides come after the schedule-derived ones, so e.g. warmup.steps=0 wins
    return [f"out_dir={out}", f"method={method}", f"seed={seed}", f"train.steps={steps}", "train.progress=false",
            f"train.threads={threads}", f"train.ckpt_every={steps}", *shape, *extra, *variant_sets]


@torch.no_grad()
def encoder_stats(trainer: Trainer, num_videos: int = 64) -> dict[str, float]:
    """Feature std / effective rank of the final encoder tokens on test clips (same measure for every
    method: how collapsed the representation the probes read is)."""
    ds = DigitsVideoDataset(trainer.config.data, "test")
    video = torch.stack([ds[i]["video"] for i in range(min(num_videos, len(ds)))])
    trainer.model.eval()
    tokens = trainer.model.encode(video.to(trainer.device))
    s = feature_stats(tokens, sample_tokens=1024)
    return {"encoder_feature_std": s["feature_std"], "encoder_effective_rank": s["effective_rank"]}


def finished_row(job: dict[str, Any]) -> dict[str, Any] | None:
    """The saved row of a finished run with exactly this job's config, else None."""
    done = Path(job["out"]) / "row.json"
    if not done.is_file():
        return None
    row = json.loads(done.read_text())
    return row if row.get("config") == load_config(job.get("config_file"), job["overrides"]).to_dict() else None


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Train (or read back) one run; returns its row."""
    out = Path(job["out"])
    config = load_config(job.get("config_file"), job["overrides"])
    done = out / "row.json"
    row = finished_row(job)
    if row is not None:
        return row
    started = time.perf_counter()
    trainer = Trainer(config, overwrite=True, echo=lambda s: None)  # an unfinished earlier try restarts
    flops_by_plan = count_plan_flops(trainer)
    summary = trainer.fit()
    rows = read_jsonl(out / "metrics.jsonl")
    trips = [(r["step"], r["layerlock/guard_trips"]) for r in rows if r.get("layerlock/guard_trips", 0) > 0]
    tail = [r["loss"] for r in rows[-max(1, len(rows) // 10):]]
    row = {
        "variant": job["variant"], "seed": job["seed"], "steps": config.train.steps,
        "probes": summary.get("probes", {}), "final_loss": sum(tail) / len(tail),
        **encoder_stats(trainer), "events": [(e["step"], e["num_frozen"]) for e in summary["events"]],
        "wall_s": round(time.perf_counter() - started, 1), "train_s": summary["train_seconds"],
        "train_flops": run_flops(trainer, config.train.steps, flops_by_plan), "flops_by_num_frozen": flops_by_plan,
        "guard_trips": trips[-1][1] if trips else 0.0, "first_trip_logged_at": trips[0][0] if trips else None,
        "collapse_over_time": [{k: r[k] for k in ("step", "layerlock/feature_std", "layerlock/effective_rank",
                                                  "loss") if k in r} for r in rows],
        "config": config.to_dict(),
    }
    done.write_text(json.dumps(row))
    print(f"  {job['variant']:>20} seed {job['seed']}: {row['wall_s']:.0f} s, loss {row['final_loss']:.4f}, "
          + ", ".join(f"{k} {row['probes'][k]:.3f}" for k, _, _ in METRICS if k in row["probes"]), flush=True)
    return row


def metrics_of(rows: list[dict[str, Any]]) -> list[tuple[str, str, bool]]:
    """The :data:`METRICS` every run's probes carry (the turn label and the attentive depth readout only
    exist on the evidence suite)."""
    return [m for m in METRICS if all(m[0] in r["probes"] for r in rows)]


def aggregate(rows: list[dict[str, Any]], variants: list[str], reference: str) -> dict[str, dict[str, Any]]:
    """Mean ± std per variant, then ``random init``: the probes of the reference variant's initial
    encoders (same seeds, before training)."""
    metrics = [k for k, _, _ in metrics_of(rows)]
    table = aggregate_seeds(rows, variants, "variant", metrics,
                            [k for k, _ in STATS] + ["train_flops", "train_s", "guard_trips"])
    base = [{"variant": "random init", "seed": r["seed"], "probes": r["probes"]["random_init"]}
            for r in rows if r["variant"] == reference and "random_init" in r["probes"]]
    table.update(aggregate_seeds(base, ["random init"], "variant", metrics, []))
    return table


def markdown(table: dict[str, dict[str, Any]], diffs: dict[str, dict[str, Any]], reference: str, steps: int,
             meta: dict[str, Any], metrics: list[tuple[str, str, bool]] = METRICS) -> str:
    cols = [(k, h) for k, h, _ in metrics] + STATS + [("guard_trips", "guard trips")]
    md = seeds_markdown(table, cols, steps, meta, note="random init: the reference variant's encoders before training.")
    return md + paired_markdown(diffs, reference, [(k, h) for k, h, _ in metrics if k != "dense_rmse"])


def plot_collapse(rows: list[dict[str, Any]], path: Path) -> Path:
    """Latent-target feature std and effective rank over training for every latent variant and seed."""
    fig = figure(11, 4)
    axes = fig.subplots(1, 2)
    # a colour per variant, in the order of VARIANTS (fixed across studies, distinct within one)
    colours = {name: f"C{i}" for i, name in enumerate(VARIANTS)}
    for ax, key, label in zip(axes, ("layerlock/feature_std", "layerlock/effective_rank"),
                              ("target feature std (scale-free)", "target effective rank / dim")):
        seen = set()
        for r in rows:
            pts = [(p["step"], p[key]) for p in r["collapse_over_time"] if key in p]
            if not pts:
                continue
            xs, ys = zip(*pts)
            name = r["variant"]
            ax.plot(xs, ys, color=colours[name], alpha=0.8, lw=1.2,
                    label=None if name in seen else name)
            seen.add(name)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        if seen:
            ax.legend()
    fig.suptitle("Collapse statistics of the latent target (one line per seed)")
    return save_figure(fig, path)


def merged_rows(path: Path, steps: int, extra: list[str], methods: list[str],
                config_file: str | None = None) -> tuple[list[dict], dict]:
    """The runs of an earlier results file of this study and its provenance, refused (ValueError naming the
    field) unless it was run with the same steps and extra overrides and none of its variants is re-run."""
    earlier = json.loads(path.read_text())
    if earlier.get("study") != "reproduction":
        raise ValueError(f"--merge-from: {path} is not a reproduction results file")
    for field, mine in (("steps", steps), ("extra_overrides", extra), ("config_file", config_file)):
        if earlier.get(field) != mine:
            raise ValueError(f"--merge-from: {path} has {field}={earlier.get(field)!r}, this call {mine!r}; "
                             "only runs of the same protocol can share a table")
    clash = sorted(set(earlier["methods"]) & set(methods))
    if clash:
        raise ValueError(f"--merge-from: {path} already holds {', '.join(clash)}; leave them out of --methods")
    info = {"path": str(path), "methods": earlier["methods"], "seeds": earlier["seeds"],
            "provenance": earlier["provenance"]}
    return earlier["runs"], {**info, "config_of_first_run": earlier["config_of_first_run"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny budget (24 steps, 64 clips, 1 seed): a smoke run")
    p.add_argument("--methods", nargs="+", default=None, choices=sorted(VARIANTS), metavar="VARIANT")
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument("--steps", type=int, default=None,
                   help="training steps per run (default 1500, or the config's with --schedule config; quick 24)")
    p.add_argument("--config", default=None, help="trainer config (default: the packaged tiny one)")
    p.add_argument("--schedule", choices=("shape", "config"), default="shape",
                   help="'shape': the packaged schedule's shape scaled to --steps; 'config': the config's own")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="extra trainer override applied to every run (same for all methods)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (each with --threads threads)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--tag", default="", help="suffix for result files and run folders")
    p.add_argument("--runs-dir", default="runs/bench", help="parent folder of the run folders")
    p.add_argument("--results-dir", default=str(RESULTS))
    p.add_argument("--reference", default=None,
                   help="variant the others are compared with per seed (default: the first of --methods)")
    p.add_argument("--collect-only", action="store_true",
                   help="train nothing: tabulate the runs whose folders already hold a finished row.json")
    p.add_argument("--merge-from", type=Path, default=None, metavar="RESULTS_JSON",
                   help="add the runs of an earlier results file of the same protocol (steps and --set equal)")
    args = p.parse_args(argv)

    methods = args.methods or PAPER_METHODS
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    if args.schedule == "config" and not args.steps and not args.quick:
        steps = load_config(args.config, []).train.steps
    else:
        steps = args.steps or (24 if args.quick else 1500)
    extra = (QUICK_SETS if args.quick else []) + args.sets
    tag = args.tag or ("quick" if args.quick else "")
    suffix = f"-{tag}" if tag else ""
    runs = Path(args.runs_dir) / f"reproduction{suffix}"
    jobs = [{"variant": v, "seed": s, "out": str(runs / f"{v}-s{s}"), "config_file": args.config,
             "overrides": run_overrides(v, s, steps, runs / f"{v}-s{s}", extra, args.threads, args.schedule)}
            for s in seeds for v in methods]
    meta = provenance()
    earlier_rows, merged = [], None
    if args.merge_from is not None:
        try:
            earlier_rows, merged = merged_rows(args.merge_from, steps, extra, methods, args.config)
        except (OSError, ValueError, KeyError) as e:
            print(e if isinstance(e, ValueError) else f"--merge-from: cannot read {args.merge_from}: {e}",
                  file=sys.stderr)
            return 2
    print(f"reproduction: {len(jobs)} runs ({', '.join(methods)} x seeds {seeds}), {steps} steps each, "
          f"{args.jobs} at a time", flush=True)
    if args.collect_only:
        rows = [r for r in (finished_row(j) for j in jobs) if r is not None]
        missing = [f"{j['variant']}-s{j['seed']}" for j in jobs if finished_row(j) is None]
        if missing:
            print(f"not finished (left out of the table): {', '.join(missing)}")
        if not rows:
            print("no finished runs to collect", file=sys.stderr)
            return 1
    elif args.jobs > 1:
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            rows = pool.map(run_one, jobs, chunksize=1)
    else:
        rows = [run_one(j) for j in jobs]
    config_of_first_run = rows[0]["config"]
    if merged is not None:
        methods = merged["methods"] + methods
        rows = earlier_rows + rows
        print(f"merged {len(earlier_rows)} runs ({', '.join(merged['methods'])}) from {args.merge_from}")
    reference = args.reference or methods[0]
    table = aggregate(rows, methods, reference)
    metrics = metrics_of(rows)
    diffs = paired_table(rows, methods, reference, "variant", [k for k, _, _ in metrics])
    results = Path(args.results_dir)
    payload = {"study": "reproduction", "provenance": meta, "steps": steps, "methods": methods, "seeds": seeds,
               "extra_overrides": extra, "config_file": args.config, "schedule": args.schedule,
               "reference": reference, "table": table, "differences": diffs,
               "runs": [{k: v for k, v in r.items() if k != "config"} for r in rows],
               "config_of_first_run": config_of_first_run}
    if merged is not None:
        payload["merged_from"] = merged
    write_json(results / f"reproduction{suffix}.json", payload)
    md = markdown(table, diffs, reference, steps, meta, metrics)
    if merged is not None:
        prov = merged["provenance"]
        md += (f"\nRuns of {', '.join(merged['methods'])} merged from {merged['path']} "
               f"({prov.get('date_utc')}, `{prov.get('command')}`, {prov.get('layerlock_plugin')}).\n")
    (results / f"reproduction{suffix}.md").write_text(md)
    plot_collapse(rows, results / f"collapse{suffix}.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
