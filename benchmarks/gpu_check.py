"""The device check: the reference trainer's GPU path proven in one short run (one GPU, at most 6 minutes).

    python3 benchmarks/gpu_check.py                      # one CUDA GPU (H100 / H200 / A100 ...): the check
    python3 benchmarks/gpu_check.py --device cpu         # the same parts end to end on CPU, tiny models (CI)
    python3 benchmarks/gpu_check.py --parts compile      # rerun some parts (results of the others are kept)

It runs from a plain checkout (nothing installed: the repository root goes on ``sys.path``, and on the
workers' ``PYTHONPATH``) with torch, timm, einops, PyYAML, numpy and scikit-learn. Parts, each in its own
process with its own timeout (the sum is printed first), in this order:

1. ``train``: ``torchrun --nproc_per_node=1`` (NCCL on GPU, gloo on CPU), ``ddp`` then ``fsdp`` (each on
   its own: one failing keeps the other's result), bf16 autocast on GPU, activation checkpointing, a ViT-B
   width/depth video model at 95% masking (tiny on CPU), across 3 freeze events and target switches: finite
   losses, frozen blocks bitwise unchanged after their event and without optimizer state, every collective's
   tensor on the training device, host syncs inside each step (``torch.cuda.set_sync_debug_mode("warn")``;
   the guard on ``warn`` decides at log steps, so a step without a freeze event must have none), the loader's
   share of the step time, peak memory from a clean baseline.
2. ``resume``: the same run under fsdp stopped after the second event and resumed from its DCP checkpoint,
   against the uninterrupted run, with deterministic kernels (``use_deterministic_algorithms``,
   ``CUBLAS_WORKSPACE_CONFIG``, cuDNN deterministic) and a second uninterrupted run as the noise floor.
3. ``efficiency``: ViT-L in bf16 (95% masking, 16x224x224) at frozen depths k = 0, 1/3, 2/3 of the encoder,
   one model per row set driven through the depths: batch 8 with and without the target cost knobs
   (``target.loss_fraction=0.05``, ``target.context=sparse``; the memory rows) and batch 64 (compute-bound:
   the FLOP-ratio rows); step time, MFU (peak from the card), peak memory per row from a clean baseline.
4. ``compile``: the compute-bound ViT-L rows with ``train.compile=true`` (MFU, compiled vs eager), then the
   train part's runs compiled under ddp and fsdp with activation checkpointing: dynamo's graph count before
   the first event and at each event, and its recompile-limit fallbacks. On CPU dynamo runs with its
   ``eager`` backend (graph capture and recompiles in seconds; inductor would take minutes there).

Results: ``<results-dir>/gpu_check[-TAG].json`` and ``.md`` (card, versions, date, commit), rewritten after
every part, so a run cut short keeps what it finished. Exit code 1 when a part failed or a check said no.
Targets on one H100: pixel-phase MFU >= 40% compiled, peak-memory saving at 2/3 frozen >= 32%, step-time
ratio within 5% of the FLOP ratio on compute-bound rows, 0 host syncs per step with the guard on ``warn``,
loader wait < 5% of the step time.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(ROOT), str(ROOT / "benchmarks")) if p not in sys.path]  # a plain checkout

from _common import provenance  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
WORKER = ROOT / "benchmarks" / "gpu_check_workers.py"
PARTS = ("train", "resume", "efficiency", "compile")
# seconds per part on one GPU (process start, CUDA init and model builds included): 360 s together, so two
# runs (a rerun) and a machine start fit 15 minutes of device time
GPU_TIMEOUTS = {"train": 70, "resume": 70, "efficiency": 100, "compile": 120}
CPU_TIMEOUTS = {"train": 300, "resume": 300, "efficiency": 300, "compile": 300}
TORCHRUN_PARTS = ("train", "resume", "compile")  # these need a process group (one process)


def worker_env(device: str, part: str) -> dict[str, str]:
    """The workers import this checkout (PYTHONPATH), as the orchestrator does."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "PYTHONUNBUFFERED": "1"}
    if device == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    if part == "resume":
        env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # deterministic cuBLAS: set before CUDA starts
    return env


