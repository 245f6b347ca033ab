"""The reference trainer on PyTorch/XLA, on PJRT's CPU device (run in the XLA environment):

    bash scripts/setup_xla_env.sh .venv-xla
    PJRT_DEVICE=CPU .venv-xla/bin/python -m pytest -q tests_xla

Every run is the CLI in its own process, as a user starts it (``CPU_NUM_DEVICES`` and SPMD are fixed per
process). The tiny run crosses two freeze events with a target switch each (steps 10 and 25 of 40).

Two choices keep these runs short on CPU. XLA compiles without LLVM's expensive optimisations (``XLA_FLAGS``
below): the tests check the trainer's programs (how many, when, what they compute, resume, SPMD), not XLA's
CPU code generation, and those passes took most of each compile (a 4-step run: 117 s -> 24 s here). The
collapse guard measures every 15 steps, once per latent plan (its own test measures every 5): its SVD runs
as an XLA while-loop that takes ~20 s per measured step on PJRT's CPU device.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.timeout(600)  # a module fixture compiles ~9 XLA programs in its own process
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

STEPS, EVENTS, LOG_EVERY = 40, (10, 25), 5
RUN = ["--set", "train.device=xla", "--set", f"train.steps={STEPS}", "--set", "schedule.pixel_steps=10",
       "--set", "schedule.interval=15", "--set", "schedule.max_frozen=2", "--set", "warmup.steps=5",
       "--set", "train.batch_size=8", "--set", "data.num_videos=64", "--set", "probe.enabled=false",
       "--set", f"train.log_every={LOG_EVERY}", "--set", "guard.every=15", "--set", "train.progress=false",
       "--set", "train.ckpt_every=5", "--set", "train.keep_last=10"]


def cli(out: Path, *args: str, devices: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": str(devices),
           "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()}
    proc = subprocess.run([sys.executable, "-m", "layerlock_plugin.reference.cli", "--out", str(out), *args],
                          env=env, capture_output=True, text=True, timeout=800)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


def rows(folder: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (folder / name).read_text().splitlines()]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="module")
def one_device(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("xla") / "one"
    cli(out, *RUN)
    return out


@pytest.fixture(scope="module")
def spmd(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("xla") / "spmd"
    proc = cli(out, *RUN, "--set", "train.strategy=spmd", devices=2)
    return out, proc.stdout


def test_two_freeze_events_finite_loss_and_frozen_blocks_bitwise(one_device):
    events = rows(one_device, "events.jsonl")
    assert [(e["step"], e["num_frozen"], e["target_layer"]) for e in events] == [(10, 1, 1), (25, 2, 2)]
    losses = [r["loss"] for r in rows(one_device, "metrics.jsonl")]
    assert len(losses) == STEPS // LOG_EVERY and all(math.isfinite(x) for x in losses)
    at = {s: weights(one_device / f"checkpoint.step_{s:08d}.pt") for s in EVENTS}
    final = weights(one_device / "checkpoint.pt")
    # the stem and block 1 froze at step 10, block 2 at step 25; block 3 kept training
    for name, frozen_at in [("patch_embed.", 10), ("blocks.0.", 10), ("blocks.1.", 25)]:
        keys = [k for k in final if k.startswith(name)]
        assert keys and all(torch.equal(at[frozen_at][k], final[k]) for k in keys), name
    assert not all(torch.equal(at[25][k], final[k]) for k in final if k.startswith("blocks.2."))


def test_compiles_a_few_programs_per_plan_and_none_once_it_runs(one_device):
    """XLA compiles when the program changes: at the start and at each freeze event (a new trainable set,
    target head and its optimizer state), plus the guard's measuring step (every 15 steps) once per plan;
    the LR, which changes every step, never recompiles. Once a plan has run both kinds of steps, no
    compile until the next event."""
    compiles = [r["xla_compiles"] for r in rows(one_device, "throughput.jsonl")]
    assert len(compiles) == STEPS // LOG_EVERY
    new = [compiles[0]] + [b - a for a, b in zip(compiles, compiles[1:])]
    print("compiles per window of 5 steps:", new)
    bounds = [0, *EVENTS, STEPS]
    for start, end in zip(bounds, bounds[1:]):  # one plan: windows [start, end) / 5
        plan = new[start // LOG_EVERY: end // LOG_EVERY]
        assert 1 <= sum(plan) <= 4, (start, new)
        assert plan[-1] == 0, (start, new)  # its steady state: no compile


def test_resume_mid_schedule_matches_the_uninterrupted_run(one_device, tmp_path):
    out = tmp_path / "resumed"
    first = cli(out, *RUN, "--stop-after", "15")
    assert "stopped after step 15" in first.stdout
    second = cli(out, "--resume", str(out), *RUN)
    assert "resuming at step 15" in second.stdout
    a, b = weights(one_device / "checkpoint.pt"), weights(out / "checkpoint.pt")
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    print(f"resume: max |param difference| vs the uninterrupted run = {diff}")
    assert diff == 0.0
    assert [r["loss"] for r in rows(one_device, "metrics.jsonl")] == [r["loss"] for r in rows(out, "metrics.jsonl")]


def test_spmd_on_two_devices_matches_one_device(one_device, spmd):
    out, stdout = spmd
    assert "spmd over 2 devices" in stdout and "{devices=[2," in stdout, stdout  # the batch really is split
    one, two = rows(one_device, "metrics.jsonl"), rows(out, "metrics.jsonl")
    gaps = [abs(a["loss"] - b["loss"]) for a, b in zip(one, two)]
    a, b = weights(one_device / "checkpoint.pt"), weights(out / "checkpoint.pt")
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    print(f"spmd x2 vs one device: max loss gap {max(gaps):.3g}, max param difference {diff:.3g}")
    assert len(two) == len(one) and max(gaps) < 1e-5
    # fp32 sums in another order (the partitioned all-reduce) differ by ~1e-7; AdamW's per-element
    # normalisation turns that into ~1e-5 in the weights after 40 steps (one step moves them ~1.5e-3)
    assert diff < 1e-4
    # frozen blocks stay bitwise what they were at their event under SPMD too
    at10 = weights(out / "checkpoint.step_00000010.pt")  # the stem and block 1 froze at step 10
    assert all(torch.equal(at10[k], b[k]) for k in b if k.startswith(("patch_embed.", "blocks.0.")))


def test_guard_decides_at_log_steps_and_probes_run(tmp_path):
    """A guard set to trip on every measured latent step: its warnings carry the steps they belong to,
    the trips are counted in the log, and the run ends with probes (encoded on the device, trained on
    the CPU) and plots."""
    out = tmp_path / "guard"
    proc = cli(out, *RUN, "--set", "train.steps=15", "--set", "guard.every=5", "--set", "guard.min_effective_rank=1.0",
               "--set", "guard.patience=1",
               "--set", "probe.enabled=true", "--set", "probe.train_videos=16", "--set", "probe.test_videos=16",
               "--set", "probe.steps=5")
    assert "collapse guard tripped at step 10" in proc.stderr + proc.stdout
    metrics = rows(out, "metrics.jsonl")
    assert metrics[-1]["layerlock/guard_trips"] == 1  # step 10 (15 is not measured: its row is the 15th step)
    summary = json.loads((out / "summary.json").read_text())
    assert {"motion_acc", "appearance_acc", "dense_r2", "random_init"} <= set(summary["probes"])
    assert (out / "plots" / "loss.png").is_file()


def test_guard_skip_is_refused_on_xla(tmp_path):
    proc = cli(tmp_path / "skip", *RUN, "--set", "guard.policy=skip", check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert "guard.policy" in lines[-1] and "Traceback" not in proc.stderr
    assert not (tmp_path / "skip").exists()
