"""The reference trainer's config: one YAML file, sections validated where they enter.

Top-level sections (each error names the dotted path, e.g. ``optim.lr``)::

    method: layerlock | mae | freeze-only | latent-naive
    seed, out_dir
    model:    ModelConfig fields (+ optional ``preset``)
    data:     source: digits (DigitsVideoConfig fields) | folder (VideoFolderConfig fields) |
              shards (VideoShardsConfig fields);
              num_frames / size / channels default to the model's
    schedule, target, warmup, guard:  the LayerLock core configs
    optim:    AdamW + linear-warmup cosine LR
    train:    steps, batch size, logging and checkpoint cadence
    probe:    ProbeConfig fields (+ ``enabled``)
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import yaml

from .. import _validate as v
from .._config import from_dict, to_dict
from ..collapse import GuardConfig
from ..controller import METHODS, LayerLockConfig
from ..errors import ConfigError
from ..schedule import ScheduleConfig
from ..targets import TargetConfig
from ..warmup import WarmupConfig
from .data import DigitsVideoConfig, VideoFolderConfig, VideoShardsConfig
from .model import ModelConfig
from .eval import ProbeConfig

DEFAULT_CONFIG = "tiny"


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with a linear LR warmup then cosine decay to ``min_lr_ratio * lr``."""

    lr: float = 1.5e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # 0 = off

    def __post_init__(self) -> None:
        v.positive_float("optim.lr", self.lr)
        v.non_negative_float("optim.weight_decay", self.weight_decay)
        if not (isinstance(self.betas, Sequence) and len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas)):
            raise ConfigError("optim.betas", f"must be two numbers in [0, 1), got {self.betas!r}")
        v.non_negative_int("optim.warmup_steps", self.warmup_steps)
        v.fraction("optim.min_lr_ratio", self.min_lr_ratio, allow_zero=True)
        v.non_negative_float("optim.grad_clip", self.grad_clip)


@dataclass(frozen=True)
class WandbConfig:
    """Weights & Biases logging (rank 0), off unless ``project`` is set; ``mode: offline`` needs no network
    (``wandb sync`` uploads later). Needs the ``wandb`` extra (``pip install -e ".[wandb]"``)."""

    project: str | None = None
    mode: str = "online"  # online | offline
    entity: str | None = None
    name: str | None = None  # the run's display name; default: the run folder's name

    def __post_init__(self) -> None:
        for field_name in ("project", "entity", "name"):
            value = getattr(self, field_name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"train.wandb.{field_name}", f"must be a non-empty string or null, got {value!r}")
        v.one_of("train.wandb.mode", self.mode, ("online", "offline"))


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1500
    batch_size: int = 32
    log_every: int = 10
    ckpt_every: int = 500  # steps between checkpoints
    ckpt_every_minutes: float = 0.0  # also checkpoint when this much time passed since the last one (0 = off)
    keep_last: int = 2  # complete checkpoints kept; older ones are removed once a newer one is complete
    tensorboard: bool | str = "auto"  # TensorBoard scalars + plots in <run>/tb: true | false | auto (if installed)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    num_workers: int = 0
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    progress: bool = True
    device: str = "cpu"  # cpu | cuda | xla (PyTorch/XLA: TPU) | auto (xla when PJRT_DEVICE is set, else cuda if available)
    # Cluster scale (see layerlock_plugin/reference/parallel/: distributed.py and parallelize.py).
    strategy: str = "none"  # none (one process) | ddp | fsdp (FSDP2, one unit per block; torchrun) | spmd (XLA)
    precision: str = "auto"  # auto (bf16 autocast on GPU and TPU, fp32 on CPU) | fp32 | bf16
    grad_accum: int = 1  # micro-batches per optimizer step; batch_size is the global batch per step
    activation_checkpointing: bool = False  # recompute trainable blocks in backward (frozen ones store nothing)
    compile: bool = False  # torch.compile each block (expect one recompile per freeze event)
    peak_tflops: float = 0.0  # per-device peak for MFU; 0 = look the device up (unknown -> no MFU)
    dist_timeout_s: int = 600  # collective timeout: a stuck rank fails instead of hanging forever

    STRATEGIES: ClassVar[tuple[str, ...]] = ("none", "ddp", "fsdp", "spmd")

    def __post_init__(self) -> None:
        v.positive_int("train.steps", self.steps)
        v.positive_int("train.batch_size", self.batch_size)
        v.positive_int("train.log_every", self.log_every)
        v.positive_int("train.ckpt_every", self.ckpt_every)
        v.non_negative_float("train.ckpt_every_minutes", self.ckpt_every_minutes)
        v.positive_int("train.keep_last", self.keep_last)
        if not isinstance(self.wandb, WandbConfig):
            raise ConfigError("train.wandb", f"must be a mapping of project, mode, entity, name; got {self.wandb!r}")
        if self.tensorboard not in (True, False, "auto"):
            raise ConfigError("train.tensorboard", f"must be true, false or auto, got {self.tensorboard!r}")
        v.non_negative_int("train.num_workers", self.num_workers)
        v.non_negative_int("train.threads", self.threads)
        v.boolean("train.progress", self.progress)
        v.one_of("train.device", self.device, ("cpu", "cuda", "xla", "auto"))
        v.one_of("train.strategy", self.strategy, self.STRATEGIES)
        v.one_of("train.precision", self.precision, ("auto", "fp32", "bf16"))
        v.positive_int("train.grad_accum", self.grad_accum)
        v.boolean("train.activation_checkpointing", self.activation_checkpointing)
        v.boolean("train.compile", self.compile)
        v.non_negative_float("train.peak_tflops", self.peak_tflops)
        v.positive_int("train.dist_timeout_s", self.dist_timeout_s)
        if self.strategy == "spmd" and self.device != "xla":
            raise ConfigError("train.strategy", "'spmd' is PyTorch/XLA's data parallel: it needs train.device=xla")
        if self.device == "xla" and self.strategy in ("ddp", "fsdp"):
            raise ConfigError("train.strategy", f"{self.strategy!r} is for CPU / GPU process groups; on XLA use "
                                                "'spmd' (all devices of the host) or 'none' (one device)")
        if self.device == "xla" and self.compile:
            raise ConfigError("train.compile", "is torch.compile for CPU / GPU; on train.device=xla the XLA compiler "
                                               "already compiles the whole step: set it to false")
        if self.device == "xla" and self.activation_checkpointing:
            raise ConfigError("train.activation_checkpointing", "is not supported with train.device=xla (untested "
                                                                "there); set it to false")
        if self.batch_size % self.grad_accum:
            raise ConfigError("train.grad_accum", f"must divide train.batch_size={self.batch_size}, got {self.grad_accum}")