def worker_traceback(stderr: str) -> str:
    """The worker's own traceback from the launcher's output (torchrun ends with its ChildFailedError
    summary, which says only that the child failed)."""
    blocks = stderr.split("Traceback (most recent call last):")
    for block in blocks[1:]:
        if "torch/distributed/run.py" not in block and "ChildFailedError" not in block:
            return ("Traceback (most recent call last):" + block)[-3000:]
    return stderr[-3000:]


_running: list[subprocess.Popen] = []  # the part in flight: ended with the check if the check is stopped


def _stop_running(signum: int, _frame: Any) -> None:
    """A stopped check (its caller's time limit: SIGTERM) ends its part's workers too: they run in their own
    process group and would otherwise hold the GPU after the check is gone."""
    for proc in _running:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    raise SystemExit(128 + signum)


def launch(part: str, out: Path, device: str, timeout: float, steps: int) -> dict[str, Any]:
    """Run one part in its own process (group); its JSON, or what broke."""
    launcher = [sys.executable]
    if part in TORCHRUN_PARTS:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    cmd = [*launcher, str(WORKER), part, str(out), "--device", device, "--steps", str(steps)]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=worker_env(device, part),
                            start_new_session=True)  # its own process group: a timeout ends the workers too
    _running.append(proc)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        timed_out = True
    finally:
        _running.remove(proc)
    seconds = round(time.perf_counter() - started, 1)
    saved = out / f"{part}.json"
    result: dict[str, Any] = json.loads(saved.read_text()) if saved.is_file() else {}
    result["seconds"] = seconds
    if timed_out:
        return {**result, "ok": False, "error": f"timed out after {timeout:.0f} s (what it finished is kept)"}
    if proc.returncode != 0 or not saved.is_file():
        return {**result, "ok": False, "error": result.get("error") or worker_traceback(stderr or stdout)}
    return {**result, "ok": result.get("ok", True)}


# ------------------------------------------------------------------------------ verdicts
def _rows(results: dict[str, Any], part: str) -> list[dict[str, Any]]:
    return results.get(part, {}).get("rows", [])


