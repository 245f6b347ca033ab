"""Layer dynamics of pixel MAE: per-layer parameter-norm curves and the layer-convergence picture.

Two studies on one plain MAE run of the reference trainer (tiny config, method ``mae``):

1. **Per-layer parameter norms** (the paper's heuristic for when to start freezing): every ``--every``
   steps, for the stem, each encoder block and each decoder block, the parameter norm and the relative
   update ``||theta_t - theta_{t-every}|| / ||theta_t||``. Early blocks settling first is what makes
   freezing them from the input side cheap.
2. **Layer convergence** (the paper's first figure): at several snapshot steps ``s``, freeze the stem and
   the first ``L`` blocks (``L = 0 .. max``), continue pixel MAE for ``--continue-steps`` steps (same batches
   for every ``L``, fresh AdamW and LR warmup for every branch), and measure the final pixel loss on a fixed
   held-out set (test clips, fixed masks). If early layers have converged by step ``s``, freezing them
   costs little loss.

Every branch is a reference ``Trainer`` (``freeze-only`` with all ``L`` blocks frozen at its first step, or
``mae`` for ``L = 0``) loaded with the snapshot's weights and driven through ``Trainer.train_step``.

    python benchmarks/layer_dynamics.py --quick      # seconds: a smoke run
    python benchmarks/layer_dynamics.py              # full: 400 MAE steps, snapshots 50/150/300, 100 more each

Writes ``benchmarks/results/layer_dynamics[-quick].json``, ``.md``, ``param_norms[-quick].png`` and
``layer_convergence[-quick].png``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_run_args, figure, provenance, save_figure, start_run, write_json  # noqa: E402

import torch  # noqa: E402

from layerlock_plugin.masking import random_masking  # noqa: E402
from layerlock_plugin.reference.config import load_config  # noqa: E402
from layerlock_plugin.reference.data import DigitsVideoDataset  # noqa: E402
from layerlock_plugin.reference.data import StepBatchSampler  # noqa: E402
from layerlock_plugin.reference.train import Trainer  # noqa: E402
from layerlock_plugin.targets import gather_tokens, pixel_targets  # noqa: E402

QUICK_SETS = ["data.num_videos=32", "train.batch_size=4"]


def trainer_for(out: Path, method: str, steps: int, extra: list[str], frozen: int = 0) -> Trainer:
    sets = [f"out_dir={out}", f"method={method}", f"train.steps={steps}", "train.progress=false",
            "probe.enabled=false", "guard.policy='off'", f"optim.warmup_steps={max(1, steps // 15)}", *extra]
    if frozen:
        # all L blocks freeze at the branch's first step: one event at step 0 with jump L
        sets += ["schedule.pixel_steps=0", "schedule.interval=1", f"schedule.jump={frozen}",
                 f"schedule.max_frozen={frozen}"]
    return Trainer(load_config(None, sets), echo=lambda s: None)


def units(model) -> list[tuple[str, list[torch.nn.Parameter]]]:
    u = model.layerlock_units()
    out = [(x.name, list(x.params)) for x in (u.stem, *u.blocks)]
    out += [(f"dec_{i + 1}", list(b.parameters())) for i, b in enumerate(model.blocks[model.encoder_depth:])]
    return out


def flat(params: list[torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def batches(trainer: Trainer, start: int, end: int):
    cfg = trainer.config
    sampler = StepBatchSampler(len(trainer.dataset), cfg.train.batch_size, cfg.seed, start, end)
    for idx in sampler:
        yield torch.stack([trainer.dataset[i]["video"] for i in idx])


@torch.no_grad()
def eval_set(config, num: int, seed: int = 123) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Held-out test clips in batches of 16 with fixed masks: ``(video, visible_idx, masked_idx)``."""
    ds = DigitsVideoDataset(config.data, "test")
    gen = torch.Generator().manual_seed(seed)
    out = []
    n_tok = config.model.grid[0] * config.model.grid[1] * config.model.grid[2]
    for start in range(0, min(num, len(ds)), 16):
        video = torch.stack([ds[i]["video"] for i in range(start, min(start + 16, num, len(ds)))])
        vis, masked = random_masking(video.shape[0], n_tok, config.model.mask_ratio, generator=gen)
        out.append((video, vis, masked))
    return out


