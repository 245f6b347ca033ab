"""The embedded probe suites and which of their tasks passed the calibration (``benchmarks/calibration.py``).

A suite is a rendering of the embedded digits (every :class:`~..data.DigitsVideoConfig` field but the clip
counts) read with the architecture it was calibrated with. Its tasks either passed the calibration rule
(:mod:`.calibration_rule`) and may enter a verdict, or did not and are shown marked ``uncalibrated``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ..data import DigitsVideoConfig

__all__ = ["SUITES", "suite_of", "calibration_marks", "reading_of"]

_COUNTS = ("num_videos", "num_test_videos")

#: name -> the rendering (fields that differ from :class:`DigitsVideoConfig`'s defaults), the architecture
#: the calibration used, the tasks that passed and where the ladder is
SUITES: dict[str, dict[str, Any]] = {
    "packaged": {
        "data": {"standardize": True},
        "architecture": "tiny: width 96, 4 encoder + 2 decoder blocks, 1500 steps x 32",
        "calibrated": ("motion",),
        "results": "benchmarks/results/calibration-fixed.json (RESULTS.md section 0.1)",
        "reading": (
            "only motion passed the calibration on these clips, and random init reads it best (its attentive probe "
            "differences raw frames; every pretrained encoder at this scale, pixel MAE included, is below it): "
            "below random init means frame detail was discarded, not that nothing was learned. Depth R2 above "
            "random init shows the encoder learned something, but [uncalibrated] tasks cannot rank methods (an "
            "encoder trained on the labels does not beat random init there). To compare methods use the evidence "
            "setting (configs/evidence.yaml) over several seeds; the numbers vary with thread count and CPU "
            "(float rounding, which training amplifies)."),
    },
    "evidence": {
        "data": {"standardize": True, "speeds": (1.0, 1.5), "placement": "inside", "turn": 90.0,
                 "digit_saturation": (0.0, 0.0), "background_value": (0.2, 0.5)},
        "architecture": "width 96, 9 encoder + 2 decoder blocks, 3000 steps x 32",
        "calibrated": ("motion", "appearance", "turn", "depth", "depth_attentive"),
        "results": "benchmarks/results/calibration-evidence.json",
        "reading": (
            "every task passed the calibration on these clips (docs/evaluation.md). Turn above 0.62 (what "
            "hand-made motion features read) is a learned temporal relation; appearance between random init "
            "(~0.46) and an encoder trained on the labels (0.875) is what was learned about digit shape. Compare "
            "methods over several seeds: one run's digits vary with thread count and CPU."),
    },
}


def _rendering(config: DigitsVideoConfig) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in _COUNTS}


def suite_of(config: Any) -> str | None:
    """The name of the suite ``config`` (a data config) renders, or None (not an embedded suite)."""
    if not isinstance(config, DigitsVideoConfig):
        return None
    mine = _rendering(config)
    for name, suite in SUITES.items():
        if _rendering(DigitsVideoConfig(**suite["data"])) == mine:
            return name
    return None


def calibration_marks(config: Any, tasks: Mapping[str, Any] | list[str]) -> dict[str, str]:
    """``{task: 'calibrated' | 'uncalibrated'}`` for ``tasks`` on the suite ``config`` renders; every task is
    ``'uncalibrated'`` on a rendering that no calibration covers."""
    name = suite_of(config)
    passed = SUITES[name]["calibrated"] if name else ()
    return {t: "calibrated" if t in passed else "uncalibrated" for t in tasks}


#: What the probe line says on clips no calibration covers.
UNCALIBRATED_READING = ("no calibration covers these clips, so no task can rank methods: calibrate them first "
                        "(benchmarks/calibration.py, docs/evaluation.md).")


def reading_of(config: Any) -> str:
    """What a run's probe line lets a user conclude on the clips ``config`` (a data config) renders."""
    name = suite_of(config)
    return SUITES[name]["reading"] if name else UNCALIBRATED_READING
