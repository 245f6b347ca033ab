"""Shared plumbing for the benchmark scripts: provenance (machine, versions, command, date), JSON output,
and a matplotlib figure that needs no display. Not a study itself."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any


def _use_source_tree() -> None:
    """``LAYERLOCK_SRC=/path/to/checkout``: import ``layerlock_plugin`` from that tree instead of the
    installed (possibly editable, possibly mid-edit) one, so long runs measure one fixed commit.
    Inherited by spawned worker processes through the environment."""
    src = os.environ.get("LAYERLOCK_SRC")
    if not src:
        return
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
    sys.path.insert(0, os.path.abspath(src))


_use_source_tree()

import torch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def provenance(argv: list[str] | None = None) -> dict[str, Any]:
    """Where and how a number was produced: put next to every result."""
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    except OSError:
        cpu = platform.processor()
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv)),
        "machine": f"{os.cpu_count()} CPU cores ({cpu})" + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "layerlock_plugin": _source_of_package(),
    }


def _source_of_package() -> str:
    """Where ``layerlock_plugin`` was imported from, with the git commit when there is one."""
    import subprocess

    import layerlock_plugin

    root = Path(layerlock_plugin.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "layerlock_plugin", "adapters"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    commit = commit or os.environ.get("LAYERLOCK_COMMIT", "")
    return f"{root}" + (f" @ {commit}" if commit else "") + (" (uncommitted changes)" if dirty else "")


def add_run_args(parser) -> None:
    """The options every in-process study shares: ``--threads``, ``--tag``, ``--results-dir``."""
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--tag", default="", help="suffix of the result files (default: 'quick' with --quick)")
    parser.add_argument("--results-dir", default=str(RESULTS))


def start_run(args) -> str:
    """Apply ``--threads`` and return the result-file suffix (``-TAG``, ``-quick`` or empty)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    tag = args.tag or ("quick" if getattr(args, "quick", False) else "")
    return f"-{tag}" if tag else ""


def run_jobs(run_one, jobs: list[dict[str, Any]], parallel: int = 1) -> list[Any]:
    """``[run_one(job) for job in jobs]``, on ``parallel`` spawned worker processes when > 1 (in order).
    ``run_one`` must be a module-level function and its exceptions picklable."""
    if parallel <= 1:
        return [run_one(j) for j in jobs]
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(parallel) as pool:
        return pool.map(run_one, jobs, chunksize=1)


def count_plan_flops(trainer) -> dict[str, int]:
    """Wrap ``trainer.train_step`` so that the first step of every distinct plan (number of frozen blocks)
    runs under ``torch.utils.flop_counter.FlopCounterMode``; returns the ``{num_frozen: FLOPs}`` dict it
    fills during the run (see :func:`run_flops`)."""
    from torch.utils.flop_counter import FlopCounterMode

    plain, flops_by_plan = trainer.train_step, {}

    def step(video):
        if str(trainer.layerlock.plan_at(trainer.step).num_frozen) in flops_by_plan:
            return plain(video)
        with FlopCounterMode(display=False) as counter:
            out = plain(video)
        flops_by_plan[str(trainer.layerlock.plan.num_frozen)] = counter.get_total_flops()
        return out

    trainer.train_step = step
    return flops_by_plan


def run_flops(trainer, steps: int, flops_by_plan: dict[str, int]) -> int:
    """Training FLOPs of a finished run: each step's plan's measured FLOPs, summed over ``steps``."""
    return sum(flops_by_plan[str(trainer.layerlock.plan_at(s).num_frozen)] for s in range(steps))


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
    return path


