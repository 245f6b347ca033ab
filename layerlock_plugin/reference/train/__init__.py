"""Training: the :class:`Trainer` and its parts, one concept per module.

:mod:`.trainer` holds the loop (``Trainer.fit``) and the step (``Trainer.train_step``), read top to
bottom; around it :mod:`.run_folder` (where a run may write), :mod:`.budget` (a run's step budget on
resume and early stop), :mod:`.checkpointing` (save and resume), :mod:`.run_log` (JSONL logs),
:mod:`.metric_sinks` (TensorBoard, W&B), :mod:`.progress` (the progress bar), :mod:`.throughput`
(tokens/s, FLOPs, MFU, data wait), :mod:`.late_guard` (the collapse guard decided at log rows),
:mod:`.optim` (parameter groups, the LR curve) and :mod:`.stop` (a signal stops at a step boundary).
"""

from typing import Any

from .checkpointing import config_from_checkpoint
from .run_folder import read_jsonl

__all__ = ["Trainer", "StepScalars", "build_dataset", "config_from_checkpoint", "read_jsonl"]


def __getattr__(name: str) -> Any:
    # The trainer (model, data, parallel code) is imported on first use: the CLI refuses bad input and
    # finished runs from the small modules above, before that import.
    if name in ("Trainer", "StepScalars", "build_dataset"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
