"""The device check (benchmarks/gpu_check.py) runs end to end on CPU from a plain checkout, and its pieces
report what a GPU run needs reported: a failed part's own traceback, results written after every part,
recompiles and recompile-limit fallbacks counted, the card's peak FLOP/s."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402
import gpu_check_workers  # noqa: E402


def plain_checkout(dest: Path) -> Path:
    """The package and the benchmark scripts copied elsewhere: a checkout nobody pip-installed."""
    ignore = shutil.ignore_patterns("__pycache__", "results", "*.pyc")
    shutil.copytree(ROOT / "layerlock_plugin", dest / "layerlock_plugin", ignore=ignore)
    shutil.copytree(ROOT / "benchmarks", dest / "benchmarks", ignore=ignore)
    return dest


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """``python3 benchmarks/gpu_check.py --device cpu`` run from a copy of the checkout, as on the GPU image
    (there the project is not installed; here the installed one must not be what it measures)."""
    tmp = tmp_path_factory.mktemp("gpu_check")
    checkout = plain_checkout(tmp / "checkout")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LAYERLOCK_SRC")}
    out = subprocess.run([sys.executable, str(checkout / "benchmarks" / "gpu_check.py"), "--device", "cpu",
                          "--results-dir", str(tmp / "results")], capture_output=True, text=True, timeout=580,
                         cwd=tmp, env=env)
    return checkout, tmp / "results", out


@pytest.mark.timeout(600)  # its module fixture: the check's four parts, each a torchrun launch (~60-120 s on CI's slow machine)
def test_gpu_check_runs_on_cpu_from_a_plain_checkout(cpu_run):
    checkout, results, out = cpu_run
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    payload = json.loads((results / "gpu_check.json").read_text())
    verdicts = payload["verdicts"]
    assert verdicts and all(verdicts.values()), {k: v for k, v in verdicts.items() if not v}
    for name in ("ddp: finite loss, frozen unchanged, no optimizer state", "fsdp: every collective on the training device",
                 "resume after a freeze event matches the uninterrupted run (bitwise, or within 2 runs' noise)",
                 "efficiency: every row measured", "compile: no recompile-limit fallback",
                 "compile (fsdp): <= 1 new graph at each freeze event after the first", "ddp: loader wait < 5% of the step time"):
        assert verdicts[name] is True, name
    # the orchestrator and every worker imported the copy, not the installed package
    assert payload["meta"]["layerlock_plugin"].startswith(str(checkout))
    for part in gpu_check.PARTS:
        assert payload["results"][part]["imported_from"] == str(checkout / "layerlock_plugin"), part
    resume = payload["results"]["resume"]
    assert resume["bitwise_equal"] and resume["noise_floor_max_abs_diff"] == 0.0
    rows = payload["results"]["efficiency"]["rows"]
    assert {(r["set"], r["k"]) for r in rows} == {(s, k) for s in ("small", "small-knobs", "compute") for k in (0, 1, 2)}
    assert all(r["max_memory_gb"] is None and r["mfu"] is None for r in rows)  # not measured on CPU
    compiled = payload["results"]["compile"]
    assert compiled["backend"] == "eager" and len(compiled["rows"]) == 3
    assert compiled["ddp"]["new_graphs_until_step"]["6"] > 0  # it did compile the blocks
    assert "Device check on **CPU**" in (results / "gpu_check.md").read_text()
    assert "at most" in out.stdout.splitlines()[0]  # its own time bound, printed first


@pytest.mark.timeout(300)
def test_a_failed_piece_keeps_the_others_and_records_the_workers_traceback(tmp_path):
    """ddp and fsdp run each on its own; a failure records the worker's traceback (here: no CUDA device),
    not torchrun's ChildFailedError summary."""
    result = gpu_check.launch("train", tmp_path, "cuda", timeout=240, steps=1)
    for strategy in ("ddp", "fsdp"):
        entry = result[strategy]
        assert entry["ok"] is False and "Traceback (most recent call last)" in entry["error"], entry
        cause = entry["error"].strip().splitlines()[-1]  # the worker's own exception, whichever CUDA call raised it
        assert ("CUDA" in cause or "NVIDIA" in cause) and "ChildFailedError" not in entry["error"], cause
    verdicts = gpu_check.verdicts({"train": result}, "cuda")
    assert verdicts["ddp: trains across the freeze events"] is False and verdicts["fsdp: trains across the freeze events"] is False


def test_the_workers_traceback_is_found_in_the_launchers_output():
    stderr = ("[rank0]: Traceback (most recent call last):\n[rank0]:   File \"gpu_check_workers.py\", line 3\n"
              "[rank0]: ValueError: the real reason\n"
              "Traceback (most recent call last):\n  File \"/x/torch/distributed/run.py\", line 9\n"
              "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: gpu_check_workers.py FAILED\n")
    assert "the real reason" in gpu_check.worker_traceback(stderr)
    assert "ChildFailedError" not in gpu_check.worker_traceback(stderr)