def figure(width: float = 8.0, height: float = 4.5):
    """A matplotlib Figure on the Agg canvas (no pyplot global state, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1; 0 for a single value)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(values) / n
    s = (sum((v - m) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return m, s


def aggregate_seeds(rows: list[dict[str, Any]], names: list[str], name_key: str, metrics: list[str],
                    stats: list[str]) -> dict[str, dict[str, Any]]:
    """One entry per name (in ``names`` order, names without rows left out): its seeds, mean ± std of
    each probe ``metric`` (from ``row["probes"]``) and each ``stat`` (from the row), and the chance levels."""
    table: dict[str, dict[str, Any]] = {}
    for name in names:
        mine = [r for r in rows if r[name_key] == name]
        if not mine:
            continue
        entry: dict[str, Any] = {"seeds": [r["seed"] for r in mine]}
        for key in metrics:
            entry[key] = mean_std([r["probes"][key] for r in mine if key in r["probes"]])
        for key in stats:
            entry[key] = mean_std([r[key] for r in mine])
        for task in ("motion", "appearance", "turn"):
            if f"{task}_chance_uniform" not in mine[0]["probes"]:
                continue
            for level in ("uniform", "majority"):
                entry[f"{task}_chance_{level}"] = mine[0]["probes"].get(f"{task}_chance_{level}")
        table[name] = entry
    return table


#: two-sided 95% critical values of Student's t by degrees of freedom (n seeds - 1)
T_CRIT_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def paired_difference(values: list[float], reference: list[float]) -> dict[str, Any]:
    """Per-seed differences ``values[i] - reference[i]`` (same seed, same data order and masks): their
    mean ± sample std, the paired t statistic and the verdict at 95% (two-sided; ``"higher"``,
    ``"lower"`` or ``"no resolved difference"``; fewer than 3 seeds never resolve)."""
    d = [a - b for a, b in zip(values, reference)]
    m, s = mean_std(d)
    n = len(d)
    t = m / (s / n ** 0.5) if s > 0 else (float("inf") if m > 0 else float("-inf") if m < 0 else 0.0)
    resolved = n >= 3 and abs(t) >= T_CRIT_95.get(n - 1, 1.96)
    return {"per_seed": d, "mean": m, "std": s, "t": t,
            "verdict": ("higher" if m > 0 else "lower") if resolved else "no resolved difference"}


def paired_table(rows: list[dict[str, Any]], names: list[str], reference: str, name_key: str,
                 metrics: list[str]) -> dict[str, dict[str, Any]]:
    """Every name in ``names`` against ``reference`` on the seeds both ran: the paired difference
    (:func:`paired_difference`) of each probe metric (``row["probes"][key]``), and the ratio of training
    FLOPs and seconds where the rows carry them (``train_flops``, ``train_s``)."""
    ref = {r["seed"]: r for r in rows if r[name_key] == reference}
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        mine = sorted((r for r in rows if r[name_key] == name and r["seed"] in ref), key=lambda r: r["seed"])
        if name == reference or not mine:
            continue
        entry: dict[str, Any] = {"seeds": [r["seed"] for r in mine]}
        for key in metrics:
            entry[key] = paired_difference([r["probes"][key] for r in mine], [ref[r["seed"]]["probes"][key] for r in mine])
        for key in ("train_flops", "train_s"):
            if all(key in r and key in ref[r["seed"]] for r in mine):
                entry[f"{key}_ratio"] = sum(r[key] for r in mine) / sum(ref[r["seed"]][key] for r in mine)
        out[name] = entry
    return out


def paired_markdown(diffs: dict[str, dict[str, Any]], reference: str, columns: list[tuple[str, str]],
                    label=lambda name: name) -> str:
    """The table of :func:`paired_table` (``columns``: ``(metric key, header)``); empty without rows."""
    if not diffs:
        return ""
    lines = ["", f"Against `{label(reference)}`, per seed (variant − reference; mean ± std, per-seed values, paired "
             "t; verdict at 95%, two-sided):", "",
             "| variant (seeds) | " + " | ".join(f"Δ {h}" for _, h in columns) + " | FLOPs ratio | time ratio |",
             "|---" * (len(columns) + 3) + "|"]
    for name, e in diffs.items():
        cells = []
        for key, _ in columns:
            d = e[key]
            verdict = "" if d["verdict"].startswith("no") else f" **{d['verdict']}**"
            cells.append(f"{d['mean']:+.3f} ± {d['std']:.3f} ({', '.join(f'{x:+.3f}' for x in d['per_seed'])}; "
                         f"t {d['t']:+.1f}){verdict}")
        ratio = [f"{e[k]:.3f}" if k in e else "–" for k in ("train_flops_ratio", "train_s_ratio")]
        lines.append(f"| {label(name)} ({', '.join(map(str, e['seeds']))}) | " + " | ".join(cells + ratio) + " |")
    lines += ["", "FLOPs: each distinct plan's training step measured once with FlopCounterMode, times the steps it "
              "lasted. Time: training seconds (two runs shared the 2 cores, one thread each: noisy)."]
    return "\n".join(lines) + "\n"


def seeds_markdown(table: dict[str, dict[str, Any]], columns: list[tuple[str, str]], steps: int,
                   meta: dict[str, Any], label=lambda name: name, note: str = "") -> str:
    """The mean ± std table of :func:`aggregate_seeds` (``columns``: ``(key, header)``), with chance
    levels, ``note``, machine, date and command underneath."""
    heads = [h for _, h in columns]
    lines = [f"| method ({steps} steps, seeds) | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    for name, e in table.items():
        cells = [f"{e[k][0]:.3f} ± {e[k][1]:.3f}" if k in e else "–" for k, _ in columns]
        lines.append(f"| {label(name)} ({', '.join(map(str, e['seeds']))}) | " + " | ".join(cells) + " |")
    any_e = next(iter(table.values()), {})
    lines.append("")
    chance = ", ".join(f"{t} {any_e.get(f'{t}_chance_uniform')} (1/K) / {any_e.get(f'{t}_chance_majority')} (majority)"
                       for t in ("motion", "appearance", "turn") if f"{t}_chance_uniform" in any_e)
    lines.append(f"Chance: {chance}. "
                 f"mean ± std over seeds (sample std). {note + ' ' if note else ''}"
                 f"{meta['machine']}, torch {meta['torch']}, {meta['date_utc']}.")
    lines.append(f"Command: `{meta['command']}`")
    return "\n".join(lines) + "\n"
