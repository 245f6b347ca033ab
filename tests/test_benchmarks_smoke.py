"""Each benchmark study's ``--quick`` mode on tiny settings: it runs, writes its JSON/Markdown/PNG, and the
deterministic efficiency invariants hold (FLOPs at the ideal, nothing stored for frozen blocks)."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def _outputs(folder, stem):
    for suffix in (".json", ".md"):
        assert (folder / f"{stem}{suffix}").stat().st_size > 0, stem + suffix
    return json.loads((folder / f"{stem}.json").read_text())


def test_efficiency_quick(tmp_path):
    eff = _load("efficiency")
    assert eff.main(["--quick", "--reps", "1", "--overhead-reps", "1", "--results-dir", str(tmp_path)]) == 0
    res = _outputs(tmp_path, "efficiency-quick")
    assert (tmp_path / "efficiency-quick.png").stat().st_size > 0
    (tiny,) = res["sizes"]
    rows = tiny["rows"]
    assert {(r["method"], r["k"]) for r in rows} == {(m, k) for m in eff.METHODS for k in range(tiny["max_k"] + 1)}
    for r in rows:
        assert abs(r["flops_gap"]) <= 0.03, (r["method"], r["k"], r["flops_gap"])
        # frozen units: nothing saved for backward, no gradient, no optimizer state
        assert r["frozen_units_saved_bytes"] == r["frozen_units_grad_bytes"] == r["frozen_units_state_bytes"] == 0
        assert r["saved_bytes"] <= r["saved_bytes_ideal"]
    fo = [r for r in rows if r["method"] == "freeze-only"]
    assert all(a["flops"] > b["flops"] and a["grad_bytes"] > b["grad_bytes"] for a, b in zip(fo, fo[1:]))
    ll = [r for r in rows if r["method"] == "layerlock"]
    assert all(b["ideal_parts"]["target_pass"] > a["ideal_parts"]["target_pass"] for a, b in zip(ll, ll[1:]))
    assert res["overhead"]["tiny"]["plugin_flops"] == res["overhead"]["tiny"]["plain_flops"]
    g500, g1m = res["paper_4ds_g"]
    assert 0 < g500["freeze_only_flops_saving"] < g1m["freeze_only_flops_saving"] < 0.5


def test_ideal_flops_matches_a_hand_count():
    eff = _load("efficiency")
    s = eff.Shape(B=1, N=8, V=2, Q=6, D=4, H=16, L_e=2, L_d=1, P=3, C=8)
    blk = lambda n: 2 * n * (3 * 16 + 16 + 2 * 64) + 4 * n * n * 4  # noqa: E731
    stem = 2 * 8 * 4 * 3
    assert eff.ideal_step_flops(s, 0, [])["total"] == 2 * stem + 3 * 2 * blk(2) + 3 * blk(8) + 3 * 2 * 6 * 4 * 3
    assert eff.ideal_step_flops(s, 1, [1])["total"] == (
        stem + blk(2) + 3 * blk(2) + 3 * blk(8) + 3 * 2 * 6 * 4 * 4 + stem + blk(8))
    # 3 queries and the sparse target context: the decoder and readout shrink, the target pass runs on Q + V
    s3 = eff.Shape(B=1, N=8, V=2, Q=3, D=4, H=16, L_e=2, L_d=1, P=3, C=5)
    assert eff.ideal_step_flops(s3, 1, [1])["total"] == (
        stem + blk(2) + 3 * blk(2) + 3 * blk(5) + 3 * 2 * 3 * 4 * 4 + stem + blk(5))


def test_efficiency_target_context_variants_match_the_ideal(tmp_path):
    """The 5%-query and sparse-context variants: measured FLOPs within 3% of their own ideal, and the
    sparse target pass cheaper than the full one at every k."""
    eff = _load("efficiency")
    args = ["--quick", "--reps", "0", "--overhead-reps", "0", "--methods", "layerlock-q5", "layerlock-q5-sparse",
            "--results-dir", str(tmp_path)]
    assert eff.main(args) == 0
    (tiny,) = _outputs(tmp_path, "efficiency-quick")["sizes"]
    by = {(r["method"], r["k"]): r for r in tiny["rows"]}
    for (method, k), r in by.items():
        assert abs(r["flops_gap"]) <= 0.03, (method, k, r["flops_gap"])
        if k:
            assert r["flops"] < by[("layerlock-q5", k)]["flops"] or method == "layerlock-q5"
            assert r["frozen_units_grad_bytes"] == r["frozen_units_state_bytes"] == 0


def test_reproduction_quick(tmp_path):
    rep = _load("reproduction")
    args = ["--quick", "--steps", "12", "--results-dir", str(tmp_path), "--runs-dir", str(tmp_path / "runs")]
    assert rep.main(args) == 0
    res = _outputs(tmp_path, "reproduction-quick")
    assert (tmp_path / "collapse-quick.png").stat().st_size > 0
    assert list(res["table"]) == rep.PAPER_METHODS + ["random init"]
    # the packaged suite has no turn label and no attentive depth readout: those columns are left out
    assert [k for k, _, _ in rep.metrics_of(res["runs"])] == ["motion_acc", "appearance_acc", "dense_r2", "dense_rmse"]
    for method, entry in res["table"].items():
        for key, _, _ in rep.metrics_of(res["runs"]):
            assert all(math.isfinite(x) for x in entry[key]), (method, key)
    naive = next(r for r in res["runs"] if r["variant"] == "latent-naive")
    assert any("layerlock/feature_std" in p for p in naive["collapse_over_time"])
    # every variant against MAE, seed by seed; frozen blocks skip their backward: fewer training FLOPs
    assert res["reference"] == "mae" and list(res["differences"]) == rep.PAPER_METHODS[1:]
    freeze = res["differences"]["freeze-only"]
    assert freeze["motion_acc"]["verdict"] == "no resolved difference"  # one seed never resolves
    assert 0 < freeze["train_flops_ratio"] < 1 and all(r["train_flops"] > 0 for r in res["runs"])
    # a second call reads the finished runs back instead of training again
    assert rep.main(args + ["--collect-only"]) == 0
    # a method run later joins the earlier table, compared with the same MAE runs
    quick_json = tmp_path / "reproduction-quick.json"
    later = ["--quick", "--steps", "12", "--results-dir", str(tmp_path), "--runs-dir", str(tmp_path / "runs"),
             "--methods", "layerlock-no-warmup", "--tag", "merged", "--merge-from", str(quick_json)]
    assert rep.main(later) == 0
    merged = _outputs(tmp_path, "reproduction-merged")
    assert list(merged["table"]) == rep.PAPER_METHODS + ["layerlock-no-warmup", "random init"]
    assert merged["reference"] == "mae" and "layerlock-no-warmup" in merged["differences"]
    assert merged["table"]["mae"] == res["table"]["mae"] and merged["merged_from"]["methods"] == rep.PAPER_METHODS
    # another protocol (steps) or a variant the file already holds is refused with exit 2
    assert rep.main([*later[:2], "13", *later[3:]]) == 2
    assert rep.main([*later[:8], "mae", *later[9:]]) == 2


def test_reproduction_quick_on_a_config_with_its_own_schedule(tmp_path):
    rep = _load("reproduction")
    config = str(Path(__file__).resolve().parents[1] / "layerlock_plugin/reference/configs/evidence.yaml")
    args = ["--quick", "--steps", "4", "--results-dir", str(tmp_path), "--runs-dir", str(tmp_path / "runs"),
            "--config", config, "--schedule", "config", "--methods", "mae", "freeze-only", "--tag", "evidence",
            "--set", "model.depth=5", "--set", "schedule.pixel_steps=1", "--set", "schedule.interval=1",
            "--set", "schedule.max_frozen=2", "--set", "warmup.steps=1"]
    assert rep.main(args) == 0
    res = _outputs(tmp_path, "reproduction-evidence")
    assert res["config_file"] == config and res["schedule"] == "config"
    keys = [k for k, _, _ in rep.metrics_of(res["runs"])]
    assert "turn_acc" in keys and "dense_attentive_r2" in keys
    assert "turn_acc" in res["differences"]["freeze-only"]
    frozen = next(r for r in res["runs"] if r["variant"] == "freeze-only")["events"]
    assert [n for _, n in frozen] == [1, 2]  # the config's schedule (as overridden), not the packaged shape


def test_layer_dynamics_quick(tmp_path):
    ld = _load("layer_dynamics")
    assert ld.main(["--quick", "--snapshots", "4", "--results-dir", str(tmp_path)]) == 0
    res = _outputs(tmp_path, "layer_dynamics-quick")
    for png in ("param_norms-quick.png", "layer_convergence-quick.png"):
        assert (tmp_path / png).stat().st_size > 0
    assert [g["frozen"] for g in res["convergence"]] == [0, 1, 2, 3]
    assert all(math.isfinite(g["final_loss"]) for g in res["convergence"])
    assert res["units"][:2] == ["stem", "block_1"] and len(res["norm_curves"]) == 6
    # --frozen picks the branches; it must hold the MAE branch (L = 0) and stay within the encoder
    assert ld.main(["--quick", "--snapshots", "4", "--frozen", "0", "2", "--results-dir", str(tmp_path), "--tag", "f"]) == 0
    assert [g["frozen"] for g in _outputs(tmp_path, "layer_dynamics-f")["convergence"]] == [0, 2]
    assert ld.main(["--quick", "--frozen", "1", "2", "--results-dir", str(tmp_path), "--tag", "g"]) == 2


def test_diagnose_quick(tmp_path):
    dg = _load("diagnose")
    assert dg.main(["--quick", "--results-dir", str(tmp_path)]) == 0
    res = _outputs(tmp_path, "diagnose-quick")
    assert [r["run"] for r in res["rows"]] == ["layerlock (seed 0)", "random init"]
    for r in res["rows"]:
        assert 0 < r["effective_rank"] <= 1 and 0 < r["top3_variance_share"] <= 1
        assert all(math.isfinite(r[k]) for k in dg.KEYS)


def test_vjepa_reproduction_quick(tmp_path):
    vj = _load("vjepa_reproduction")
    assert vj.main(["--quick", "--steps", "6", "--results-dir", str(tmp_path)]) == 0
    res = _outputs(tmp_path, "vjepa_reproduction-quick")
    assert list(res["table"]) == vj.METHODS + ["random init"] and list(res["differences"]) == ["layerlock"]
    for method, entry in res["table"].items():
        for key, _ in vj.METRICS + (vj.STATS if method != "random init" else []):
            assert all(math.isfinite(x) for x in entry[key]), (method, key)
    runs = {r["method"]: r for r in res["runs"]}
    # the LayerLock run froze on its schedule (2 of 4 blocks), the V-JEPA baseline froze nothing
    assert runs["layerlock"]["num_frozen"] == 2 and runs["vjepa"]["num_frozen"] == 0
    assert all(len(r["losses_every_10"]) == 1 and r["steps"] == 6 for r in runs.values())


def test_calibration_quick(tmp_path):
    cal = _load("calibration")
    assert cal.main(["--quick", "--results-dir", str(tmp_path), "--threads", "1"]) == 0
    res = _outputs(tmp_path, "calibration-quick")
    assert (tmp_path / "calibration-quick.png").stat().st_size > 0
    assert [r["rung"] for r in res["rows"]] == ["pixels", "motion_features", "random_init", "supervised_motion",
                                                "supervised_appearance"]
    for r in res["rows"]:
        for key in ("motion_linear_acc", "motion_attentive_acc", "motion_knn_acc", "appearance_acc", "dense_r2"):
            assert math.isfinite(r["probes"][key]), (r["name"], key)
    assert [c["check"].split()[0] for c in res["checks"]] == ["motion"] + ["supervised"] * 4
    assert all(isinstance(c["passed"], bool) for c in res["checks"])
    for r in res["rows"][3:]:  # the supervised rungs: every learning rate tried, the best held-out one kept
        grid = r["lr_grid"]
        assert [g["lr"] for g in grid] == list(cal.SUPERVISED_LRS) and all(g["task"] == r["task"] for g in grid)
        assert r["lr"] == max(grid, key=lambda g: g["val_acc"])["lr"] and "state" not in grid[0]


def test_calibration_quick_multitask_applies_the_rule_to_every_task(tmp_path):
    cal = _load("calibration")
    config = str(Path(__file__).resolve().parents[1] / "layerlock_plugin/reference/configs/evidence.yaml")
    assert cal.main(["--quick", "--config", config, "--supervised", "multitask", "--supervised-lrs", "6e-4",
                     "--set", "model.depth=4", "--results-dir", str(tmp_path), "--threads", "1"]) == 0
    res = _outputs(tmp_path, "calibration-quick")
    assert [r["rung"] for r in res["rows"]] == ["pixels", "motion_features", "random_init", "supervised"]
    assert set(res["verdicts"]) == {"motion", "appearance", "turn", "depth", "depth_attentive"}
    assert res["verdicts"]["turn"]["temporal_semantic"] and all(isinstance(v["passed"], bool) for v in res["verdicts"].values())
    assert "Calibration rule" in (tmp_path / "calibration-quick.md").read_text()


def test_mae_setting_quick(tmp_path):
    ms = _load("mae_setting")
    args = ["--quick", "--results-dir", str(tmp_path), "--runs-dir", str(tmp_path / "runs")]
    assert ms.main(args) == 0
    res = _outputs(tmp_path, "mae_setting-quick")
    (row,) = res["runs"]
    assert row["candidate"] == "packaged" and row["config"]["method"] == "mae"
    assert set(row["mae"]) == set(row["random_init"]) and "motion_attentive_acc" in row["mae"]
    entry = res["table"]["packaged"]
    assert entry["seeds"] == [0] and entry["tasks_passed"] == 0  # one seed can never pass
    assert ms.main(args) == 0  # the finished run is read back


def test_paired_difference_verdicts():
    common = _load("_common")
    d = common.paired_difference([0.50, 0.52, 0.51], [0.40, 0.41, 0.42])
    assert d["per_seed"] == pytest.approx([0.10, 0.11, 0.09]) and d["verdict"] == "higher"
    assert d["t"] == pytest.approx(0.10 / (0.01 / 3 ** 0.5))
    assert common.paired_difference([0.40, 0.41], [0.50, 0.52])["verdict"] == "no resolved difference"  # 2 seeds
    noisy = common.paired_difference([0.50, 0.30, 0.45], [0.40, 0.41, 0.42])  # mean +0.007, spread 0.11
    assert noisy["verdict"] == "no resolved difference"
    assert common.paired_difference([0.1, 0.2, 0.3], [0.3, 0.4, 0.5])["verdict"] == "lower"  # constant -0.2


def test_mae_setting_criterion():
    ms = _load("mae_setting")
    v = ms.verdict([0.50, 0.52, 0.51], [0.40, 0.41, 0.42])
    assert v["passes"] and v["passes_paired"] and v["gap_in_stds"] == pytest.approx(10.0)
    v = ms.verdict([0.50, 0.60, 0.40], [0.40, 0.41, 0.42])  # too noisy: 0.09 < 3 * 0.1
    assert not v["passes"]
    assert not ms.verdict([0.5, 0.5], [0.1, 0.1])["passes"]  # fewer than 3 seeds


def test_supervised_recipe_quick(tmp_path):
    sr = _load("supervised_recipe")
    assert sr.main(["--quick", "--task", "appearance", "--results-dir", str(tmp_path), "--threads", "1"]) == 0
    res = _outputs(tmp_path, "supervised_recipe-quick")
    assert res["num_classes"] == 10 and res["steps"] == 12 and [c["step"] for c in res["curve"]] == list(range(2, 13, 2))
    assert all(0 <= c["test_acc"] <= 1 and math.isfinite(c["train_loss"]) for c in res["curve"])


@pytest.mark.timeout(300)
def test_main_job_speed_compares_against_a_commit_and_checks_the_numbers(tmp_path):
    speed = _load("main_job_speed")
    tiny = ["--set", "data.num_videos=64", "--set", "train.batch_size=8", "--set", "train.steps=4",
            "--set", "schedule.pixel_steps=2", "--set", "schedule.interval=1", "--set", "schedule.max_frozen=1",
            "--set", "optim.warmup_steps=1", "--set", "warmup.steps=1", "--no-probe"]
    out = tmp_path / "speed.json"
    assert speed.main(["--baseline", "HEAD", "--runs", "1", "--out", str(out), *tiny]) == 0
    res = json.loads(out.read_text())
    assert res["weights_bitwise_equal"] and res["probe_lines_identical"]
    assert res["median_ratio_checkout_over_baseline"]["wall_s"] > 0 and len(res["runs"]["baseline"]) == 1


def _results_file(path, variant, probes_by_seed, steps=3000, config="cfg/evidence.yaml"):
    runs = [{"variant": variant, "seed": s, "probes": p, "events": [[1500, 1]], "train_flops": 10.0 + s}
            for s, p in probes_by_seed.items()]
    path.write_text(json.dumps({"runs": runs, "methods": [variant], "steps": steps, "config_file": config,
                                "extra_overrides": [], "provenance": {}}))
    return path


def test_compare_runs_pairs_variants_of_several_files_per_seed_and_refuses_another_setting(tmp_path, capsys):
    cmp = _load("compare_runs")
    probe = lambda m, d: {"motion_acc": m, "appearance_acc": 0.5, "turn_acc": 0.5, "dense_r2": d,  # noqa: E731
                          "dense_attentive_r2": d, "dense_rmse": 1 - d}
    a = _results_file(tmp_path / "a.json", "layerlock",
                      {0: probe(0.50, 0.30), 1: probe(0.60, 0.31), 2: probe(0.70, 0.32)})
    # the same variant name in another file: a later study with other overrides, seed 1 listed first
    b = _results_file(tmp_path / "b.json", "layerlock",
                      {1: probe(0.61, 0.41), 0: probe(0.52, 0.40), 2: probe(0.70, 0.42)})
    out = tmp_path / "cmp"
    assert cmp.main(["--reference", "explicit", "--runs", f"explicit={a}:layerlock",
                     "--runs", f"adaptive={b}:layerlock", "--out", str(out)]) == 0
    diff = json.loads(out.with_suffix(".json").read_text())["differences"]["adaptive"]
    assert diff["seeds"] == [0, 1, 2]
    assert diff["motion_acc"]["per_seed"] == pytest.approx([0.02, 0.01, 0.0])
    assert diff["dense_r2"]["per_seed"] == pytest.approx([0.10, 0.10, 0.10])
    assert diff["dense_r2"]["verdict"] == "higher"
    assert "adaptive seed 0: 1500 (1)" in out.with_suffix(".md").read_text()
    # one name gathered from one file per seed; a seed given twice is refused
    per_seed = [_results_file(tmp_path / f"s{seed}.json", "freeze-only", {seed: probe(0.5, 0.2)})
                for seed in (0, 1, 2)]
    assert cmp.main(["--reference", "explicit", "--runs", f"explicit={a}:layerlock",
                     *[x for f in per_seed for x in ("--runs", f"replayed={f}:freeze-only")], "--out", str(out)]) == 0
    diff = json.loads(out.with_suffix(".json").read_text())["differences"]["replayed"]
    assert diff["seeds"] == [0, 1, 2] and diff["dense_r2"]["per_seed"] == pytest.approx([-0.10, -0.11, -0.12])
    capsys.readouterr()
    twice = ["--runs", f"replayed={per_seed[0]}:freeze-only"] * 2
    assert cmp.main(["--reference", "explicit", "--runs", f"explicit={a}:layerlock", *twice, "--out", str(out)]) == 2
    assert "'replayed' already has seed(s) [0]" in capsys.readouterr().err
    other = _results_file(tmp_path / "c.json", "mae", {0: probe(0.5, 0.3)}, steps=1500)
    capsys.readouterr()
    assert cmp.main(["--reference", "explicit", "--runs", f"explicit={a}:layerlock", "--runs", f"mae={other}:mae",
                     "--out", str(out)]) == 2
    assert "another setting (config evidence.yaml, 1500 steps)" in capsys.readouterr().err
