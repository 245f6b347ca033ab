"""The Hugging Face example (examples/huggingface/pretrain_videomae_layerlock.py) at a few steps: freeze events,
the encoder into VideoMAEForVideoClassification, and a stop + ``--resume`` that ends bitwise where the
uninterrupted run ends."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "huggingface" / "pretrain_videomae_layerlock.py"
_spec = importlib.util.spec_from_file_location("hf_example", EXAMPLE)
ex = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ex)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_example_runs_stops_and_resumes_exactly(tmp_path):
    common = ["--max-steps", "20", "--batch-size", "4", "--quiet"]
    full = ex.main(["--output-dir", str(tmp_path / "full"), *common])
    # 20 steps: pixel phase 8 steps, then a freeze every 3 steps up to 3 blocks
    assert [(e.step, e.num_frozen) for e in full["trainer"].events] == [(8, 1), (11, 2), (14, 3)]
    assert full["loading_info"]["missing_keys"] == {"classifier.weight", "classifier.bias"}
    assert not full["loading_info"]["unexpected_keys"]
    ex.main(["--output-dir", str(tmp_path / "cut"), *common, "--stop-at", "12"])
    resumed = ex.main(["--output-dir", str(tmp_path / "cut"), *common, "--resume"])
    assert [(e.step, e.resumed) for e in resumed["trainer"].events] == [(11, True), (14, False)]
    a, b = full["model"].state_dict(), resumed["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
