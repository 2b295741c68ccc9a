"""Exact GELU, written so that its gradient fuses."""

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array

_SQRT_HALF = 1 / math.sqrt(2)


def gelu_erf(x: Array) -> Array:
    """Exact GELU, ``x * Φ(x)`` with ``Φ(x) = (1 + erf(x / √2)) / 2``: transformers'
    ``"gelu"`` and ``torch.nn.GELU()``, which compute it in this form. Any shape; computed in
    float32 at least (as torch does for half precision) and returned in ``x``'s dtype."""
    # jax.nn.gelu(approximate=False) computes Φ with erfc, whose lowering XLA:CPU splits
    # into several passes over the (batch, tokens, hidden) array in the backward pass; this
    # form's gradient takes fewer (benchmarks/README.md, "Exact GELU's backward pass").
    # In bfloat16, 1 + erf cancels in the left tail (45% off at x = -3): hence float32.
    wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return (wide * (0.5 + 0.5 * jax.lax.erf(wide * _SQRT_HALF))).astype(x.dtype)
