"""Cluster-grade operation of the reference trainer: preemption signals, auto-resume, checkpoint cadence
and retention, TensorBoard / W&B, progress lines in job logs, the applied LR in the logs.

Signals go to real subprocesses (one process, and a 2-process gloo torchrun run), as SLURM sends them;
the other command lines run ``layerlock-train``'s ``main()`` in this process (see ``cli_helpers``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli_helpers import checksums, command, rows, run_main, tiny_args
from teardown_abort import forgive_teardown_abort, torchrun_exit_codes

# long enough that a run signalled after its first checkpoint (step 10) cannot finish first
LONG = ["--set", "train.steps=40", "--set", "train.ckpt_every=10"]


def _start(args, cwd, launcher=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = (launcher or command()) + [str(a) for a in args]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for(predicate, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended first: {proc.communicate()}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _step(run: Path) -> int:
    try:
        return int(torch.load(run / "checkpoint.pt", weights_only=True)["step"])
    except (FileNotFoundError, RuntimeError, EOFError):
        return -1


def _weights(run: Path) -> dict:
    return torch.load(run / "checkpoint.pt", weights_only=True)["model"]


def _same_weights(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    assert run_main(tiny_args("--out", "full", *LONG), root).returncode == 0
    return root / "full"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_checkpoints_and_exits_for_requeue(tmp_path, reference, sig):
    run = tmp_path / "run"
    proc = _start(tiny_args("--out", "run", *LONG), tmp_path)
    _wait_for(lambda: _step(run) >= 10, proc)
    proc.send_signal(sig)
    time.sleep(0.05)
    proc.send_signal(sig)  # twice in a row: still one clean stop
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr
    saved = _step(run)
    assert f"stopped after step {saved} by {sig.name}; checkpoint written" in stdout and saved < 40
    assert "Traceback" not in stderr
    out = run_main(["--resume", "auto", "--out", "run", *tiny_args(*LONG)], tmp_path)
    assert out.returncode == 0, out.stderr
    assert rows(run / "metrics.jsonl") == rows(reference / "metrics.jsonl")
    assert _same_weights(_weights(reference), _weights(run))


def test_a_repeated_signal_after_the_stop_finished_does_not_kill_the_process():
    """The scheduler's repeat can arrive after the run stopped (a fast step and checkpoint) while the process
    still writes its summary: it must not die from the signal's default action then (SIGTERM, then SIGUSR1,
    in one process: each stop request is its own)."""
    code = "import os, signal\nfrom layerlock_plugin.reference.train.stop import StopRequest\n"
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        code += (f"with StopRequest() as stop:\n    os.kill(os.getpid(), {int(sig)})\n"
                 f"assert stop.requested\nos.kill(os.getpid(), {int(sig)})\nprint('still alive after {sig.name}')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, (out.returncode, out.stderr)
    assert out.stdout.split("\n")[:2] == ["still alive after SIGTERM", "still alive after SIGUSR1"], out.stdout


def test_a_signal_at_start_up_stops_after_the_first_step(tmp_path):
    proc = _start(tiny_args("--out", "run", *LONG), tmp_path)
    _wait_for(lambda: proc.stdout is not None, proc)
    first = proc.stdout.readline()  # printed once the trainer is built, before the first step
    assert first.startswith("layerlock-train: method=")
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr
    assert 1 <= _step(tmp_path / "run") <= 3


def test_a_signal_during_a_checkpoint_write_stops_after_the_next_step(tmp_path, monkeypatch):
    from layerlock_plugin.reference.train import checkpointing
    from layerlock_plugin.reference.config import load_config
    from layerlock_plugin.reference.train import Trainer

    sets = [s for s in tiny_args(*LONG)[1::2] if "=" in s]
    trainer = Trainer(load_config(None, [f"out_dir={tmp_path / 'run'}", *sets, "probe.enabled=false"]), echo=lambda s: None)
    real = checkpointing.save_atomic

    def save_and_get_signalled(obj, path):
        out = real(obj, path)
        if obj["step"] == 10:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while the checkpoint is being written
        return out

    monkeypatch.setattr(checkpointing, "save_atomic", save_and_get_signalled)
    summary = trainer.fit()
    assert summary["stopped_at"] == 11 and summary["interrupted"]
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 11


def _logged_steps(run: Path) -> int:
    """The last step in the run's metrics log (complete lines only: the run may be writing one)."""
    try:
        lines = (run / "metrics.jsonl").read_text().split("\n")[:-1]
    except FileNotFoundError:
        return 0
    return json.loads(lines[-1])["step"] if lines else 0


