"""The device check: the reference trainer's GPU path proven in one short run (one GPU, <= 8 minutes).

    python benchmarks/gpu_check.py                 # on a machine with one CUDA GPU (H100 / H200 / A100 ...)
    python benchmarks/gpu_check.py --device cpu    # the same checks end to end on CPU with tiny models (CI)

Parts (each a subprocess, so a failure in one is reported and the others still run):

1. ``train``: ``torchrun --nproc_per_node=1`` (NCCL on GPU, gloo on CPU), ``ddp`` and ``fsdp``, bf16 autocast
   on GPU, activation checkpointing, a ViT-B-sized video model (tiny on CPU), across 3 freeze events and
   target switches: finite losses, frozen blocks bitwise unchanged after their event and without optimizer
   state, every collective's tensor on the training device (recorded), the device checked for syncs
   (``torch.cuda.set_sync_debug_mode("warn")`` counts the warnings of the steps between log steps).
2. ``resume``: the same run stopped after the second event and resumed from its DCP checkpoint, against the
   uninterrupted run: bitwise equal weights, or the max difference reported.
3. ``compile``: ``train.compile=true`` across the events, compiled graphs counted (``torch._dynamo``
   counters): at most one recompile per block per freeze event. Skipped on CPU (minutes of compile time).
4. ``efficiency``: a ViT-L-shaped model in bf16 at frozen depths k = 0, 1/3, 2/3 of the encoder, with and
   without the target cost knobs (``target.loss_fraction=0.05``, ``target.context=sparse``): step time,
   clips/s, tokens/s, MFU (peak from the card), ``max_memory_allocated``, and the ratios against k = 0
   beside the analytic FLOP ratio. Targets: pixel-phase MFU >= 45%, peak-memory saving at 2/3 frozen
   >= 32%, step-time ratio within 5% of the FLOP ratio.

Results: ``benchmarks/results/gpu_check[-TAG].json`` and ``.md`` (the card's name, versions, date, commit).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import provenance  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
EVENTS = [  # 3 freeze events, each a target switch
    "schedule.pixel_steps=6", "schedule.interval=4", "schedule.max_frozen=3", "warmup.steps=3",
    "optim.warmup_steps=3", "guard.every=2", "probe.enabled=false", "train.progress=false",
    "train.log_every=4", "train.tensorboard=false", "train.ckpt_every=1000",
]
STEPS, STOP = 16, 11  # events at 6, 10, 14; the resume part stops after the event at 10
GPU_MODEL = ["model.preset=base", "model.decoder_depth=4", "model.num_frames=8", "model.img_size=160",
             "train.batch_size=8", "data.num_videos=64"]  # ViT-B width/depth, a shorter clip
CPU_MODEL = ["data.num_videos=32", "train.batch_size=4", "train.threads=1"]
GPU_EFFICIENCY = ["model.preset=large", "model.decoder_depth=4", "train.batch_size=8", "data.num_videos=8"]
CPU_EFFICIENCY = ["data.num_videos=4", "train.batch_size=4", "train.threads=1"]


def _sets(device: str, *extra: str) -> list[str]:
    model = GPU_MODEL if device == "cuda" else CPU_MODEL
    precision = "bf16" if device == "cuda" else "fp32"
    return [*model, *EVENTS, f"train.device={device}", f"train.precision={precision}", f"train.steps={STEPS}", *extra]


# ------------------------------------------------------------------------------ worker parts (under torchrun)
def _full_params(model) -> dict:
    import torch

    out = {}
    for name, p in model.named_parameters():
        t = p.detach()
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        out[name] = t.float().cpu().clone()
    return out


def _record_collectives(devices: list[str]) -> None:
    """Wrap torch.distributed's collectives: each call records the device of its tensor."""
    import torch
    import torch.distributed as dist

    for name in ("all_reduce", "broadcast", "all_gather", "reduce_scatter", "all_gather_into_tensor",
                 "reduce_scatter_tensor"):
        original = getattr(dist, name)

        def recorded(*args, _original=original, **kwargs):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            devices.extend(str(t.device.type) for t in tensors[:1])
            return _original(*args, **kwargs)

        setattr(dist, name, recorded)


