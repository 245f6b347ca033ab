"""Step time and training memory per strategy (none / ddp / fsdp) and frozen depth, side by side.

For each strategy this builds the reference trainer (model, wrapping, AdamW, LayerLock) with a fixed
frozen depth from step 0 (``freeze-only``: pixel targets, so only the freezing differs; depth 0 is the
MAE baseline) and times a few optimizer steps. ``ddp`` and ``fsdp`` run in 2 CPU processes (gloo) from
one torchrun launch of this file; ``none`` in this process. Ratios are against the unfrozen run of the
same strategy, measured in the same invocation.

Memory: on a GPU, ``torch.cuda.max_memory_allocated``. On a CPU there is no allocator peak to read, so
the script counts what training holds per process, exactly, from the live tensors: parameters +
gradients (one per trainable parameter) + optimizer state + the activations autograd saved for backward
in one step (a saved_tensors_hooks tally, unique storages). That is the memory LayerLock's freezing
can save; the interpreter and libraries (the rest of the RSS) are left out and reported separately.

    python benchmarks/strategies.py --quick       # ~minutes on 2 CPU cores
    python benchmarks/strategies.py               # more steps
Writes benchmarks/results/strategies.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import RESULTS, provenance, write_json  # noqa: E402  (also honours LAYERLOCK_SRC)

import torch  # noqa: E402

# 15 blocks, the last 3 decode: depths 0, 5 (1/3 of the model) and 10 (2/3, the paper's ViT-G ratio 32/48).
MODEL = ["model.embed_dim=192", "model.depth=15", "model.decoder_depth=3", "model.num_heads=3",
         "model.img_size=64", "model.num_frames=16", "model.tubelet=[2,16,16]", "model.mask_ratio=0.75"]
DEPTHS = (0, 5, 10)


def _config(strategy: str, depth: int, steps: int, batch: int, out: Path):
    from layerlock_plugin.reference.config import load_config

    method = "mae" if depth == 0 else "freeze-only"
    sched = [f"schedule.pixel_steps=0", f"schedule.jump={max(depth, 1)}", f"schedule.max_frozen={max(depth, 1)}",
             "schedule.interval=1000000"]
    return load_config(None, [f"out_dir={out}", f"method={method}", *MODEL, *sched, f"train.steps={steps}",
                              f"train.batch_size={batch}", f"train.strategy={strategy}", "train.progress=false",
                              "data.num_videos=8", "probe.enabled=false", "optim.warmup_steps=1",
                              "guard.policy='off'"])


def _local_bytes(t: torch.Tensor) -> int:
    t = getattr(t, "_local_tensor", t)  # a DTensor's shard on this rank
    return t.numel() * t.element_size()


def measure(strategy: str, depth: int, steps: int, batch: int, out: Path) -> dict:
    """Train ``steps`` steps at a fixed frozen depth; time the last ones; count training memory."""
    from layerlock_plugin.reference.train import Trainer

    trainer = Trainer(_config(strategy, depth, steps, batch, out / f"{strategy}_{depth}"), overwrite=True,
                      echo=lambda s: None)
    cfg = trainer.config.model
    local = batch // trainer.env.world_size
    g = torch.Generator().manual_seed(0)
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor):
        # Weights saved for backward are parameters (or views of them), counted once in params_mb; under
        # FSDP2 they are the all-gathered copies, freed after each block, so they are not activations.
        base = t._base if t._base is not None else t
        if base.is_leaf and base.requires_grad:
            return t
        try:
            key = t.untyped_storage().data_ptr()
            saved[key] = max(saved.get(key, 0), t.untyped_storage().nbytes())
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. DTensor wrappers)
            pass
        return t

    times, saved_bytes = [], 0
    dev = trainer.device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for i in range(steps):
        video = torch.rand(local, cfg.in_chans, cfg.num_frames, cfg.img_size, cfg.img_size, generator=g).to(dev)
        saved.clear()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            trainer.train_step(video)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
        saved_bytes = max(saved_bytes, sum(saved.values()))
    assert trainer.layerlock.plan.num_frozen == depth
    params = list(trainer.model.parameters())
    param_b = sum(_local_bytes(p) for p in params)
    grad_b = sum(_local_bytes(p) for p in params if p.requires_grad)
    optim_b = sum(_local_bytes(v) for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    warm = times[max(1, steps // 2):]  # skip the first steps (allocation, DDP build, thread pools)
    row = {"strategy": strategy, "frozen": depth, "depth": cfg.depth, "world_size": trainer.env.world_size,
           "step_s": sum(warm) / len(warm), "params_mb": param_b / 2**20, "grads_mb": grad_b / 2**20,
           "optimizer_mb": optim_b / 2**20, "activations_mb": saved_bytes / 2**20}
    row["training_mb"] = row["params_mb"] + row["grads_mb"] + row["optimizer_mb"] + row["activations_mb"]
    if dev.type == "cuda":
        row["cuda_peak_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return row


def worker(out: Path, steps: int, batch: int) -> None:
    """torchrun entry: ddp and fsdp at every depth in one process group; rank 0 writes the rows."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rows = [measure(s, d, steps, batch, out) for s in ("ddp", "fsdp") for d in DEPTHS]
    # per-process numbers; every rank holds the same amounts (equal shards), report rank 0's
    if dist.get_rank() == 0:
        (out / "dist_rows.json").write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


