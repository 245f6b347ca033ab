"""Runs never overwrite, mix or silently change: run folders, resume, budgets, interruptions, config parsing.

Every test drives ``layerlock-train`` with a user's command lines and reads its exit code and output: the
installed executable in its own process where the process matters (a kill, Ctrl-C, what the terminal shows
of a whole run), its ``main()`` in this process otherwise (see ``cli_helpers``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from cli_helpers import checksums, command, rows, run_cli, run_main, tiny_args


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted tiny run (24 steps) that interrupted-and-resumed runs must equal."""
    root = tmp_path_factory.mktemp("reference")
    out = run_main(tiny_args("--out", "full"), root)
    assert out.returncode == 0, out.stderr
    return root / "full"


def _same_run(a: Path, b: Path) -> None:
    assert rows(a / "metrics.jsonl") == rows(b / "metrics.jsonl")
    assert (a / "events.jsonl").read_text() == (b / "events.jsonl").read_text()
    ma, mb = torch.load(a / "checkpoint.pt", weights_only=True), torch.load(b / "checkpoint.pt", weights_only=True)
    assert ma["step"] == mb["step"]
    assert all(torch.equal(ma["model"][k], mb["model"][k]) for k in ma["model"]), "weights differ"


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """The reference run stopped after step 13, made as ``--out src`` (the folder name its config holds)."""
    root = tmp_path_factory.mktemp("stopped")
    out = run_main(tiny_args("--out", "src", "--stop-after", "13"), root)
    assert out.returncode == 0, out.stderr
    return root / "src"


def _src(stopped: Path, tmp_path: Path) -> Path:
    """This test's own copy of the stopped run, as ``src`` in ``tmp_path`` (where it was made, for its config)."""
    return Path(shutil.copytree(stopped, tmp_path / "src"))


