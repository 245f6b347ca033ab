"""LayerLockCallback under 2-process Lightning DDP (CPU, gloo) across two freeze events and switches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from teardown_abort import forgive_teardown_abort

pytest.importorskip("lightly")
pytest.importorskip("pytorch_lightning")

WORKER = Path(__file__).with_name("lightning_ddp_worker.py")


def test_two_process_ddp_fit_across_freeze_events(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(WORKER), str(tmp_path)], env=env, cwd=WORKER.parent,
                          capture_output=True, text=True, timeout=220)
    results = [tmp_path / f"rank{r}.pt" for r in (0, 1)]
    # this process is rank 0 (Lightning starts rank 1 from it): its exit code; torch's teardown abort is forgiven
    forgive_teardown_abort([proc.returncode], proc.stdout[-3000:] + proc.stderr, results, "2-rank Lightning fit")
    ranks = [torch.load(p, weights_only=True) for p in results]
    for state in ranks:
        assert state["world_size"] == 2
        assert state["next_step"] == 12 and state["num_frozen"] == 2
        # the blocks frozen at each event (3: stem + block 1, 6: block 2) never moved again
        assert sorted(state["snapshots"]) == [3, 6]
        for step, frozen in state["snapshots"].items():
            for name, before in frozen.items():
                assert torch.equal(state["vit"][name], before), f"{name} moved after the freeze at step {step}"
        assert not any(state["frozen_has_grad"])
    # every weight (frozen or trained through DDP's gradient all-reduce) is the same on both ranks
    a, b = ranks[0]["vit"], ranks[1]["vit"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs between ranks"
    # the last block kept training (else "identical on both ranks" would hold vacuously)
    assert not torch.equal(a["blocks.3.attn.qkv.weight"], ranks[0]["initial_last_block"]["attn.qkv.weight"])
