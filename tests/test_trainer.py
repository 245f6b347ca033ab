"""The reference trainer end to end on tiny settings: exact resume, the CLI's run folder, bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from layerlock_plugin.checkpoint import load_checkpoint
from layerlock_plugin.errors import CheckpointError, ConfigError
from layerlock_plugin.reference.cli import main
from layerlock_plugin.reference.config import load_config
from layerlock_plugin.reference.data import StepBatchSampler
from layerlock_plugin.reference.train import Trainer

TINY = [
    "data.num_videos=64", "train.batch_size=8", "train.steps=24", "train.log_every=2", "train.ckpt_every=100",
    "train.progress=false", "schedule.pixel_steps=6", "schedule.interval=4", "schedule.max_frozen=3",
    "warmup.steps=6", "optim.warmup_steps=3", "probe.enabled=false", "guard.every=2",
    "train.threads=1",  # tiny models gain nothing from more threads; on a shared machine they lose a lot
]


def tiny_config(tmp_path, *extra):
    return load_config(None, [f"out_dir={tmp_path}", *TINY, *extra])


def _train(config, stop_after=None, resume=None):
    torch.manual_seed(123)  # resume must not depend on the caller's RNG state
    trainer = Trainer(config, resume=resume, echo=lambda s: None)
    trainer.fit(stop_after=stop_after)
    return trainer


@pytest.mark.parametrize("method, stop", [("layerlock", 13), ("layerlock", 10), ("freeze-only", 7), ("latent-naive", 11)])
def test_resume_mid_schedule_matches_uninterrupted(tmp_path, method, stop):
    # events at steps 6, 10, 14; warmup 6 steps, so stop=13 resumes in the middle of a switch warmup
    # and stop=10 right after an event (stop_after=10 saves the state after step index 9)
    args = (f"method={method}", "train.log_every=1")
    full = _train(tiny_config(tmp_path / "full", *args))
    part = _train(tiny_config(tmp_path / "part", *args), stop_after=stop)
    assert part.step == stop
    resumed = _train(tiny_config(tmp_path / "part", *args), resume=tmp_path / "part")
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run diverged from the uninterrupted one"
    rows_full = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    rows_res = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]  # noqa: E731
    assert strip(rows_full) == strip(rows_res)
    assert (tmp_path / "full" / "events.jsonl").read_text() == (tmp_path / "part" / "events.jsonl").read_text()


def test_frozen_blocks_unchanged_during_training(tmp_path):
    cfg = tiny_config(tmp_path)
    trainer = Trainer(cfg, echo=lambda s: None)
    trainer.fit(stop_after=7)  # first freeze at step 6: stem + block 1
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    assert any(n.startswith("blocks.0.") for n in frozen) and any(n.startswith("patch_embed") for n in frozen)
    trainer.fit()
    after = dict(trainer.model.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen.items())
    assert all(after[n] not in trainer.optimizer.state for n in frozen)


def test_cli_main_job_writes_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--out", str(out), "--steps", "16", "--no-progress"]
    for item in TINY + ["probe.train_videos=48", "probe.test_videos=48", "probe.max_iter=20"]:
        if not item.startswith(("train.steps", "probe.enabled")):
            args += ["--set", item]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "step 6: froze stem, block_1 (1 blocks frozen); target -> layer_1" in printed
    assert "probes (frozen features, " in printed and "(random init " in printed
    for name in ("config.yaml", "metrics.jsonl", "events.jsonl", "checkpoint.pt", "probes.json", "summary.json",
                 "plots/loss.png", "plots/schedule.png", "plots/collapse.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    events = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines()]
    assert [(e["step"], e["num_frozen"], e["target_layer"]) for e in events] == [(6, 1, 1), (10, 2, 2), (14, 3, 3)]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 16 and rows[-1]["layerlock/num_frozen"] == 3.0 and "loss/layer_3" in rows[-1]
    assert any("layerlock/feature_std" in r for r in rows)
    probes = json.loads((out / "probes.json").read_text())
    for key in ("motion_acc", "appearance_acc", "dense_rmse", "dense_r2", "motion_chance_uniform"):
        assert key in probes and key in probes["random_init"]
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["step"] == 16 and ckpt["layerlock"]["next_step"] == 16
    # the written config reproduces the run
    assert load_config(out / "config.yaml").to_dict() == load_config(None, [f"out_dir={out}", *args_to_sets(args)]).to_dict()


def args_to_sets(args):
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    return sets + ["train.steps=16", "train.progress=false"]


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "layerlock_plugin.reference.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "latent-naive" in out.stdout


def test_bad_input_errors(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"^optim\.lr: must be a positive number"):
        tiny_config(tmp_path, "optim.lr=-1")
    with pytest.raises(ConfigError, match=r"^model\.depht: unknown field"):
        tiny_config(tmp_path, "model.depht=3")
    with pytest.raises(ConfigError, match=r"^schedule\.max_frozen: must be smaller than the number of freezable encoder blocks \(4\)"):
        Trainer(tiny_config(tmp_path, "schedule.max_frozen=4"))
    with pytest.raises(ConfigError, match=r"^data\.size: must equal model\.img_size \(32\)"):
        tiny_config(tmp_path, "data.size=64")
    with pytest.raises(ConfigError, match=r"^method"):
        tiny_config(tmp_path, "method=byol")
    assert main(["--out", str(tmp_path), "--set", "train.steps=0"]) == 2
    assert "train.steps: must be a positive integer, got 0" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="only 2 of 3 blocks will be frozen"):
        Trainer(tiny_config(tmp_path, "train.steps=12"), echo=lambda s: None)


def test_resume_refuses_other_config_truncated_and_other_model(tmp_path):
    _train(tiny_config(tmp_path / "a"), stop_after=8)
    ckpt_file = tmp_path / "a" / "checkpoint.pt"
    with pytest.raises(CheckpointError, match="differing fields: schedule.interval"):
        Trainer(tiny_config(tmp_path / "a", "schedule.interval=5"), resume=tmp_path / "a")
    # a different model: the config check names it first
    with pytest.raises(CheckpointError, match="model.embed_dim"):
        Trainer(tiny_config(tmp_path / "a", "model.embed_dim=48"), resume=tmp_path / "a")
    good = ckpt_file.read_bytes()
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(good[: len(good) // 3])
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        Trainer(tiny_config(tmp_path / "b"), resume=trunc)  # a file outside a run folder: resumed into a new one
    assert ckpt_file.read_bytes() == good, "a failed resume must not touch the run's checkpoint"
    assert main(["--resume", str(trunc), "--out", str(tmp_path / "b")]) == 2


def test_step_batch_sampler_is_a_function_of_the_step():
    s = StepBatchSampler(10, 4, seed=3, start_step=0, end_step=6)
    batches = list(s)
    assert list(StepBatchSampler(10, 4, seed=3, start_step=4, end_step=6)) == batches[4:]
    flat = [i for b in batches for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))  # epochs are permutations


def test_custom_loop_example_runs_its_default_length_without_a_guard_trip(monkeypatch, capsys):
    """README's own loop, as a user runs it (``python examples/custom_loop.py``, here in this process): three
    freeze events and no collapse-guard trip (its first contact with the guard must not be an unexplained trip)."""
    import runpy

    example = Path(__file__).resolve().parents[1] / "examples" / "custom_loop.py"
    monkeypatch.setattr(sys, "argv", [str(example)])
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(example), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    out = captured.out
    assert "step 40: froze stem, block_1 (1 blocks frozen); target -> layer_1" in out
    assert "step 80: froze block_3 (3 blocks frozen); target -> layer_3" in out
    assert "tripped" not in out + captured.err and "collapse guard: 0 trips" in out, out
    assert "LayerLock resumes at step 120" in out


def test_set_data_source_folder_starts_a_fresh_data_section(tmp_path):
    (tmp_path / "videos").mkdir()
    cfg = load_config(None, ["data.source=folder", f"data.root={tmp_path / 'videos'}", "data.frame_stride=1"])
    assert cfg.data_source == "folder" and cfg.data.root == str(tmp_path / "videos") and cfg.data.frame_stride == 1
    # the digits fields of the packaged config are gone, and a digits field given after the switch is refused
    with pytest.raises(ConfigError, match="data.num_videos"):
        load_config(None, ["data.source=folder", f"data.root={tmp_path / 'videos'}", "data.num_videos=4"])
    assert load_config(None, ["data.source=digits", "data.num_videos=64"]).data.num_videos == 64
