"""Calibration ladder of the frozen-feature probes: features of known quality, probed like an encoder.

A probe is only evidence once it ranks features whose quality is known. Every rung goes through the
trainer's own probes (``layerlock_plugin.reference.eval.run_probes`` with the config's probe section:
linear, attentive and k-NN classifiers, ridge depth) on the config's data:

* ``raw pixels``: each tubelet's pixels as its token;
* ``motion features``: hand-made Lucas-Kanade statistics per tubelet (built for the motion task);
* ``random init (seed s)``: the config's architecture as the trainer initialises it at seed ``s``;
* ``supervised <task>``: that architecture trained on the task's labels for the config's budget
  (``train.steps`` x ``train.batch_size``, its optimizer schedule), initialised as the seed-0 random
  init; its peak learning rate is chosen from ``--supervised-lrs`` on held-out train clips (the clips
  of 1/8 of the train digit images, never the test set; the other 7/8 are trained on);
* ``--runs DIR ...``: trained run folders (their ``checkpoint.pt``), e.g. MAE runs, printed beside
  random init and raw pixels.

``--supervised multitask`` (the evidence suite's ladder) trains one encoder on every label of the data at
once (:mod:`~layerlock_plugin.reference.eval.supervised_multitask`: each classification label and the
per-token depth) instead of one per task, and applies the calibration rule
(:mod:`~layerlock_plugin.reference.eval.calibration_rule`) to every task, depth readouts included: the
verdict table says which tasks may enter a method comparison. The tasks are the data's labels (with
``data.turn`` set: motion, appearance and turn).

Checks (the ladder the probe must order; a failed check is reported, and the exit status is 1):
the motion features read motion far above chance (headline accuracy >= majority share + 0.5); each
supervised encoder fits its training labels (final train loss <= ln(K) / 2) and beats every random-init
seed on the task it was trained for.

    python benchmarks/calibration.py --quick                      # seconds: CI smoke
    python benchmarks/calibration.py                              # the packaged config, 3 random-init seeds
    python benchmarks/calibration.py --runs runs/bench/mae_setting/std-s0 --tag mae
    python benchmarks/calibration.py --config layerlock_plugin/reference/configs/evidence.yaml \
        --supervised multitask --supervised-lrs 6e-4 --tag evidence         # the evidence suite

Writes ``benchmarks/results/calibration[-TAG].json`` (every rung's probes, the checks, provenance), ``.md``
(the table) and ``.png`` (headline probe per task and rung, chance marked).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_run_args, figure, provenance, run_jobs, save_figure, start_run, write_json  # noqa: E402

from layerlock_plugin.checkpoint import load_checkpoint  # noqa: E402
from layerlock_plugin.reference.eval.calibration import (  # noqa: E402
    SUPERVISED_LRS, SupervisedEncoder, held_out_split, motion_tokens, pixel_tokens, supervised_accuracy,
    train_supervised)
from layerlock_plugin.reference.config import RunConfig, build_config, load_config  # noqa: E402
from layerlock_plugin.reference.data import DigitsVideoDataset  # noqa: E402
from layerlock_plugin.reference.model import VideoMAE  # noqa: E402
from layerlock_plugin.reference.eval import run_probes  # noqa: E402
from layerlock_plugin.reference.eval.calibration_rule import task_verdicts  # noqa: E402
from layerlock_plugin.reference.eval.supervised_multitask import (  # noqa: E402
    MultiTaskEncoder, multitask_accuracy, train_multitask)

TASKS = ("motion", "appearance")
KINDS = ("linear", "attentive", "knn")
QUICK_SETS = ["data.num_videos=48", "train.batch_size=8", "train.steps=4", "optim.warmup_steps=1",
              "probe.train_videos=32", "probe.test_videos=32", "probe.steps=10", "probe.weight_decay=1.0",
              "probe.l2=0.01", "probe.knn_k=5", "probe.max_iter=10", "probe.dense_steps=10"]


def random_init(config: RunConfig, seed: int) -> VideoMAE:
    """The architecture as the trainer draws it at ``seed`` (MAE readouts only)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VideoMAE(config.model).eval()


