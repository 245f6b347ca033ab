"""LayerLock for mmaction2 1.x: import this module from a config to register everything.

    custom_imports = dict(imports=['layerlock_plugin.adapters.mmaction'], allow_failed_imports=False)
    model = dict(type='LayerLockVideoMAE', backbone=dict(type='VisionTransformer', ...), ...)
    custom_hooks = [dict(type='LayerLockHook', schedule=dict(...), ...)]

Importing it (1) makes the broken mmaction2 1.2.0 PyPI wheel importable (:mod:`.compat`, silently; it
does nothing for a source install), (2) lets mmengine checkpoints written from then on load with
torch's ``weights_only`` default (:func:`.compat.allow_mmengine_checkpoints`), (3) registers :class:`LayerLockVideoMAE` (``MODELS``) and
:class:`LayerLockHook` (``HOOKS``) in mmaction2's registries *and* mmengine's root registries, so
they are found with ``default_scope='mmaction'`` and with ``custom_imports`` alone (where the runner's
scope is mmengine's; mmengine issue #1662).
"""

from layerlock_plugin.errors import MissingDependencyError, install_extra

try:
    import mmengine  # noqa: F401
except ImportError as exc:
    raise MissingDependencyError(
        f"layerlock_plugin.adapters.mmaction needs mmaction2 and mmengine: {install_extra('mmaction')}"
    ) from exc

from .compat import allow_mmengine_checkpoints, import_mmaction_models, install_drn_placeholder

install_drn_placeholder()  # before anything imports mmaction.models
allow_mmengine_checkpoints()  # epoch_N.pth / iter_N.pth load with torch >= 2.6's weights_only default

try:
    import_mmaction_models()  # registers VisionTransformer, ActionDataPreprocessor, ...
except ImportError as exc:
    raise MissingDependencyError(
        f'layerlock_plugin.adapters.mmaction could not import mmaction2 ({exc}); install the tested versions: '
        f"{install_extra('mmaction')}"
    ) from exc

from .hook import LayerLockHook  # noqa: E402
from .model import LayerLockVideoMAE, MMActionViTEncoder  # noqa: E402

__all__ = ["LayerLockHook", "LayerLockVideoMAE", "MMActionViTEncoder", "allow_mmengine_checkpoints", "install_drn_placeholder"]