def test_results_are_written_after_every_part(tmp_path, monkeypatch):
    """A run cut short (the machine taken back, a part hanging) keeps the parts it finished on disk."""
    seen = []

    def fake_launch(part, out, device, timeout, steps):
        saved = tmp_path / "gpu_check.json"
        seen.append((part, json.loads(saved.read_text())["parts_done"] if saved.is_file() else []))
        return {"ok": True, "seconds": 0.1}

    monkeypatch.setattr(gpu_check, "launch", fake_launch)
    gpu_check.main(["--device", "cpu", "--parts", "efficiency", "train", "--results-dir", str(tmp_path)])
    assert seen == [("train", []), ("efficiency", ["train"])]  # in the check's order, each after the last was saved
    payload = json.loads((tmp_path / "gpu_check.json").read_text())
    assert payload["parts_done"] == ["train", "efficiency"] and payload["parts_pending"] == []


def test_timeouts_fit_the_device_budget_and_a_timeout_ends_the_workers(tmp_path):
    assert sum(gpu_check.GPU_TIMEOUTS.values()) <= 6 * 60  # <= 8 min asked; 6 leave a rerun in 15 min of device time
    assert list(gpu_check.PARTS).index("efficiency") < list(gpu_check.PARTS).index("compile")
    result = gpu_check.launch("efficiency", tmp_path, "cpu", timeout=2, steps=1)
    assert result["ok"] is False and result["error"].startswith("timed out after 2 s")


def test_recompile_counting_and_limit_fallbacks_can_fail():
    """The compile part's counters see a function that recompiles on every call and dynamo giving up on it."""
    import torch._dynamo

    torch._dynamo.reset()

    def f(x, n):
        return x * n

    compiled = torch.compile(f, backend="eager", dynamic=False)
    x = torch.ones(2)
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    before = gpu_check_workers.graph_count()
    with torch._dynamo.config.patch(**{limit: 2, "automatic_dynamic_shapes": False}), \
            gpu_check_workers.LimitHits() as hits:
        for n in range(5):
            compiled(x, n)  # a new constant each call: a recompile each time, until the limit
    assert gpu_check_workers.graph_count() - before == 2
    assert hits.messages and "hit config." in hits.messages[0]
    torch._dynamo.reset()


@pytest.mark.parametrize("name, tflops", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                          ("NVIDIA H100 NVL", 835.0), ("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0),
                                          ("NVIDIA H800", 989.0), ("NVIDIA H800 PCIe", 756.0), ("NVIDIA L4", 121.0),
                                          ("NVIDIA L40S", 362.0), ("NVIDIA H20", None)])
def test_peak_flops_of_the_card(monkeypatch, name, tflops):
    from layerlock_plugin.reference.train.throughput import device_peak_tflops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert device_peak_tflops(torch.device("cuda", 0)) == tflops


def test_a_rows_baseline_frees_the_earlier_trainers(tmp_path):
    """A trainer holds reference cycles (its event listener, its checkpointer): ``del`` alone leaves its model
    alive, and a GPU row's peak memory would include it. The baseline collects it first."""
    import weakref

    trainer = gpu_check_workers.trainer_for(tmp_path, ["data.num_videos=8", "train.batch_size=4", "probe.enabled=false"])
    model = weakref.ref(trainer.model)
    del trainer
    assert gpu_check_workers.clean_memory("cpu") is None and model() is None


def test_the_gpu_settings_the_check_needs():
    assert "model.mask_ratio=0.95" in gpu_check_workers.GPU_MODEL  # vit_l's masking, not tiny.yaml's 0.75
    assert "model.mask_ratio=0.95" in gpu_check_workers.GPU_EFFICIENCY
    assert gpu_check.worker_env("cuda", "resume")["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"  # before CUDA starts
    assert str(ROOT) in gpu_check.worker_env("cuda", "train")["PYTHONPATH"].split(os.pathsep)


@pytest.mark.timeout(300)
def test_a_stopped_check_ends_its_workers(tmp_path):
    """The caller's time limit (SIGTERM) must not leave a part's workers running (their own process group),
    holding the GPU for the next run."""
    import signal
    import time

    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
        except OSError:
            return False

    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--parts",
                             "efficiency", "--results-dir", str(tmp_path)], stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    workers = []
    while not workers and time.monotonic() < deadline:  # the part's worker: a child of the check
        workers = [int(x) for x in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                                  text=True).stdout.split()]
        time.sleep(0.2)
    assert workers, "the worker never started"
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    time.sleep(1)
    assert not [w for w in workers if alive(w)], "a worker outlived the check"