def verdicts(results: dict[str, Any], device: str) -> dict[str, bool | None]:
    """Each check True / False, or None where its part did not run (or cannot measure it on this device)."""
    out: dict[str, bool | None] = {}
    train = results.get("train", {})
    for s in ("ddp", "fsdp"):
        t = train.get(s, {})
        if not t.get("ok"):
            out[f"{s}: trains across the freeze events"] = False if "train" in results else None
            continue
        out[f"{s}: finite loss, frozen unchanged, no optimizer state"] = (
            t["losses_finite"] and t["frozen_unchanged"] and t["frozen_state_free"] and bool(t["frozen"]))
        out[f"{s}: every collective on the training device"] = set(t["collective_devices"]) == {t["training_device"]}
        if t["host_syncs"]["measured"]:
            syncs = t["host_syncs"]["per_step"]
            out[f"{s}: 0 host syncs in a step without a freeze event (guard warn)"] = all(
                syncs[str(k)] == 0 for k in t["host_syncs"]["steps_without_event"])
        if t.get("data_wait_frac_max") is not None:
            out[f"{s}: loader wait < 5% of the step time"] = t["data_wait_frac_max"] < 0.05
    resume = results.get("resume", {})
    if resume.get("ok"):
        noise = resume["noise_floor_max_abs_diff"]
        out["resume after a freeze event matches the uninterrupted run (bitwise, or within 2 runs' noise)"] = (
            resume["bitwise_equal"] or (noise > 0 and resume["max_abs_diff"] <= noise))
    elif "resume" in results:
        out["resume after a freeze event matches the uninterrupted run (bitwise, or within 2 runs' noise)"] = False
    eff, comp = _rows(results, "efficiency"), _rows(results, "compile")
    if "efficiency" in results:
        out["efficiency: every row measured"] = len(eff) == 9 and not results["efficiency"].get("errors")
    if device == "cuda":
        small = [r for r in eff if r["set"] == "small"]
        if small and "memory_ratio" in small[-1]:
            out["peak-memory saving at 2/3 frozen >= 32% (batch 8)"] = small[-1]["memory_ratio"] <= 0.68
        for label, rows in (("eager", [r for r in eff if r["set"] == "compute"]), ("compiled", comp)):
            latent = [r for r in rows if r["k"] > 0 and "flop_ratio" in r]
            if latent:
                out[f"step-time ratio within 5% of the FLOP ratio ({label}, compute-bound)"] = all(
                    abs(r["time_ratio"] / r["flop_ratio"] - 1) <= 0.05 for r in latent)
        pixel = next((r for r in comp if r["k"] == 0 and r["mfu"] is not None), None)
        if pixel is not None:
            out["pixel-phase MFU >= 40% (ViT-L bf16 compiled)"] = pixel["mfu"] >= 0.40
        eager = {r["k"]: r for r in eff if r["set"] == "compute"}
        if comp and eager:
            out["compiled step faster than eager at every depth"] = all(
                r["step_s"] < eager[r["k"]]["step_s"] for r in comp if r["k"] in eager)
    if "compile" in results:
        c = results["compile"]
        out["compile: no recompile-limit fallback"] = not c.get("recompile_limit_hits") and c.get("ok", False)
        for s in ("ddp", "fsdp"):
            g = c.get(s, {})
            out[f"compile ({s}): <= 1 new graph at each freeze event after the first"] = (
                g.get("ok", False) and g["new_graphs_until_step"]["14"] <= 1 and g["new_graphs_until_step"]["16"] <= 1)
    return out


# ------------------------------------------------------------------------------ the report
def _fmt(x: Any, f: str) -> str:
    return "n/a" if x is None else format(x, f)


def markdown(payload: dict[str, Any]) -> str:
    m, results = payload["meta"], payload["results"]
    lines = [f"Device check on **{payload['card']}** ({payload['device']}), torch {m['torch']}, {m['date_utc']}, "
             f"{m['layerlock_plugin']}. Command: `{m['command']}`. Parts run: {', '.join(payload['parts_done']) or 'none'}"
             f"{'; pending: ' + ', '.join(payload['parts_pending']) if payload['parts_pending'] else ''}.",
             "", "| check | result |", "|---|---|"]
    for name, ok in payload["verdicts"].items():
        lines.append(f"| {name} | {'not measured' if ok is None else ('yes' if ok else '**no**')} |")
    for part, r in results.items():
        errors = [r.get("error")] + [v.get("error") for v in r.values() if isinstance(v, dict)]
        errors += list(r.get("errors", {}).values())
        for e in filter(None, errors):
            lines += ["", f"{part} ({r.get('seconds', '?')} s): error", "```", str(e)[-1500:], "```"]
    for s in ("ddp", "fsdp"):
        t = results.get("train", {}).get(s, {})
        if t.get("ok"):
            syncs = t["host_syncs"]
            lines.append(f"\nTrain {s}: losses {', '.join(f'{x:.3f}' for x in t['losses'])}; peak memory "
                         f"{_fmt(t['peak_mem_gb'], '.2f')} GB; loader wait at most {_fmt(t['data_wait_frac_max'], '.1%')} "
                         f"of a log window; host syncs per step {syncs.get('per_step', 'not measured')} "
                         f"(+{syncs.get('at_log_rows_and_checkpoints', 0)} at log rows and checkpoints).")
    resume = results.get("resume", {})
    if resume.get("ok"):
        lines.append(f"\nResume (fsdp, stopped after step {resume['resumed_at']}, deterministic kernels): bitwise "
                     f"{resume['bitwise_equal']}, max |difference| {resume['max_abs_diff']:.3g}; two uninterrupted runs "
                     f"differ by {resume['noise_floor_max_abs_diff']:.3g}. Ops without a deterministic kernel: "
                     f"{resume['nondeterministic_ops'] or 'none'}.")
    rows = _rows(results, "efficiency") + _rows(results, "compile")
    if rows:
        lines += ["", "| rows | batch | compiled | frozen k | step s | clips/s | MFU | base / peak memory GB | time ratio | "
                      "FLOP ratio | memory ratio |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['set']} | {r['batch']} | {r['compiled']} | {r['k']} | {r['step_s']:.4f} | "
                         f"{r['clips_per_s']:.1f} | {_fmt(r['mfu'], '.3f')} | {_fmt(r['base_memory_gb'], '.2f')} / "
                         f"{_fmt(r['max_memory_gb'], '.2f')} | {_fmt(r.get('time_ratio'), '.3f')} | "
                         f"{_fmt(r.get('flop_ratio'), '.3f')} | {_fmt(r.get('memory_ratio'), '.3f')} |")
    comp = results.get("compile", {})
    for s in ("ddp", "fsdp"):
        if comp.get(s, {}).get("ok"):
            lines.append(f"\nCompile ({s}, {comp['backend']}): new graphs until step "
                         f"{comp[s]['new_graphs_until_step']} (events at 6, 10, 14); recompile-limit fallbacks: "
                         f"{comp.get('recompile_limit_hits') or 'none'}.")
    return "\n".join(lines) + "\n"