@torch.no_grad()
def held_out_loss(model, data) -> float:
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for video, vis, masked in data:
        target = gather_tokens(pixel_targets(video, model.cfg.tubelet), masked)
        pred = model(video, vis, masked, heads=("pixels",))["pixels"]
        total += float(((pred - target) ** 2).mean()) * video.shape[0]
        count += video.shape[0]
    model.train(was)
    return total / count


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=None, help="MAE steps (default 400; quick 12)")
    p.add_argument("--every", type=int, default=None, help="norm record interval (default 10; quick 2)")
    p.add_argument("--snapshots", type=int, nargs="+", default=None, help="default 50 150 300; quick 4 8")
    p.add_argument("--continue-steps", type=int, default=None, help="default 100; quick 4")
    p.add_argument("--eval-videos", type=int, default=None, help="held-out clips (default 256; quick 16)")
    p.add_argument("--frozen", type=int, nargs="+", default=None,
                   help="numbers of frozen blocks L to branch with (default: every L from 0 to encoder blocks - 1)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    add_run_args(p)
    args = p.parse_args(argv)
    suffix = start_run(args)
    q = args.quick
    steps = args.steps or (12 if q else 400)
    every = args.every or (2 if q else 10)
    snaps = args.snapshots or ([4, 8] if q else [50, 150, 300])
    cont = args.continue_steps or (4 if q else 100)
    n_eval = args.eval_videos or (16 if q else 256)
    extra = (QUICK_SETS if q else []) + args.sets
    meta = provenance()
    started = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        # 1. the MAE run: norms every `every` steps, snapshots kept
        base = trainer_for(tmp / "mae", "mae", steps, extra)
        max_l = base.config.model.depth - base.config.model.decoder_depth - 1
        frozen = sorted(set(args.frozen)) if args.frozen else list(range(max_l + 1))
        if frozen[0] != 0 or frozen[-1] > max_l:
            print(f"--frozen: must hold 0 (the MAE branch) and stay within 0..{max_l}", file=sys.stderr)
            return 2
        evalset = eval_set(base.config, n_eval)
        names = [n for n, _ in units(base.model)]
        prev = {n: flat(ps) for n, ps in units(base.model)}
        curves: list[dict[str, Any]] = []
        snapshots: dict[int, dict[str, torch.Tensor]] = {}
        for step, video in enumerate(batches(base, 0, steps), start=1):
            base.train_step(video)
            if step % every == 0 or step == steps:
                row: dict[str, Any] = {"step": step}
                for n, ps in units(base.model):
                    now = flat(ps)
                    row[f"norm/{n}"] = float(now.norm())
                    row[f"rel_update/{n}"] = float((now - prev[n]).norm() / now.norm().clamp_min(1e-12))
                    prev[n] = now
                curves.append(row)
            if step in snaps:
                snapshots[step] = copy.deepcopy(base.model.state_dict())
        mae_final = held_out_loss(base.model, evalset)
        print(f"layer_dynamics: MAE {steps} steps, held-out loss {mae_final:.4f}", flush=True)

        # 2. branches: freeze L blocks at snapshot s, continue `cont` steps on the batches s..s+cont
        grid: list[dict[str, Any]] = []
        for s in sorted(snapshots):
            for L in frozen:
                br = trainer_for(tmp / f"s{s}-L{L}", "freeze-only" if L else "mae", cont, extra, frozen=L)
                br.model.load_state_dict(snapshots[s])
                at_snapshot = held_out_loss(br.model, evalset)
                for video in batches(br, s, s + cont):
                    br.train_step(video)
                assert br.layerlock.plan.num_frozen == L
                final = held_out_loss(br.model, evalset)
                grid.append({"snapshot": s, "frozen": L, "loss_at_snapshot": at_snapshot, "final_loss": final})
                print(f"  snapshot {s:>5}, L={L}: held-out loss {at_snapshot:.4f} -> {final:.4f}", flush=True)

    payload = {"study": "layer_dynamics", "provenance": meta, "mae_steps": steps, "every": every,
               "continue_steps": cont, "eval_videos": n_eval, "extra_overrides": extra, "units": names,
               "mae_final_held_out_loss": mae_final, "norm_curves": curves, "convergence": grid,
               "wall_s": round(time.perf_counter() - started, 1)}
    out = Path(args.results_dir)
    write_json(out / f"layer_dynamics{suffix}.json", payload)
    plot_norms(curves, names, out / f"param_norms{suffix}.png")
    plot_convergence(grid, out / f"layer_convergence{suffix}.png")
    md = markdown(payload)
    (out / f"layer_dynamics{suffix}.md").write_text(md)
    print(md)
    return 0


def plot_norms(curves: list[dict[str, Any]], names: list[str], path: Path) -> Path:
    fig = figure(12, 4.5)
    ax_n, ax_u = fig.subplots(1, 2)
    steps = [r["step"] for r in curves]
    cmap = __import__("matplotlib").colormaps["viridis"]
    for i, n in enumerate(names):
        c = cmap(i / max(1, len(names) - 1))
        first = curves[0][f"norm/{n}"]
        ax_n.plot(steps, [r[f"norm/{n}"] / first for r in curves], color=c, label=n)
        ax_u.plot(steps, [r[f"rel_update/{n}"] for r in curves], color=c, label=n)
    ax_n.set_title("parameter norm / its first record")
    ax_u.set_title("relative update per record interval")
    ax_u.set_yscale("log")
    for ax in (ax_n, ax_u):
        ax.set_xlabel("MAE step")
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_convergence(grid: list[dict[str, Any]], path: Path) -> Path:
    fig = figure(7, 4.5)
    ax = fig.subplots()
    for s in sorted({g["snapshot"] for g in grid}):
        pts = [(g["frozen"], g["final_loss"]) for g in grid if g["snapshot"] == s]
        ax.plot(*zip(*pts), "o-", label=f"frozen at step {s}")
    ax.set_xlabel("blocks frozen L (stem + blocks 1..L)")
    ax.set_ylabel("held-out pixel loss after continuing")
    ax.set_title("Layer convergence: freeze the first L blocks at step s, continue")
    ax.legend()
    return save_figure(fig, path)


def markdown(payload: dict[str, Any]) -> str:
    meta = payload["provenance"]
    grid = payload["convergence"]
    ls = sorted({g["frozen"] for g in grid})
    lines = [f"MAE {payload['mae_steps']} steps (held-out pixel loss {payload['mae_final_held_out_loss']:.4f}); each branch "
             f"continues {payload['continue_steps']} steps. Held-out pixel loss after continuing "
             f"({payload['eval_videos']} test clips, fixed masks):", "",
             "| frozen at step | " + " | ".join(f"L={L}" for L in ls) + " | loss at snapshot |",
             "|---" * (len(ls) + 2) + "|"]
    for s in sorted({g["snapshot"] for g in grid}):
        row = {g["frozen"]: g for g in grid if g["snapshot"] == s}
        lines.append(f"| {s} | " + " | ".join(f"{row[L]['final_loss']:.4f}" for L in ls)
                     + f" | {row[0]['loss_at_snapshot']:.4f} |")
    last = payload["norm_curves"][-1]
    lines += ["", "Relative update over the last record interval, per unit: "
              + ", ".join(f"{n} {last[f'rel_update/{n}']:.2e}" for n in payload["units"]), "",
              f"{meta['machine']}, torch {meta['torch']}, {meta['date_utc']}, {payload['wall_s']:.0f} s. "
              f"Command: `{meta['command']}`"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