def encoder_of_run(folder: Path) -> tuple[VideoMAE, dict[str, Any]]:
    """The trained model of a one-process run folder (``checkpoint.pt``) and its raw config."""
    ckpt = load_checkpoint(folder / "checkpoint.pt")
    config = build_config(ckpt["config"])
    layers = [int(k.split("_")[1]) for k in ckpt["model"] if k.startswith("readouts.layer_") and k.endswith(".weight")]
    model = VideoMAE(config.model, latent_target_layers=sorted(set(layers)))
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt["config"]


def supervised_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train one supervised encoder (``task``, peak ``lr``) on the fitted clips; returns its held-out
    accuracy, final train loss, seconds and weights (a worker function: runs in a spawned process)."""
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    config = build_config(job["config"])
    train = DigitsVideoDataset(config.data, "train", cache=True)
    fit, val = held_out_split(train, job["val_fraction"], job["seed"])
    losses: list[float] = []
    started = time.perf_counter()
    model = train_supervised(config.model, train, job["task"], steps=config.train.steps,
                             batch_size=config.train.batch_size, optim=config.optim, lr=job["lr"], indices=fit,
                             seed=job["seed"], log=lambda step, loss: losses.append(loss))
    tail = losses[-max(1, len(losses) // 10):] or [float("nan")]
    row = {"task": job["task"], "lr": job["lr"], "fit_clips": len(fit), "val_clips": len(val),
           "val_acc": supervised_accuracy(model, train, val, job["task"]),
           "final_train_loss": sum(tail) / len(tail), "train_s": round(time.perf_counter() - started, 1),
           "state": model.state_dict()}
    print(f"  supervised {job['task']} lr {job['lr']:g}: final train loss {row['final_train_loss']:.3f}, "
          f"held-out accuracy {row['val_acc']:.3f} ({row['train_s']:.0f} s)", flush=True)
    return row


def multitask_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train one encoder on every label (peak ``lr``) on the fitted clips; returns its held-out accuracy per
    task (own heads), final train loss, seconds and weights (a worker function: runs in a spawned process)."""
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    config = build_config(job["config"])
    train = DigitsVideoDataset(config.data, "train", cache=True)
    tasks = list(train.num_classes)
    fit, val = held_out_split(train, job["val_fraction"], job["seed"])
    losses: list[float] = []
    started = time.perf_counter()
    model = train_multitask(config.model, train, tasks, steps=config.train.steps, batch_size=config.train.batch_size,
                            optim=config.optim, lr=job["lr"], indices=fit, seed=job["seed"],
                            log=lambda step, loss: losses.append(loss))
    tail = losses[-max(1, len(losses) // 10):] or [float("nan")]
    acc = multitask_accuracy(model, train, val, tasks)
    row = {"task": "all", "tasks": tasks, "lr": job["lr"], "fit_clips": len(fit), "val_clips": len(val),
           "val_acc": sum(acc.values()) / len(acc), "val_acc_per_task": acc,
           "final_train_loss": sum(tail) / len(tail), "train_s": round(time.perf_counter() - started, 1),
           "state": model.state_dict()}
    print(f"  supervised (all labels) lr {job['lr']:g}: final train loss {row['final_train_loss']:.3f}, held-out "
          + ", ".join(f"{t} {a:.3f}" for t, a in acc.items()) + f" ({row['train_s']:.0f} s)", flush=True)
    return row


def ladder(config: RunConfig, seeds: list[int], runs: list[Path], lrs: list[float], jobs: int = 1, threads: int = 0,
           log=print, supervised_mode: str = "per-task") -> list[dict[str, Any]]:
    """Probe every rung; returns one row per rung (``name``, ``kind`` of rung, ``probes``, seconds).
    The supervised encoders (every task x learning rate in ``lrs``, or one on all labels per learning rate
    with ``supervised_mode='multitask'``) train first, ``jobs`` at a time."""
    base = {"config": config.to_dict(), "seed": seeds[0], "val_fraction": 0.125, "threads": threads}
    if supervised_mode == "multitask":
        supervised = run_jobs(multitask_job, [{**base, "lr": lr} for lr in lrs], jobs)
    else:
        supervised = run_jobs(supervised_job, [{**base, "task": t, "lr": lr} for t in TASKS for lr in lrs], jobs)
    train = DigitsVideoDataset(config.data, "train", cache=True)
    test = DigitsVideoDataset(config.data, "test")
    grid, tubelet = config.model.grid, config.model.tubelet
    rows: list[dict[str, Any]] = []

    def probe(name: str, rung: str, encode, **extra: Any) -> None:
        started = time.perf_counter()
        res = run_probes(encode, train, test, grid, tubelet, config.probe)  # encodes under no_grad
        rows.append({"name": name, "rung": rung, "probes": res, "probe_s": round(time.perf_counter() - started, 1),
                     **extra})
        log(f"  {name:>26}: " + ", ".join(f"{t} {res[f'{t}_acc']:.3f}" for t in train.num_classes)
            + f", depth R² {res['dense_r2']:.3f}"
            + (f" (attentive {res['dense_attentive_r2']:.3f})" if "dense_attentive_r2" in res else "")
            + f"  ({rows[-1]['probe_s']:.0f} s)")

    probe("raw pixels", "pixels", pixel_tokens(tubelet))
    probe("motion features", "motion_features", motion_tokens(tubelet))
    for s in seeds:
        probe(f"random init (seed {s})", "random_init", random_init(config, s).encode, seed=s)
    for task in (["all"] if supervised_mode == "multitask" else TASKS):
        tried = [r for r in supervised if r["task"] == task]
        best = max(tried, key=lambda r: r["val_acc"])  # ties: the first (higher) learning rate
        if task == "all":
            model = MultiTaskEncoder(config.model, {t: train.num_classes[t] for t in best["tasks"]})
        else:
            model = SupervisedEncoder(config.model, train.num_classes[task])
        model.load_state_dict(best.pop("state"))
        for r in tried:
            r.pop("state", None)
        extra = ({"val_acc_per_task": best["val_acc_per_task"]} if task == "all"
                 else {"num_classes": train.num_classes[task]})
        probe("supervised (all labels)" if task == "all" else f"supervised {task}",
              "supervised" if task == "all" else f"supervised_{task}", model.eval().encode, task=task,
              seed=seeds[0], lr=best["lr"], val_acc=best["val_acc"], train_s=best["train_s"],
              final_train_loss=best["final_train_loss"], lr_grid=tried, **extra)
    for folder in runs:
        model, raw = encoder_of_run(folder)
        probe(f"{raw.get('method', 'run')} {folder.name}", "run", model.encode, folder=str(folder),
              method=raw.get("method"))
    return rows


def checks(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The orderings the probes must reproduce (headline probe)."""
    by = {r["rung"]: r["probes"] for r in rows if r["rung"] != "random_init"}
    rand = [r["probes"] for r in rows if r["rung"] == "random_init"]
    out = []
    mf = by["motion_features"]
    out.append({"check": "motion features read motion far above chance (>= majority + 0.5)",
                "value": mf["motion_acc"], "threshold": mf["motion_chance_majority"] + 0.5,
                "passed": mf["motion_acc"] >= mf["motion_chance_majority"] + 0.5})
    for r in rows:
        if r["rung"].startswith("supervised"):
            limit = math.log(r["num_classes"]) / 2
            out.append({"check": f"supervised {r['task']} fits its training labels (final train loss <= ln K / 2)",
                        "value": r["final_train_loss"], "threshold": limit, "passed": r["final_train_loss"] <= limit})
    for task in TASKS:
        sup = by[f"supervised_{task}"][f"{task}_acc"]
        best = max(p[f"{task}_acc"] for p in rand)
        out.append({"check": f"supervised {task} beats every random-init seed on {task}", "value": sup,
                    "threshold": best, "passed": sup > best})
    return out


def verdict_markdown(verdicts: dict[str, dict[str, Any]]) -> str:
    """The calibration rule's table: per task the supervised rung beside its baselines, and the verdict."""
    from layerlock_plugin.reference.eval.calibration_rule import ABOVE_CHANCE, MARGIN

    lines = [f"Calibration rule (fixed before any method is compared): supervised >= chance + {ABOVE_CHANCE} and "
             f">= the best of raw pixels and every random-init seed + {MARGIN} (temporal-semantic tasks: also >= "
             f"hand-made motion features + {MARGIN}); accuracy for classification (headline probe), R² for depth.",
             "", "| task | supervised | chance | raw pixels | random init (seeds) | motion features | verdict |",
             "|---|---|---|---|---|---|---|"]
    for task, v in verdicts.items():
        rand = [x for k, x in v["baselines"].items() if k.startswith("random init")]
        mf = "–" if v["motion_features"] is None else f"{v['motion_features']:.3f}"
        verdict = "**calibrated**" if v["passed"] else f"uncalibrated ({v['why']})"
        lines.append(f"| {task}{' (temporal-semantic)' if v['temporal_semantic'] else ''} | {v['supervised']:.3f} | "
                     f"{v['chance']:.3f} | {v['baselines']['raw pixels']:.3f} | "
                     f"{' / '.join(f'{x:.3f}' for x in rand)} | {mf} | {verdict} |")
    return "\n".join(lines) + "\n"


def markdown(rows: list[dict[str, Any]], checks_: list[dict[str, Any]], meta: dict[str, Any], config: RunConfig,
             verdicts: dict[str, dict[str, Any]] | None = None) -> str:
    tasks = [k[: -len("_num_classes")] for k in rows[0]["probes"] if k.endswith("_num_classes")]
    dense = ["dense_r2"] + (["dense_attentive_r2"] if "dense_attentive_r2" in rows[0]["probes"] else [])
    heads = [f"{t} {k}" for t in tasks for k in KINDS] + [{"dense_r2": "depth R² (ridge)",
                                                          "dense_attentive_r2": "depth R² (attentive)"}[d] for d in dense]
    lines = [f"| rung | {' | '.join(heads)} |", "|---" * (len(heads) + 1) + "|"]
    for r in rows:
        p = r["probes"]
        cells = [f"{p[f'{t}_{k}_acc']:.3f}" for t in tasks for k in KINDS] + [f"{p[d]:.3f}" for d in dense]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    p0 = rows[0]["probes"]
    lines += ["", "Chance: " + ", ".join(f"{t} uniform {p0[f'{t}_chance_uniform']:.3f}, majority "
                                       f"{p0[f'{t}_chance_majority']:.3f}" for t in tasks)
              + f". Headline probe: {config.probe.kind}; features standardised with probe-train statistics "
              f"({config.probe.normalize}).", ""]
    sup = [r for r in rows if r["rung"].startswith("supervised")]
    if sup:
        lines.append(f"Supervised budget: {config.train.steps} steps x {config.train.batch_size} clips, the "
                     "pretraining optimizer schedule; peak learning rate chosen on held-out train clips (digit "
                     "images never trained on). Per task and learning rate: final train loss / held-out accuracy "
                     "(seconds); **chosen**:")
        for r in sup:
            lines.append(f"- {r['task']}: " + ", ".join(
                ("**" if g["lr"] == r["lr"] else "") + f"lr {g['lr']:g}: {g['final_train_loss']:.3f} / "
                f"{g['val_acc']:.3f} ({g['train_s']:.0f} s)" + ("**" if g["lr"] == r["lr"] else "")
                for g in r["lr_grid"]))
            if "val_acc_per_task" in r:
                lines.append("  held-out accuracy of its own heads: " + ", ".join(
                    f"{t} {a:.3f}" for t, a in r["val_acc_per_task"].items()))
        lines.append("")
    if verdicts is not None:
        lines += [verdict_markdown(verdicts)]
    if checks_:
        lines += ["| check | value | threshold | passed |", "|---|---|---|---|"]
    lines += [f"| {c['check']} | {c['value']:.3f} | {c['threshold']:.3f} | {'yes' if c['passed'] else '**no**'} |"
              for c in checks_]
    lines += ["", f"{meta['machine']}, torch {meta['torch']}, {meta['layerlock_plugin']}, {meta['date_utc']}.",
              f"Command: `{meta['command']}`"]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    p0 = rows[0]["probes"]
    tasks = [k[: -len("_num_classes")] for k in p0 if k.endswith("_num_classes")]
    panels = [(f"{t}_acc", f"{t} (headline probe)", t) for t in tasks] + [("dense_r2", "depth R² (ridge per token)", None)]
    if "dense_attentive_r2" in p0:
        panels.append(("dense_attentive_r2", "depth R² (attentive)", None))
    fig = figure(4 * len(panels), 4.5)
    axes = fig.subplots(1, len(panels))
    names = [r["name"] for r in rows]
    for ax, (key, title, chance) in zip(axes, panels):
        vals = [r["probes"][key] for r in rows]
        ax.barh(range(len(rows)), vals, color=[f"C{i % 10}" for i in range(len(rows))])
        ax.set_yticks(range(len(rows)), names if ax is axes[0] else [""] * len(rows), fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        if chance:
            p = rows[0]["probes"]
            ax.axvline(p[f"{chance}_chance_uniform"], color="k", ls="--", lw=1, label="1/K")
            ax.axvline(p[f"{chance}_chance_majority"], color="gray", ls=":", lw=1, label="majority")
            ax.legend(fontsize=7)
    fig.suptitle("Probe calibration ladder")
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny data, a few supervised steps: a smoke run")
    p.add_argument("--config", default=None, help="trainer config (default: the packaged tiny one)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="random-init seeds")
    p.add_argument("--runs", nargs="*", default=[], help="trained run folders to probe beside the ladder")
    p.add_argument("--supervised-lrs", nargs="+", type=float, default=list(SUPERVISED_LRS),
                   help="peak learning rates tried for the supervised rungs (chosen on held-out train clips)")
    p.add_argument("--jobs", type=int, default=1, help="supervised encoders trained in parallel processes")
    p.add_argument("--supervised", choices=("per-task", "multitask"), default="per-task",
                   help="one supervised encoder per task, or one on every label at once with the calibration "
                        "rule applied to every task (the evidence suite)")
    add_run_args(p)
    args = p.parse_args(argv)
    suffix = start_run(args)
    config = load_config(args.config, (QUICK_SETS if args.quick else []) + args.sets)
    seeds = args.seeds[:1] if args.quick else args.seeds
    meta = provenance()
    print(f"calibration: {config.train.steps} supervised steps x {config.train.batch_size}, random-init seeds {seeds}",
          flush=True)
    rows = ladder(config, seeds, [Path(r) for r in args.runs], args.supervised_lrs, args.jobs, args.threads,
                  supervised_mode=args.supervised)
    multitask = args.supervised == "multitask"
    checks_ = [] if multitask else checks(rows)
    verdicts = task_verdicts(rows) if multitask else None
    results = Path(args.results_dir)
    write_json(results / f"calibration{suffix}.json", {"study": "calibration", "provenance": meta,
                                                        "config": config.to_dict(), "rows": rows, "checks": checks_,
                                                        "verdicts": verdicts})
    md = markdown(rows, checks_, meta, config, verdicts)
    (results / f"calibration{suffix}.md").write_text(md)
    plot(rows, results / f"calibration{suffix}.png")
    print(md)
    return 0 if all(c["passed"] for c in checks_) or args.quick else 1


if __name__ == "__main__":
    sys.exit(main())