def write(folder: Path, name: str, payload: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(payload, indent=2)), (".md", markdown(payload))):
        tmp = folder / f"{name}{suffix}.tmp"
        tmp.write_text(text)
        tmp.replace(folder / f"{name}{suffix}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--steps", type=int, default=None, help="timed steps per efficiency row (default 10 GPU, 2 CPU)")
    p.add_argument("--tag", default="")
    p.add_argument("--results-dir", default=str(RESULTS))
    args = p.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    card = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    steps = args.steps or (10 if device == "cuda" else 2)
    timeouts = GPU_TIMEOUTS if device == "cuda" else CPU_TIMEOUTS
    parts = [p for p in PARTS if p in args.parts]  # efficiency always before compile
    folder, name = Path(args.results_dir), "gpu_check" + (f"-{args.tag}" if args.tag else "")
    previous = folder / f"{name}.json"
    results: dict[str, Any] = {}
    if set(parts) != set(PARTS) and previous.is_file():  # a rerun of some parts keeps the others' results
        results = {k: v for k, v in json.loads(previous.read_text())["results"].items() if k not in parts}
    budget = sum(timeouts[p] for p in parts)
    print(f"[gpu_check] {', '.join(parts)} on {card}: at most {budget} s ({budget / 60:.1f} min; timeouts "
          f"{', '.join(f'{p} {timeouts[p]} s' for p in parts)})", flush=True)
    meta = provenance(["benchmarks/gpu_check.py", *argv])
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _stop_running)
    with tempfile.TemporaryDirectory() as tmp:
        for i, part in enumerate(parts):
            print(f"[gpu_check] {part} ...", flush=True)
            results[part] = launch(part, Path(tmp) / part, device, timeouts[part], steps)
            print(f"[gpu_check] {part}: {'ok' if results[part]['ok'] else 'FAILED'} ({results[part]['seconds']} s)",
                  flush=True)
            payload = {"meta": meta, "card": card, "device": device, "results": results,
                       "parts_done": [p for p in PARTS if p in results], "parts_pending": parts[i + 1:],
                       "verdicts": verdicts(results, device)}
            write(folder, name, payload)
    print(markdown(payload))
    failed = [n for n, ok in payload["verdicts"].items() if ok is False]
    return 1 if failed or any(not r.get("ok") for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
