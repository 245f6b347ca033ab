"""The lightly examples as a user runs them: without lightly they say what to install (no traceback);
with it they write only into the folder the user names and print nothing the user cannot act on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "lightly"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("script", ["mae_layerlock.py", "mae_layerlock_lightning.py"])
def test_lightly_examples_without_lightly_name_the_extra_in_one_line(script, tmp_path):
    hide = ("import runpy, sys; sys.modules['lightly'] = None; "  # as if lightly were not installed
            f"sys.path.insert(0, {str(EXAMPLES)!r}); sys.argv = [{script!r}]; "
            f"runpy.run_path({str(EXAMPLES / script)!r}, run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", hide], cwd=tmp_path, capture_output=True, text=True, timeout=240,
                         env=ENV)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    line, = out.stderr.strip().splitlines()
    assert line.startswith(f"{script}: layerlock_plugin.adapters.lightly_mae needs lightly: pip install -e "
                           '".[lightly]" from the layerlock-plugin checkout'), line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.timeout(300)
def test_lightning_example_writes_only_under_out_without_cloud_tips(tmp_path):
    args = ["--steps", "8", "--batch-size", "8", "--methods", "layerlock", "--out", "mine"]
    out = subprocess.run([sys.executable, str(EXAMPLES / "mae_layerlock_lightning.py"), *args], cwd=tmp_path,
                         capture_output=True, text=True, timeout=280, env=ENV)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[layerlock] step 3: froze stem, block_1 (1 blocks frozen); target -> layer_1" in out.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    printed = out.stdout + out.stderr
    assert "Tip:" not in printed and "LeafSpec" not in printed, printed[-3000:]
