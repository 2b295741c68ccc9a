"""Normalisation layers: ``BatchNorm`` (PyTorch semantics, statistics in the state) and
``LayerNorm`` (float32 over the last axis)."""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


class BatchNorm(eqx.Module):
    """BatchNorm over the last (channel) axis with PyTorch's semantics and names.

    The running statistics live in an ``eqx.nn.State`` (``running_mean``, ``running_var``,
    paths as in a torch state dict); they are never model leaves, so they never train.

    - ``inference=True``: normalise with the running statistics, exactly as loaded.
    - ``inference=False``: normalise with the batch statistics (biased variance) over the
      vmapped axis ``axis_name`` and the spatial axes, and update the running statistics
      like ``torch.nn.BatchNorm2d.train()``: ``r <- (1 - momentum) r + momentum s`` with the
      *unbiased* variance. One example ``(*spatial, c)`` must be called under
      ``jax.vmap(..., axis_name=axis_name)``; a whole batch ``(n, *spatial, c)`` (with
      ``spatial_dims`` spatial axes) is reduced over its first axis directly.
    """

    weight: Float[Array, " c"]
    bias: Float[Array, " c"]
    running_mean: eqx.nn.StateIndex
    running_var: eqx.nn.StateIndex
    eps: float = eqx.field(static=True)
    momentum: float = eqx.field(static=True)
    axis_name: str = eqx.field(static=True)
    spatial_dims: int = eqx.field(static=True)
    inference: bool

    def __init__(
        self,
        channels: int,
        *,
        eps: float = 1e-5,
        momentum: float = 0.1,
        axis_name: str = "batch",
        spatial_dims: int = 2,
        inference: bool = True,
    ):
        self.weight = jnp.ones((channels,))
        self.bias = jnp.zeros((channels,))
        self.running_mean = eqx.nn.StateIndex(jnp.zeros((channels,)))
        self.running_var = eqx.nn.StateIndex(jnp.ones((channels,)))
        self.eps = eps
        self.momentum = momentum
        self.axis_name = axis_name
        self.spatial_dims = spatial_dims
        self.inference = inference

    def __call__(
        self, x: Float[Array, "*n_spatial c"], state: eqx.nn.State
    ) -> tuple[Float[Array, "*n_spatial c"], eqx.nn.State]:
        if self.inference:
            mean = state.get(self.running_mean)
            var = state.get(self.running_var)
        else:
            batched = x.ndim == self.spatial_dims + 2
            axes = tuple(range(x.ndim - 1))

            def across_batch(y):  # the vmapped axis, unless the batch is in x itself
                return y if batched else jax.lax.pmean(y, self.axis_name)

            xf = x.astype(jnp.float32)
            mean = across_batch(jnp.mean(xf, axis=axes))
            var = across_batch(jnp.mean(jnp.square(xf - mean), axis=axes))
            examples = 1 if batched else jax.lax.psum(1, self.axis_name)
            count = examples * math.prod(x.shape[:-1])
            unbiased = var * (count / jnp.maximum(count - 1, 1))
            m = self.momentum
            old_mean = state.get(self.running_mean)
            old_var = state.get(self.running_var)
            state = state.set(self.running_mean, (1 - m) * old_mean + m * mean)
            state = state.set(self.running_var, (1 - m) * old_var + m * unbiased)
        scale = self.weight * jax.lax.rsqrt(var + self.eps)
        shift = self.bias - mean * scale
        return x * scale.astype(x.dtype) + shift.astype(x.dtype), state


def set_inference(model, value: bool):
    """``model`` with every ``inference`` flag (BatchNorm, dropout) set to ``value``."""
    return eqx.nn.inference_mode(model, value=value)


class LayerNorm(eqx.Module):
    """LayerNorm over the last axis ``(..., d) -> (..., d)``, computed in float32."""

    weight: Float[Array, " d"]
    bias: Float[Array, " d"]
    eps: float = eqx.field(static=True)

    def __init__(self, dim: int, eps: float):
        self.weight = jnp.ones((dim,))
        self.bias = jnp.zeros((dim,))
        self.eps = eps

    def __call__(self, x: Float[Array, "*n d"]) -> Float[Array, "*n d"]:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight + self.bias).astype(x.dtype)
