"""The evidence suite: its renderer options, the turn label, the attentive depth readout, the calibration
rule, the suites' calibration marks and the one-command probe of a checkpoint."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from layerlock_plugin.errors import ConfigError
from layerlock_plugin.reference.data import DigitsVideoConfig, DigitsVideoDataset
from layerlock_plugin.reference.eval import ProbeConfig, probe_report, run_probes
from layerlock_plugin.reference.eval.calibration_rule import ABOVE_CHANCE, MARGIN, task_verdicts
from layerlock_plugin.reference.eval.dense_attentive import attentive_depth
from layerlock_plugin.reference.eval.features import fit_feature_norm
from layerlock_plugin.reference.eval.suite import _dense
from layerlock_plugin.reference.eval.suites import calibration_marks, suite_of

EVIDENCE = dict(speeds=(1.0, 1.5), placement="inside", turn=90.0, digit_saturation=(0.0, 0.0),
                background_value=(0.2, 0.5), standardize=True)


def _evidence(n: int = 64, **kw) -> DigitsVideoConfig:
    return DigitsVideoConfig(num_videos=n, num_test_videos=n, **{**EVIDENCE, **kw})


# --------------------------------------------------------------------------------------------------
# renderer options
# --------------------------------------------------------------------------------------------------


def test_packaged_rendering_draws_nothing_new():
    cfg = DigitsVideoConfig(num_videos=8)
    assert not cfg.uses_evidence_options and cfg.label_classes == {"motion": 8, "appearance": 10}
    ds = DigitsVideoDataset(cfg, "train")
    p = ds.sample_params(3)
    assert not {"turn", "velocity_after", "middle"} & set(p)
    x, y = ds._centres(p)
    t = np.arange(cfg.num_frames, dtype=np.float64)
    # the packaged straight line, bit for bit
    assert np.array_equal(x, p["start"][0] + p["velocity"][0] * t) and np.array_equal(y, p["start"][1] + p["velocity"][1] * t)
    assert "turn" not in ds[3] and ds.num_classes == {"motion": 8, "appearance": 10}


def test_inside_placement_keeps_the_whole_digit_in_the_frame():
    cfg = _evidence(96)
    ds = DigitsVideoDataset(cfg, "train")
    for i in range(96):
        p = ds.sample_params(i)
        x, y = ds._centres(p)
        half = p["digit_size"] / 2
        for c in (x, y):
            assert c.min() - half >= -1e-9 and c.max() + half <= cfg.size + 1e-9, (i, c, half)
    # a wrapped digit shows at both the left and the right edge of some frame; an inside one never does
    def touches_both(config):
        d = DigitsVideoDataset(DigitsVideoConfig(**{**config, "standardize": False}), "train")
        hits = 0
        for i in range(64):
            depth = d[i]["depth"]  # the digit is nearer than the background: its pixels hold the digit depth
            digit = depth == depth.min()
            hits += bool((digit[:, :, 0].any(dim=1) & digit[:, :, -1].any(dim=1)).any())
        return hits

    assert touches_both(dict(num_videos=64)) > 5
    assert touches_both(dict(num_videos=64, **{k: v for k, v in EVIDENCE.items() if k != "standardize"})) == 0


def test_turn_label_is_the_turn_direction_and_the_middle_position_ignores_it():
    ds = DigitsVideoDataset(_evidence(400), "train")
    labels, mids = [], {0: [], 1: []}
    for i in range(400):
        p = ds.sample_params(i)
        (vx, vy), (wx, wy) = p["velocity"], p["velocity_after"]
        cross_screen = vx * wy - vy * wx  # y points down: a counter-clockwise turn on screen is negative
        assert abs(math.hypot(vx, vy) - math.hypot(wx, wy)) < 1e-9 and abs(vx * wx + vy * wy) < 1e-9  # 90 degrees
        assert p["turn"] == (0 if cross_screen < 0 else 1)
        # the rendered digit follows the two legs: its displacement before and after the middle frame
        x, y = ds._centres(p)
        assert np.allclose([x[4] - x[0], y[4] - y[0]], [4 * vx, 4 * vy]) and np.allclose([x[7] - x[4], y[7] - y[4]], [3 * wx, 3 * wy])
        labels.append(p["turn"])
        mids[p["turn"]].append(p["middle"])
        assert int(ds[i]["turn"]) == p["turn"]
    assert 0.4 < np.mean(labels) < 0.6
    m0, m1 = np.array(mids[0]), np.array(mids[1])
    assert np.abs(m0.mean(0) - m1.mean(0)).max() < 0.5  # the same box for both labels (~4-8 px wide)
    assert ds.num_classes == {"motion": 8, "appearance": 10, "turn": 2}


@pytest.mark.parametrize("field, kwargs", [
    ("data.placement", dict(placement="torus")),
    ("data.placement", dict(placement="inside", speeds=(2.0,))),  # 16 + 2 * 8 = 32 fits, 3 px/frame would not
    ("data.placement", dict(placement="inside", size=24)),
    ("data.turn", dict(turn=200)),
    ("data.turn", dict(turn=-5)),
    ("data.digit_saturation", dict(channels=1, digit_saturation=(0.0, 0.0))),
    ("data.digit_value", dict(digit_value=(0.5, 1.5))),
    ("data.background_value", dict(background_value=(0.6, 0.2))),
])
def test_evidence_options_are_validated(field, kwargs):
    if kwargs.get("speeds") == (2.0,):
        DigitsVideoConfig(**kwargs)  # exactly fits
        kwargs = dict(kwargs, speeds=(3.0,))
    with pytest.raises(ConfigError) as e:
        DigitsVideoConfig(**kwargs)
    assert str(e.value).startswith(field)


# --------------------------------------------------------------------------------------------------
# probes: the turn label, the attentive depth readout, the report
# --------------------------------------------------------------------------------------------------


def test_probes_read_every_declared_label_and_the_report_marks_uncalibrated_tasks():
    cfg = _evidence(48)
    train, test = DigitsVideoDataset(cfg, "train"), DigitsVideoDataset(cfg, "test")
    probe = ProbeConfig(train_videos=48, test_videos=48, steps=10, weight_decay=1.0, l2=0.01, knn_k=5, max_iter=10)
    from layerlock_plugin.reference.eval.calibration import motion_tokens

    res = run_probes(motion_tokens((2, 8, 8)), train, test, (4, 4, 4), (2, 8, 8), probe)
    assert {"turn_acc", "turn_linear_acc", "turn_knn_acc", "turn_chance_uniform"} <= set(res)
    assert res["turn_chance_uniform"] == 0.5 and "dense_attentive_r2" not in res
    line = probe_report({**res, "random_init": res}, "attentive",
                        {"motion": "calibrated", "appearance": "uncalibrated", "turn": "calibrated", "depth": "uncalibrated"})
    assert "turn 0." in line and "appearance [uncalibrated] 0." in line and "depth [uncalibrated] R2" in line
    assert "motion [uncalibrated]" not in line
    # without marks the packaged line is unchanged
    assert "[uncalibrated]" not in probe_report({**res, "random_init": res}, "attentive")


def _context_depth(n: int, seed: int):
    """Tokens [n, 32, 8] on a (2, 4, 4) grid; each token's target is its own channel 1 plus the clip's mean
    of channel 0 over all tokens (context a per-token readout cannot see)."""
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n, 32, 8, generator=g)
    y = 0.5 * f[..., 1] + 3.0 * f[..., 0].mean(dim=1, keepdim=True)
    return f, y


def test_attentive_depth_reads_context_the_ridge_probe_cannot():
    f_tr, y_tr = _context_depth(256, 0)
    f_te, y_te = _context_depth(128, 1)
    norm = fit_feature_norm(f_tr)
    cfg = ProbeConfig(dense_kinds=("ridge", "attentive"), attn_dim=32, dense_steps=200, dense_lr=3e-3)
    ridge_r2 = _dense(norm(f_tr), y_tr, norm(f_te), y_te, cfg)[1]
    att = attentive_depth(norm(f_tr), y_tr, norm(f_te), y_te, (2, 4, 4), cfg)
    assert ridge_r2 < 0.6  # the own-token part only
    assert att["dense_attentive_r2"] > ridge_r2 + 0.2, (att, ridge_r2)
    short = ProbeConfig(dense_kinds=("ridge", "attentive"), attn_dim=32, dense_steps=20)
    first = attentive_depth(norm(f_tr[:64]), y_tr[:64], norm(f_te), y_te, (2, 4, 4), short)
    assert attentive_depth(norm(f_tr[:64]), y_tr[:64], norm(f_te), y_te, (2, 4, 4), short) == first  # deterministic


def test_dense_kinds_are_validated():
    with pytest.raises(ConfigError, match="^probe.dense_kinds"):
        ProbeConfig(dense_kinds=("attentive",))
    with pytest.raises(ConfigError, match="^probe.dense_kinds"):
        ProbeConfig(dense_kinds=("ridge", "mlp"))
    assert ProbeConfig(dense_kinds="ridge").dense_kinds == ("ridge",)


# --------------------------------------------------------------------------------------------------
# the calibration rule and the suites' marks
# --------------------------------------------------------------------------------------------------


def _rung(kind, turn, appearance, depth):
    return {"rung": kind, "probes": {"turn_acc": turn, "turn_chance_majority": 0.52, "appearance_acc": appearance,
                                     "appearance_chance_majority": 0.12, "dense_r2": depth}}


def test_calibration_rule_passes_only_tasks_the_supervised_rung_reads_well_above_every_baseline():
    ladder = [_rung("pixels", 0.50, 0.47, 0.26), _rung("motion_features", 0.62, 0.45, 0.16),
              _rung("random_init", 0.50, 0.46, 0.27), _rung("random_init", 0.51, 0.48, 0.27),
              _rung("supervised", 0.99, 0.55, 0.80)]
    v = task_verdicts(ladder)
    assert v["turn"]["passed"] and v["turn"]["temporal_semantic"] and v["depth"]["passed"]
    assert not v["appearance"]["passed"] and "random init" in v["appearance"]["why"]  # 0.55 < 0.48 + MARGIN
    # the hand-made motion features must stay MARGIN below a temporal-semantic task
    ladder[1] = _rung("motion_features", 0.95, 0.45, 0.16)
    assert "motion features" in task_verdicts(ladder)["turn"]["why"]
    # well above chance
    ladder[-1] = _rung("supervised", 0.52 + ABOVE_CHANCE - 0.01, 0.75, 0.80)
    assert "chance" in task_verdicts(ladder)["turn"]["why"] and MARGIN > 0
    with pytest.raises(ValueError):
        task_verdicts(ladder[:-1])


def test_suites_and_calibration_marks():
    assert suite_of(DigitsVideoConfig(standardize=True)) == "packaged"
    assert suite_of(DigitsVideoConfig(num_videos=8192, **EVIDENCE)) == "evidence"
    assert suite_of(DigitsVideoConfig(standardize=True, texture=0.3)) is None
    marks = calibration_marks(DigitsVideoConfig(standardize=True, texture=0.3), ["motion", "depth"])
    assert marks == {"motion": "uncalibrated", "depth": "uncalibrated"}


def test_the_probe_lines_reading_follows_the_calibration_of_its_clips():
    """The line's last sentence never tells a user to rank methods on a task its clips' calibration failed."""
    from layerlock_plugin.reference.eval.suites import SUITES, UNCALIBRATED_READING, reading_of

    packaged = reading_of(DigitsVideoConfig(standardize=True))
    assert SUITES["packaged"]["calibrated"] == ("motion",)
    assert "cannot rank methods" in packaged and "compare runs on depth" not in packaged and "evidence" in packaged
    assert "every task passed" in reading_of(DigitsVideoConfig(num_videos=8192, **EVIDENCE))
    assert reading_of(DigitsVideoConfig(standardize=True, texture=0.3)) == UNCALIBRATED_READING
    res = {"motion_acc": 0.5, "motion_chance_uniform": 0.125, "motion_chance_majority": 0.15}
    assert "reading it: abc" in probe_report({**res, "random_init": res}, "attentive", None, "abc")
    assert "reading it" not in probe_report({**res, "random_init": res}, "attentive")


# --------------------------------------------------------------------------------------------------
# the one command
# --------------------------------------------------------------------------------------------------


def test_probe_command_refuses_bad_input_with_one_line(tmp_path, capsys):
    from layerlock_plugin.reference.eval.probe_checkpoint import main

    assert main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
    bogus = tmp_path / "checkpoint.pt"
    torch.save({"weights": torch.zeros(1)}, bogus)
    assert main([str(bogus)]) == 2
    assert "not a reference-trainer checkpoint" in capsys.readouterr().err
    assert main([str(bogus), "--videos", "4"]) == 2


def test_probe_command_prints_each_task_beside_random_init_and_its_mark(tmp_path, capsys):
    from layerlock_plugin.reference.config import load_config
    from layerlock_plugin.reference.eval.probe_checkpoint import main
    from layerlock_plugin.reference.train import Trainer

    cfg = load_config(None, [f"out_dir={tmp_path / 'run'}", "train.steps=2", "train.batch_size=4", "probe.enabled=false",
                             "data.num_videos=16", "train.progress=false", "model.embed_dim=32", "model.num_heads=2"])
    Trainer(cfg, echo=lambda s: None).fit()
    assert main([str(tmp_path / "run"), "--videos", "24", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("suite packaged")
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert set(rows) == {"motion", "appearance", "depth"}
    assert rows["motion"][-1] == "calibrated" and rows["appearance"][-1] == "uncalibrated"
    assert rows["motion"][3] == "0.125"  # uniform chance 1/8 beside the trained and random-init scores


def test_the_recorded_calibration_is_the_benchmarks_verdict():
    """``suites.py`` lists exactly the tasks the committed calibration run passed."""
    import json
    from pathlib import Path

    from layerlock_plugin.reference.eval.suites import SUITES

    res = json.loads((Path(__file__).resolve().parents[1] / "benchmarks/results/calibration-evidence.json").read_text())
    passed = tuple(t for t, v in res["verdicts"].items() if v["passed"])
    assert passed == SUITES["evidence"]["calibrated"]
    data = {k: tuple(v) if isinstance(v, list) else v for k, v in res["config"]["data"].items()}
    assert suite_of(DigitsVideoConfig(**{k: v for k, v in data.items() if k != "source"})) == "evidence"
