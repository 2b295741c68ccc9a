"""Bytes of pytrees of arrays, from shapes alone."""

from __future__ import annotations

import math
from typing import Any

import equinox as eqx
import jax


def is_leaf_value(x: Any) -> bool:
    """An array, or the shape and dtype of one (``jax.ShapeDtypeStruct``)."""
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def nbytes(*trees: Any) -> int:
    """Bytes of the arrays (or ``ShapeDtypeStruct``, or tracers) in ``trees``."""
    leaves = jax.tree.leaves(eqx.filter(trees, is_leaf_value))
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in leaves)
