"""Which probe tasks may carry a verdict: the calibration rule, fixed before any method is compared.

A task's probe is evidence only if it ranks features of known quality. For each task, with the same
probes an encoder is read with (headline classifier; ridge and attentive depth):

* the supervised rung (the evaluation's architecture and budget, trained on the labels, read on
  held-out content: test clips of digit images it never saw) must be **well above chance**: accuracy at
  least :data:`ABOVE_CHANCE` over the majority share (depth: R² at least :data:`ABOVE_CHANCE`);
* and **well above random init and raw pixels**: at least :data:`MARGIN` (accuracy or R²) over the best
  of raw pixels and every random-init seed;
* a temporal-semantic task (:data:`TEMPORAL_SEMANTIC`: one that frame differencing must not read) must
  also be at least :data:`MARGIN` above the hand-made motion features.

A task that fails is reported as uncalibrated and never enters a verdict.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["ABOVE_CHANCE", "MARGIN", "TEMPORAL_SEMANTIC", "DENSE_TASKS", "task_verdicts", "task_scores"]

#: how far above chance (accuracy over the majority share; R² over 0) the supervised rung must be
ABOVE_CHANCE = 0.20
#: how far above the best of raw pixels and every random-init seed (and, for temporal-semantic tasks,
#: the hand-made motion features) the supervised rung must be, in accuracy or R²
MARGIN = 0.10
#: tasks built so that frame differencing cannot read them
TEMPORAL_SEMANTIC = ("turn",)
#: the dense tasks: name -> the probe key of its score
DENSE_TASKS = {"depth": "dense_r2", "depth_attentive": "dense_attentive_r2"}


def task_scores(probes: Mapping[str, Any]) -> dict[str, float]:
    """Every task's headline score in one probe result: ``<task>_acc`` per classification task, the
    depth readouts' R² under :data:`DENSE_TASKS` names."""
    out = {k[: -len("_acc")]: float(v) for k, v in probes.items()
           if k.endswith("_acc") and k.count("_") == 1}
    out.update({name: float(probes[key]) for name, key in DENSE_TASKS.items() if key in probes})
    return out


def task_verdicts(rungs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Apply the rule to a ladder. ``rungs``: dicts with ``rung`` (``'supervised'``, ``'pixels'``,
    ``'random_init'``, ``'motion_features'``; others are ignored) and ``probes`` (``run_probes``' keys);
    exactly one supervised rung, at least one random-init one. Returns per task: the scores, the
    thresholds, ``passed`` and ``why`` (the first failed condition, or ``''``)."""
    by_kind: dict[str, list[Mapping[str, Any]]] = {}
    for r in rungs:
        by_kind.setdefault(r["rung"], []).append(r["probes"])
    if len(by_kind.get("supervised", [])) != 1 or not by_kind.get("random_init") or not by_kind.get("pixels"):
        raise ValueError("the ladder needs one supervised rung, raw pixels and at least one random-init rung")
    sup = by_kind["supervised"][0]
    out: dict[str, dict[str, Any]] = {}
    for task, score in task_scores(sup).items():
        dense = task in DENSE_TASKS
        chance = 0.0 if dense else float(sup[f"{task}_chance_majority"])
        baselines = {"raw pixels": task_scores(by_kind["pixels"][0]).get(task, float("nan"))}
        for i, p in enumerate(by_kind["random_init"]):
            baselines[f"random init {i}"] = task_scores(p).get(task, float("nan"))
        best = max(baselines.values())
        motion = [task_scores(p).get(task, float("nan")) for p in by_kind.get("motion_features", [])]
        entry: dict[str, Any] = {"supervised": score, "chance": chance, "baselines": baselines,
                                 "best_baseline": best, "motion_features": motion[0] if motion else None,
                                 "temporal_semantic": task in TEMPORAL_SEMANTIC}
        why = ""
        if score < chance + ABOVE_CHANCE:
            why = f"supervised {score:.3f} < chance {chance:.3f} + {ABOVE_CHANCE}"
        elif score < best + MARGIN:
            why = f"supervised {score:.3f} < best of raw pixels / random init {best:.3f} + {MARGIN}"
        elif task in TEMPORAL_SEMANTIC:
            if not motion:
                why = "no hand-made motion features rung for a temporal-semantic task"
            elif score < motion[0] + MARGIN:
                why = f"supervised {score:.3f} < hand-made motion features {motion[0]:.3f} + {MARGIN}"
        entry["passed"], entry["why"] = not why, why
        out[task] = entry
    return out
