"""LayerLockTrainer under 2-process DDP (torchrun, gloo, CPU) across two freeze events and target switches."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from teardown_abort import forgive_teardown_abort, torchrun_exit_codes

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

WORKER = Path(__file__).with_name("hf_ddp_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_run_across_freeze_events_keeps_ranks_identical(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(WORKER), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, cwd=WORKER.parent, capture_output=True, text=True, timeout=220)
    results = [tmp_path / f"rank{r}.pt" for r in (0, 1)]
    codes = [0] if proc.returncode == 0 else torchrun_exit_codes(proc.stderr)  # torch's teardown abort is forgiven
    forgive_teardown_abort(codes, proc.stdout[-3000:] + proc.stderr, results, "2-rank Hugging Face run")
    ranks = [torch.load(p, weights_only=True) for p in results]
    for r in ranks:
        assert r["world_size"] == 2 and r["wrapper"] == "DistributedDataParallel" and r["find_unused"] is True
        assert r["events"] == [(3, 1), (7, 2)]
        assert not any(r["frozen_have_grad"])
        # what froze at an event never moved again (stem + block 1 at step 3, block 2 at step 7)
        for step, prefixes in {3: ("videomae.embeddings.", "videomae.encoder.layer.0."), 7: ("videomae.encoder.layer.1.",)}.items():
            keys = [k for k in r["state"] if k.startswith(prefixes)]
            assert keys and all(torch.equal(r["state"][k], r["snapshots"][step][k]) for k in keys), step
    a, b = ranks[0]["state"], ranks[1]["state"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs between ranks"
    # the trainable tail and the newest readout trained (else "identical" would hold vacuously)
    for k in ("videomae.encoder.layer.3.attention.attention.query.weight", "layerlock_readouts.layer_2.weight"):
        assert not torch.equal(a[k], ranks[0]["initial"][k]), k
