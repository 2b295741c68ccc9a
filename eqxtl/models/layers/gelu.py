"""Exact GELU, written so that its gradient fuses."""

import math

import jax
from jaxtyping import Array

_SQRT_HALF = 1 / math.sqrt(2)


def gelu_erf(x: Array) -> Array:
    """Exact GELU, ``x * Φ(x)`` with ``Φ(x) = (1 + erf(x / √2)) / 2``: transformers'
    ``"gelu"`` and ``torch.nn.GELU()``, which compute it in this form. Any shape."""
    # jax.nn.gelu(approximate=False) computes Φ with erfc, whose lowering XLA:CPU splits
    # into several passes over the (batch, tokens, hidden) array in the backward pass; this
    # form's gradient fuses into one or two (benchmarks/README.md, "Exact GELU").
    return x * (0.5 + 0.5 * jax.lax.erf(x * _SQRT_HALF))
