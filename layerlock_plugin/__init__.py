"""LayerLock: progressive layer freezing that moves the self-supervised target from pixels to ever
deeper frozen-layer activations (Erdogan et al., ICCV 2025, arXiv 2509.10156).

The core (this package, except ``reference`` and ``adapters``) depends on torch and einops only.
"""

__version__ = "0.1.0"