@dataclass(frozen=True)
class RunConfig:
    method: str = "layerlock"
    seed: int = 0
    out_dir: str | None = None  # the run folder; None: the CLI picks a fresh runs/<method>-<time>
    model: ModelConfig = field(default_factory=lambda: ModelConfig.tiny())
    data: DigitsVideoConfig | VideoFolderConfig | VideoShardsConfig = field(default_factory=DigitsVideoConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    probe_enabled: bool = True

    def __post_init__(self) -> None:
        v.one_of("method", self.method, METHODS)
        v.non_negative_int("seed", self.seed)
        if self.out_dir is not None and (not isinstance(self.out_dir, str) or not self.out_dir):
            raise ConfigError("out_dir", f"must be a folder path (or null: a fresh runs/<method>-<time>), got {self.out_dir!r}")
        m, d = self.model, self.data
        for name, want in (("num_frames", m.num_frames), ("size", m.img_size), ("channels", m.in_chans)):
            have = getattr(d, name, want)
            if have != want:
                model_field = {"size": "img_size", "channels": "in_chans"}.get(name, name)
                raise ConfigError(f"data.{name}", f"must equal model.{model_field} ({want}), got {have}")

    @property
    def data_source(self) -> str:
        if isinstance(self.data, VideoShardsConfig):
            return "shards"
        return "folder" if isinstance(self.data, VideoFolderConfig) else "digits"

    def layerlock(self) -> LayerLockConfig:
        """The core config for this run's method."""
        return LayerLockConfig(
            schedule=self.schedule, target=self.target, warmup=self.warmup, guard=self.guard
        ).with_method(self.method)

    def to_dict(self) -> dict[str, Any]:
        out = to_dict(self)
        out.pop("probe_enabled")
        out["probe"]["enabled"] = self.probe_enabled
        out["data"] = {"source": self.data_source, **out["data"]}
        return out


def _section(raw: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = raw.get(name) or {}
    if not isinstance(value, Mapping):
        raise ConfigError(name, f"must be a mapping of fields, got {value!r}")
    return dict(value)


def build_config(raw: Mapping[str, Any]) -> RunConfig:
    """Validate a plain dict (parsed YAML with overrides applied) into a :class:`RunConfig`."""
    if not isinstance(raw, Mapping):
        raise ConfigError("config", f"must be a mapping of sections, got {type(raw).__name__}")
    known = {f.name for f in dataclasses.fields(RunConfig)} - {"probe_enabled"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(unknown[0], f"unknown section; allowed: {', '.join(sorted(known))}")
    model = ModelConfig.from_dict(_section(raw, "model") or {"preset": "tiny"})
    data_raw = _section(raw, "data")
    source = v.one_of("data.source", data_raw.pop("source", "digits"), ("digits", "folder", "shards"))
    data_raw.setdefault("num_frames", model.num_frames)
    data_raw.setdefault("size", model.img_size)
    if source == "digits":
        data_raw.setdefault("channels", model.in_chans)
        data: DigitsVideoConfig | VideoFolderConfig | VideoShardsConfig = DigitsVideoConfig.from_dict(data_raw)
    else:
        data = from_dict(VideoFolderConfig if source == "folder" else VideoShardsConfig, data_raw, "data")
    probe_raw = _section(raw, "probe")
    probe_enabled = v.boolean("probe.enabled", probe_raw.pop("enabled", True))
    kwargs: dict[str, Any] = dict(
        model=model,
        data=data,
        probe=ProbeConfig.from_dict(probe_raw),
        probe_enabled=probe_enabled,
        schedule=from_dict(ScheduleConfig, _section(raw, "schedule"), "schedule"),
        target=from_dict(TargetConfig, _section(raw, "target"), "target"),
        warmup=from_dict(WarmupConfig, _section(raw, "warmup"), "warmup"),
        guard=from_dict(GuardConfig, _section(raw, "guard"), "guard"),
        optim=from_dict(OptimConfig, _section(raw, "optim"), "optim"),
        train=from_dict(TrainConfig, _section(raw, "train"), "train"),
    )
    for key in ("method", "seed", "out_dir"):
        if key in raw:
            kwargs[key] = raw[key]
    return RunConfig(**kwargs)


def packaged_config_path(name: str) -> Path:
    """Path of a config shipped inside the package (``tiny``)."""
    return Path(str(resources.files("layerlock_plugin.reference") / "configs" / f"{name}.yaml"))


class _Loader(yaml.SafeLoader):
    """YAML 1.1 as PyYAML reads it, plus numbers in scientific notation without a dot (``1e-3``, ``5E4``),
    which PyYAML would read as strings. Such a number is an int when it is whole and has no dot or
    negative exponent (``5e4`` -> 50000, so it fits integer fields), else a float (``1e-3`` -> 0.001)."""


_SCIENTIFIC = re.compile(r"^[-+]?[0-9]+(\.[0-9]*)?[eE][-+]?[0-9]+$")


def _scientific(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int | float:
    text = loader.construct_scalar(node)
    value = float(text)
    whole = "." not in text and "-" not in text.lower().split("e", 1)[1]
    return int(value) if whole else value


_Loader.add_implicit_resolver("tag:layerlock,2026:scientific", _SCIENTIFIC, list("-+0123456789"))
_Loader.add_constructor("tag:layerlock,2026:scientific", _scientific)


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text; a syntax error becomes one :class:`ConfigError` line naming ``source``, the line
    and the column (``--config run.yaml: line 3, column 7: mapping values are not allowed here``)."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ConfigError(source, f"{where}{e.problem or e.context or 'invalid YAML'}") from None
    except yaml.YAMLError as e:
        raise ConfigError(source, f"invalid YAML: {str(e).splitlines()[0]}") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        shipped = packaged_config_path(str(path))
        if shipped.is_file():
            path = shipped
        else:
            what = "a folder, not a file" if path.is_dir() else "no such file"
            raise ConfigError("--config", f"{path}: {what} (and no packaged config of that name: "
                                          f"{', '.join(packaged_config_names())})")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("--config", f"{path}: cannot read it as text ({type(e).__name__}: {e})") from None
    raw = parse_yaml(text, f"--config {path}") or {}
    if not isinstance(raw, dict):
        raise ConfigError("--config", f"{path} must hold a mapping of sections, got {type(raw).__name__}")
    return raw


def packaged_config_names() -> list[str]:
    folder = resources.files("layerlock_plugin.reference") / "configs"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML: ``3``, ``0.5``, ``1e-3``, ``[2,8,8]``, ``true``)."""
    raw = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in raw.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError("--set", f"expected key=value, got {item!r}")
        key, text = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if not all(parts):
            raise ConfigError("--set", f"expected a dotted field name such as optim.lr before '=', got {key!r}")
        value = parse_yaml(text, f"--set {key}")
        data = raw.get("data")
        if parts == ["data", "source"] and isinstance(data, dict) and value != data.get("source", "digits"):
            # another data source: the base config's data fields belong to the old source (e.g. the
            # digits' num_videos), so the section starts empty; later --set data.* fill it in
            raw["data"] = {}
        node = raw
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            elif not isinstance(child, dict):
                raise ConfigError(key, f"{p} is not a section")
            node = child
        node[parts[-1]] = value
    return raw


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    raw = load_yaml(path or DEFAULT_CONFIG)
    return build_config(apply_overrides(raw, overrides))


def dump_config(config: RunConfig, path: str | Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(config.to_dict(), f, sort_keys=False)
