"""The reference trainer under torch.distributed: 2 CPU processes (gloo), ``ddp`` and ``fsdp``.

One torchrun launch (this file run as a script) does all the 2-process work in one process group, to
keep the start-up cost to one; the tests then check what it recorded against a one-process run:

* the same global batch gives the same loss as one process, step by step, across 3 freeze events and
  target switches (ddp, fsdp, ddp and fsdp with gradient accumulation + activation checkpointing, and
  fsdp with a 25% query subset and the sparse target context);
* frozen parameters are identical on every rank, unchanged after freezing and hold no optimizer state;
* a run stopped after a freeze event and resumed from its DCP checkpoint ends with the same weights and
  logs as the uninterrupted run;
* bad input: world size not dividing the batch, a resume dir from another config, a partial or missing
  DCP checkpoint, fsdp without a process group.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from layerlock_plugin.errors import CheckpointError, ConfigError
from layerlock_plugin.reference.config import load_config
from teardown_abort import forgive_teardown_abort, save_atomic, torchrun_exit_codes

# The module's runs (3 one-process references, then 5 strategies in one 2-process torchrun launch) take ~70 s
# on CI's slow machine and count against the first test that asks for them.
pytestmark = pytest.mark.timeout(480)

# Events at steps 6, 10 and 14 (3 freezes, each a target switch); 16 steps of 8 clips.
TINY = [
    "data.num_videos=64", "train.batch_size=8", "train.steps=16", "train.log_every=1", "train.ckpt_every=100",
    "train.progress=false", "train.threads=1", "schedule.pixel_steps=6", "schedule.interval=4",
    "schedule.max_frozen=3", "warmup.steps=6", "optim.warmup_steps=3", "probe.enabled=false", "guard.every=2",
]
STOP = 11  # stop after the event at step 10, resume to 16
ACCUM = ["train.grad_accum=2", "train.activation_checkpointing=true"]
SPARSE = ["target.loss_fraction=0.25", "target.context=sparse"]  # queries on 25% of the masked, sparse target pass
STOCHASTIC = ["model.drop_path=0.2", "model.proj_drop=0.1", "target.loss_fraction=0.5"]  # every random knob


def tiny_config(out, *extra):
    return load_config(None, [f"out_dir={out}", *TINY, *extra])


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------ the torchrun worker
def _full_params(model) -> dict[str, torch.Tensor]:
    """Every parameter as a full (unsharded) CPU tensor; collective under FSDP2."""
    out = {}
    for name, p in model.named_parameters():
        t = p.detach()
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        out[name] = t.cpu().clone()
    return out


def _fork_and_copy(root: Path, cfg, final: dict[str, torch.Tensor]) -> dict:
    """A DCP run copied elsewhere resumes in the copy; resumed into another folder it forks. Either way
    the source folder stays byte-identical, and the run ends as the uninterrupted one did."""
    import torch.distributed as dist

    from cli_helpers import checksums
    from layerlock_plugin.reference.train import Trainer

    source = root / "ddp_part"
    if dist.get_rank() == 0:
        shutil.copytree(source, root / "ddp_copy")
    dist.barrier()
    before = checksums(source)
    out = {}
    for name, resume in (("fork", source), ("copy", root / "ddp_copy")):
        t = Trainer(cfg(f"ddp_{name}"), resume=resume, echo=lambda s: None)
        t.fit()
        params = _full_params(t.model)
        out[f"{name}_equal"] = all(torch.equal(final[n], params[n]) for n in final)
    dist.barrier()
    out["source_untouched"] = checksums(source) == before
    return out


def _worker(root: Path) -> None:
    import torch.distributed as dist

    from layerlock_plugin.reference.train import Trainer

    quiet = dict(echo=lambda s: None)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    report: dict = {"world_size": dist.get_world_size()}
    from gpu_check_workers import record_collectives  # benchmarks/: the device check records the same way

    devices: list[str] = []
    record_collectives(devices)
    for strategy, extra in (("ddp", []), ("fsdp", []), ("ddp_accum", ACCUM), ("fsdp_accum", ACCUM),
                            ("fsdp_sparse", SPARSE)):
        name = strategy
        strat = strategy.split("_")[0]
        cfg = lambda d, *more: tiny_config(root / d, f"train.strategy={strat}", *extra, *more)  # noqa: E731
        torch.manual_seed(123)
        full = Trainer(cfg(f"{name}_full"), **quiet)
        full.fit(stop_after=7)  # first freeze at step 6: stem + block 1
        frozen_names = [n for n, p in full.model.named_parameters() if not p.requires_grad and not n.startswith("readouts.")]
        before = _full_params(full.model)
        full.fit()
        after = _full_params(full.model)
        frozen_ids = {id(p) for n, p in full.model.named_parameters() if n in frozen_names}
        entry = {
            "frozen_names": frozen_names,
            "frozen_unchanged": all(torch.equal(before[n], after[n]) for n in frozen_names),
            "frozen_state_free": not any(id(p) in frozen_ids for p in full.optimizer.state),
            "checksums": {n: float(after[n].double().sum()) for n in sorted(after)},
            "ddp_rebuilds": full.parallel.rebuilds,
        }
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, {n: after[n].double().sum().item() for n in frozen_names})
        entry["frozen_same_on_ranks"] = all(g == gathered[0] for g in gathered)
        if strategy in ("ddp", "fsdp"):
            torch.manual_seed(7)  # resume must not depend on the caller's RNG state
            part = Trainer(cfg(f"{name}_part"), **quiet)
            part.fit(stop_after=STOP)
            if strategy == "ddp":
                entry.update(_fork_and_copy(root, cfg, after))
            resumed = Trainer(cfg(f"{name}_part"), resume=root / f"{name}_part", **quiet)
            entry["resumed_at"] = resumed.step
            resumed.fit()
            res = _full_params(resumed.model)
            entry["resume_equal"] = all(torch.equal(after[n], res[n]) for n in after)
            entry["resume_max_diff"] = max(float((after[n] - res[n]).abs().max()) for n in after)
        report[name] = entry

    # every stochastic knob on (per-rank dropout / drop-path streams, the query subset), logs every 5 steps:
    # stopped at 11 (off the log cadence) and resumed from DCP = the uninterrupted run, RNG state included
    drop = lambda d: tiny_config(root / d, "train.strategy=ddp", *STOCHASTIC, "train.log_every=5")  # noqa: E731
    full = Trainer(drop("drop_full"), **quiet)
    full.fit()
    after, rng_after = _full_params(full.model), torch.get_rng_state()
    Trainer(drop("drop_part"), **quiet).fit(stop_after=STOP)
    resumed = Trainer(drop("drop_part"), resume=root / "drop_part", **quiet)
    resumed.fit()
    res = _full_params(resumed.model)
    differ = [n for n in after if not torch.equal(after[n], res[n])]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"differ": differ, "rng_equal": torch.equal(rng_after, torch.get_rng_state())})
    report["drop"] = {"per_rank": gathered, "tensors": len(after)}

    # bad input, on every rank (each must raise, or the other would hang in a collective)
    errors = {}
    try:
        Trainer(tiny_config(root / "bad", "train.strategy=ddp", "train.batch_size=7"), **quiet)
    except ConfigError as e:
        errors["batch"] = str(e)
    try:
        Trainer(tiny_config(root / "ddp_part", "train.strategy=ddp", "schedule.interval=5"), resume=root / "ddp_part", **quiet)
    except CheckpointError as e:
        errors["other_config"] = str(e)
    try:
        Trainer(tiny_config(root / "none", "train.strategy=fsdp"), resume=root / "no_such_run", **quiet)
    except CheckpointError as e:
        errors["missing"] = str(e)
    try:
        Trainer(tiny_config(root / "x", "train.strategy=none"), **quiet)
    except ConfigError as e:
        errors["none_under_torchrun"] = str(e)
    report["errors"] = errors
    report["collective_devices"] = sorted(set(devices))
    report["collectives"] = len(devices)
    if rank == 0:
        save_atomic(report, root / "report.json")
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------ the tests
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The one-process reference (in this process) and the 2-process report (one torchrun launch)."""
    root = tmp_path_factory.mktemp("dist")
    torch.manual_seed(123)
    from layerlock_plugin.reference.train import Trainer

    Trainer(tiny_config(root / "one"), echo=lambda s: None).fit()
    Trainer(tiny_config(root / "one_accum", *ACCUM), echo=lambda s: None).fit()
    Trainer(tiny_config(root / "one_sparse", *SPARSE), echo=lambda s: None).fit()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, str(root)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420, env=env)
    codes = [0] if proc.returncode == 0 else torchrun_exit_codes(proc.stderr)  # torch's teardown abort is forgiven
    forgive_teardown_abort(codes, proc.stdout[-3000:] + proc.stderr, [root / "report.json"], "2-process trainer runs")
    return root, json.loads((root / "report.json").read_text())


