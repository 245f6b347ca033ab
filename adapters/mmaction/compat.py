"""Workarounds for the mmaction2 1.2.0 wheel on PyPI and the stack around it (narrowly scoped, silent).

The wheel lacks the package ``mmaction/models/localizers/drn/`` (upstream open-mmlab/mmaction2
issue #2714), yet ``mmaction/models/localizers/__init__.py`` runs ``from .drn.drn import DRN``. So
``import mmaction.models`` fails, and with it every registry lookup of an mmaction2 model, dataset or
transform. DRN is a language-grounding localizer that LayerLock never uses.

:func:`install_drn_placeholder` looks for the folder **on disk** (``importlib.util.find_spec`` on the
subpackage would itself import ``mmaction.models`` and fail) and, only when it is missing, puts two
placeholder modules into ``sys.modules`` so that the import succeeds. It says nothing (every mmaction2
command would repeat a warning that nobody can act on); the placeholder ``DRN`` raises a clear error if
anybody builds it. With mmaction2 installed from source (the folder exists) it does nothing.

:func:`import_mmaction_models` imports ``mmaction.models`` without the two warnings that import prints and
that a LayerLock user cannot act on (mmcv-lite lacks ``MultiScaleDeformableAttention``, which only
detection models use; mmaction2's own ``timm.models.layers`` import is deprecated), and with VindLU's
multimodal models left out when transformers >= 5 is installed (VindLU imports names transformers 5
removed, which would fail the whole import; mmaction2 then registers its own placeholders for them).
"""

from __future__ import annotations

import importlib.util
import sys
import types
import warnings
from pathlib import Path

from layerlock_plugin.errors import MissingDependencyError, install_extra

#: Where the wheel should have put DRN, relative to the ``mmaction`` package folder.
DRN_RELATIVE_PATH = Path("models") / "localizers" / "drn" / "drn.py"
_PACKAGE = "mmaction.models.localizers.drn"
_MODULE = _PACKAGE + ".drn"


class DRNUnavailable(RuntimeError):
    """Raised when the placeholder DRN localizer is built."""


class DRN:  # noqa: D101 - a placeholder with the name mmaction's __init__ imports
    """Placeholder for mmaction2's DRN localizer, which the PyPI wheel does not ship."""

    def __init__(self, *args, **kwargs):
        raise DRNUnavailable(
            "DRN is not available: the mmaction2 1.2.0 wheel from PyPI lacks "
            "mmaction/models/localizers/drn (open-mmlab/mmaction2#2714) and layerlock_plugin installed "
            "a placeholder so that the rest of mmaction2 imports. Install mmaction2 from source "
            "(pip install git+https://github.com/open-mmlab/mmaction2) to use DRN."
        )


def mmaction_root() -> Path:
    """The folder of the installed ``mmaction`` package (imports nothing from it)."""
    spec = importlib.util.find_spec("mmaction")  # a top-level spec lookup does not import it
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            f"layerlock_plugin.adapters.mmaction needs mmaction2: {install_extra('mmaction')}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def drn_missing(root: Path | None = None) -> bool:
    """True when the installed mmaction2 lacks the DRN subpackage (the broken PyPI wheel)."""
    return not ((root or mmaction_root()) / DRN_RELATIVE_PATH).is_file()


def install_drn_placeholder() -> bool:
    """Make ``import mmaction.models`` work on the broken wheel. Returns True if a placeholder was
    installed by this call; False when nothing was needed (source install, or already installed)."""
    if _MODULE in sys.modules or not drn_missing():
        return False
    package = types.ModuleType(_PACKAGE, "layerlock_plugin placeholder for the missing DRN subpackage")
    package.__path__ = []  # a package, so that `.drn.drn` resolves
    module = types.ModuleType(_MODULE, "layerlock_plugin placeholder for the missing DRN localizer")
    module.DRN = DRN
    package.drn = module
    sys.modules[_PACKAGE] = package
    sys.modules[_MODULE] = module
    return True


#: Warnings ``import mmaction.models`` prints that a LayerLock user cannot act on (see the module docstring).
_IMPORT_NOISE = (r"Fail to import ``MultiScaleDeformableAttention``", r"Importing from timm\.models\.layers is deprecated")


def _transformers_major() -> int | None:
    from importlib import metadata

    try:
        return int(metadata.version("transformers").split(".")[0])
    except (metadata.PackageNotFoundError, ValueError):
        return None


