"""The adaptive schedule under 2 processes (gloo, CPU): every rank decides the same events at the same
steps, with replicated parameters that deliberately see different data per rank, and with FSDP2
(``fully_shard``) parameters whose norms come from reduced shard sums.

The test runs this file as a script under 2 spawned processes (``python test_adaptive_distributed.py OUT``);
the launcher prints each rank's exit code (torch's gloo teardown abort is forgiven: see teardown_abort).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from teardown_abort import forgive_teardown_abort, save_atomic

HERE = Path(__file__).resolve()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_take_the_same_decisions(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(HERE), str(tmp_path)], env=env, cwd=HERE.parent,
                          capture_output=True, text=True, timeout=300)
    results = [tmp_path / f"rank{r}.pt" for r in (0, 1)]
    codes = json.loads(proc.stdout.splitlines()[-1])["exit_codes"] if proc.stdout.strip() else []
    forgive_teardown_abort(codes, proc.stdout[-3000:] + proc.stderr, results, "2-rank adaptive run")
    r0, r1 = (torch.load(p, weights_only=True) for p in results)

    # replicated parameters, different data per rank
    rep0, rep1 = r0["replicated"], r1["replicated"]
    assert rep0["events"] and rep0["events"] == rep1["events"]
    assert rep0["history"] == rep1["history"], "the reduced signals must be identical on both ranks"
    # non-vacuous: the ranks' own parameters (and so their local norms) really differ ...
    assert rep0["local_sq"] != rep1["local_sq"]
    # ... and the agreed norm is that of the average over the ranks: norm^2 = mean of the local sums
    for (step, norm), a, b in zip(rep0["history"], rep0["local_sq"], rep1["local_sq"]):
        assert norm**2 == pytest.approx((a + b) / 2, rel=1e-9), step
    # on its own data alone, each rank would have decided differently (what the reduction is for)
    assert rep0["alone_events"] != rep1["alone_events"]

    # FSDP2: parameters are sharded DTensors; the reduced norm is the norm of the full tensor
    f0, f1 = r0["fsdp"], r1["fsdp"]
    assert f0["events"] and f0["events"] == f1["events"] and f0["history"] == f1["history"]
    for f in (f0, f1):
        assert f["reduced_sq"] == pytest.approx(f["full_sq"], rel=1e-9)
        assert 0 < f["snapshot_numel"] < f["full_numel"], "only the local shard may be snapshot"
        assert f["frozen_unchanged"], "blocks frozen on schedule moved under FSDP2"


# -- the worker (runs in each of the 2 processes) -----------------------------------------------------------
def _schedule():
    from layerlock_plugin.schedule import AdaptiveConfig, ScheduleConfig

    return ScheduleConfig(kind="adaptive", max_frozen=2, adaptive=AdaptiveConfig(
        observe_every=2, window=3, signal="either", update_threshold=0.6, norm_tolerance=0.002,
        min_pixel_steps=6, max_pixel_steps=12, min_interval=4, max_interval=8))


STEPS = 24


def _run(model, ll, opt, rank: int, steps: int, on_obs=None) -> None:
    for step in range(steps):
        ll.begin_step(step)
        if on_obs is not None and step % 2 == 0:
            on_obs(step)
        g = torch.Generator().manual_seed(1000 * rank + step)  # different data on every rank
        x = torch.randn(4, 6, 8, generator=g)
        loss = (model(x) - x.flip(-1) * (1 + rank)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _replicated(rank: int) -> dict:
    from conftest import ToyEncoder

    from layerlock_plugin.controller import LayerLock, LayerLockConfig

    def build():
        torch.manual_seed(0)
        model = ToyEncoder(p=0.0)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.05)
        return model, opt, LayerLock(model, LayerLockConfig(schedule=_schedule()).with_method("freeze-only"), opt)

    model, opt, ll = build()
    local_sq = []

    def on_obs(step):
        o = ll.schedule.last
        if o is not None and o.step == step:
            params = [p for b in model.blocks[o.first_block - 1 : o.last_block] for p in b.parameters()]
            local_sq.append(float(sum(p.detach().double().pow(2).sum() for p in params)))

    _run(model, ll, opt, rank, STEPS, on_obs)
    history = [(o.step, o.norm) for o in ll.schedule.history]
    return {"events": [d.as_list() for d in ll.schedule.decisions], "history": history, "local_sq": local_sq,
            "alone_events": _alone_events(rank)}


def _alone_events(rank: int) -> list:
    """The events this rank would decide on its own data, without any reduction (torch.distributed
    treated as absent for the schedule)."""
    from conftest import ToyEncoder

    import layerlock_plugin.adaptive as adaptive
    from layerlock_plugin.controller import LayerLock, LayerLockConfig

    torch.manual_seed(0)
    model = ToyEncoder(p=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.05)
    ll = LayerLock(model, LayerLockConfig(schedule=_schedule()).with_method("freeze-only"), opt)
    real = adaptive._distributed
    adaptive._distributed = lambda: False
    try:
        _run(model, ll, opt, rank, STEPS)
    finally:
        adaptive._distributed = real
    return [d.as_list() for d in ll.schedule.decisions]


def _fsdp(rank: int) -> dict:
    from conftest import ToyEncoder
    from torch.distributed.fsdp import fully_shard

    from layerlock_plugin.adaptive import global_sums_of_squares
    from layerlock_plugin.controller import LayerLock, LayerLockConfig

    torch.manual_seed(0)
    model = ToyEncoder(p=0.0)
    fully_shard(model)  # one FSDP group (few collectives per step): every parameter is a sharded DTensor
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.05)
    ll = LayerLock(model, LayerLockConfig(schedule=_schedule()).with_method("freeze-only"), opt)
    frozen_at: dict[int, dict[str, torch.Tensor]] = {}
    ll.on_event(lambda e: frozen_at.setdefault(e.step, {}))

    snapshot_numel = []

    def on_obs(step):
        watch = ll.schedule._watch
        if watch is not None:
            snapshot_numel.append(sum(t.numel() for t in watch.snapshot))
        if step in frozen_at and not frozen_at[step]:
            for i in range(ll.plan.num_frozen):
                for n, p in model.blocks[i].named_parameters():
                    frozen_at[step][f"{i}.{n}"] = p.full_tensor().detach().clone()

    _run(model, ll, opt, rank, STEPS, on_obs)
    # compare every frozen snapshot with the final weights
    unchanged = all(torch.equal(dict(model.blocks[int(k.split(".")[0])].named_parameters())[k.split(".", 1)[1]].full_tensor(), v)
                    for snap in frozen_at.values() for k, v in snap.items())
    block = list(model.blocks[2].parameters())
    (reduced,) = global_sums_of_squares([block])
    full = float(sum(p.full_tensor().detach().double().pow(2).sum() for p in block))
    return {"events": [d.as_list() for d in ll.schedule.decisions],
            "history": [(o.step, o.norm) for o in ll.schedule.history],
            "reduced_sq": reduced, "full_sq": full, "frozen_unchanged": bool(unchanged and frozen_at),
            "snapshot_numel": max(snapshot_numel),
            "full_numel": sum(p.numel() for p in block)}


def _worker(out: Path) -> None:
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    from datetime import timedelta

    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        result = {"replicated": _replicated(rank), "fsdp": _fsdp(rank)}
        save_atomic(result, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    out = Path(sys.argv[1])
    if "RANK" in os.environ:
        sys.path.insert(0, str(HERE.parent))
        _worker(out)
    else:  # the launcher: two ranks of this same script
        procs = [subprocess.Popen([sys.executable, str(HERE), str(out)], env={**os.environ, "RANK": str(r)})
                 for r in (0, 1)]
        try:
            codes = [p.wait(timeout=280) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        print(json.dumps({"exit_codes": codes}))  # per rank: -6 is a SIGABRT
        sys.exit(max(abs(c) for c in codes))