@pytest.mark.parametrize("name, reference", [("ddp", "one"), ("fsdp", "one"), ("ddp_accum", "one_accum"),
                                             ("fsdp_accum", "one_accum"), ("fsdp_sparse", "one_sparse")])
def test_two_processes_match_one_process_loss(runs, name, reference):
    root, report = runs
    assert report["world_size"] == 2
    one, two = _losses(root / reference), _losses(root / f"{name}_full")
    assert len(one) == len(two) == 16
    # across the pixel phase, 3 freeze events and target switches (steps 6, 10, 14)
    assert two == pytest.approx(one, rel=1e-5, abs=1e-6)
    events = [json.loads(x) for x in (root / f"{name}_full" / "events.jsonl").read_text().splitlines()]
    assert [(e["step"], e["num_frozen"], e["target_layer"]) for e in events] == [(6, 1, 1), (10, 2, 2), (14, 3, 3)]


@pytest.mark.parametrize("name", ["ddp", "fsdp", "ddp_accum", "fsdp_accum", "fsdp_sparse"])
def test_frozen_params_identical_across_ranks_and_unchanged(runs, name):
    _, report = runs
    entry = report[name]
    assert any(n.startswith("patch_embed") for n in entry["frozen_names"])
    assert any(n.startswith("blocks.0.") for n in entry["frozen_names"])
    assert entry["frozen_unchanged"] and entry["frozen_state_free"] and entry["frozen_same_on_ranks"]
    if name.startswith("ddp"):  # rebuilt once at the start and at each of the 3 events
        assert entry["ddp_rebuilds"] == 4


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_distributed_resume_after_freeze_matches_uninterrupted(runs, name):
    root, report = runs
    entry = report[name]
    assert entry["resumed_at"] == STOP
    assert entry["resume_equal"], f"max abs diff {entry['resume_max_diff']}"
    strip = lambda rows: [{k: v for k, v in json.loads(r).items() if k != "elapsed_s"} for r in rows]  # noqa: E731
    full = (root / f"{name}_full" / "metrics.jsonl").read_text().splitlines()
    part = (root / f"{name}_part" / "metrics.jsonl").read_text().splitlines()
    assert strip(full) == strip(part)
    latest = (root / f"{name}_part" / "dcp" / "latest").read_text().strip()
    assert latest == "step_00000016" and (root / f"{name}_part" / "encoder.pt").is_file()


