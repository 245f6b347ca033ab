"""What the 2-process tests forgive (torch's gloo teardown abort after complete results) and what they don't."""

from __future__ import annotations

import pytest
import torch

from teardown_abort import ABORT_LINE, forgive_teardown_abort, save_atomic, torchrun_exit_codes

TORCHRUN_SUMMARY = """Traceback (most recent call last):
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
worker.py FAILED
------------------------------------------------------------
Failures:
  <NO_OTHER_FAILURES>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-05_18:00:00
  host      : ci
  rank      : 1 (local_rank: 1)
  exitcode  : -6 (pid: 4242)
  error_file: <N/A>
  traceback : Signal 6 (SIGABRT) received by PID 4242
============================================================"""


def test_only_the_known_abort_after_complete_results_is_forgiven(tmp_path):
    results = [tmp_path / "rank0.pt", tmp_path / "rank1.json"]
    save_atomic({"w": torch.ones(2)}, results[0])
    save_atomic({"events": [1, 2]}, results[1])
    assert not (tmp_path / "rank0.pt.tmp").exists()
    forgive_teardown_abort([0, 0], "", results, "run")  # success: nothing to forgive
    with pytest.warns(UserWarning, match="known gloo teardown abort"):
        forgive_teardown_abort([0, -6], f"{ABORT_LINE}\n", results, "run")
    for codes, stderr, match in [([0, -11], ABORT_LINE, "exit codes"), ([1], ABORT_LINE, "exit codes"),
                                 ([], ABORT_LINE, "exit codes"), ([-6], "Segmentation fault", "no 'terminate")]:
        with pytest.raises(AssertionError, match=match):
            forgive_teardown_abort(codes, stderr, results, "run")
    results[1].write_text('{"events": [1, ')  # a rank that died while writing
    with pytest.raises(AssertionError, match="incomplete results"):
        forgive_teardown_abort([-6], ABORT_LINE, results, "run")
    with pytest.raises(AssertionError, match="incomplete results"):
        forgive_teardown_abort([-6], ABORT_LINE, [tmp_path / "missing.pt"], "run")


def test_torchrun_exit_codes_are_read_from_its_failure_summary():
    assert torchrun_exit_codes(TORCHRUN_SUMMARY) == [-6]
    assert torchrun_exit_codes(TORCHRUN_SUMMARY.replace("exitcode  : -6", "exitcode  : 1")) == [1]
    assert torchrun_exit_codes("no summary") == []
