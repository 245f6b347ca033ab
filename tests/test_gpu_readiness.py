"""GPU paths correct by construction, checked on CPU: host syncs per step, nothing built from host values on
the device inside a step, the guard's spectrum only at log steps, cached clips indexed on the device, the
decoder stream in the autocast dtype, DDP built with the keywords the installed torch has, the process
group's backends, the CUDA generator in checkpoints, peak memory only where an allocator reports it.

(Collectives on the trainer's device are checked in tests/test_distributed.py, which records the device
of every tensor the 2-process run hands to torch.distributed.)
"""

from __future__ import annotations

import collections
import json
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


@pytest.mark.parametrize("extra, syncs", [(["guard.policy=off"], 0), (["guard.policy=warn"], 0),
                                          (["guard.policy=raise"], 0),
                                          (["guard.policy=skip", "train.grad_accum=2"], 1),
                                          (["guard.policy=off", "target.loss_fraction=0.5"], 0)])
def test_a_training_step_reads_the_device_once_only_to_skip(tmp_path, monkeypatch, extra, syncs):
    """Only ``skip`` decides inside the step (its decision gates the update); ``warn`` / ``raise`` decide at
    log steps, so a step between them never waits for the device."""
    trainer = _trainer(tmp_path, *extra)
    video = torch.stack([trainer.dataset[i]["video"] for i in range(8)])
    reads = HostReads(monkeypatch)
    per_step = []
    for _ in range(16):  # the pixel phase, three freeze events and target switches
        before = reads.total()
        trainer.train_step(video)
        per_step.append(reads.total() - before)
    assert per_step == [syncs] * 16, dict(reads.where)


def test_no_tensor_is_built_from_host_values_on_the_device_in_a_step(tmp_path, monkeypatch):
    """``torch.tensor([...], device=cuda)`` is a pageable host-to-device copy that waits for the GPU: the
    step's flags are made on the device instead (fills of device tensors, no copy)."""
    trainer = _trainer(tmp_path, "guard.policy=warn", "train.ckpt_every_minutes=60")
    video = torch.stack([trainer.dataset[i]["video"] for i in range(8)])
    built = collections.Counter()
    for name in ("tensor", "as_tensor"):
        original = getattr(torch, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            caller = traceback.extract_stack(limit=2)[0]
            if caller.filename.startswith(PACKAGE) and kwargs.get("device") is not None:
                built[f"torch.{_name} at {Path(caller.filename).name}:{caller.lineno}"] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch, name, counted)
    for _ in range(8):
        trainer.train_step(video)
    assert not built, dict(built)
    trainer.stop.requested = True  # the flags still carry a stop request (read at the next log row)
    out = trainer.train_step(video)
    assert dict(zip(out.names, out.values.tolist()))["_stop"] == 1.0


def _svdvals_calls(monkeypatch) -> list[int]:
    calls = []
    original = torch.linalg.svdvals

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svdvals", counted)
    return calls


def test_the_guard_spectrum_runs_at_log_steps_not_inside_the_step(tmp_path, monkeypatch):
    """With ``warn`` the target's token sample is kept (on the device) and its spectrum computed when the log
    row is written: no ``svdvals`` inside any step, one per measured latent step at the row, and the row's
    guard statistics are those of the last measured step."""
    from layerlock_plugin.collapse import feature_stat_tensors

    trainer = _trainer(tmp_path, "guard.policy=warn", "train.steps=12", "train.log_every=12")
    calls = _svdvals_calls(monkeypatch)
    targets, in_steps = {}, []
    real_targets, real_step = trainer.layerlock.targets, trainer.train_step

    def keep(*args, **kwargs):
        out = real_targets(*args, **kwargs)
        targets[trainer.step] = out
        return out

    def step(video):
        before = len(calls)
        out = real_step(video)
        in_steps.append(len(calls) - before)
        return out

    monkeypatch.setattr(trainer.layerlock, "targets", keep)
    monkeypatch.setattr(trainer, "train_step", step)
    trainer.fit()  # 12 steps, one log row (and the final checkpoint) at step 12
    measured = [s for s in range(12) if s % 2 == 0 and s >= 6]  # guard.every=2, latent targets from step 6
    assert in_steps == [0] * 12 and len(calls) == len(measured), (in_steps, len(calls), measured)
    row = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    last = targets[measured[-1]]
    expected = feature_stat_tensors(last[trainer.layerlock.heads(trainer.layerlock.plan_at(measured[-1]))[-1]])
    assert row["layerlock/feature_std"] == pytest.approx(float(expected[0]), rel=1e-6)
    assert row["layerlock/effective_rank"] == pytest.approx(float(expected[1]), rel=1e-6)


def test_a_deferred_raise_names_the_step_that_tripped(tmp_path):
    """``raise`` decides at the log row, in order, with the step each measure belongs to."""
    from layerlock_plugin.errors import CollapseError

    trainer = _trainer(tmp_path, "guard.policy=raise", "guard.min_effective_rank=1.0", "guard.patience=1",
                       "train.log_every=4")
    with pytest.raises(CollapseError, match="tripped at step 6:"):
        trainer.fit()
    assert trainer.step == 8  # the first row after the first measured latent step


def test_skip_still_measures_inside_the_step(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, "guard.policy=skip", "guard.min_effective_rank=1.0", "guard.patience=1")
    video = torch.stack([trainer.dataset[i]["video"] for i in range(8)])
    calls = _svdvals_calls(monkeypatch)
    skipped = [trainer.train_step(video).skipped for _ in range(8)]
    assert skipped == [False] * 6 + [True, False] and len(calls) == 1


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
    assert all(0 <= r["data_wait_frac"] < 0.5 for r in rows)  # cached clips: indexing, no decoding