def worker_train(out: Path, device: str, strategy: str) -> dict[str, Any]:
    import torch

    from layerlock_plugin.reference.config import load_config
    from layerlock_plugin.reference.train import Trainer

    devices: list[str] = []
    _record_collectives(devices)
    extra = [f"train.strategy={strategy}", "train.activation_checkpointing=true"]
    trainer = Trainer(load_config(None, [f"out_dir={out / strategy}", *_sets(device, *extra)]), echo=lambda s: None)
    trainer.fit(stop_after=7)  # first freeze at step 6
    frozen = [n for n, p in trainer.model.named_parameters() if not p.requires_grad and not n.startswith("readouts.")]
    before = _full_params(trainer.model)
    sync_warnings = 0
    if device == "cuda":
        import warnings

        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):  # steps 7, 9, 10: no log step (log_every 4), guard policy warn
                trainer.train_step(trainer.dataset[0]["video"].unsqueeze(0).repeat(
                    trainer.micro_batch * trainer.config.train.grad_accum, 1, 1, 1, 1).to(trainer.device))
            sync_warnings = sum("synchroniz" in str(w.message) for w in caught)
        torch.cuda.set_sync_debug_mode(0)
        trainer = Trainer(load_config(None, [f"out_dir={out / (strategy + '_b')}", *_sets(device, *extra)]),
                          echo=lambda s: None)
        trainer.fit(stop_after=7)
        before = _full_params(trainer.model)
    trainer.fit()
    after = _full_params(trainer.model)
    frozen_ids = {id(p) for n, p in trainer.model.named_parameters() if n in frozen}
    losses = [json.loads(x)["loss"] for x in (Path(trainer.out) / "metrics.jsonl").read_text().splitlines()]
    return {"strategy": strategy, "frozen": frozen, "losses": losses,
            "losses_finite": all(x == x and abs(x) < float("inf") for x in losses),
            "frozen_unchanged": all(torch.equal(before[n], after[n]) for n in frozen),
            "frozen_state_free": not any(id(p) in frozen_ids for p in trainer.optimizer.state),
            "collective_devices": sorted(set(devices)), "training_device": trainer.device.type,
            "sync_warnings_between_log_steps_per_3_steps": sync_warnings,
            "peak_mem_gb": None if device != "cuda" else torch.cuda.max_memory_allocated() / 2**30}


def worker_resume(out: Path, device: str) -> dict[str, Any]:
    import torch

    from layerlock_plugin.reference.config import load_config
    from layerlock_plugin.reference.train import Trainer

    sets = _sets(device, "train.strategy=fsdp")
    full = Trainer(load_config(None, [f"out_dir={out / 'full'}", *sets]), echo=lambda s: None)
    full.fit()
    part = Trainer(load_config(None, [f"out_dir={out / 'part'}", *sets]), echo=lambda s: None)
    part.fit(stop_after=STOP)
    resumed = Trainer(load_config(None, [f"out_dir={out / 'part'}", *sets]), resume=out / "part", echo=lambda s: None)
    resumed.fit()
    a, b = _full_params(full.model), _full_params(resumed.model)
    return {"bitwise_equal": all(torch.equal(a[n], b[n]) for n in a),
            "max_abs_diff": max(float((a[n] - b[n]).abs().max()) for n in a), "resumed_at": STOP}


def worker_compile(out: Path, device: str) -> dict[str, Any]:
    import torch._dynamo

    from layerlock_plugin.reference.config import load_config
    from layerlock_plugin.reference.train import Trainer

    torch._dynamo.reset()
    trainer = Trainer(load_config(None, [f"out_dir={out / 'compile'}", *_sets(device, "train.compile=true")]),
                      echo=lambda s: None)
    graphs = []
    for stop in (6, 10, 14, STEPS):  # before the first event, then after each of the 3 events
        trainer.fit(stop_after=stop)
        graphs.append(int(torch._dynamo.utils.counters["stats"]["unique_graphs"]))
    blocks = trainer.config.model.depth
    per_event = [(b - a) / blocks for a, b in zip(graphs, graphs[1:])]
    return {"unique_graphs_after": dict(zip(["6", "10", "14", str(STEPS)], graphs)),
            "recompiles_per_block_per_event": per_event, "at_most_one_per_event": all(x <= 1 for x in per_event)}


