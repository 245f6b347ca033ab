"""The decode benchmark's ``--quick`` mode: it runs on the real MP4s, writes its JSON and Markdown, and its
numbers are of the right kind (positive rates per decoder and video, a feed estimate, start-up times)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from video_helpers import needs_av, needs_skvideo

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@needs_av
@needs_skvideo
@pytest.mark.timeout(240)
def test_video_decode_quick(tmp_path):
    pytest.importorskip("webdataset")
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_video_decode", BENCH / "video_decode.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    assert module.main(["--quick", "--results-dir", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "video_decode-quick.json").read_text())
    assert (tmp_path / "video_decode-quick.md").read_text().startswith("# Real-video decoding")
    rows = res["decoding"]["rows"]
    assert len(rows) == 6 and {"pyav-seek", "pyav-from-start", "dataset"} <= set(res["decoding"]["decoders"])
    assert all(r[k] > 0 for r in rows for k in res["decoding"]["decoders"])
    phases = res["feed"]["phases"]
    assert phases[1]["gflops_per_clip"] > phases[0]["gflops_per_clip"] > 0 and all(p["workers_per_gpu"] > 0 for p in phases)
    assert res["startup"]["entries"] == 500 and res["startup"]["former_open_per_file_ms"] > 0