def import_mmaction_models() -> None:
    """``import mmaction.models`` (registers every mmaction2 model, dataset and transform) without the
    noise and the transformers-5 failure described in the module docstring."""
    import mmaction.utils.dependency as dependency

    if (_transformers_major() or 0) >= 5:
        dependency.WITH_MULTIMODAL = False  # read by mmaction/models/multimodal/__init__ at its import
    with warnings.catch_warnings():
        for message in _IMPORT_NOISE:
            warnings.filterwarnings("ignore", message=message)
        import mmaction.models  # noqa: F401


# -- mmengine 0.10.7 checkpoints under torch >= 2.6 ------------------------------------------------------
# torch.load defaults to weights_only=True since torch 2.6, and mmengine 0.10.7 calls torch.load without
# the argument (open-mmlab/mmengine#1655, fix PR #1650 still open). Its checkpoints hold the MessageHub's
# HistoryBuffer objects (pickled with numpy arrays and bound methods, which need `builtins.getattr`: not
# safe to allowlist) and numpy scalars in runtime_info (e.g. `eta`), so `--resume`, `load_from` and
# tools/test.py fail on any mmengine checkpoint, e.g. a fine-tuning run's epoch_N.pth. Two narrow fixes:
# * allow_mmengine_checkpoints() (run when the plugin is imported, i.e. by a config's custom_imports):
#   HistoryBuffer pickles as HistoryBuffer(log_history, count_history, max_length) with plain lists, and
#   exactly that class plus numpy's scalar reconstructor and dtype are allowlisted for weights_only loads.
#   Checkpoints written with the plugin imported then load; older ones still hold `builtins.getattr`.
# * LayerLockHook stores the MessageHub as plain lists/floats in its own checkpoints and rebuilds the
#   HistoryBuffers after loading, so they load with weights_only=True even where the plugin is not imported.
_HISTORY_MARK = "__layerlock_history_buffer__"


def _reduce_history_buffer(buf):
    log, count = buf.data
    return type(buf), (log.tolist(), count.tolist(), buf.max_length)


def allow_mmengine_checkpoints() -> list:
    """Let ``torch.load(weights_only=True)`` read mmengine checkpoints written from now on (see above);
    returns the allowlisted globals. Idempotent."""
    import numpy as np
    import torch
    from mmengine.logging import HistoryBuffer

    HistoryBuffer.__reduce__ = _reduce_history_buffer
    numpy_core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    numbers = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
               np.float16, np.float32, np.float64)  # a numpy scalar in runtime_info (eta: float64) needs its dtype class
    allowed = [HistoryBuffer, numpy_core.multiarray.scalar, np.dtype, *(type(np.dtype(t)) for t in numbers)]
    torch.serialization.add_safe_globals(allowed)
    return allowed


def _plain(value):
    """numpy scalars/arrays -> Python numbers/lists (weights_only-safe); anything else unchanged."""
    import numpy as np

    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return type(value)((k, _plain(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def _log_scalars(checkpoint: dict) -> dict:
    """``checkpoint['message_hub']['log_scalars']`` (empty when the checkpoint has no MessageHub)."""
    hub = checkpoint.get("message_hub")
    return hub.get("log_scalars", {}) if isinstance(hub, dict) else {}


def message_hub_to_plain(checkpoint: dict) -> None:
    """In place: make ``checkpoint['message_hub']`` loadable with ``torch.load(weights_only=True)``."""
    from mmengine.logging import HistoryBuffer

    scalars = _log_scalars(checkpoint)
    for key, buf in list(scalars.items()):
        if isinstance(buf, HistoryBuffer):
            log, count, max_length = _reduce_history_buffer(buf)[1]
            scalars[key] = {_HISTORY_MARK: True, "log_history": log, "count_history": count, "max_length": int(max_length)}
    hub = checkpoint.get("message_hub")
    if isinstance(hub, dict) and isinstance(hub.get("runtime_info"), dict):
        hub["runtime_info"] = _plain(hub["runtime_info"])


def message_hub_from_plain(checkpoint: dict) -> None:
    """In place: undo :func:`message_hub_to_plain` (HistoryBuffers back for ``MessageHub.load_state_dict``)."""
    from mmengine.logging import HistoryBuffer

    scalars = _log_scalars(checkpoint)
    for key, buf in list(scalars.items()):
        if isinstance(buf, dict) and buf.get(_HISTORY_MARK):
            scalars[key] = HistoryBuffer(buf["log_history"], buf["count_history"], buf["max_length"])
