"""The device check's parts, each run in its own process by ``gpu_check.py`` (under ``torchrun`` where it
needs a process group). Not a study of its own: see ``gpu_check.py`` for what is checked and why.

A worker writes ``<out>/<part>.json`` after every finished piece (a part stopped by its timeout keeps
what it finished) and, when a piece fails, that piece's Python traceback in its entry, so the report
says what broke, not only that the launcher's child failed.

    python benchmarks/gpu_check_workers.py PART OUT --device cuda|cpu [--steps N]
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import logging
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(ROOT),) if p not in sys.path]  # a plain checkout: nothing installed

import torch  # noqa: E402

EVENTS = [  # 3 freeze events, each a target switch
    "schedule.pixel_steps=6", "schedule.interval=4", "schedule.max_frozen=3", "warmup.steps=3",
    "optim.warmup_steps=3", "guard.every=2", "probe.enabled=false", "train.progress=false",
    "train.log_every=4", "train.tensorboard=false", "train.ckpt_every=1000",
]
STEPS, STOP = 16, 11  # events at 6, 10, 14; the resume part stops after the event at 10
GPU_MODEL = ["model.preset=base", "model.decoder_depth=4", "model.num_frames=8", "model.img_size=160",
             "model.mask_ratio=0.95", "train.batch_size=8", "data.num_videos=64"]  # ViT-B width/depth, a shorter clip
CPU_MODEL = ["data.num_videos=32", "train.batch_size=4", "train.threads=1"]
# ViT-L (24 blocks, the last 4 decode) on 16x224x224 clips at the packaged 95% masking
GPU_EFFICIENCY = ["model.preset=large", "model.decoder_depth=4", "model.mask_ratio=0.95", "data.num_videos=8"]
CPU_EFFICIENCY = ["data.num_videos=4", "train.threads=1"]
# batch sizes of the efficiency rows: a small one (memory rows) and one sized so that a step is compute-bound
GPU_BATCHES, CPU_BATCHES = {"small": 8, "compute": 64}, {"small": 4, "compute": 8}
KNOBS = ["target.loss_fraction=0.05", "target.context=sparse"]
PIXEL_STEPS = 1000  # efficiency/compile rows: pixels before this step, then one more frozen block per step


def sets(device: str, *extra: str) -> list[str]:
    model = GPU_MODEL if device == "cuda" else CPU_MODEL
    precision = "bf16" if device == "cuda" else "fp32"
    return [*model, *EVENTS, f"train.device={device}", f"train.precision={precision}", f"train.steps={STEPS}", *extra]


# ------------------------------------------------------------------------------ shared helpers
def quiet(_line: str) -> None:
    return None


def error_entry() -> dict[str, Any]:
    return {"ok": False, "error": traceback.format_exc()[-4000:]}


def clean_memory(device: str) -> float | None:
    """Collect garbage (trainers hold reference cycles) and return the allocator's bytes in use as a
    baseline, the peak counter reset; None on the CPU (no allocator to read)."""
    gc.collect()
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return float(torch.cuda.memory_allocated())


def full_params(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        t = p.detach()
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        out[name] = t.float().cpu().clone()
    return out


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def record_collectives(devices: list[str]) -> None:
    """Wrap torch.distributed's collectives: each call records the device of its tensor."""
    import torch.distributed as dist

    for name in ("all_reduce", "broadcast", "all_gather", "reduce_scatter", "all_gather_into_tensor",
                 "reduce_scatter_tensor"):
        original = getattr(dist, name)

        def recorded(*args, _original=original, **kwargs):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            devices.extend(str(t.device.type) for t in tensors[:1])
            return _original(*args, **kwargs)

        setattr(dist, name, recorded)


@functools.lru_cache(maxsize=2)
def _rendered(data_config):
    from layerlock_plugin.reference.train import trainer as trainer_module

    return trainer_module.DigitsVideoDataset(data_config, split="train", cache=True)


def render_data_once() -> None:
    """Trainers of this process share one rendered dataset per data config (rendering ViT-L-sized clips
    is seconds of numpy per trainer otherwise)."""
    from layerlock_plugin.reference.train import trainer as trainer_module

    original = trainer_module.build_dataset

    def shared(config, split="train", env=None):
        if config.data_source == "digits" and split == "train":
            return _rendered(config.data)
        return original(config, split, env)

    trainer_module.build_dataset = shared


def trainer_for(out: Path, sets_: list[str]):
    from layerlock_plugin.reference.config import load_config
    from layerlock_plugin.reference.train import Trainer

    return Trainer(load_config(None, [f"out_dir={out}", *sets_]), echo=quiet)


def jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