def test_distributed_resume_with_dropout_drop_path_and_query_subset_is_bitwise(runs):
    root, report = runs
    for rank, entry in enumerate(report["drop"]["per_rank"]):
        assert entry["differ"] == [], f"rank {rank}: {len(entry['differ'])} of {report['drop']['tensors']} differ"
        assert entry["rng_equal"], f"rank {rank}: the dropout RNG stream ends elsewhere than the uninterrupted run's"
    strip = lambda rows: [{k: v for k, v in json.loads(r).items() if k != "elapsed_s"} for r in rows]  # noqa: E731
    full = (root / "drop_full" / "metrics.jsonl").read_text().splitlines()
    assert [r["step"] for r in strip(full)] == [5, 10, 15, 16]
    assert strip((root / "drop_part" / "metrics.jsonl").read_text().splitlines()) == strip(full)


def test_dcp_run_resumes_in_its_copy_and_forks_without_touching_the_source(runs):
    root, report = runs
    entry = report["ddp"]
    assert entry["source_untouched"] and entry["fork_equal"] and entry["copy_equal"]
    strip = lambda rows: [{k: v for k, v in json.loads(r).items() if k != "elapsed_s"} for r in rows]  # noqa: E731
    full = strip((root / "ddp_full" / "metrics.jsonl").read_text().splitlines())
    for name in ("ddp_fork", "ddp_copy"):
        assert strip((root / name / "metrics.jsonl").read_text().splitlines()) == full, name
        assert (root / name / "dcp" / "latest").read_text().strip() == "step_00000016"


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_consolidated_encoder_export(runs, name):
    """encoder.pt is one file with the full (unsharded) encoder weights the run ended with."""
    from layerlock_plugin.reference.parallel.dcp import load_encoder

    root, report = runs
    model = load_encoder(root / f"{name}_full" / "encoder.pt")
    sums = report[name]["checksums"]
    encoder = [n for n in sums if n.startswith(("patch_embed.", "blocks.0.", "blocks.3."))]
    assert len(encoder) > 10
    params = dict(model.named_parameters())
    for n in encoder:
        assert float(params[n].detach().double().sum()) == sums[n], n


