"""Where the run's scalars go besides ``metrics.jsonl``: TensorBoard and Weights & Biases (rank 0 only).

* TensorBoard (``train.tensorboard``: ``auto`` = when the ``tensorboard`` package is installed): event
  files in ``<run>/tb``, one scalar per metrics key (``loss``, ``loss/<head>``, ``lr`` as applied,
  ``grad_norm``, ``layerlock/*``, ``throughput/*``) and the run's plots as images at the end. A resumed
  run purges the events written after its checkpoint, so the curves do not fold back on themselves.
* Weights & Biases (``train.wandb.project`` set): ``wandb`` is imported only then (a missing package is an
  error naming the extra); ``mode: offline`` works without network. The W&B run id is kept in the run
  folder, so a resume continues the same W&B run.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from ...errors import ConfigError, install_extra

TB_DIR, WANDB_DIR, WANDB_ID = "tb", "wandb", "wandb_run_id"


def _numbers(row: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardSink:
    def __init__(self, folder: Path, resumed_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder / TB_DIR), purge_step=resumed_step or None)

    def scalars(self, step: int, row: dict[str, Any], prefix: str = "") -> None:
        for key, value in _numbers(row).items():
            self.writer.add_scalar(prefix + key, value, step)

    def images(self, step: int, images: dict[str, Path]) -> None:
        import matplotlib.image

        for name, path in images.items():
            self.writer.add_image(f"plots/{name}", matplotlib.image.imread(path)[..., :3], step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, folder: Path, config: Any, run_config: dict[str, Any]):
        import wandb  # check_sinks has made sure it is installed
        id_file = folder / WANDB_DIR / WANDB_ID
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        (folder / WANDB_DIR).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=config.project, entity=config.entity, name=config.name or folder.name,
                              mode=config.mode, dir=str(folder), config=run_config, id=run_id, resume="allow")
        id_file.write_text(self.run.id + "\n")
        self._wandb = wandb

    def scalars(self, step: int, row: dict[str, Any], prefix: str = "") -> None:
        self.run.log({prefix + k: v for k, v in _numbers(row).items()}, step=step)

    def images(self, step: int, images: dict[str, Path]) -> None:
        self.run.log({f"plots/{n}": self._wandb.Image(str(p)) for n, p in images.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def check_sinks(train_config: Any) -> None:
    """Refuse, before anything is written, a sink that was asked for but cannot run."""
    if train_config.tensorboard is True and not tensorboard_available():
        raise ConfigError("train.tensorboard", "is true but the tensorboard package is not installed: "
                                               f"{install_extra('tensorboard')} (or set it to auto / false)")
    if train_config.wandb.project is not None and importlib.util.find_spec("wandb") is None:
        raise ConfigError("train.wandb.project", f"is set but wandb is not installed: {install_extra('wandb')} "
                                                 "(or leave train.wandb.project null)")


def open_sinks(folder: Path, train_config: Any, run_config: dict[str, Any], resumed_step: int) -> list[Any]:
    """The sinks this run's config asks for (call on rank 0, once the folder exists)."""
    sinks: list[Any] = []
    if train_config.tensorboard is True or (train_config.tensorboard == "auto" and tensorboard_available()):
        sinks.append(TensorBoardSink(folder, resumed_step))
    if train_config.wandb.project is not None:
        sinks.append(WandbSink(folder, train_config.wandb, run_config))
    return sinks