class SyncCounter:
    """Counts ``torch.cuda.set_sync_debug_mode("warn")`` warnings inside each training step (and the
    loader's ``next``) of a trainer, apart from those at log rows and checkpoints."""

    def __init__(self, trainer):
        self.per_step: list[int] = []
        self.outside = 0
        self._caught: list[warnings.WarningMessage] = []
        step, wait = trainer.train_step, trainer.throughput.wait_for

        def counted(call: Callable, *args):
            before = self._syncs()
            out = call(*args)
            return out, self._syncs() - before

        def train_step(video):
            out, n = counted(step, video)
            self.per_step.append(n + self._pending_wait)
            self._pending_wait = 0
            return out

        def wait_for(batches):
            out, n = counted(wait, batches)
            self._pending_wait += n
            return out

        self._pending_wait = 0
        trainer.train_step, trainer.throughput.wait_for = train_step, wait_for

    def _syncs(self) -> int:
        return sum("synchroniz" in str(w.message) for w in self._caught)

    def run(self, fn: Callable[[], Any]) -> Any:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self._caught = caught
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return fn()
            finally:
                torch.cuda.set_sync_debug_mode(0)
                self.outside = self._syncs() - sum(self.per_step)


# ------------------------------------------------------------------------------ part: train
def train_one(out: Path, device: str, strategy: str) -> dict[str, Any]:
    devices: list[str] = []
    record_collectives(devices)
    base = clean_memory(device)
    trainer = trainer_for(out / strategy, sets(device, f"train.strategy={strategy}",
                                               "train.activation_checkpointing=true"))
    trainer.fit(stop_after=7)  # first freeze at step 6
    frozen = [n for n, p in trainer.model.named_parameters() if not p.requires_grad and not n.startswith("readouts.")]
    before = full_params(trainer.model)
    first_step = trainer.step
    events = {e["step"] for e in jsonl(trainer.out / "events.jsonl")} | {10, 14}
    syncs: dict[str, Any] = {"measured": False}
    if device == "cuda":
        counter = SyncCounter(trainer)
        counter.run(trainer.fit)
        per_step = {str(s): n for s, n in zip(range(first_step, STEPS), counter.per_step)}
        syncs = {"measured": True, "per_step": per_step, "at_log_rows_and_checkpoints": counter.outside,
                 "steps_without_event": [s for s in range(first_step, STEPS) if s not in events]}
    else:
        trainer.fit()
    after = full_params(trainer.model)
    frozen_ids = {id(p) for n, p in trainer.model.named_parameters() if n in frozen}
    losses = [r["loss"] for r in jsonl(trainer.out / "metrics.jsonl")]
    speed = jsonl(trainer.out / "throughput.jsonl")
    result = {"ok": True, "frozen": frozen, "losses": losses,
              "losses_finite": all(x == x and abs(x) < float("inf") for x in losses),
              "frozen_unchanged": all(torch.equal(before[n], after[n]) for n in frozen),
              "frozen_state_free": not any(id(p) in frozen_ids for p in trainer.optimizer.state),
              "collective_devices": sorted(set(devices)), "training_device": trainer.device.type,
              "host_syncs": syncs, "throughput": speed,
              "data_wait_frac_max": max((r.get("data_wait_frac") or 0.0) for r in speed) if speed else None,
              "peak_mem_gb": None if base is None else (torch.cuda.max_memory_allocated() - base) / 2**30}
    del trainer
    clean_memory(device)
    return result


def part_train(out: Path, device: str, save: Callable[[dict], None], **_: Any) -> None:
    render_data_once()
    result: dict[str, Any] = {}
    for strategy in ("ddp", "fsdp"):  # each on its own: one failing keeps the other's result
        try:
            result[strategy] = train_one(out, device, strategy)
        except Exception:
            result[strategy] = error_entry()
        save(result)


