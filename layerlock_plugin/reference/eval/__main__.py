"""``python -m layerlock_plugin.reference.eval CHECKPOINT``: see :mod:`.probe_checkpoint`."""

import sys

from .probe_checkpoint import main

sys.exit(main())