def add_ratios(rows: list[dict]) -> None:
    for r in rows:
        base = next(b for b in rows if b["strategy"] == r["strategy"] and b["frozen"] == 0)
        r["step_time_ratio"] = r["step_s"] / base["step_s"]
        r["training_memory_ratio"] = r["training_mb"] / base["training_mb"]
        if "cuda_peak_mb" in r:
            r["cuda_peak_ratio"] = r["cuda_peak_mb"] / base["cuda_peak_mb"]


def markdown(rows: list[dict], prov: dict) -> str:
    lines = ["# Strategies x frozen depth: step time and training memory", "",
             f"Machine: {prov['machine']}; torch {prov['torch']}; {prov['date_utc']}; command `{prov['command']}`.",
             "Model: 15 blocks (last 3 decode), width 192, 16x64x64 clips (128 tokens, 75% masked); pixel targets "
             "(`mae` at depth 0, `freeze-only` otherwise) so only the freezing differs. Memory per process = "
             "parameters + gradients + optimizer state + activations saved for backward (counted from the live "
             "tensors; CPU has no allocator peak). Ratios are against depth 0 of the same strategy, same run.", "",
             "| strategy | procs | frozen | step s | step-time ratio | params MB | grads MB | optim MB | activ. MB | "
             "training MB | memory ratio |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['strategy']} | {r['world_size']} | {r['frozen']}/{r['depth']} | {r['step_s']:.3f} | "
                     f"{r['step_time_ratio']:.3f} | {r['params_mb']:.1f} | {r['grads_mb']:.1f} | {r['optimizer_mb']:.1f} | "
                     f"{r['activations_mb']:.1f} | {r['training_mb']:.1f} | {r['training_memory_ratio']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="few steps (CI-sized)")
    p.add_argument("--out", default="/tmp/layerlock_strategies")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int)
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args()
    steps = args.steps or (6 if args.quick else 20)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.worker:
        worker(out, steps, args.batch)
        return 0
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))  # the same cores per process as each torchrun rank
    rows = [measure("none", d, steps, args.batch, out) for d in DEPTHS]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // 2)), "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, "--worker",
           "--out", str(out), "--steps", str(steps), "--batch", str(args.batch)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).parent)
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        return 1
    rows += json.loads((out / "dist_rows.json").read_text())
    add_ratios(rows)
    prov = provenance()
    print(markdown(rows, prov))
    write_json(RESULTS / "strategies.json", {"provenance": prov, "steps": steps, "batch": args.batch, "rows": rows})
    (RESULTS / "strategies.md").write_text(markdown(rows, prov))
    return 0


if __name__ == "__main__":
    sys.exit(main())
