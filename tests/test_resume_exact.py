"""A stopped and resumed run is the uninterrupted run: with every stochastic knob on, off the log cadence,
and never mixed with another run's checkpoint.

Every test drives the installed ``layerlock-train`` as a subprocess, as a user does (the 2-process case
with the same knobs is in ``tests/test_distributed.py``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cli_helpers import checksums, rows, run_cli, tiny_args

pytestmark = pytest.mark.timeout(600)

#: Every stochastic knob of the config: drop-path and dropout (global torch RNG, in every block), the
#: query subset of the masked tokens (the shared mask generator). Masking itself is always random.
STOCHASTIC = ["--set", "model.drop_path=0.2", "--set", "model.proj_drop=0.1", "--set", "target.loss_fraction=0.5"]
#: Rows every 5 steps, so a stop at step 13 lies between two rows.
OFF_CADENCE = ["--set", "train.log_every=5"]


def _checkpoint(run: Path) -> dict:
    return torch.load(run / "checkpoint.pt", weights_only=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    out = run_cli(tiny_args("--out", "full", *STOCHASTIC, *OFF_CADENCE), root)
    assert out.returncode == 0, out.stderr
    return root / "full"


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """The same run stopped after step 13 (off the 5-step log cadence, inside the switch warmup of the
    event at step 10), then resumed to the end in its folder."""
    root = tmp_path_factory.mktemp("resumed")
    out = run_cli(tiny_args("--out", "run", *STOCHASTIC, *OFF_CADENCE, "--stop-after", "13"), root)
    assert out.returncode == 0, out.stderr
    stopped_rows = rows(root / "run" / "metrics.jsonl")
    out = run_cli(["--resume", "run", "--no-progress"], root)
    assert out.returncode == 0, out.stderr
    return root / "run", stopped_rows


def test_resume_with_dropout_drop_path_and_query_subset_is_bitwise(uninterrupted, resumed):
    run, _ = resumed
    a, b = _checkpoint(uninterrupted), _checkpoint(run)
    assert a["step"] == b["step"] == 24
    differ = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert differ == [], f"{len(differ)} of {len(a['model'])} model tensors differ, e.g. {differ[:3]}"
    # the restore point of the RNG: the dropout stream ends where the uninterrupted one does
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"]), "the global torch RNG state differs"
    assert torch.equal(a["rng"]["mask"], b["rng"]["mask"]), "the mask generator state differs"
    for key in a["optimizer"]["state"]:
        for name, value in a["optimizer"]["state"][key].items():
            assert torch.equal(value, b["optimizer"]["state"][key][name]), f"optimizer state {key}.{name} differs"


def test_logs_after_an_off_cadence_stop_equal_the_uninterrupted_logs(uninterrupted, resumed):
    run, stopped_rows = resumed
    assert [r["step"] for r in stopped_rows] == [5, 10], "a stop between log steps wrote a row off the cadence"
    assert rows(run / "metrics.jsonl") == rows(uninterrupted / "metrics.jsonl")
    assert rows(run / "throughput.jsonl", drop=()) .__len__() == len(rows(uninterrupted / "throughput.jsonl", drop=()))
    assert (run / "events.jsonl").read_text() == (uninterrupted / "events.jsonl").read_text()
    # where the run was resumed is recorded apart from the logs that must equal the uninterrupted run's
    assert rows(run / "sessions.jsonl") == [{"step": 0, "kind": "start", "train_steps": 24},
                                            {"step": 13, "kind": "resume", "train_steps": 24}]


def test_a_folder_whose_checkpoint_belongs_to_another_run_is_refused_before_anything_is_written(tmp_path):
    assert run_cli(tiny_args("--out", "run", "--set", "train.steps=4"), tmp_path).returncode == 0
    wide = tiny_args("--out", "wide", "--set", "train.steps=6", "--set", "model.embed_dim=48")
    assert run_cli(wide, tmp_path).returncode == 0
    shutil.copy(tmp_path / "wide" / "checkpoint.pt", tmp_path / "run" / "checkpoint.pt")
    before = checksums(tmp_path / "run")
    # extended, plain (the foreign run is finished: the model is named, not the budget) and forked
    for args in (["--resume", "run", "--extend", "8"], ["--resume", "run"], ["--resume", "run", "--out", "fork"]):
        out = run_cli(args, tmp_path)
        assert out.returncode == 2, (args, out.stdout[-2000:])
        line, = out.stderr.strip().splitlines()
        assert line.startswith("layerlock-train: error: run: its config.yaml and checkpoint.pt belong to different "
                               "runs; differing fields: model.embed_dim"), (args, line)
        assert "train.steps" not in line  # a budget the folder's run may legitimately change
    assert checksums(tmp_path / "run") == before
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]["embed_dim"] == 96
    assert not (tmp_path / "fork").exists()


def test_a_finished_run_is_refused_before_the_trainer_is_built(tmp_path):
    """The refusal needs the checkpoint's step and config only: the trainer (its model, its rendered
    clips) is never imported, let alone built."""
    assert run_cli(tiny_args("--out", "done", "--set", "train.steps=2"), tmp_path).returncode == 0
    probe = ("import sys; from layerlock_plugin.reference.cli import main; rc = main(['--resume', 'done']); "
             "print(rc, sorted(m for m in ('timm', 'layerlock_plugin.reference.train.trainer') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.stdout.strip().splitlines()[-1] == "2 []", out.stdout + out.stderr
    assert "the run is finished (extend it with --extend N, N > 2)" in out.stderr
