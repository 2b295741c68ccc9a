"""Steering XLA's schedule of a train step without changing its values: ``materialized``
(an array computed once into its own buffer) and ``gradients_first`` (weight gradients
computed as soon as the backward pass reaches them)."""

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array


def materialized(x: Array) -> Array:
    """``x``, computed once into a buffer of its own that later uses read.

    Why: XLA fuses a cheap elementwise producer (a frozen BatchNorm and ReLU over the sum of
    a convolution and its adapter) into every consumer, so an array that the backward pass
    reads is recomputed there from its inputs, keeping those (often two arrays of its size)
    alive instead of it. ``lax.optimization_barrier`` does not stop this (XLA:CPU removes
    barriers before fusing); a conditional, which nothing fuses into, does. Its predicate is
    "the first element is not NaN": the other branch fills ``x`` with NaN, a value whose
    loss is non-finite anyway (``make_step`` skips such steps)."""
    if not x.size:
        return x
    first = x.reshape(-1)[0]
    return jax.lax.cond(first == first, lambda v: v, lambda v: jnp.full_like(v, jnp.nan), x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def gradients_first(fn: Callable[[Any, Array], Array], weights: Any, x: Array) -> Array:
    """``fn(weights, x)`` for small trained ``weights`` and a large input ``x``; its backward
    pass computes the gradients of ``weights`` before it hands ``x``'s cotangent on (the
    cotangent takes a zero dependency on them), and keeps ``x`` ``materialized``.

    Why: XLA's scheduler left a convolutional adapter's weight gradients until the backward
    pass had reached the stem, keeping every layer's input and output cotangent (the size of
    its feature map) alive until then (ResNet-50's LoRA step; benchmarks/README.md, "LoRA's
    weight gradients on a convolution"). Like any ``custom_vjp``, it has no forward mode
    (``jax.jvp``).
    """
    return fn(weights, x)


def _gradients_first_forward(fn, weights, x):
    # The pullback is a pytree of its residuals (``x`` among them).
    return jax.vjp(fn, weights, materialized(x))


def _gradients_first_backward(fn, pullback, g):
    d_weights, dx = pullback(g)
    firsts = [leaf.reshape(-1)[0] for leaf in jax.tree.leaves(d_weights) if leaf.size]
    if not firsts:
        return d_weights, dx
    return d_weights, dx + (0 * sum(firsts)).astype(dx.dtype)


gradients_first.defvjp(_gradients_first_forward, _gradients_first_backward)
