"""Adaptive vs explicit freezing schedules at equal step budgets (issue 8's evidence).

Every run is the reference trainer on the packaged tiny config (6-block video ViT, 4 encoder + 2 decoder
blocks, embedded moving-digits videos), method ``layerlock``, with only the schedule, the seed and the
step budget changed. Schedules (3 of the 4 encoder blocks frozen in every one):

* ``explicit``: the packaged config's shape (pixels for 40% of the run, then a block every 2/15 of it);
  at 1500 steps: events at 600, 800, 1000 — the "paper-style" schedule a user would hand-tune;
* ``too-early``: pixels for 10% of the run, then a block every 1/30 of it;
* ``too-late``: pixels for 70% of the run, then a block every 1/10 of it;
* ``adaptive``: ``schedule.kind=adaptive``, default signals and thresholds (``signal=both``,
  ``update_threshold=0.5``, ``norm_tolerance=0.01``, ``window=5``); only the step guards follow the
  budget by a fixed rule, as the warmups do: ``observe_every`` = 1% of the run, ``min_pixel_steps`` and
  ``min_interval`` = the too-early schedule's pace (10% and 1/30 of the run), no upper limits. Nothing
  in it was tuned on these runs.

Reported per schedule (mean ± std over seeds): the trainer's own probes (attentive motion / appearance
probes, ridge depth probe on frozen encoder tokens), the final training loss, the decided/explicit event
steps, and the training FLOPs: each distinct plan's step is measured once under
``torch.utils.flop_counter.FlopCounterMode`` during the run and multiplied by the steps it lasted.

    python benchmarks/adaptive_schedule.py --quick      # tiny budget (128 videos, batch 8, 150 steps), 3 seeds
    python benchmarks/adaptive_schedule.py --quick --steps 300 --tag 300   # the same data, twice the steps
    python benchmarks/adaptive_schedule.py --steps 1500 --seeds 0 1 2

Writes ``benchmarks/results/adaptive[-TAG].json`` (every run, aggregates, provenance), ``adaptive[-TAG].md``
(the table) and ``adaptive_signals[-TAG].png`` (the first seed's per-block signals and decided events next to
``explicit``). Run folders: ``runs/bench/adaptive[-TAG]/<schedule>-s<seed>``; a finished run with the same
config is read back, not retrained.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, count_plan_flops, mean_std, provenance, run_flops, write_json  # noqa: E402

from layerlock_plugin.reference.config import load_config  # noqa: E402
from layerlock_plugin.reference.plots import plot_adaptive_signals  # noqa: E402
from layerlock_plugin.reference.train.run_folder import read_jsonl  # noqa: E402
from layerlock_plugin.reference.train import Trainer  # noqa: E402

SCHEDULES = ["explicit", "too-early", "too-late", "adaptive"]
METRICS = [("motion_acc", "motion acc", True), ("appearance_acc", "appearance acc", True),
           ("dense_r2", "depth R²", True)]
QUICK_SETS = ["data.num_videos=128", "train.batch_size=8", "probe.train_videos=96", "probe.test_videos=96",
              "probe.steps=40", "train.log_every=2", "guard.every=2"]


def schedule_sets(name: str, steps: int) -> list[str]:
    """``--set`` overrides of one schedule at a budget of ``steps`` (warmups scale with the budget)."""
    common = ["schedule.max_frozen=3", f"warmup.steps={max(1, round(40 * steps / 1500))}",
              f"optim.warmup_steps={max(1, round(100 * steps / 1500))}"]
    if name == "adaptive":
        every = max(1, round(steps / 100))
        return ["schedule.kind=adaptive", f"schedule.adaptive.observe_every={every}",
                f"schedule.adaptive.min_pixel_steps={round(0.1 * steps)}",
                f"schedule.adaptive.min_interval={max(every, round(steps / 30))}", *common]
    pixel, interval = {"explicit": (0.4, 2 / 15), "too-early": (0.1, 1 / 30), "too-late": (0.7, 0.1)}[name]
    return [f"schedule.pixel_steps={round(pixel * steps)}", f"schedule.interval={max(1, round(interval * steps))}",
            *common]


def run_one(name: str, seed: int, steps: int, out: Path, extra: list[str], threads: int) -> dict[str, Any]:
    done = out / "row.json"
    overrides = [f"out_dir={out}", "method=layerlock", f"seed={seed}", f"train.steps={steps}", "train.progress=false",
                 f"train.threads={threads}", f"train.ckpt_every={steps}", *extra, *schedule_sets(name, steps)]
    config = load_config(None, overrides)
    if done.is_file():
        row = json.loads(done.read_text())
        if row.get("config") == config.to_dict():
            return row
    started = time.perf_counter()
    trainer = Trainer(config, overwrite=True, echo=lambda s: None)  # an unfinished earlier try restarts
    flops_by_plan = count_plan_flops(trainer)
    summary = trainer.fit()
    total_flops = run_flops(trainer, steps, flops_by_plan)
    rows = read_jsonl(out / "metrics.jsonl")
    tail = [r["loss"] for r in rows[-max(1, len(rows) // 10):]]
    row = {
        "schedule": name, "seed": seed, "steps": steps, "probes": summary.get("probes", {}),
        "final_loss": sum(tail) / len(tail), "events": trainer.layerlock.schedule.events(),
        "reasons": [d.reason for d in getattr(trainer.layerlock.schedule, "decisions", [])],
        "flops_by_num_frozen": flops_by_plan, "train_flops": total_flops,
        "wall_s": round(time.perf_counter() - started, 1), "config": config.to_dict(),
    }
    done.write_text(json.dumps(row))
    print(f"  {name:>10} seed {seed}: {row['wall_s']:.0f} s, events {row['events']}, loss {row['final_loss']:.4f}, "
          + ", ".join(f"{k} {row['probes'].get(k, float('nan')):.3f}" for k, _, _ in METRICS), flush=True)
    return row


def aggregate(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    table = {}
    base = [r["train_flops"] for r in rows if r["schedule"] == "explicit"]
    for name in SCHEDULES:
        mine = [r for r in rows if r["schedule"] == name]
        if not mine:
            continue
        entry: dict[str, Any] = {"runs": len(mine), "events": [r["events"] for r in mine]}
        for key, _, _ in METRICS:
            entry[key] = mean_std([r["probes"][key] for r in mine if key in r["probes"]])
        for key in ("motion_chance_majority", "appearance_chance_majority"):  # majority-class frequency on the probe test set
            entry[key] = mean_std([r["probes"][key] for r in mine if key in r["probes"]])[0]
        entry["final_loss"] = mean_std([r["final_loss"] for r in mine])
        entry["train_flops"] = mean_std([r["train_flops"] for r in mine])
        if base:
            entry["flops_vs_explicit"] = entry["train_flops"][0] / (sum(base) / len(base))
        table[name] = entry
    return table


def markdown(table: dict[str, dict[str, Any]], steps: int, seeds: list[int], meta: dict[str, Any]) -> str:
    head = "| schedule | events (step, frozen) per seed | " + " | ".join(h for _, h, _ in METRICS) + \
        " | final loss | train FLOPs (×explicit) |"
    lines = [f"Adaptive vs explicit schedules, layerlock, tiny config, {steps} steps, seeds {seeds} "
             f"(mean ± std). {meta['machine']}, torch {meta['torch']}, {meta['date_utc']}.", "",
             f"Command: `{meta['command']}`", "", head, "|" + "---|" * (4 + len(METRICS))]
    for name, e in table.items():
        ev = "; ".join(",".join(f"{s}" for s, _ in evs) for evs in e["events"])
        cells = [f"{e[k][0]:.3f} ± {e[k][1]:.3f}" for k, _, _ in METRICS]
        lines.append(f"| {name} | {ev} | " + " | ".join(cells) + f" | {e['final_loss'][0]:.4f} ± {e['final_loss'][1]:.4f} | "
                     f"{e['train_flops'][0] / 1e12:.3f} T ({e.get('flops_vs_explicit', float('nan')):.3f}) |")
    chance = {k: max(e.get(k, float("nan")) for e in table.values())
              for k in ("motion_chance_majority", "appearance_chance_majority")}
    lines += ["", f"Chance (majority class on the probe test set): motion {chance['motion_chance_majority']:.3f}, "
              f"appearance {chance['appearance_chance_majority']:.3f}."]
    lines += ["", "Probes: the trainer's own (attentive motion / appearance classification, ridge depth R²) on frozen "
              "encoder tokens. The final loss is each run's loss on its own final target (block 3 of its own frozen "
              "prefix), so it is not comparable across schedules. FLOPs: each distinct plan's step measured once "
              "with FlopCounterMode during the run, times the steps it lasted."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny budget: 128 videos, batch 8, 150 steps")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--schedules", nargs="+", default=SCHEDULES, choices=SCHEDULES)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/bench/adaptive"))
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="extra trainer overrides for every run (after --quick's)")
    parser.add_argument("--tag", default="", help="suffix of the result files (adaptive-TAG.*) and run folders")
    args = parser.parse_args(argv)
    steps = args.steps or (150 if args.quick else 1500)
    extra = (QUICK_SETS if args.quick else []) + args.sets
    suffix = f"-{args.tag}" if args.tag else ""
    runs_dir = args.runs_dir.parent / (args.runs_dir.name + suffix)
    meta = provenance(sys.argv if argv is None else ["benchmarks/adaptive_schedule.py", *argv])
    rows = []
    for seed in args.seeds:
        for name in args.schedules:
            rows.append(run_one(name, seed, steps, runs_dir / f"{name}-s{seed}", extra, args.threads))
    table = aggregate(rows)
    payload = {"meta": meta, "steps": steps, "seeds": args.seeds, "quick": args.quick, "table": table,
               "runs": [{k: v for k, v in r.items() if k != "config"} for r in rows]}
    write_json(args.results_dir / f"adaptive{suffix}.json", payload)
    (args.results_dir / f"adaptive{suffix}.md").write_text(markdown(table, steps, args.seeds, meta))
    first = args.seeds[0]
    run = runs_dir / f"adaptive-s{first}"
    if (run / "metrics.jsonl").is_file():
        explicit = next((r["events"] for r in rows if r["schedule"] == "explicit" and r["seed"] == first), None)
        plot_adaptive_signals(read_jsonl(run / "metrics.jsonl"), read_jsonl(run / "events.jsonl"),
                              args.results_dir / f"adaptive_signals{suffix}.png", explicit_events=explicit, total_steps=steps,
                              title=f"adaptive schedule (defaults), seed {first}: signals and decided events")
    print((args.results_dir / f"adaptive{suffix}.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
