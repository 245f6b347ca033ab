"""Errors raised by LayerLock, each naming what to fix."""

from __future__ import annotations


class LayerLockError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(LayerLockError, ValueError):
    """A config field has a value that is not allowed.

    The message always starts with the dotted field name, e.g.
    ``schedule.interval: must be a positive integer, got 0``.
    """

    def __init__(self, field: str, message: str):
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}")

    def __reduce__(self):
        # the default rebuilds from ``args`` (one string): a worker's error would not reach its parent
        return type(self), (self.field, self.message)


class EncoderStructureError(LayerLockError, TypeError):
    """A model does not expose the structure LayerLock needs (patch embedding + ordered blocks)."""


class CheckpointError(LayerLockError, RuntimeError):
    """A checkpoint is missing, truncated, corrupt or belongs to a different model/config."""


class CollapseError(LayerLockError, RuntimeError):
    """The collapse guard tripped under the ``raise`` policy."""


class MissingDependencyError(LayerLockError, ImportError):
    """An optional host framework is not installed; the message names the pip extra."""


class DataError(LayerLockError, RuntimeError):
    """Training data that cannot be used: a bad video under ``data.on_bad_video: raise``, or no good video
    found for a sample. The message names the file and the reason."""


def install_extra(extra: str) -> str:
    """How to install the optional packages of the pip extra ``extra``, in commands that work.

    The distribution is not on PyPI, so ``pip install "layerlock-plugin[X]"`` alone fails in a fresh
    environment; it works where layerlock-plugin is installed already (pip then adds only the extra's
    packages), and ``pip install -e ".[X]"`` works from a checkout."""
    return (f'pip install -e ".[{extra}]" from the layerlock-plugin checkout, or pip install '
            f'"layerlock-plugin[{extra}]" where layerlock-plugin is installed already')
