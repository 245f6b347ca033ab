"""GPU paths correct by construction, checked on CPU: host syncs per step, the process group's backends,
the CUDA generator in checkpoints, peak memory only where an allocator reports it.

(Collectives on the trainer's device are checked in tests/test_distributed.py, which records the device
of every tensor the 2-process run hands to torch.distributed.)
"""

from __future__ import annotations

import collections
import traceback
from pathlib import Path

import pytest
import torch

from layerlock_plugin.errors import CheckpointError
from layerlock_plugin.reference.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")

PACKAGE = str(Path(__file__).resolve().parents[1] / "layerlock_plugin")
TINY = ["data.num_videos=64", "train.batch_size=8", "train.steps=24", "train.log_every=100", "train.progress=false",
        "schedule.pixel_steps=6", "schedule.interval=4", "warmup.steps=3", "probe.enabled=false", "guard.every=2",
        "train.tensorboard=false"]
# Every way a tensor's value reaches the host; on a GPU each one waits for the device.
HOST_READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")


class HostReads:
    """Counts host reads of tensors made directly by this package's code (not torch's internals, e.g.
    AdamW's ``step.item()`` on its CPU step counters, which is no device sync)."""

    def __init__(self, monkeypatch):
        self.where: collections.Counter = collections.Counter()
        for name in HOST_READS:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original, _name=name, **kwargs):
                caller = traceback.extract_stack(limit=2)[0]
                # The model's index range check reads CPU indices only (free there); for GPU indices it is
                # skipped (see test_the_index_check_never_reads_device_indices), so it is no GPU sync.
                if caller.filename.startswith(PACKAGE) and caller.name != "_check_idx":
                    self.where[f"{_name} at {Path(caller.filename).name}:{caller.lineno}"] += 1
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)

    def total(self) -> int:
        return sum(self.where.values())


def _trainer(tmp_path, *extra):
    from layerlock_plugin.reference.train import Trainer

    return Trainer(load_config(None, [f"out_dir={tmp_path}", *TINY, *extra]), echo=lambda s: None)


@pytest.mark.parametrize("extra, syncs", [(["guard.policy=off"], 0), (["guard.policy=warn"], 1),
                                          (["guard.policy=skip", "train.grad_accum=2"], 1),
                                          (["guard.policy=off", "target.loss_fraction=0.5"], 0)])
def test_a_training_step_reads_the_device_at_most_once(tmp_path, monkeypatch, extra, syncs):
    trainer = _trainer(tmp_path, *extra)
    video = torch.stack([trainer.dataset[i]["video"] for i in range(8)])
    reads = HostReads(monkeypatch)
    per_step = []
    for _ in range(16):  # the pixel phase, three freeze events and target switches
        before = reads.total()
        trainer.train_step(video)
        per_step.append(reads.total() - before)
    assert per_step == [syncs] * 16, dict(reads.where)


def test_logging_reads_the_device_once_per_log_row_not_per_step(tmp_path, monkeypatch):
    from layerlock_plugin.reference.train.run_log import RunLog

    log = RunLog(tmp_path, enabled=True)
    names = ("loss", "loss/pixels", "grad_norm", "_stop", "_ckpt_due")
    reads = HostReads(monkeypatch)
    for i in range(10):
        log.add_step(names, torch.full((5,), float(i)), skipped=False)
    assert reads.total() == 0
    row = log.write_row(10, {"lr": 0.1})
    assert reads.total() == 1 and row["loss"] == 4.5 and "_stop" not in row and log.last_step["_stop"] == 9.0


def test_the_process_group_of_a_gpu_run_has_gloo_for_cpu_tensors(monkeypatch):
    from layerlock_plugin.reference.parallel import distributed

    created = {}
    for var, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "localhost"), ("MASTER_PORT", "1")):
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(distributed, "pick_device", lambda want, local_rank=0: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: None)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)

    def init(backend, **kwargs):
        created["backend"] = backend
        raise RuntimeError("stop here")

    monkeypatch.setattr(distributed.dist, "init_process_group", init)
    with pytest.raises(RuntimeError, match="stop here"):
        distributed.setup("ddp", "cuda")
    assert created["backend"] == "cpu:gloo,cuda:nccl"


def test_checkpoints_carry_the_cuda_generator_of_a_gpu_run(monkeypatch):
    from layerlock_plugin.reference.train.checkpointing import restore_rng, rng_state

    cuda_state = torch.arange(16, dtype=torch.uint8)
    restored = {}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=None: cuda_state.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device=None: restored.update(state=state))
    gpu = torch.device("cuda", 0)
    state = rng_state(gpu)
    assert torch.equal(state["cuda"], cuda_state) and "torch" in state
    assert "cuda" not in rng_state(torch.device("cpu"))
    restore_rng(state, gpu)
    assert torch.equal(restored["state"], cuda_state)
    with pytest.raises(CheckpointError, match="no CUDA generator state"):
        restore_rng(rng_state(torch.device("cpu")), gpu)


def test_peak_memory_is_not_measured_on_cpu(tmp_path):
    trainer = _trainer(tmp_path, "train.steps=4", "train.log_every=2")
    trainer.fit()
    import json

    rows = [json.loads(x) for x in (tmp_path / "throughput.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert all(r["peak_mem_gb"] is None and r["step_s"] > 0 and r["clips_per_s"] > 0 for r in rows)


def test_the_index_check_never_reads_device_indices():
    """Indices on another device than the CPU are not read back (a meta tensor cannot be: reading would raise)."""
    from layerlock_plugin.reference.model import ModelConfig, VideoMAE

    model = VideoMAE(ModelConfig.tiny())
    model._check_idx("query_idx", torch.zeros(2, 3, dtype=torch.long, device="meta"), 2)
    with pytest.raises(ValueError, match="token positions must be in 0..63"):
        model._check_idx("query_idx", torch.full((2, 3), 64, dtype=torch.long), 2)