def _finished(proc: subprocess.CompletedProcess, run: Path) -> None:
    """A 2-process run that finished: exit 0, or torch's gloo teardown abort after its last files (forgiven)."""
    codes = [0] if proc.returncode == 0 else torchrun_exit_codes(proc.stderr)
    forgive_teardown_abort(codes, proc.stderr, [run / "encoder.pt", run / "summary.json"], f"2-process run {run.name}")


def _torchrun(nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "layerlock_plugin.reference.cli"]


@pytest.mark.timeout(360)  # three 2-process torchrun launches: ~60 s on CI's slow machine
def test_two_process_run_stops_on_a_signal_at_one_step_and_resumes_bitwise(tmp_path):
    ddp = [*tiny_args(*LONG), "--set", "train.strategy=ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = subprocess.run(_torchrun() + ddp + ["--out", "full"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=400)
    _finished(full, tmp_path / "full")
    proc = _start(ddp + ["--out", "run", "--resume", "auto"], tmp_path, launcher=_torchrun())  # starts fresh
    latest = tmp_path / "run" / "dcp" / "latest"
    _wait_for(lambda: latest.is_file() and latest.read_text().strip() >= "step_00000010", proc)
    after = 11 + int(torch.randint(0, 3, ()))  # some step after the first checkpoint, as logged
    _wait_for(lambda: _logged_steps(tmp_path / "run") >= after, proc)
    os.killpg(proc.pid, signal.SIGTERM)  # SLURM signals every process of the job step
    stdout, _ = proc.communicate(timeout=200)
    stopped = latest.read_text().strip()
    assert stopped != "step_00000040", "the run finished before the signal"
    # the printed command continues the run; without torchrun it is refused, naming that command
    hint = "torchrun --standalone --nproc_per_node=2 -m layerlock_plugin.reference.cli --resume run"
    assert f"Continue with: {hint}\n" in stdout
    alone = run_main(["--resume", "run"], tmp_path)
    assert alone.returncode == 2 and f"continue it under torchrun, e.g. `{hint}`" in alone.stderr, alone.stderr
    resumed = subprocess.run([sys.executable, "-m", "torch.distributed.run", *hint.split()[1:]], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=400)
    _finished(resumed, tmp_path / "run")
    assert rows(tmp_path / "run" / "metrics.jsonl") == rows(tmp_path / "full" / "metrics.jsonl")
    a, b = (torch.load(tmp_path / name / "encoder.pt", weights_only=True)["encoder"] for name in ("full", "run"))
    assert a.keys() == b.keys() and _same_weights(a, b)


# -- auto-resume ------------------------------------------------------------------------------------------
def test_resume_auto_starts_fresh_continues_and_says_so(tmp_path):
    args = tiny_args("--set", "train.steps=24")
    out = run_main(["--resume", "auto", "--out", "run", "--stop-after", "12", *args], tmp_path)
    assert out.returncode == 0 and "--resume auto: no checkpoint in run; starting a new run there" in out.stdout
    out = run_main(["--resume", "auto", "--out", "run", *args], tmp_path)
    assert out.returncode == 0 and "resuming at step 12" in out.stdout, out.stderr
    out = run_main(["--resume", "auto", "--out", "run", *args], tmp_path)
    assert out.returncode == 0 and "finished at step 24; nothing to do" in out.stdout
    before = checksums(tmp_path / "run")
    other = run_main(["--resume", "auto", "--out", "run", *args, "--set", "schedule.interval=5"], tmp_path)
    assert other.returncode == 2 and "differing fields: schedule.interval" in other.stderr
    missing = run_main(["--resume", "auto", *args], tmp_path)
    assert missing.returncode == 2 and "--resume: auto needs the run folder it continues: add --out DIR" in missing.stderr
    assert checksums(tmp_path / "run") == before


def test_resume_auto_restarts_a_run_that_never_checkpointed(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    out = run_main(["--resume", "auto", "--out", "run", *tiny_args("--set", "train.steps=4")], tmp_path)
    assert out.returncode == 0 and "holds no complete checkpoint" in out.stdout
    assert rows(tmp_path / "run" / "metrics.jsonl")[0]["step"] == 1 and len(rows(tmp_path / "run" / "metrics.jsonl")) == 4


# -- checkpoint cadence and retention ----------------------------------------------------------------------
def test_keep_last_keeps_the_newest_checkpoints(tmp_path):
    out = run_main(tiny_args("--out", "run", "--set", "train.steps=24", "--set", "train.ckpt_every=4",
                            "--set", "train.keep_last=3"), tmp_path)
    assert out.returncode == 0, out.stderr
    kept = sorted(p.name for p in (tmp_path / "run").glob("checkpoint*.pt"))
    assert kept == ["checkpoint.pt", "checkpoint.step_00000016.pt", "checkpoint.step_00000020.pt"]
    assert torch.load(tmp_path / "run" / "checkpoint.step_00000016.pt", weights_only=True)["step"] == 16
    refused = run_main(tiny_args("--out", "x", "--set", "train.keep_last=0"), tmp_path)
    assert refused.returncode == 2 and "train.keep_last: must be a positive integer" in refused.stderr


def test_time_based_checkpoints(tmp_path, monkeypatch):
    from layerlock_plugin.reference.config import load_config
    from layerlock_plugin.reference.train import Trainer

    sets = [s for s in tiny_args()[1::2] if "=" in s]
    trainer = Trainer(load_config(None, [f"out_dir={tmp_path}", *sets, "train.steps=6", "train.ckpt_every=100",
                                         "train.ckpt_every_minutes=0.00001", "probe.enabled=false"]), echo=lambda s: None)
    saved = []
    real = trainer.checkpointer.save
    monkeypatch.setattr(trainer.checkpointer, "save", lambda: saved.append(trainer.step) or real())
    trainer.fit()
    assert saved == [1, 2, 3, 4, 5, 6]


# -- where researchers look --------------------------------------------------------------------------------
def test_tensorboard_scalars_and_plots_with_the_applied_lr(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = run_main(tiny_args("--out", "run", "--set", "train.tensorboard=true"), tmp_path)
    assert out.returncode == 0, out.stderr
    acc = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"loss", "lr", "grad_norm", "layerlock/num_frozen", "layerlock/warmup_factor",
            "throughput/clips_per_s", "loss/layer_3"} <= set(tags["scalars"])
    assert {"plots/loss", "plots/schedule", "plots/collapse"} <= set(tags["images"])
    metrics = {r["step"]: r for r in rows(tmp_path / "run" / "metrics.jsonl")}
    lr = {e.step: e.value for e in acc.Scalars("lr")}
    assert lr[7] == pytest.approx(metrics[7]["lr"], rel=1e-6)
    # step 7 is the step after the switch at step 6: the scheduler's LR times the warmup ramp
    from layerlock_plugin.reference.train.optim import cosine_with_warmup

    scheduled = 1.5e-3 * cosine_with_warmup(24, 3, 0.1)(6)
    assert metrics[7]["lr"] == pytest.approx(scheduled * metrics[7]["layerlock/warmup_factor"], rel=1e-9)
    assert metrics[7]["layerlock/warmup_factor"] < 1


def _wandb_folder_report(run: Path) -> str:
    """What a failed W&B check needs to be understood: the files of ``run/wandb`` and the tail of W&B's own
    debug logs (W&B runs its own service process; its failures show only there)."""
    folder = run / "wandb"
    if not folder.is_dir():
        return f"{folder} does not exist"
    files = sorted(str(f.relative_to(folder)) for f in folder.rglob("*"))
    logs = "".join(f"\n--- {f.relative_to(folder)} (last lines)\n"
                   + "\n".join(f.read_text(errors="replace").splitlines()[-15:])
                   for f in sorted(folder.glob("*/logs/debug*.log")))
    return f"files: {files}{logs}"


def _run_main_as_a_process_with_wandb(args: list, cwd: Path):
    """``run_main``, then what the end of a ``layerlock-train`` process does for W&B: ``run.finish()`` returns
    before W&B's service process has written the run's last records, and its exit hook (``wandb.teardown``)
    waits for them. In this long-lived test process that hook would never run, and the log read right after
    could miss the session's metrics (seen once in five full-suite runs: W&B's log ended at "stream:
    finishing up")."""
    import wandb

    out = run_main(args, cwd)
    wandb.teardown()
    return out


def test_wandb_offline_logs_into_the_run_folder_and_resumes_the_same_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    args = tiny_args("--out", "run", "--set", "train.wandb.project=layerlock-test", "--set", "train.wandb.mode=offline",
                     "--set", "train.steps=8")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    out = _run_main_as_a_process_with_wandb([*args, "--stop-after", "4"], tmp_path)
    assert out.returncode == 0, out.stderr + _wandb_folder_report(run)
    run_id = (run / "wandb" / "wandb_run_id").read_text().strip()
    out = _run_main_as_a_process_with_wandb(["--resume", "run", "--no-progress"], tmp_path)
    assert out.returncode == 0, out.stderr + _wandb_folder_report(run)
    assert (run / "wandb" / "wandb_run_id").read_text().strip() == run_id
    # one offline folder per session; W&B names a second one started in the same second "...-{id}-1"
    logs = list((run / "wandb").glob(f"offline-run-*-{run_id}*/run-{run_id}.wandb"))
    assert len(logs) == 2, f"not one offline log per session of run {run_id}; " + _wandb_folder_report(run)
    missing = [str(f) for f in logs if b"layerlock/num_frozen" not in f.read_bytes()]
    assert not missing, f"{missing} lack the LayerLock metrics; " + _wandb_folder_report(run)


def test_a_missing_wandb_is_refused_naming_the_extra(tmp_path, monkeypatch):
    import importlib.util

    from layerlock_plugin.errors import ConfigError
    from layerlock_plugin.reference.train import metric_sinks
    from layerlock_plugin.reference.config import load_config

    real = importlib.util.find_spec
    monkeypatch.setattr(metric_sinks.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    cfg = load_config(None, [f"out_dir={tmp_path / 'x'}", "train.wandb.project=p"])
    with pytest.raises(ConfigError, match=r'^train\.wandb\.project: is set but wandb is not installed: pip install -e '
                                          r'"\.\[wandb\]" from the layerlock-plugin checkout, or pip install '
                                          r'"layerlock-plugin\[wandb\]" where layerlock-plugin is installed already'):
        metric_sinks.check_sinks(cfg.train)
    assert not (tmp_path / "x").exists()


def test_progress_in_a_job_log_is_one_line_per_log_step(tmp_path):
    args = [a for a in tiny_args("--out", "run", "--set", "train.log_every=8") if a != "--no-progress"]
    out = run_main(args, tmp_path)  # stdout is not a terminal, as in a SLURM job log
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("step ")]
    assert [line.split(" ")[1] for line in lines] == ["8/24", "16/24", "24/24"]
    assert all(" steps/s | ETA " in line and " | frozen " in line for line in lines)
    assert "\r" not in out.stdout + out.stderr
