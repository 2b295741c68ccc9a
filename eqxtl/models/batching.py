"""Running a one-example module over a batch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax


def batched(model: Any) -> Callable:
    """``model`` over a batch: ``(x (B, ...), state, keys (B,) | None) -> (out (B, ...), state)``.

    ``jax.vmap`` over the examples (BatchNorm in training mode reduces over the vmapped axis
    ``"batch"``), or, for a model that says it is ``batch_native`` (CLIP), one call on the
    whole batch with the first key.
    """

    def call(x, state, keys=None):
        if getattr(model, "batch_native", False):
            return model(x, state, key=None if keys is None else keys[0])
        if keys is None:
            fn = lambda xi: model(xi, state)  # noqa: E731
            return jax.vmap(fn, axis_name="batch", out_axes=(0, None))(x)
        fn = lambda xi, ki: model(xi, state, key=ki)  # noqa: E731
        return jax.vmap(fn, axis_name="batch", out_axes=(0, None))(x, keys)

    return call
