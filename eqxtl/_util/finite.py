"""Whether arrays are finite, as one traced bool."""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp


def all_finite(arrays: Iterable[jax.Array]) -> jax.Array:
    """Whether every element of every floating-point array in ``arrays`` is finite: a traced
    bool. The arrays are read in the order given (the order XLA's scheduler then tends to
    produce them in)."""
    # a * 0 is 0 where a is finite and NaN where it is not, so the sum is NaN exactly when
    # some element is (large finite values cannot overflow it). XLA:CPU runs it as one
    # vectorised reduction per array, where jnp.all(jnp.isfinite(a)) was an elementwise pass,
    # a bool array and a reduction, slower to run and to compile (benchmarks/README.md,
    # "Where the full step's compile time grows with depth").
    total = jnp.zeros((), jnp.float32)
    for a in arrays:
        total = total + jnp.sum(a * 0).astype(jnp.float32)
    return jnp.isfinite(total)