def worker_efficiency(out: Path, device: str, steps: int) -> dict[str, Any]:
    import torch

    from layerlock_plugin.reference.config import load_config
    from layerlock_plugin.reference.dryrun import step_flops
    from layerlock_plugin.reference.train.throughput import device_peak_tflops
    from layerlock_plugin.reference.train import Trainer

    model = GPU_EFFICIENCY if device == "cuda" else CPU_EFFICIENCY
    precision = "bf16" if device == "cuda" else "fp32"
    probe = load_config(None, model)
    enc = probe.model.depth - probe.model.decoder_depth
    depths = sorted({0, enc // 3, (2 * enc) // 3})
    rows = []
    for knobs in ([], ["target.loss_fraction=0.05", "target.context=sparse"]):
        for k in depths:
            sched = ["schedule.pixel_steps=1000000"] if k == 0 else ["schedule.pixel_steps=1", "schedule.interval=1",
                                                                     f"schedule.max_frozen={k}"]
            cfg = load_config(None, [f"out_dir={out / f'eff-{k}-{len(knobs)}'}", *model, *sched, *knobs,
                                     "warmup.steps=0", "probe.enabled=false", f"train.device={device}",
                                     f"train.precision={precision}", "train.steps=1000", "guard.policy=off",
                                     "train.tensorboard=false"])
            trainer = Trainer(cfg, echo=lambda s: None)
            video = torch.stack([trainer.dataset[i % len(trainer.dataset)]["video"]
                                 for i in range(cfg.train.batch_size)]).to(trainer.device)
            for _ in range(k + 2):  # reach depth k (one event per step), then warm up
                trainer.train_step(video)
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            for _ in range(steps):
                trainer.train_step(video)
            if device == "cuda":
                torch.cuda.synchronize()
            dt = (time.perf_counter() - started) / steps
            plan = trainer.layerlock.plan
            flops = step_flops(cfg.model, plan.num_frozen, trainer.layerlock.target_layers(plan),
                               cfg.target.loss_fraction, plan.stem_frozen, cfg.target.context)["total"]
            peak = device_peak_tflops(trainer.device)
            rows.append({"knobs": bool(knobs), "k": plan.num_frozen, "step_s": dt,
                         "clips_per_s": cfg.train.batch_size / dt,
                         "tokens_per_s": cfg.train.batch_size * trainer.model.num_patches / dt,
                         "flops_per_clip": flops, "mfu": flops * cfg.train.batch_size / dt / (peak * 1e12) if peak else None,
                         "max_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None})
            del trainer
            if device == "cuda":
                torch.cuda.empty_cache()
    base = {knobs: next(r for r in rows if r["k"] == 0 and r["knobs"] == knobs) for knobs in (False, True)}
    for r in rows:
        b = base[r["knobs"]]
        r["time_ratio"] = r["step_s"] / b["step_s"]
        r["flop_ratio"] = r["flops_per_clip"] / b["flops_per_clip"]
        r["memory_ratio"] = None if r["max_memory_gb"] is None else r["max_memory_gb"] / b["max_memory_gb"]
    return {"model": model, "encoder_blocks": enc, "rows": rows}


def _worker(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("part")
    p.add_argument("out")
    p.add_argument("--device", required=True)
    p.add_argument("--steps", type=int, default=10)
    a = p.parse_args(argv)
    import torch.distributed as dist

    out = Path(a.out)
    if a.part == "train":
        result = {s: worker_train(out, a.device, s) for s in ("ddp", "fsdp")}
    elif a.part == "resume":
        result = worker_resume(out, a.device)
    elif a.part == "compile":
        result = worker_compile(out, a.device)
    else:
        result = worker_efficiency(out, a.device, a.steps)
    if not dist.is_initialized() or dist.get_rank() == 0:
        (out / f"{a.part}.json").write_text(json.dumps(result, indent=2))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


# ------------------------------------------------------------------------------ the orchestrator
def _launch(part: str, out: Path, device: str, timeout: float, steps: int) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    if part == "efficiency":  # one process, no process group needed
        launcher = [sys.executable]
    cmd = [*launcher, __file__, "--worker", part, str(out), "--device", device, "--steps", str(steps)]
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    result: dict[str, Any] = {"seconds": round(time.perf_counter() - started, 1)}
    if proc.returncode != 0 or not (out / f"{part}.json").is_file():
        return {**result, "ok": False, "error": (proc.stderr or proc.stdout)[-2000:]}
    return {**result, "ok": True, **json.loads((out / f"{part}.json").read_text())}


def verdicts(results: dict[str, Any]) -> dict[str, bool | None]:
    """The checks, each True / False, or None where the part did not run."""
    out: dict[str, bool | None] = {}
    train = results.get("train", {})
    if train.get("ok"):
        for s in ("ddp", "fsdp"):
            t = train[s]
            out[f"{s}: finite loss, frozen unchanged, no optimizer state"] = (
                t["losses_finite"] and t["frozen_unchanged"] and t["frozen_state_free"] and bool(t["frozen"]))
            out[f"{s}: every collective on the training device"] = set(t["collective_devices"]) == {t["training_device"]}
    resume = results.get("resume", {})
    out["resume after a freeze event is bitwise"] = resume.get("bitwise_equal") if resume.get("ok") else None
    comp = results.get("compile", {})
    out["compile: <= 1 recompile per block per event"] = comp.get("at_most_one_per_event") if comp.get("ok") else None
    eff = results.get("efficiency", {})
    if eff.get("ok") and eff["rows"][0]["mfu"] is not None:
        rows = eff["rows"]
        deepest = max(r["k"] for r in rows)
        plain = [r for r in rows if not r["knobs"]]
        out["pixel-phase MFU >= 45%"] = next(r for r in plain if r["k"] == 0)["mfu"] >= 0.45
        d = next(r for r in plain if r["k"] == deepest)
        out["peak-memory saving at 2/3 frozen >= 32%"] = d["memory_ratio"] <= 0.68
        out["step-time ratio within 5% of the FLOP ratio"] = all(abs(r["time_ratio"] / r["flop_ratio"] - 1) <= 0.05
                                                                for r in rows)
    return out


def markdown(payload: dict[str, Any]) -> str:
    m = payload["meta"]
    lines = [f"Device check on **{payload['card']}** ({payload['device']}), torch {m['torch']}, {m['date_utc']}, "
             f"{m['layerlock_plugin']}. Command: `{m['command']}`.", "", "| check | result |", "|---|---|"]
    for name, ok in payload["verdicts"].items():
        lines.append(f"| {name} | {'not run' if ok is None else ('yes' if ok else '**no**')} |")
    for part in ("train", "resume", "compile", "efficiency"):
        r = payload["results"].get(part, {})
        if not r.get("ok"):
            lines.append(f"\n{part}: did not run or failed: `{str(r.get('error', 'skipped'))[-300:]}`")
    resume = payload["results"].get("resume", {})
    if resume.get("ok"):
        lines.append(f"\nResume (fsdp, stopped after step {resume['resumed_at']}): bitwise {resume['bitwise_equal']}, "
                     f"max |difference| {resume['max_abs_diff']:.3g}.")
    eff = payload["results"].get("efficiency", {})
    if eff.get("ok"):
        lines += ["", "| knobs | frozen k | step s | clips/s | tokens/s | MFU | max memory GB | time ratio | FLOP ratio | memory ratio |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        fmt = lambda x, f: "n/a" if x is None else format(x, f)  # noqa: E731
        for r in eff["rows"]:
            lines.append(f"| {'q5%+sparse' if r['knobs'] else 'none'} | {r['k']} | {r['step_s']:.4f} | {r['clips_per_s']:.1f} | "
                         f"{r['tokens_per_s']:.0f} | {fmt(r['mfu'], '.3f')} | {fmt(r['max_memory_gb'], '.2f')} | "
                         f"{r['time_ratio']:.3f} | {r['flop_ratio']:.3f} | {fmt(r['memory_ratio'], '.3f')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--worker":
        return _worker(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    p.add_argument("--parts", nargs="+", default=["train", "resume", "compile", "efficiency"],
                   choices=["train", "resume", "compile", "efficiency"])
    p.add_argument("--steps", type=int, default=None, help="timed steps per efficiency point (default 20 GPU, 2 CPU)")
    p.add_argument("--tag", default="")
    p.add_argument("--results-dir", default=str(RESULTS))
    args = p.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    card = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    steps = args.steps or (20 if device == "cuda" else 2)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for part in args.parts:
            if part == "compile" and device == "cpu":
                results[part] = {"ok": False, "error": "skipped on CPU (compiling takes minutes there)"}
                continue
            out = Path(tmp) / part
            out.mkdir()
            print(f"[gpu_check] {part} on {card} ...", flush=True)
            results[part] = _launch(part, out, device, timeout=420 if device == "cuda" else 600, steps=steps)
            print(f"[gpu_check] {part}: {'ok' if results[part]['ok'] else 'FAILED'} "
                  f"({results[part].get('seconds', '?')} s)", flush=True)
    payload = {"meta": provenance(["benchmarks/gpu_check.py", *argv]), "card": card, "device": device, "results": results,
               "verdicts": verdicts(results)}
    folder = Path(args.results_dir)
    folder.mkdir(parents=True, exist_ok=True)
    name = "gpu_check" + (f"-{args.tag}" if args.tag else "")
    (folder / f"{name}.json").write_text(json.dumps(payload, indent=2))
    (folder / f"{name}.md").write_text(markdown(payload))
    print(markdown(payload))
    failed = [n for n, ok in payload["verdicts"].items() if ok is False]
    runs_failed = [p for p, r in results.items() if not r.get("ok") and not str(r.get("error", "")).startswith("skipped")]
    return 1 if (failed or runs_failed) and device == "cuda" else (1 if runs_failed else 0)


if __name__ == "__main__":
    sys.exit(main())
