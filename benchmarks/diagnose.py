"""Why does (or doesn't) a method win? Layer-wise diagnostics of finished reference-trainer runs.

For each run folder (its ``checkpoint.pt`` and config) and a random-init model of the same config, and for
every encoder block ``k``, on the test clips:

* token statistics of ``h_k`` (the same ``feature_stats`` the collapse guard uses: scale-free feature std
  and effective rank / dim) and the share of token variance in the top 3 principal directions;
* the trainer's own frozen-feature probes (``run_probes`` with the run's probe config, only the number of
  probe videos may be lowered with ``--probe-videos``) read from block ``k`` instead of the last block.

The evaluation is identical for every run and layer; nothing is tuned per method.

    python benchmarks/diagnose.py --quick                                   # a tiny run trained here, 1 layer
    python benchmarks/diagnose.py runs/bench/reproduction/{mae,layerlock,latent-naive}-s0

Writes ``benchmarks/results/diagnose[-TAG].json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_run_args, provenance, start_run, write_json  # noqa: E402

import torch  # noqa: E402

from layerlock_plugin.checkpoint import load_checkpoint  # noqa: E402
from layerlock_plugin.collapse import feature_stats  # noqa: E402
from layerlock_plugin.reference.config import build_config, load_config  # noqa: E402
from layerlock_plugin.reference.data import DigitsVideoDataset  # noqa: E402
from layerlock_plugin.reference.model import VideoMAE  # noqa: E402
from layerlock_plugin.reference.eval import run_probes  # noqa: E402
from layerlock_plugin.reference.train import Trainer  # noqa: E402

KEYS = ("motion_acc", "appearance_acc", "dense_r2")


def load_run(folder: Path) -> tuple[Any, VideoMAE]:
    ckpt = load_checkpoint(folder / "checkpoint.pt")
    config = build_config(ckpt["config"])
    model = VideoMAE(config.model, latent_target_layers=_latent_layers(ckpt["model"]))
    model.load_state_dict(ckpt["model"])
    return config, model.eval()


def _latent_layers(state: dict[str, torch.Tensor]) -> list[int]:
    return sorted({int(k.split(".")[1].split("_")[1]) for k in state if k.startswith("readouts.layer_")})


@torch.no_grad()
def token_stats(model: VideoMAE, video: torch.Tensor, layer: int) -> dict[str, float]:
    tokens = model.encode(video, layer=layer)
    s = feature_stats(tokens, sample_tokens=2048)
    x = tokens.reshape(-1, tokens.shape[-1]).float()
    sv = torch.linalg.svdvals(x - x.mean(0, keepdim=True)) ** 2
    s["top3_variance_share"] = float(sv[:3].sum() / sv.sum().clamp_min(1e-12))
    return s


def diagnose(name: str, config, model: VideoMAE, layers: list[int], probe_videos: int | None) -> list[dict[str, Any]]:
    probe_cfg = config.probe
    if probe_videos:
        probe_cfg = dataclasses.replace(probe_cfg, train_videos=probe_videos, test_videos=probe_videos)
    train, test = DigitsVideoDataset(config.data, "train"), DigitsVideoDataset(config.data, "test")
    video = torch.stack([test[i]["video"] for i in range(min(64, len(test)))])
    rows = []
    for k in layers:
        probes = run_probes(lambda v, k=k: model.encode(v, layer=k), train, test, model.grid, config.model.tubelet,
                            probe_cfg)
        row = {"run": name, "layer": k, **token_stats(model, video, k), **{key: probes.get(key) for key in KEYS},
               **{key: probes.get(key) for key in ("motion_chance_majority", "appearance_chance_majority")}}
        rows.append(row)
        print(f"  {name:>24} layer {k}: " + ", ".join(f"{a} {row[a]:.3f}" for a in
              ("feature_std", "effective_rank", "top3_variance_share", *KEYS)), flush=True)
    return rows


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = ["| run | layer | feature std | eff. rank / dim | top-3 PC variance | motion acc | appearance acc | depth R² |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['layer']} | {r['feature_std']:.3f} | {r['effective_rank']:.3f} | "
                     f"{r['top3_variance_share']:.2f} | {r['motion_acc']:.3f} | {r['appearance_acc']:.3f} | "
                     f"{r['dense_r2']:.3f} |")
    first = rows[0]
    lines += ["", f"Chance: motion {first['motion_chance_majority']}, appearance {first['appearance_chance_majority']}. "
              f"{meta['machine']}, torch {meta['torch']}, {meta['date_utc']}. Command: `{meta['command']}`"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="*", help="run folders of the reference trainer (with checkpoint.pt)")
    p.add_argument("--quick", action="store_true", help="train a 6-step tiny run here and diagnose its layer 1")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="encoder blocks (default: all)")
    p.add_argument("--probe-videos", type=int, default=None, help="probe train/test videos (default: the run's)")
    p.add_argument("--no-random-init", action="store_true", help="skip the random-init reference model")
    add_run_args(p)
    args = p.parse_args(argv)
    suffix = start_run(args)
    meta = provenance()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmpdir:
        runs = [Path(r) for r in args.runs]
        layers = args.layers
        probe_videos = args.probe_videos
        if args.quick:
            out = Path(tmpdir) / "quick"
            Trainer(load_config(None, [f"out_dir={out}", "train.steps=6", "data.num_videos=32", "train.batch_size=4",
                                       "train.progress=false", "probe.enabled=false", "probe.steps=10",
                                       "schedule.pixel_steps=2", "schedule.interval=1", "warmup.steps=1",
                                       "probe.weight_decay=1.0", "probe.l2=0.01"]), echo=lambda s: None).fit()
            runs, layers, probe_videos = [out], layers or [1], probe_videos or 24
        if not runs:
            p.error("give run folders or --quick")
        config = None
        for folder in runs:
            config, model = load_run(folder)
            ks = layers or list(range(1, model.encoder_depth + 1))
            rows += diagnose(f"{config.method} (seed {config.seed})", config, model, ks, probe_videos)
        if not args.no_random_init:
            torch.manual_seed(config.seed)
            model = VideoMAE(config.model).eval()
            ks = layers or list(range(1, model.encoder_depth + 1))
            rows += diagnose("random init", config, model, ks, probe_videos)
    payload = {"study": "diagnose", "provenance": meta, "runs": [str(r) for r in args.runs],
               "probe_videos": probe_videos, "rows": rows}
    out_dir = Path(args.results_dir)
    write_json(out_dir / f"diagnose{suffix}.json", payload)
    md = markdown(rows, meta)
    (out_dir / f"diagnose{suffix}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
