"""Stochastic depth ("drop path", Huang et al. 2016): ``drop_path`` and the per-block
schedules of the rates.

A backbone's config holds one rate (``drop_path_rate``); the forward pass derives each
block's rate from it (``linear_rates``) and hands it to the block with a key, as data: under
``eqxtl.with_scan`` the rates are stacked with the keys and scanned over, so blocks with
different rates still share one compiled body.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray


def drop_path(
    x: Array, rate: float | Array | None, key: PRNGKeyArray | None, *, example_dims: int
) -> Array:
    """timm's ``drop_path`` (``scale_by_keep=True``) on a residual branch ``x``: each example
    is zeroed with probability ``rate`` and otherwise scaled by ``1 / (1 - rate)``, so its
    expectation is ``x``.

    **Arguments:**

    - `x`: ``(*b, *example)``; one draw per index of the leading axes ``*b`` (none: one
      draw for the single example, as under ``jax.vmap``).
    - `rate`: the drop probability in ``[0, 1)``, a float or a traced scalar (under scan).
    - `key`: the randomness; ``None`` (inference), a ``None`` rate or a Python rate of 0
      return ``x`` itself, untouched.
    - `example_dims`: how many trailing axes make one example (2 for tokens ``(t, d)``,
      3 for a feature map ``(h, w, c)``).
    """
    if key is None or rate is None or (isinstance(rate, (int, float)) and rate == 0):
        return x
    keep = 1.0 - jnp.asarray(rate, jnp.float32)
    shape = x.shape[: x.ndim - example_dims] + (1,) * example_dims
    mask = jax.random.bernoulli(key, keep, shape)
    # as timm: a {0, 1/keep} tensor in x's dtype, multiplied in
    return x * (mask.astype(jnp.float32) / keep).astype(x.dtype)


def linear_rates(rate: float, n: int) -> list[float]:
    """The rates of ``n`` blocks rising linearly from 0 (the first) to ``rate`` (the last):
    timm's ``torch.linspace(0, drop_path_rate, depth)`` for its ViTs, and its ResNet rule
    ``drop_path_rate * block_index / (num_blocks - 1)`` over the blocks of all stages."""
    if n <= 1:
        return [0.0] * n
    return [rate * i / (n - 1) for i in range(n)]


def block_rates(
    rate: float, n: int, key: PRNGKeyArray | None, *, schedule=linear_rates
) -> list[float] | None:
    """What a forward pass hands its ``n`` blocks: their rates (``schedule(rate, n)``) when
    drop path is on, i.e. a ``key`` is given and ``rate > 0``; else ``None`` (the blocks
    then run exactly as without drop path)."""
    if key is None or rate == 0:
        return None
    return schedule(rate, n)


def drop_keys(key: PRNGKeyArray | None, n: int, rate) -> tuple[list, list]:
    """``(keys, drop)``: ``n`` keys for a block's layers (LoRA dropout; ``split_key``) and
    two for its branches' drop path. Without drop path (``rate`` or ``key`` ``None``) the
    layer keys are those of ``split_key(key, n)`` (what the block used before drop path
    existed) and ``drop`` is ``[None, None]``."""
    if key is None or rate is None:
        return ([None] * n if key is None else list(jax.random.split(key, n))), [None, None]
    keys = list(jax.random.split(key, n + 2))
    return keys[:n], keys[n:]
