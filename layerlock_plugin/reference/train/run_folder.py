"""Run folders: where a run writes, and the rules that keep one run's files from mixing with another's.

* A **new run** goes into a folder that does not exist or is empty. A folder that holds a run is
  refused unless the caller asked to overwrite it, and then every file of the old run is removed
  first, so nothing stale (an old ``probes.json``, a later checkpoint) survives beside the new run.
  A folder with files that are not a run's is refused even then: overwriting never deletes a user's
  files.
* A **resume** continues the run in the folder that holds its checkpoint, and writes nowhere else.
* A **fork** (resume into another folder) reads the source run and writes only into the new folder,
  which must be fresh as for a new run; the source is never touched.

The CLI decides which of the three a command is (:func:`resume_source`); the trainer applies the rules
(:func:`plan_folder`, then :meth:`RunFolder.clear`) before it writes anything.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import CheckpointError, ConfigError

CHECKPOINT_FILE = "checkpoint.pt"
DCP_DIR = "dcp"
#: Everything the reference trainer writes into a run folder (save_atomic's temporary files start with
#: a dot and the name of the file they replace).
RUN_FILES = ("config.yaml", "metrics.jsonl", "events.jsonl", "throughput.jsonl", "sessions.jsonl", CHECKPOINT_FILE,
             "encoder.pt",
             "probes.json", "summary.json")
RUN_DIRS = ("plots", DCP_DIR, "tb", "wandb")
#: Earlier checkpoints kept beside checkpoint.pt (``train.keep_last``): ``checkpoint.step_00000500.pt``.
HISTORY_PREFIX = "checkpoint.step_"


def _is_run_entry(name: str) -> bool:
    return (name in RUN_FILES or name in RUN_DIRS or any(name.startswith(f".{f}.") for f in RUN_FILES)
            or (name.startswith(HISTORY_PREFIX) and name.endswith(".pt")))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL log. A torn last line (a process killed while writing it) is dropped; a torn line
    anywhere else means the file was edited or damaged, and is refused."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise CheckpointError(f"{path}: line {i + 1} is not JSON; the log was damaged, not torn by a crash") from None
    return rows


def default_run_dir(method: str, root: str | Path = "runs") -> Path:
    """A fresh folder ``runs/<method>-<YYYYmmdd-HHMMSS>`` (a numeric suffix when that exists already)."""
    base = Path(root) / f"{method}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


@dataclass(frozen=True)
class RunFolder:
    """One run folder on disk (it may not exist yet)."""

    path: Path

    def entries(self) -> list[str]:
        return sorted(p.name for p in self.path.iterdir()) if self.path.is_dir() else []

    def has_checkpoint(self) -> bool:
        """A complete checkpoint to resume: ``checkpoint.pt`` or a ``dcp/latest`` pointer."""
        return (self.path / CHECKPOINT_FILE).is_file() or (self.path / DCP_DIR / "latest").is_file()

    def holds_run(self) -> bool:
        return any(_is_run_entry(n) for n in self.entries())

    def describe(self) -> str:
        """What the folder holds, for messages: ``a run (checkpoint at step 1500)``."""
        ckpt = self.path / CHECKPOINT_FILE
        if (self.path / DCP_DIR / "latest").is_file():
            return f"a run (distributed checkpoint {(self.path / DCP_DIR / 'latest').read_text().strip()})"
        if ckpt.is_file():
            return "a run (with a checkpoint.pt)"
        return "the files of a run"

    def check_new(self, overwrite: bool, flag: str = "out_dir") -> None:
        """Refuse to start a new run here if the folder holds a run (unless ``overwrite``) or anything that
        is not a run's. Writes nothing."""
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(flag, f"{self.path} is a file, not a folder")
        foreign = [n for n in self.entries() if not _is_run_entry(n)]
        if foreign:
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise ConfigError(flag, f"{self.path} holds files that are not a run's ({shown}); a run only starts in "
                                    "a new or empty folder (nothing there is deleted): name another one")
        if self.holds_run() and not overwrite:
            raise ConfigError(flag, f"{self.path} holds {self.describe()}; continue it with --resume {self.path}, "
                                    f"replace it with --overwrite, or name another folder with --out")

    def clear(self) -> None:
        """Remove every file of an earlier run (after :meth:`check_new` allowed it)."""
        for name in self.entries():
            if _is_run_entry(name):
                target = self.path / name
                shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()


def resume_source(path: str | Path) -> tuple[Path, Path | None]:
    """``(checkpoint, run folder)`` for a ``--resume`` argument: a run folder, its ``checkpoint.pt``, or one
    ``dcp/step_*`` folder. The run folder is ``None`` when a checkpoint file lies outside any run folder
    (then the resumed run needs an explicit new folder). Raises :class:`CheckpointError` if there is
    nothing to resume."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"--resume {path}: does not exist; nothing to resume (a resume never starts fresh)")
    if path.is_file():
        run_dir = path.parent
        return path, (run_dir if (run_dir / "config.yaml").is_file() else None)
    if path.parent.name == DCP_DIR:  # one dcp/step_* folder
        return path, path.parent.parent
    if (path / DCP_DIR).is_dir() or (path / CHECKPOINT_FILE).exists():
        return path, path
    raise CheckpointError(f"--resume {path}: the folder holds no checkpoint ({CHECKPOINT_FILE} or {DCP_DIR}/); "
                          "nothing to resume")


def same_folder(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def inside(child: Path, parent: Path) -> bool:
    """``child`` is ``parent`` or below it."""
    child, parent = child.resolve(), parent.resolve()
    return child == parent or parent in child.parents


@dataclass(frozen=True)
class FolderPlan:
    """What a run does with its folder, decided before anything is written: the ``checkpoint`` to load
    (None for a new run), ``log_source`` (a fork: the run folder whose logs it continues; None
    otherwise) and ``clear`` (an overwritten run's files are removed before the first write)."""

    checkpoint: Path | None
    log_source: Path | None
    clear: bool


def plan_folder(out: Path, resume: str | Path | None, overwrite: bool) -> FolderPlan:
    """Apply the run folder rules (module docstring) to a run into ``out`` without writing anything:
    a new run (``resume`` None), a resume in place, or a fork into a fresh folder."""
    folder = RunFolder(out)
    if resume is None:
        folder.check_new(overwrite)
        return FolderPlan(None, None, overwrite and folder.holds_run())
    checkpoint, source = resume_source(resume)
    if source is not None and same_folder(source, out):
        if overwrite:
            raise ConfigError("--overwrite", "is for a new run; a resume continues its run in place "
                                             "(to start the resumed state in another folder: --out NEW)")
        return FolderPlan(checkpoint, None, False)
    if source is not None and (inside(out, source) or inside(source, out)):
        raise ConfigError("out_dir", f"{out} and the resumed run {source} lie inside one another; "
                                     "a fork goes into a separate folder and never touches its source")
    folder.check_new(overwrite)
    return FolderPlan(checkpoint, source, overwrite and folder.holds_run())