# ------------------------------------------------------------------------------ part: resume
def deterministic(device: str) -> None:
    """Deterministic kernels for a bitwise comparison (cuDNN's Conv3d, cuBLAS workspaces, attention
    backward); ops without a deterministic version warn (recorded), not fail."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    if device == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def part_resume(out: Path, device: str, save: Callable[[dict], None], **_: Any) -> None:
    render_data_once()
    deterministic(device)
    fsdp = sets(device, "train.strategy=fsdp")
    result: dict[str, Any] = {"resumed_at": STOP, "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs = {}
        for name in ("full", "full_again"):  # the second uninterrupted run: the noise floor
            t = trainer_for(out / name, fsdp)
            t.fit()
            runs[name] = full_params(t.model)
            del t
        part = trainer_for(out / "part", fsdp)
        part.fit(stop_after=STOP)
        del part
        from layerlock_plugin.reference.config import load_config
        from layerlock_plugin.reference.train import Trainer

        resumed = Trainer(load_config(None, [f"out_dir={out / 'part'}", *fsdp]), resume=out / "part", echo=quiet)
        resumed.fit()
        runs["resumed"] = full_params(resumed.model)
    a, b, c = runs["full"], runs["resumed"], runs["full_again"]
    result.update({"ok": True, "bitwise_equal": all(torch.equal(a[n], b[n]) for n in a),
                   "max_abs_diff": max_abs_diff(a, b), "noise_floor_max_abs_diff": max_abs_diff(a, c),
                   "nondeterministic_ops": sorted({str(w.message)[:200] for w in caught
                                                   if "deterministic" in str(w.message)})})
    save(result)


# ------------------------------------------------------------------------------ parts: efficiency, compile
def depth_rows(out: Path, device: str, label: str, batch: int, knobs: list[str], steps: int, compile_: bool,
               save_row: Callable[[dict], None]) -> None:
    """One trainer (the model built once) driven from k = 0 to the deepest frozen depth: at each depth a
    warm-up, then ``steps`` timed steps, peak memory from a clean baseline, FLOPs from the cost model."""
    from layerlock_plugin.reference.config import load_config
    from layerlock_plugin.reference.dryrun import step_flops
    from layerlock_plugin.reference.train.throughput import device_peak_tflops

    model = GPU_EFFICIENCY if device == "cuda" else CPU_EFFICIENCY
    probe = load_config(None, model)
    enc = probe.model.depth - probe.model.decoder_depth
    depths = sorted({0, enc // 3, (2 * enc) // 3})
    precision = "bf16" if device == "cuda" else "fp32"
    cfg_sets = [*model, *knobs, f"schedule.pixel_steps={PIXEL_STEPS}", "schedule.interval=1",
                f"schedule.max_frozen={depths[-1]}", "warmup.steps=0", "probe.enabled=false", f"train.device={device}",
                f"train.precision={precision}", f"train.steps={PIXEL_STEPS + 1000}", "guard.policy=off",
                "train.tensorboard=false", f"train.batch_size={batch}", f"train.compile={str(compile_).lower()}"]
    clean_memory(device)
    trainer = trainer_for(out / label, cfg_sets)
    cfg = trainer.config
    data = trainer.dataset.cached_videos
    video = data[torch.arange(batch) % data.shape[0]].to(trainer.device)  # one batch, rendered once
    peak = device_peak_tflops(trainer.device)
    compiled_before = graph_count()
    for k in depths:
        at = PIXEL_STEPS + k - 1 if k else 0  # the plan of this step has k frozen blocks

        def step() -> None:
            trainer.step = at  # every step of the row at the same plan (the plan is a function of the step)
            trainer.train_step(video)

        for _ in range(2):  # reach depth k (the freeze event), then one more: compile / autotune / caches
            step()
        base = clean_memory(device)
        started = time.perf_counter()
        for _ in range(steps):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        dt = (time.perf_counter() - started) / steps
        plan = trainer.layerlock.plan
        flops = step_flops(cfg.model, plan.num_frozen, trainer.layerlock.target_layers(plan), cfg.target.loss_fraction,
                           plan.stem_frozen, cfg.target.context)["total"]
        graphs = graph_count()
        save_row({"set": label, "batch": batch, "knobs": bool(knobs), "compiled": compile_, "k": plan.num_frozen,
                  "step_s": dt, "clips_per_s": batch / dt, "tokens_per_s": batch * trainer.model.num_patches / dt,
                  "flops_per_clip": flops, "mfu": flops * batch / dt / (peak * 1e12) if peak else None,
                  "base_memory_gb": None if base is None else base / 2**30,
                  "max_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
                  "graphs_compiled_by_now": graphs - compiled_before})
    del trainer, video
    clean_memory(device)


def ratios(rows: list[dict[str, Any]]) -> None:
    """Each row against the k = 0 row of its set: time, FLOPs, memory."""
    for r in rows:
        b = next((x for x in rows if x["set"] == r["set"] and x["k"] == 0), None)
        if b is None:
            continue
        r["time_ratio"] = r["step_s"] / b["step_s"]
        r["flop_ratio"] = r["flops_per_clip"] / b["flops_per_clip"]
        r["memory_ratio"] = None if r["max_memory_gb"] is None else r["max_memory_gb"] / b["max_memory_gb"]


def part_efficiency(out: Path, device: str, save: Callable[[dict], None], steps: int, **_: Any) -> None:
    render_data_once()
    batches = GPU_BATCHES if device == "cuda" else CPU_BATCHES
    result: dict[str, Any] = {"model": GPU_EFFICIENCY if device == "cuda" else CPU_EFFICIENCY, "rows": [], "errors": {}}
    plan = [("small", batches["small"], []), ("small-knobs", batches["small"], KNOBS), ("compute", batches["compute"], [])]
    for label, batch, knobs in plan:
        try:
            depth_rows(out, device, label, batch, knobs, steps, False, lambda row: (result["rows"].append(row),
                                                                                 ratios(result["rows"]), save(result)))
        except Exception:
            result["errors"][label] = error_entry()["error"]
            save(result)


# -- compile: dynamo's own counts, and recompile-limit fallbacks read from its warnings
def graph_count() -> int:
    """Graphs dynamo has compiled in this process (every compile and recompile)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(counters["stats"]["unique_graphs"])


