"""LayerLock for Hugging Face transformers 5.x: VideoMAE pretraining under the ``Trainer``, V-JEPA 2 modules.

    from layerlock_plugin.adapters.huggingface import LayerLockTrainer, LayerLockVideoMAEForPreTraining

* :mod:`.videomae`: :class:`LayerLockVideoMAEForPreTraining` (``VideoMAEForPreTraining`` + LayerLock's
  readouts), :class:`VideoMAEEncoder` (the layered-encoder view), VideoMAE's pixel targets;
* :mod:`.trainer`: :class:`LayerLockTrainer` (a ``Trainer`` subclass) and its :class:`LayerLockCallback`;
* :mod:`.vjepa2`: ``VJEPA2Model``'s encoder as a layered encoder and the context / predictor passes that
  :class:`~layerlock_plugin.adapters.vjepa.LayerLockAdapter` needs.

Install: ``pip install -e ".[hf]"`` (transformers>=5.17,<6 and accelerate); another
transformers version is refused at import, naming the tested range.
"""

from ._compat import TESTED_RANGE, check_transformers_version, require_transformers

require_transformers()

from .trainer import STATE_FILE, LayerLockCallback, LayerLockTrainer  # noqa: E402
from .videomae import LayerLockVideoMAEForPreTraining, VideoMAEEncoder, videomae_pixel_targets  # noqa: E402
from .vjepa2 import HFVJEPA2Encoder, vjepa2_predict  # noqa: E402

__all__ = ["STATE_FILE", "TESTED_RANGE", "HFVJEPA2Encoder", "LayerLockCallback", "LayerLockTrainer", "LayerLockVideoMAEForPreTraining",
           "VideoMAEEncoder", "check_transformers_version", "require_transformers", "videomae_pixel_targets", "vjepa2_predict"]
