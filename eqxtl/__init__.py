"""eqxtl: transfer learning in JAX with Equinox.

Pretrained backbones loaded by name, freezing as data (filter specs from path rules),
per-group optimizers over the trainable half only, and a compiled train step that
differentiates only what trains.
"""

from ._lazy import attach_stub

# The public names are listed once, in __init__.pyi (``from .x import name as name``); each
# is imported on first use, so that ``import eqxtl`` (and the ``eqxtl`` command's --help)
# does not pay for JAX.
__getattr__, __dir__, __all__ = attach_stub(__name__, __file__)

__version__ = "0.1.0"
