"""Build (nested) config dataclasses from plain dicts, refusing unknown keys by their dotted name."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from .errors import ConfigError

T = TypeVar("T")


def from_dict(cls: type[T], data: Mapping[str, Any] | None, prefix: str) -> T:
    """``cls(**data)`` with unknown keys named (``prefix.key``), nested dataclasses built recursively
    and lists turned into tuples where the field's default is a tuple (YAML has no tuples)."""
    data = dict(data or {})
    if not isinstance(data, dict):
        raise ConfigError(prefix, f"must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{prefix}.{unknown[0]}", f"unknown key; allowed keys of {prefix}: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        hint = hints.get(name)
        if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
            value = from_dict(hint, value, f"{prefix}.{name}")
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as e:  # e.g. a required field missing
        raise ConfigError(prefix, str(e)) from e


def to_dict(config: Any) -> dict[str, Any]:
    """Plain, YAML-friendly dict of a (nested) config dataclass; tuples become lists."""

    def plain(x: Any) -> Any:
        if isinstance(x, (list, tuple)):
            return [plain(i) for i in x]
        if isinstance(x, dict):
            return {k: plain(i) for k, i in x.items()}
        return x

    return plain(dataclasses.asdict(config))
