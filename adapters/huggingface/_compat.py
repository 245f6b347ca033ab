"""The transformers versions this adapter is tested with, and the one-line error outside them."""

from __future__ import annotations

from layerlock_plugin.errors import MissingDependencyError

#: The range the tests ran on (``setup.cfg``'s ``hf`` extra says the same).
TESTED_RANGE = (5, 6)  # >= 5.0, < 6
INSTALL_HINT = 'pip install "layerlock-plugin[hf]"'


def check_transformers_version(version: str) -> None:
    """Refuse a transformers ``version`` outside :data:`TESTED_RANGE`, naming it and the install line."""
    try:
        major = int(version.split(".")[0])
    except ValueError:
        major = -1
    if not TESTED_RANGE[0] <= major < TESTED_RANGE[1]:
        raise MissingDependencyError(
            f"layerlock_plugin.adapters.huggingface is tested with transformers>={TESTED_RANGE[0]}.0,<{TESTED_RANGE[1]} "
            f"(its VideoMAE / V-JEPA 2 module layout and Trainer hooks); found {version}: {INSTALL_HINT}"
        )


def require_transformers():
    """Import transformers (and accelerate, which its ``Trainer`` needs) or raise naming the ``hf`` extra."""
    try:
        import transformers
    except ImportError as exc:
        raise MissingDependencyError(f"layerlock_plugin.adapters.huggingface needs transformers: {INSTALL_HINT}") from exc
    check_transformers_version(transformers.__version__)
    return transformers