def test_the_index_check_never_reads_device_indices():
    """Indices on another device than the CPU are not read back (a meta tensor cannot be: reading would raise)."""
    from layerlock_plugin.reference.model import ModelConfig, VideoMAE

    model = VideoMAE(ModelConfig.tiny())
    model._check_idx("query_idx", torch.zeros(2, 3, dtype=torch.long, device="meta"), 2)
    with pytest.raises(ValueError, match="token positions must be in 0..63"):
        model._check_idx("query_idx", torch.full((2, 3), 64, dtype=torch.long), 2)


def test_cached_clips_are_served_from_the_device_without_a_dataloader(tmp_path, monkeypatch):
    """The embedded clips, rendered once, stay on the training device and each step's rows are indexed
    there: no DataLoader collating on the main thread, and on the CPU (float32) exactly the batches the
    DataLoader gave, so the run's numbers do not change."""
    from torch.utils.data import DataLoader

    from layerlock_plugin.reference.data import StepBatchSampler
    from layerlock_plugin.reference.train import trainer as trainer_module

    trainer = _trainer(tmp_path, "train.steps=6")
    sampler = StepBatchSampler(len(trainer.dataset), 8, trainer.config.seed, 0, 6)
    expected = [torch.stack([trainer.dataset[i]["video"] for i in b]) for b in sampler]

    def refuse(*args, **kwargs):
        raise AssertionError("a DataLoader was built for cached clips")

    monkeypatch.setattr(trainer_module, "DataLoader", refuse)
    got = [batch["video"] for batch in trainer._loader(6)]
    assert len(got) == 6 and all(torch.equal(a, b) and a.dtype == torch.float32 for a, b in zip(got, expected))
    assert DataLoader is not refuse


def test_clip_storage_dtype_follows_the_device_and_precision():
    from layerlock_plugin.reference.data.device_clips import storage_dtype

    assert storage_dtype(torch.device("cpu"), torch.bfloat16) == torch.float32  # CPU keeps today's numbers
    assert storage_dtype(torch.device("cpu"), None) == torch.float32
    assert storage_dtype(torch.device("cuda", 0), torch.bfloat16) == torch.bfloat16
    assert storage_dtype(torch.device("cuda", 0), None) == torch.float32


def test_the_decoder_stream_stays_in_the_autocast_dtype():
    """The fp32 query token (and position table) must not promote the bf16 decoder stream to fp32."""
    from layerlock_plugin.reference.model import ModelConfig, VideoMAE

    model = VideoMAE(ModelConfig.tiny())
    seen = []
    for block in model.blocks[model.encoder_depth:]:
        block.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    video = torch.randn(2, 3, 8, 32, 32)
    n = model.num_patches
    visible = torch.arange(6).repeat(2, 1)
    query = torch.arange(6, n).repeat(2, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(video, visible, query)
    assert seen and set(seen) == {torch.bfloat16}, seen
    seen.clear()
    model(video, visible, query)  # fp32 stays fp32
    assert set(seen) == {torch.float32}


class _DDPWithout:
    """torch 2.11's DistributedDataParallel signature (no ``forward_sync_buffers``), recording its arguments."""

    built: list[dict] = []

    def __init__(self, module, device_ids=None, output_device=None, dim=0, broadcast_buffers=True,
                 process_group=None, bucket_cap_mb=None, find_unused_parameters=False, check_reduction=False,
                 gradient_as_bucket_view=False, static_graph=False):
        self.module, self.broadcast_buffers = module, broadcast_buffers
        _DDPWithout.built.append({"broadcast_buffers": broadcast_buffers})


class _DDPWith(_DDPWithout):
    """torch 2.14's: ``forward_sync_buffers`` beside the deprecated ``broadcast_buffers``."""

    def __init__(self, module, device_ids=None, broadcast_buffers=None, forward_sync_buffers=None):
        self.module, self.forward_sync_buffers = module, forward_sync_buffers


@pytest.mark.parametrize("ddp, keyword", [(_DDPWithout, "broadcast_buffers"), (_DDPWith, "forward_sync_buffers")])
def test_the_buffer_sync_keyword_is_the_one_the_installed_ddp_takes(monkeypatch, ddp, keyword):
    from layerlock_plugin import _compat

    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", ddp)
    assert _compat.ddp_buffer_sync(False) == {keyword: False}
    assert _compat.ddp_buffer_sync_of(ddp(nn_module := torch.nn.Linear(1, 1), **{keyword: False})) == {keyword: False}
    del nn_module


def test_ddp_wrapping_builds_on_a_torch_without_forward_sync_buffers(monkeypatch):
    """``train.strategy=ddp`` on torch 2.11 crashed with ``unexpected keyword argument 'forward_sync_buffers'``."""
    from layerlock_plugin import integration
    from layerlock_plugin.reference.model import ModelConfig, VideoMAE
    from layerlock_plugin.reference.parallel.distributed import DistEnv
    from layerlock_plugin.reference.parallel.parallelize import Parallelized

    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", _DDPWithout)
    monkeypatch.setattr(integration, "DistributedDataParallel", _DDPWithout)
    _DDPWithout.built.clear()
    parallel = Parallelized(VideoMAE(ModelConfig.tiny()), DistEnv("ddp", 0, 1, 0, torch.device("cpu"), "gloo"))
    assert parallel.sync(["pixels"]) and _DDPWithout.built == [{"broadcast_buffers": False}]