class LimitHits(logging.Handler):
    """Counts dynamo's "hit config.recompile_limit" warnings: the function then runs uncompiled."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "hit config." in message:
            self.messages.append(message.splitlines()[0])

    def __enter__(self) -> LimitHits:
        logging.getLogger("torch._dynamo").addHandler(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        logging.getLogger("torch._dynamo").removeHandler(self)


def use_backend(backend: str) -> None:
    """``nn.Module.compile()`` (what ``train.compile`` calls per block) with ``backend``: the CPU run uses
    dynamo alone (``eager``), which checks the graph capture and recompiles in seconds, not minutes."""
    original = torch.nn.Module.compile

    def compile_with(self, *args, **kwargs):
        kwargs.setdefault("backend", backend)
        return original(self, *args, **kwargs)

    torch.nn.Module.compile = compile_with


def compile_fit(out: Path, device: str, strategy: str) -> dict[str, Any]:
    """The train part's run (ViT-B size on GPU, activation checkpointing) compiled, under ``strategy``: new
    graphs before the first event and at each event, and the step times (throughput rows)."""
    trainer = trainer_for(out / f"compile-{strategy}", sets(device, f"train.strategy={strategy}",
                                                             "train.activation_checkpointing=true", "train.compile=true"))
    graphs = {}
    for stop in (6, 10, 14, STEPS):  # before the first event, then through each of the 3 events
        before = graph_count()
        trainer.fit(stop_after=stop) if stop < STEPS else trainer.fit()
        graphs[str(stop)] = graph_count() - before
    speed = jsonl(trainer.out / "throughput.jsonl")
    del trainer
    clean_memory(device)
    return {"ok": True, "new_graphs_until_step": graphs, "throughput": speed}


def part_compile(out: Path, device: str, save: Callable[[dict], None], steps: int, **_: Any) -> None:
    import torch._dynamo

    backend = "inductor" if device == "cuda" else "eager"
    if backend != "inductor":
        use_backend(backend)
    render_data_once()
    batch = (GPU_BATCHES if device == "cuda" else CPU_BATCHES)["compute"]
    result: dict[str, Any] = {"backend": backend, "rows": [], "errors": {}}
    with LimitHits() as hits:
        try:
            depth_rows(out, device, "compute-compiled", batch, [], steps, True,
                       lambda row: (result["rows"].append(row), ratios(result["rows"]), save(result)))
        except Exception:
            result["errors"]["compute-compiled"] = error_entry()["error"]
        for strategy in ("ddp", "fsdp"):
            torch._dynamo.reset()
            try:
                result[strategy] = compile_fit(out, device, strategy)
            except Exception:
                result[strategy] = error_entry()
            result["recompile_limit_hits"] = list(hits.messages)
            save(result)
    result["recompile_limit_hits"] = list(hits.messages)
    save(result)


PARTS = {"train": part_train, "resume": part_resume, "efficiency": part_efficiency, "compile": part_compile}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("part", choices=list(PARTS))
    p.add_argument("out")
    p.add_argument("--device", required=True, choices=("cuda", "cpu"))
    p.add_argument("--steps", type=int, default=10)
    a = p.parse_args(argv)
    import torch.distributed as dist

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.distributed")

    latest: dict[str, Any] = {}

    import layerlock_plugin

    source = str(Path(layerlock_plugin.__file__).resolve().parent)  # which checkout this worker measures

    def save(result: dict[str, Any]) -> None:
        result = {**result, "imported_from": source}
        latest.clear()
        latest.update(result)
        if not dist.is_initialized() or dist.get_rank() == 0:
            tmp = out / f"{a.part}.json.tmp"
            tmp.write_text(json.dumps(result, indent=2))
            tmp.replace(out / f"{a.part}.json")

    try:
        PARTS[a.part](out, a.device, save, steps=a.steps)
        code = 0
    except Exception:  # what the part finished stays, with the traceback of what broke
        save({**latest, **error_entry()})
        code = 1
    if dist.is_initialized():
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
