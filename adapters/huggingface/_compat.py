"""The transformers versions this adapter is tested with, and the one-line error outside them."""

from __future__ import annotations

import re

from layerlock_plugin.errors import MissingDependencyError, install_extra

#: The range the tests ran on, ``(lowest, first excluded)`` as (major, minor) (``setup.cfg``'s ``hf`` extra says the
#: same): 5.17 and 5.25 were tested; 5.0 does not import beside the current ``kernels`` package.
TESTED_RANGE = ((5, 17), (6, 0))
SPEC = f"transformers>={TESTED_RANGE[0][0]}.{TESTED_RANGE[0][1]},<{TESTED_RANGE[1][0]}"
INSTALL_HINT = install_extra("hf")


def check_transformers_version(version: str) -> None:
    """Refuse a transformers ``version`` outside :data:`TESTED_RANGE`, naming it and the install line."""
    match = re.match(r"(\d+)\.(\d+)", version)
    ours = (int(match[1]), int(match[2])) if match else (-1, -1)
    if not TESTED_RANGE[0] <= ours < TESTED_RANGE[1]:
        raise MissingDependencyError(
            f"layerlock_plugin.adapters.huggingface is tested with {SPEC} (its VideoMAE / V-JEPA 2 module layout and "
            f"Trainer hooks); found transformers {version}: {INSTALL_HINT}"
        )


def require_transformers():
    """Import transformers (in the tested range) or raise naming the ``hf`` extra; accelerate is checked where the
    ``Trainer`` is used (:mod:`.trainer`)."""
    try:
        import transformers
    except ImportError as exc:
        raise MissingDependencyError(f"layerlock_plugin.adapters.huggingface needs transformers: {INSTALL_HINT}") from exc
    check_transformers_version(transformers.__version__)
    return transformers
