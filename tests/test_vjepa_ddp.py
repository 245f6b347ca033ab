"""gloo DDP across freeze events with the official V-JEPA modules: V-JEPA's
``DistributedDataParallel(encoder, static_graph=True)`` breaks at the first freeze; ``LayerLockDDP`` (the one
changed line) rebuilds at each freeze event and 2 ranks stay in sync.

The break is shown in a process group of its own with one rank: the error is the reducer's own bookkeeping
(the static graph expected the frozen parameters' gradients), the same with any number of ranks, and a
reducer left mid-iteration is kept away from the 2-rank checks. Each worker releases its wrappers before
destroying the group: gloo work still alive at interpreter exit can abort a process. Each rank writes
``rank{r}.done`` once its checks passed, before the teardown, so that torch's known teardown abort after that
is told apart from a failure (see teardown_abort)."""

from __future__ import annotations

import copy
import datetime
import gc
import importlib.util
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from conftest import vjepa_step
from layerlock_plugin.adapters.vjepa import LayerLockAdapter, LayerLockDDP, require_vjepa
from teardown_abort import forgive_teardown_abort, save_atomic

require_vjepa()
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "vjepa" / "train_layerlock_vjepa.py"
STEPS = 12  # events at steps 4 and 8 (layerlock_config(12))


def _example():
    spec = importlib.util.spec_from_file_location("vjepa_example_ddp", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(ex, rank: int, wrap) -> tuple[LayerLockAdapter, torch.nn.Module, torch.nn.Module, list[float]]:
    """Train the tiny V-JEPA for STEPS steps with the encoder wrapped by ``wrap``; every rank sees other data."""
    torch.manual_seed(0)
    encoder, predictor = ex.init_video_model()
    teacher = copy.deepcopy(encoder)
    optimizer = torch.optim.AdamW(list(encoder.parameters()) + list(predictor.parameters()), lr=1e-3)
    ddp_encoder = wrap(encoder)
    ddp_predictor = DistributedDataParallel(predictor, static_graph=True)
    adapter = LayerLockAdapter(ddp_encoder, teacher, ddp_predictor, optimizer, ex.layerlock_config(STEPS))
    collator = ex.make_mask_collator()
    losses = []
    for step in range(STEPS):
        adapter.begin_step(step)
        loss = vjepa_step(ex, adapter, ddp_encoder, ddp_predictor, optimizer, collator, seed=1000 * rank + step)
        adapter.update_teacher(0.99)
        losses.append(float(loss.detach()))
    return adapter, ddp_encoder, teacher, losses


def _same_on_all_ranks(module: torch.nn.Module) -> bool:
    flat = torch.cat([p.detach().flatten() for p in module.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], g) for g in gathered)


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)


def _done(out: Path, rank: int) -> Path:
    return out / f"rank{rank}.done.pt"


def _spawn(worker, world: int, out: Path, capfd, what: str) -> None:
    """``mp.spawn`` the ranks; a rank that died of the known teardown abort after its checks passed is forgiven."""
    try:
        mp.spawn(worker, args=(world, _free_port(), out), nprocs=world, join=True)
        codes = [0]
    except mp.ProcessExitedException as e:  # killed by a signal (a Python exception is ProcessRaisedException)
        codes = [e.exit_code]
    forgive_teardown_abort(codes, capfd.readouterr().err, [_done(out, r) for r in range(world)], what)


def _static_graph_worker(rank: int, world: int, port: int, out: Path) -> None:
    _init(rank, world, port)
    try:
        # V-JEPA's own line breaks at the first freeze event (step 4): the static graph expected the
        # now-frozen stem and block 1 to get gradients.
        with pytest.raises(RuntimeError, match="Expected to have finished reduction"):
            _run(_example(), rank, lambda m: DistributedDataParallel(m, static_graph=True))
        save_atomic({"rank": rank}, _done(out, rank))
    finally:
        dist.destroy_process_group()


def _worker(rank: int, world: int, port: int, out: Path) -> None:
    _init(rank, world, port)
    ex = _example()
    try:
        adapter, ddp_encoder, teacher, losses = _run(ex, rank, lambda m: LayerLockDDP(m, static_graph=True))
        assert ddp_encoder.rebuilds == 2, "one rebuild per freeze event"
        assert adapter.plan.num_frozen == 2 and all(torch.isfinite(torch.tensor(losses)))
        assert _same_on_all_ranks(ddp_encoder.module) and _same_on_all_ranks(teacher)
        assert list(ddp_encoder.state_dict())[0].startswith("module."), "checkpoint keys as with plain DDP"
        save_atomic({"rank": rank}, _done(out, rank))
        # release every DDP wrapper (they hold the process group) and destroy the group while the interpreter
        # is fully alive: gloo work left to interpreter finalization can abort the process (SIGABRT)
        del adapter, ddp_encoder, teacher
        gc.collect()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vjepa_static_graph_ddp_breaks_at_the_first_freeze(tmp_path, capfd):
    _spawn(_static_graph_worker, 1, tmp_path, capfd, "V-JEPA static-graph DDP (one rank)")


def test_layerlock_ddp_survives_freeze_events_and_two_ranks_stay_in_sync(tmp_path, capfd):
    _spawn(_worker, 2, tmp_path, capfd, "V-JEPA LayerLockDDP (2 ranks)")


def _vjepa2_worker(rank: int, world: int, port: int, folder: Path) -> None:
    """V-JEPA 2's train step (the example) under 2 processes: LayerLockDDP around the RoPE encoder."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    spec = importlib.util.spec_from_file_location("vjepa2_example_ddp", EXAMPLE.with_name("train_layerlock_vjepa2.py"))
    ex2 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex2)
    try:
        out = ex2.main(["--steps", str(STEPS), "--quiet"])  # events at steps 4 and 8; every rank other data
        assert out["world_size"] == 2 and out["encoder"].rebuilds == 2, "one rebuild per freeze event"
        assert out["layerlock"].plan.num_frozen == 2 and all(torch.isfinite(torch.tensor(out["losses"])))
        assert _same_on_all_ranks(out["encoder"].module) and _same_on_all_ranks(out["target_encoder"])
        assert _same_on_all_ranks(out["predictor"].module)
        del out  # the wrappers go before the group (see _worker)
        gc.collect()
        save_atomic({"rank": rank}, _done(folder, rank))
    finally:
        dist.destroy_process_group()


def test_vjepa2_train_step_under_two_processes_stays_in_sync_across_freeze_events(tmp_path, capfd):
    _spawn(_vjepa2_worker, 2, tmp_path, capfd, "V-JEPA 2 LayerLockDDP (2 ranks)")