# -- run folders --------------------------------------------------------------------------------------
def test_resume_of_a_copied_run_writes_only_into_the_copy(tmp_path, reference, stopped):
    shutil.copytree(_src(stopped, tmp_path), tmp_path / "copy")
    before = checksums(tmp_path / "src")
    out = run_main(["--resume", "copy", "--no-progress"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert checksums(tmp_path / "src") == before, "resuming the copy wrote into the original run"
    assert yaml.safe_load((tmp_path / "copy" / "config.yaml").read_text())["out_dir"] == "copy"
    _same_run(reference, tmp_path / "copy")


def test_resume_into_another_folder_forks_and_leaves_the_source_untouched(tmp_path, reference, stopped):
    before = checksums(_src(stopped, tmp_path))
    out = run_main(["--resume", "src", "--out", "fork", "--no-progress"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert checksums(tmp_path / "src") == before
    _same_run(reference, tmp_path / "fork")
    # a fork needs a fresh folder, as a new run does
    refused = run_main(["--resume", "src", "--out", "fork"], tmp_path)
    assert refused.returncode == 2 and "out_dir: fork holds a run" in refused.stderr


def test_a_fork_is_self_contained_from_its_first_moment(tmp_path, stopped):
    _src(stopped, tmp_path)
    # the fork stops right away: it still holds a checkpoint of the resumed state, and resumes on its own
    assert run_main(["--resume", "src", "--out", "fork", "--stop-after", "14", "--no-progress"], tmp_path).returncode == 0
    shutil.rmtree(tmp_path / "src")
    assert torch.load(tmp_path / "fork" / "checkpoint.pt", weights_only=True)["step"] == 14
    assert run_main(["--resume", "fork", "--no-progress"], tmp_path).returncode == 0


# the probes' cheapest read-out, for the tests that only ask whether the probes ran
LINEAR_PROBE = ["--set", "probe.kinds=[linear]", "--set", "probe.kind=linear"]


def test_a_new_run_refuses_a_folder_that_holds_one_unless_overwrite_removes_it_all(tmp_path):
    assert run_main(tiny_args("--out", "run", *LINEAR_PROBE, probe=True), tmp_path).returncode == 0
    assert (tmp_path / "run" / "probes.json").is_file()
    before = checksums(tmp_path / "run")
    refused = run_main(tiny_args("--out", "run"), tmp_path)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        "layerlock-train: error: out_dir: run holds a run (with a checkpoint.pt); continue it with --resume run, "
        "replace it with --overwrite, or name another folder with --out"]
    assert checksums(tmp_path / "run") == before
    out = run_main(tiny_args("--out", "run", "--overwrite", "--set", "train.steps=8"), tmp_path)
    assert out.returncode == 0, out.stderr
    assert not (tmp_path / "run" / "probes.json").exists(), "a stale probes.json survived --overwrite"
    assert rows(tmp_path / "run" / "metrics.jsonl")[-1]["step"] == 8


def test_overwrite_never_deletes_files_that_are_not_a_runs(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    out = run_main(tiny_args("--out", "mine", "--overwrite"), tmp_path)
    assert out.returncode == 2 and "holds files that are not a run's (notes.txt)" in out.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_without_out_a_new_run_gets_a_fresh_folder(tmp_path):
    first = run_main(tiny_args("--set", "train.steps=2"), tmp_path)
    second = run_main(tiny_args("--set", "train.steps=2"), tmp_path)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    folders = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(folders) == 2 and all(f.startswith("layerlock-") for f in folders)


# -- interruptions ------------------------------------------------------------------------------------
def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command() + args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended before the test could interrupt it: {proc.communicate()}"
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.02)


def _kill_when(predicate, proc: subprocess.Popen, timeout: float = 240) -> None:
    """SIGKILL the run at a moment when ``predicate`` holds. The run is paused (SIGSTOP) while the predicate
    reads its files, so what it saw is still true when the kill lands: a run left going between the check
    and the kill can write its next checkpoint in between (a race that failed CI once)."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"the run ended before the test could interrupt it: {proc.communicate()}"
        assert time.monotonic() < deadline, "timed out waiting for the run"
        proc.send_signal(signal.SIGSTOP)
        try:
            ready = predicate()
        except BaseException:
            proc.send_signal(signal.SIGCONT)  # never leave the run paused: the caller waits for it to end
            raise
        if ready:
            proc.kill()
            return
        proc.send_signal(signal.SIGCONT)
        time.sleep(0.02)


def _last_logged_step(run: Path) -> int:
    """The step of the last whole row in metrics.jsonl (a paused run may have half written the next one)."""
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return -1
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue
    return -1


LONG = ["--set", "train.steps=80", "--set", "train.ckpt_every=10"]  # interrupted after step 20 or so


@pytest.fixture(scope="module")
def long_reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("long")
    assert run_main(tiny_args("--out", "full", *LONG), root).returncode == 0
    return root / "full"


def _checkpoint_step(run: Path) -> int:
    try:
        return int(torch.load(run / "checkpoint.pt", weights_only=True)["step"])
    except (FileNotFoundError, RuntimeError, EOFError):
        return -1


def test_a_killed_run_resumes_to_the_uninterrupted_logs(tmp_path, long_reference):
    run = tmp_path / "run"
    proc = _start(tiny_args("--out", "run", *LONG), tmp_path)
    try:
        # kill -9 once rows past the latest checkpoint were logged (they must not survive the resume)
        _kill_when(lambda: _checkpoint_step(run) >= 20 and _last_logged_step(run) > _checkpoint_step(run) + 1, proc)
    finally:
        proc.communicate()
    saved = _checkpoint_step(run)
    assert saved < 80 and _last_logged_step(run) > saved
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 9999, "loss": 0.')  # the line a kill tears while it is being written
    out = run_main(["--resume", "run", "--no-progress"], tmp_path)
    assert out.returncode == 0, out.stderr
    _same_run(long_reference, run)


def test_ctrl_c_stops_after_the_step_with_a_checkpoint_and_resume_continues_exactly(tmp_path, long_reference):
    run = tmp_path / "run"
    proc = _start(tiny_args("--out", "run", *LONG), tmp_path)
    _wait_for(lambda: _checkpoint_step(run) >= 10, proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    saved = _checkpoint_step(run)
    assert f"stopped after step {saved} by SIGINT; checkpoint written" in stdout
    assert rows(run / "metrics.jsonl")[-1]["step"] == saved, "the logs run past the checkpoint"
    out = run_main(["--resume", "run", "--no-progress"], tmp_path)
    assert out.returncode == 0, out.stderr
    _same_run(long_reference, run)


# -- budgets and resume semantics -----------------------------------------------------------------------
def test_stop_after_keeps_the_schedule_and_resume_finishes_bitwise(tmp_path, reference):
    out = run_main(tiny_args("--out", "run", "--stop-after", "11"), tmp_path)
    assert out.returncode == 0, out.stderr
    assert "stopped after step 11 as asked (--stop-after); checkpoint written. Continue with: " \
           "layerlock-train --resume run" in out.stdout
    lr_at_11 = rows(tmp_path / "run" / "metrics.jsonl")[-1]["lr"]
    assert lr_at_11 == rows(reference / "metrics.jsonl")[10]["lr"], "--stop-after changed the LR schedule"
    resumed = run_main(["--resume", "run", "--no-progress"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    # one step count in every message
    assert "[layerlock] resuming at step 11:" in resumed.stdout and ", resuming at step 11" in resumed.stdout
    _same_run(reference, tmp_path / "run")


def test_changing_the_budget_on_resume_is_refused_unless_extended_and_extension_says_what_changes(tmp_path):
    assert run_main(tiny_args("--out", "run", "--stop-after", "12"), tmp_path).returncode == 0
    before = checksums(tmp_path / "run")
    for args in (["--steps", "40"], ["--set", "train.steps=40"]):
        out = run_main(["--resume", "run", *args], tmp_path)
        assert out.returncode == 2
        assert out.stderr.strip().splitlines() == [
            "layerlock-train: error: train.steps: the resumed run's budget is 24 steps and train.steps=40 would "
            "recompute its LR schedule; say --extend 40 to do that (or --stop-after N to stop early keeping the "
            "schedule)"]
    for steps in (4, 12):  # at or below the resumed step: nothing to train
        out = run_main(["--resume", "run", "--set", f"train.steps={steps}"], tmp_path)
        assert out.returncode == 2 and f"train.steps: {steps} is not above the resumed step 12" in out.stderr
    assert checksums(tmp_path / "run") == before
    out = run_main(["--resume", "run", "--extend", "40", "--no-progress"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert ("extending the run from 24 to 40 steps: the cosine LR schedule is recomputed for 40 steps, so at step 12 "
            "the LR goes from ") in out.stdout
    assert rows(tmp_path / "run" / "metrics.jsonl")[-1]["step"] == 40
    done = run_main(["--resume", "run"], tmp_path)
    assert done.returncode == 2 and "the run is finished (extend it with --extend N, N > 40)" in done.stderr


def test_a_warmup_longer_than_the_run_is_warned_and_extend_describes_the_lr_curve_that_runs(tmp_path):
    long_warmup = ["--set", "optim.warmup_steps=100"]
    out = run_cli(tiny_args("--out", "run", "--stop-after", "12", *long_warmup), tmp_path)
    assert out.returncode == 0, out.stderr
    warning = [line for line in out.stderr.splitlines() if "optim.warmup_steps" in line]
    assert len(warning) == 1 and warning[0].startswith(
        "layerlock-train: warning: optim.warmup_steps: the LR warmup (100 steps) is not shorter than the run "
        "(train.steps=24): the LR rises for the whole run"), out.stderr
    out = run_cli(["--resume", "run", "--extend", "40", "--no-progress"], tmp_path)
    assert out.returncode == 0, out.stderr
    said = next(line for line in out.stdout.splitlines() if line.startswith("extending the run"))
    assert "then decays" not in said, said  # the warmup (100 steps) outlasts the extended run too: the LR only rises
    last_lr = rows(tmp_path / "run" / "metrics.jsonl")[-1]["lr"]
    assert f"then keeps rising (optim.warmup_steps=100) to {last_lr:.3g} at step 40" in said, (said, last_lr)


def test_no_probe_is_said_on_resume_and_probe_turns_them_back_on(tmp_path):
    assert run_main(tiny_args("--out", "run", "--stop-after", "20", *LINEAR_PROBE), tmp_path).returncode == 0
    out = run_main(["--resume", "run", "--probe", "--no-progress"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "run" / "probes.json").is_file()
    assert run_main(tiny_args("--out", "quiet", "--stop-after", "20"), tmp_path).returncode == 0
    out = run_main(["--resume", "quiet", "--no-progress"], tmp_path)
    assert "note: probes are off in this run's config (probe.enabled: false, e.g. from --no-probe); add --probe" in out.stdout
    assert not (tmp_path / "quiet" / "probes.json").exists()


# -- config parsing and messages -----------------------------------------------------------------------
def test_scientific_numbers_parse_as_numbers_in_set_and_in_yaml(tmp_path, capfd):
    from layerlock_plugin.reference.config import load_config

    cfg = load_config(None, ["optim.lr=1e-3", "train.steps=5E2", "optim.weight_decay=5.0e-2"])
    assert cfg.optim.lr == 0.001 and cfg.train.steps == 500 and isinstance(cfg.train.steps, int)
    assert cfg.optim.weight_decay == 0.05
    (tmp_path / "c.yaml").write_text("optim:\n  lr: 2e-4\ntrain:\n  steps: 1e3\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.optim.lr == 0.0002 and cfg.train.steps == 1000
    out = run_main(["--set", "optim.lr=1e-3", "--print-config"], tmp_path)
    assert out.returncode == 0 and "lr: 0.001" in capfd.readouterr().out  # written to /dev/stdout


def test_yaml_syntax_errors_name_file_line_and_column(tmp_path):
    (tmp_path / "bad.yaml").write_text("model:\n  preset: tiny\n  depth: [1, 2\n")
    out = run_main(["--config", "bad.yaml", "--out", "x"], tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    line, = out.stderr.strip().splitlines()
    assert line.startswith("layerlock-train: error: --config bad.yaml: line 4, column 1: ")
    assert not (tmp_path / "x").exists()


def test_dry_run_applies_the_real_runs_batch_check(tmp_path):
    out = run_main(["--dry-run", "--world-size", "3", "--set", "train.strategy=ddp"], tmp_path)
    assert out.returncode == 2 and "train.batch_size: 32 (the global batch) must be divisible by world size" in out.stderr
    out = run_main(["--dry-run", "--world-size", "64"], tmp_path)
    assert out.returncode == 2 and "train.strategy: 'none' runs one process; --world-size 64 needs" in out.stderr


def test_package_warnings_are_one_clean_line(tmp_path):
    out = run_cli(tiny_args("--out", "run", "--set", "train.steps=3"), tmp_path)
    assert out.returncode == 0, out.stderr
    warning = [line for line in out.stderr.splitlines() if "warning" in line]
    assert sorted(warning) == [
        "layerlock-train: warning: optim.warmup_steps: the LR warmup (3 steps) is not shorter than the run "
        "(train.steps=3): the LR rises for the whole run: it starts at 0.0005 and keeps rising "
        "(optim.warmup_steps=3) to 0.0015 at step 3, and never decays. Set optim.warmup_steps below 3 (e.g. 1).",
        "layerlock-train: warning: schedule: the last freeze event is at step 14 but the run has 3 "
        "steps; only 0 of 3 blocks will be frozen. Shorten schedule.pixel_steps / schedule.interval "
        "or lower schedule.max_frozen."]


def test_an_adaptive_run_without_events_says_so(tmp_path):
    adaptive = ["--set", "schedule.kind=adaptive", "--set", "schedule.adaptive.min_pixel_steps=1000",
                "--set", "train.steps=30"]
    out = run_main(tiny_args("--out", "run", *adaptive), tmp_path)
    assert out.returncode == 0, out.stderr
    assert "note: the adaptive schedule decided no freeze event in 30 steps" in out.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["adaptive"]["events"] == 0 and "decided no freeze event" in summary["adaptive"]["note"]


def test_adaptive_signals_plot_spans_the_run(monkeypatch, tmp_path):
    from layerlock_plugin.reference import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or Path(path))
    plots.plot_adaptive_signals([], [], tmp_path / "a.png", explicit_events=[(600, 1), (800, 2)], total_steps=300)
    depth_axis = figures[0].axes[2]
    assert depth_axis.get_xlim() == (0.0, 300.0)
    assert any("no freeze event decided in 300 steps" in t.get_text() for t in depth_axis.texts)


def test_mask_ratio_has_one_message_with_one_range(tmp_path):
    from layerlock_plugin.errors import ConfigError
    from layerlock_plugin.reference.config import load_config

    messages = set()
    for bad in ("0", "1", "1.5", "0.999", "-0.2", "abc"):
        with pytest.raises(ConfigError) as e:
            load_config(None, [f"model.mask_ratio={bad}"])
        messages.add(str(e.value).rsplit(", got", 1)[0])
    assert messages == {"model.mask_ratio: must be a number in [0.007812, 0.9922) for the model's 64 tokens "
                        "(at least one masked and one visible token)"}


def test_a_switch_warmup_longer_than_the_interval_warns_once_in_the_core(toy_encoder):
    from layerlock_plugin.controller import LayerLock, LayerLockConfig
    from layerlock_plugin.schedule import ScheduleConfig
    from layerlock_plugin.warmup import WarmupConfig

    config = LayerLockConfig(schedule=ScheduleConfig(pixel_steps=8, interval=4, max_frozen=3), warmup=WarmupConfig(steps=50))
    with pytest.warns(UserWarning, match=r"^warmup\.steps: the switch warmup \(50 steps\) is longer than the 4 steps") as w:
        LayerLock(toy_encoder, config)
    assert len([x for x in w if "warmup.steps" in str(x.message)]) == 1
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LayerLock(toy_encoder, LayerLockConfig(schedule=ScheduleConfig(pixel_steps=8, interval=4, max_frozen=3),
                                               warmup=WarmupConfig(steps=4)))
