"""Small validators used where config fields enter; each raises ConfigError naming the field."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .errors import ConfigError


def positive_int(field: str, value: Any) -> int:
    """An int >= 1 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(field, f"must be a positive integer, got {value!r}")
    return value


def non_negative_int(field: str, value: Any) -> int:
    """An int >= 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(field, f"must be a non-negative integer, got {value!r}")
    return value


def fraction(field: str, value: Any, *, allow_zero: bool = False, allow_one: bool = True) -> float:
    """A float in (0, 1]; ``allow_zero`` includes 0, ``allow_one=False`` excludes 1."""
    interval = ("[0" if allow_zero else "(0") + (", 1]" if allow_one else ", 1)")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(field, f"must be a number in {interval}, got {value!r}")
    v = float(value)
    if not ((v <= 1.0 if allow_one else v < 1.0) and (v >= 0.0 if allow_zero else v > 0.0)):
        raise ConfigError(field, f"must be in {interval}, got {value!r}")
    return v


def positive_float(field: str, value: Any) -> float:
    """A number > 0, as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value) > 0:
        raise ConfigError(field, f"must be a positive number, got {value!r}")
    return float(value)


def non_negative_float(field: str, value: Any) -> float:
    """A number >= 0, as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value) >= 0:
        raise ConfigError(field, f"must be a non-negative number, got {value!r}")
    return float(value)


def one_of(field: str, value: Any, allowed: Iterable[Any]) -> Any:
    """``value`` if it is one of ``allowed``."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(field, f"must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


def boolean(field: str, value: Any) -> bool:
    """A real bool (YAML's true/false), not a truthy value."""
    if not isinstance(value, bool):
        raise ConfigError(field, f"must be true or false, got {value!r}")
    return value
