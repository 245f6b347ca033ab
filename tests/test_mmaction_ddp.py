"""mmaction2's tools/train.py with 2 processes (torchrun, gloo, CPU) across two freeze events.

mmaction2's ``dist_train.sh`` cannot run on a machine without CUDA: mmengine's ``init_dist`` calls
``torch.cuda.set_device``. The launcher below initialises the gloo process group itself (mmengine then
skips ``init_dist``) and runs the wheel's own ``tools/train.py`` unchanged with ``--launcher pytorch``;
``model_wrapper_cfg.device_ids=None`` makes mmengine's MMDistributedDataParallel accept a CPU model.
A test-only hook dumps every rank's weights at the end: DDP, rebuilt by LayerLockHook at each freeze
event, must keep the ranks identical.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("mmaction", reason='needs pip install "layerlock-plugin[mmaction]"')
pytest.importorskip("decord")
pytest.importorskip("cv2")

from layerlock_plugin.adapters.mmaction.compat import mmaction_root  # noqa: E402

from teardown_abort import forgive_teardown_abort, torchrun_exit_codes  # noqa: E402
from test_mmaction import TINY, _load_example  # noqa: E402

LAUNCHER = textwrap.dedent('''
    import os, runpy, sys
    import torch, torch.distributed as dist
    from mmengine.hooks import Hook
    from mmengine.registry import HOOKS

    @HOOKS.register_module()
    class DumpRankWeights(Hook):
        def __init__(self, out):
            self.out = out
        def after_run(self, runner):
            model = runner.model.module if hasattr(runner.model, "module") else runner.model
            path = f"{self.out}/rank{dist.get_rank()}.pt"
            torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, path + ".tmp")
            os.replace(path + ".tmp", path)  # complete or absent (see teardown_abort)

    dist.init_process_group("gloo")  # mmengine's init_dist would call torch.cuda.set_device
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
''')


def test_two_process_gloo_training_across_freeze_events(tmp_path):
    data = tmp_path / "clips"
    _load_example("make_tiny_clips").write_clips(data, num_clips=4, num_frames=24)
    launcher = tmp_path / "launch_cpu.py"
    launcher.write_text(LAUNCHER)
    text = TINY.read_text().replace("custom_hooks = [\n", f"custom_hooks = [\n    dict(type='DumpRankWeights', out='{tmp_path}'),\n")
    config = tmp_path / "tiny_ddp.py"
    config.write_text(text + "\nmodel_wrapper_cfg = dict(type='MMDistributedDataParallel', device_ids=None)\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(launcher),
           str(mmaction_root() / ".mim" / "tools" / "train.py"), str(config), "--launcher", "pytorch",
           "--work-dir", str(tmp_path / "work"), "--cfg-options", "train_cfg.max_iters=9",
           f"train_dataloader.dataset.ann_file={data}/train_list.txt",
           f"train_dataloader.dataset.data_prefix.video={data}/videos"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=380,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
    log = proc.stdout + proc.stderr
    results = [tmp_path / f"rank{r}.pt" for r in (0, 1)]
    codes = [0] if proc.returncode == 0 else torchrun_exit_codes(proc.stderr)  # torch's teardown abort is forgiven
    forgive_teardown_abort(codes, log, results, "2-rank mmaction2 tools/train.py")
    assert log.count("rebuilt MMDistributedDataParallel") >= 2, log[-3000:]  # at steps 4 and 7 (rank 0 logs)
    assert "[layerlock] step 7: froze block_2 (2 blocks frozen); target -> layer_2" in log
    r0, r1 = (torch.load(p, weights_only=True) for p in results)
    # Ranks see different clips and masks, so only synchronised gradients keep them identical.
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"ranks diverged at {k}"
