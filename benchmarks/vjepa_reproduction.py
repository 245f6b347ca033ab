"""V-JEPA vs LayerLock-V-JEPA at small scale: same model, data, step budget and seeds; probes on the frozen encoder.

Every run is ``examples/vjepa/train_layerlock_vjepa.py``'s ``main`` (the official V-JEPA modules at tiny
size: 4-block ViT encoder, 2-block predictor, 32x32 clips of 4 frames of the embedded moving-digits data,
V-JEPA's multi-block masks, AdamW with V-JEPA's LR / WD schedules, EMA teacher) with ``--method vjepa``
(V-JEPA's own train step: target = layer-normed output of the EMA teacher's last block) or ``--method
layerlock`` (the same step through ``layerlock_plugin.adapters.vjepa``: the target is the teacher's block-k
output, k = 1 before the first freeze, then the newest frozen block; the example's schedule freezes 2 of
the 4 blocks, at 1/3 and 2/3 of the run, so the target is block 1, 1, then 2). Only the
method and the seed differ between runs.

Evaluation (identical for both methods): the project's probes
(``layerlock_plugin.reference.eval.run_probes``: attentive motion / appearance probes, ridge depth probe)
on the tokens ``[B, 32, 48]`` of the final *target* (EMA) encoder — the encoder V-JEPA's own evaluations
load (``checkpoint_key='target_encoder'``) — on the same digits config the runs trained on.

Also reported: the final training loss (mean of the last 10% of steps; note the two methods regress
different targets, so losses are not comparable across methods), the scale-free feature std of the last
step's regression targets (``layerlock_plugin.collapse.feature_stats``; near 0 = collapsed target) and the
same statistic for the probed encoder tokens on test clips.

    python benchmarks/vjepa_reproduction.py --quick            # seconds: 12 steps, 1 seed, tiny probes
    python benchmarks/vjepa_reproduction.py                    # full: 2 methods x 3 seeds x 600 steps
    python benchmarks/vjepa_reproduction.py --steps 300 --jobs 2

Writes ``benchmarks/results/vjepa_reproduction[-TAG].json`` (every run, mean and sample std, provenance)
and ``.md`` (the table).
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, aggregate_seeds, paired_markdown, paired_table, provenance, seeds_markdown, write_json  # noqa: E402

from layerlock_plugin.collapse import feature_stats  # noqa: E402
from layerlock_plugin.reference.data import DigitsVideoDataset  # noqa: E402
from layerlock_plugin.reference.eval import ProbeConfig, run_probes  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "vjepa" / "train_layerlock_vjepa.py"
METHODS = ["vjepa", "layerlock"]
LABELS = {"vjepa": "V-JEPA", "layerlock": "LayerLock-V-JEPA"}
# Columns of the table: (key, header)
METRICS = [("motion_acc", "motion acc"), ("appearance_acc", "appearance acc"), ("dense_r2", "depth R²"),
           ("dense_rmse", "depth RMSE")]
STATS = [("final_loss", "final loss"), ("target_feature_std", "target feature std"),
         ("encoder_feature_std", "enc. feature std")]
# Quick mode's probes: few videos and steps, one regularisation value (a smoke run, not a measurement).
QUICK_PROBE = dict(train_videos=32, test_videos=32, steps=10, weight_decay=1.0, l2=0.01)


def load_example():
    """The V-JEPA example as a module (it is a script, not a package); raises the install hint if vjepa is missing."""
    spec = importlib.util.spec_from_file_location("vjepa_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def probe_encoder(ex, encoder: torch.nn.Module, probe: ProbeConfig) -> dict[str, Any]:
    """Probe ``encoder`` (a ``MultiMaskWrapper``; without masks it returns all tokens ``[B, N, D]``) frozen."""
    encoder.eval()

    def encode(video: torch.Tensor) -> torch.Tensor:
        """``video [B, C, T, H, W]`` -> tokens ``[B, N, D]``."""
        with torch.no_grad():
            return encoder(video)

    data = ex.data_config()
    grid = (ex.FRAMES // ex.TUBELET, ex.CROP // ex.PATCH, ex.CROP // ex.PATCH)
    tubelet = (ex.TUBELET, ex.PATCH, ex.PATCH)
    test = DigitsVideoDataset(data, "test")
    results = run_probes(encode, DigitsVideoDataset(data, "train"), test, grid, tubelet, probe)
    video = torch.stack([test[i]["video"] for i in range(min(64, len(test)))])
    results["encoder_feature_std"] = feature_stats(encode(video), sample_tokens=1024)["feature_std"]
    return results


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Train one method / seed with the example's ``main`` and probe its target encoder; returns the row."""
    torch.set_num_threads(job["threads"])
    ex = load_example()
    started = time.perf_counter()
    out = ex.main(["--steps", str(job["steps"]), "--method", job["method"], "--seed", str(job["seed"]),
                   "--threads", str(job["threads"]), "--quiet"])
    train_s = time.perf_counter() - started
    losses = out["losses"]
    tail = losses[-max(1, len(losses) // 10):]
    # the targets the loss regressed on the last step ([B, M_i, D] per mask config), pooled over masks
    target = torch.cat([t.reshape(-1, t.shape[-1]) for t in out["last_target"]])
    probes = probe_encoder(ex, out["target_encoder"], ProbeConfig(**job["probe"]))
    if job["method"] == METHODS[0]:
        # The encoder both methods start from at this seed (the example seeds, then builds it first).
        torch.manual_seed(job["seed"])
        initial, _ = ex.init_video_model()
        probes["random_init"] = probe_encoder(ex, initial, ProbeConfig(**job["probe"]))
        probes["random_init"].pop("encoder_feature_std")
    row = {
        "method": job["method"], "seed": job["seed"], "steps": job["steps"],
        "probes": {k: v for k, v in probes.items() if k != "encoder_feature_std"},
        "final_loss": sum(tail) / len(tail), "target_feature_std": feature_stats(target, 1024)["feature_std"],
        "encoder_feature_std": probes["encoder_feature_std"],
        "num_frozen": int(out["layerlock"].metrics().get("layerlock/num_frozen", 0)) if out["layerlock"] else 0,
        "losses_every_10": losses[::10], "train_s": round(train_s, 1),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print(f"  {LABELS[job['method']]:>17} seed {job['seed']}: {row['wall_s']:.0f} s, loss {row['final_loss']:.4f}, "
          f"target std {row['target_feature_std']:.3f}, "
          + ", ".join(f"{k} {row['probes'].get(k, float('nan')):.3f}" for k, _ in METRICS), flush=True)
    return row


def aggregate(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Mean ± std per method, then ``random init`` (the encoder both methods start from, per seed)."""
    table = aggregate_seeds(rows, METHODS, "method", [k for k, _ in METRICS], [k for k, _ in STATS])
    base = [{"method": "random init", "seed": r["seed"], "probes": r["probes"]["random_init"]}
            for r in rows if "random_init" in r["probes"]]
    table.update(aggregate_seeds(base, ["random init"], "method", [k for k, _ in METRICS], []))
    return table


def markdown(table: dict[str, dict[str, Any]], diffs: dict[str, dict[str, Any]], steps: int, meta: dict[str, Any]) -> str:
    label = lambda name: LABELS.get(name, name)  # noqa: E731
    md = seeds_markdown(table, METRICS + STATS, steps, meta, label=label,
                        note="Probes read the final target (EMA) encoder. Final losses regress different "
                             "targets and are not comparable across methods.")
    return md + paired_markdown(diffs, METHODS[0], [m for m in METRICS if m[0] != "dense_rmse"], label=label)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="12 steps, 1 seed, tiny probes: a smoke run")
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default 0 1 2 (quick: 0)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 600; quick 12)")
    p.add_argument("--probe-videos", type=int, default=256, help="probe train and test videos (full mode)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (each with --threads threads)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--tag", default="", help="suffix for the result files")
    p.add_argument("--results-dir", default=str(RESULTS))
    args = p.parse_args(argv)

    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    steps = args.steps or (12 if args.quick else 600)
    if steps < 3:
        p.error(f"--steps must be >= 3 (LayerLock's schedule freezes at 1/3 and 2/3 of the run), got {steps}")
    probe = QUICK_PROBE if args.quick else dict(train_videos=args.probe_videos, test_videos=args.probe_videos)
    tag = args.tag or ("quick" if args.quick else "")
    suffix = f"-{tag}" if tag else ""
    jobs = [{"method": m, "seed": s, "steps": steps, "probe": probe, "threads": args.threads}
            for s in seeds for m in args.methods]
    meta = provenance()
    print(f"vjepa_reproduction: {len(jobs)} runs ({', '.join(args.methods)} x seeds {seeds}), {steps} steps each, "
          f"{args.jobs} at a time", flush=True)
    if args.jobs > 1:
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            rows = pool.map(run_one, jobs, chunksize=1)
    else:
        rows = [run_one(j) for j in jobs]
    table = aggregate(rows)
    diffs = paired_table(rows, args.methods, METHODS[0], "method", [k for k, _ in METRICS])
    results = Path(args.results_dir)
    write_json(results / f"vjepa_reproduction{suffix}.json",
               {"study": "vjepa_reproduction", "provenance": meta, "steps": steps, "methods": args.methods,
                "seeds": seeds, "probe": probe, "probed_encoder": "target (EMA)", "table": table, "differences": diffs, "runs": rows})
    md = markdown(table, diffs, steps, meta)
    (results / f"vjepa_reproduction{suffix}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