def test_every_collective_runs_on_the_training_device(runs):
    """Each tensor the 2-process runs handed to torch.distributed (the step's all-reduce, the adaptive
    and guard reductions, DCP, logging) was on the device the trainer runs on: the CPU here. On a GPU the
    same recorder runs in the device check (benchmarks/gpu_check_workers.py), where a CPU tensor would be the bug."""
    _, report = runs
    assert report["collectives"] > 100 and report["collective_devices"] == ["cpu"]


def test_distributed_bad_input_errors(runs):
    _, report = runs
    err = report["errors"]
    assert err["batch"].startswith("train.batch_size: 7 (the global batch) must be divisible by world size")
    assert "differing fields: schedule.interval" in err["other_config"]
    assert "no_such_run" in err["missing"] and "does not exist" in err["missing"]
    assert err["none_under_torchrun"].startswith("train.strategy: is 'none' but this is one of WORLD_SIZE=2")


def test_partial_dcp_checkpoint_refused(runs, tmp_path):
    from layerlock_plugin.reference.parallel import dcp
    from layerlock_plugin.reference.train import config_from_checkpoint

    root, _ = runs
    run = tmp_path / "run"
    shutil.copytree(root / "fsdp_part", run)
    assert config_from_checkpoint(run)["train"]["strategy"] == "fsdp"
    step_dir = run / "dcp" / "step_00000016"
    (step_dir / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=r"is partial \(missing \.metadata\)"):
        dcp.resolve(run)
    (run / "dcp" / "latest").unlink()
    with pytest.raises(CheckpointError, match="no complete distributed checkpoint"):
        dcp.resolve(run)
    # a one-process run cannot load it (and says how to)
    from layerlock_plugin.reference.train import Trainer

    with pytest.raises(CheckpointError, match="train.strategy=ddp or fsdp"):
        Trainer(tiny_config(tmp_path / "x"), resume=root / "ddp_part", echo=lambda s: None)


def test_strategy_without_process_group_and_unknown_strategy(tmp_path, monkeypatch):
    from layerlock_plugin.reference.train import Trainer

    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match=r"^train\.strategy: 'fsdp' needs a torch.distributed process group.*torchrun"):
        Trainer(tiny_config(tmp_path, "train.strategy=fsdp"))
    with pytest.raises(ConfigError, match=r"^train\.strategy: must be one of 'none', 'ddp', 'fsdp', 'spmd'; got 'zero3'"):
        tiny_config(tmp_path, "train.strategy=zero3")
    with pytest.raises(ConfigError, match=r"^train\.grad_accum: must divide train\.batch_size=8, got 3"):
        tiny_config(tmp_path, "train.grad_accum=3")


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
