"""The XLA path seen from the main environment (no torch_xla): a clear error naming the install step,
and nothing XLA-specific imported by the core or the CPU / GPU path. The XLA runs themselves are in
``tests_xla/`` (their own environment: ``bash scripts/setup_xla_env.sh``)."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

from cli_helpers import run_main, tiny_args

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(importlib.util.find_spec("torch_xla") is not None,
                                reason="this environment has torch_xla; tests_xla/ covers it")


@pytest.mark.parametrize("sets, env", [(["--set", "train.device=xla"], {}),
                                       (["--set", "train.device=auto"], {"PJRT_DEVICE": "TPU"})],
                         ids=["xla", "auto-with-PJRT_DEVICE"])
def test_xla_without_torch_xla_names_the_install_step(tmp_path, monkeypatch, sets, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    out = run_main(tiny_args("--out", "runs/x", *sets), tmp_path)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert "train.device" in lines[0] and "scripts/setup_xla_env.sh" in lines[0] and "torch-xla 2.9.0" in lines[0]
    assert "Traceback" not in out.stderr and not (tmp_path / "runs").exists()


def test_auto_without_PJRT_DEVICE_stays_off_xla(tmp_path, monkeypatch):
    monkeypatch.delenv("PJRT_DEVICE", raising=False)
    out = run_main(tiny_args("--out", "runs/a", "--set", "train.device=auto", "--set", "train.steps=2"), tmp_path)
    assert out.returncode == 0, out.stderr


def test_only_the_xla_module_imports_torch_xla_and_only_inside_functions():
    """The core, the adapters and the CPU / GPU trainer never import torch_xla; ``reference/parallel/xla.py`` does
    it lazily, when a run asks for the XLA device."""
    importers = []
    for path in sorted((ROOT / "layerlock_plugin").rglob("*.py")) + sorted((ROOT / "adapters").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "torch_xla" or n.startswith("torch_xla.") for n in names):
                importers.append((path.relative_to(ROOT).as_posix(), node.col_offset))
    assert importers and {p for p, _ in importers} == {"layerlock_plugin/reference/parallel/xla.py"}
    assert all(col > 0 for _, col in importers), "torch_xla imported at module level"
