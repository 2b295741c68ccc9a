"""Steering XLA's schedule of a train step without changing its values: ``materialized``
(an array computed once into its own buffer), ``stored_gradient`` (a cotangent computed once
into its own buffer) and ``gradients_first`` (weight gradients computed as soon as the
backward pass reaches them)."""

import functools
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax._src.interpreters import ad as jax_ad
from jaxtyping import Array

# jax.interpreters.ad exports JVPTracer only; reverse mode traces with LinearizeTracer.
_DIFFERENTIATED = (jax_ad.JVPTracer, jax_ad.LinearizeTracer)


def differentiated(tree: Any) -> bool:
    """Whether any array of ``tree`` is being differentiated (a JVP or linearize tracer), at
    trace time: only then is there a backward pass to plan memory for."""
    return any(isinstance(x, _DIFFERENTIATED) for x in jax.tree.leaves(tree))


def materialized(x: Array, witness: Array | None = None) -> Array:
    """``x``, computed once into a buffer of its own that later uses read.

    Why: XLA fuses a cheap elementwise producer (a frozen BatchNorm and ReLU over the sum of
    a convolution and its adapter) into every consumer, so an array that the backward pass
    reads is recomputed there from its inputs, keeping those (often two arrays of its size)
    alive instead of it. ``lax.optimization_barrier`` does not stop this (XLA:CPU removes
    barriers before fusing); a conditional, which nothing fuses into, does. Its predicate is
    "the first element of ``witness`` (default ``x``) is not NaN": the other branch fills
    ``x`` with NaN. The witness is a value of the same step (``x``, or the forward value
    whose cotangent ``x`` is), so a NaN there already makes the step's loss or gradients
    non-finite, and ``make_step`` skips such steps. A ``witness`` computed elsewhere keeps
    the predicate from reading ``x``: XLA fuses ``x``'s producer into that one-element read
    too, and a producer with two consumers gets its own inputs stored (``stored_gradient``)."""
    if not x.size:
        return x
    first = (x if witness is None else witness).reshape(-1)[0]
    return jax.lax.cond(first == first, lambda v: v, lambda v: jnp.full_like(v, jnp.nan), x)


def stored_if_forward_only(h: Array, block: Any) -> Array:
    """``h``, the input of ``block``: ``materialized`` when nothing in ``(block, h)`` is
    differentiated (a forward pass alone: evaluation, frozen blocks), as it is otherwise.

    Why: left fused, every later use of a residual block's output recomputed it from the
    block's convolution outputs, which stayed alive to the end of the stage (ResNet's
    forward pass; benchmarks/README.md, "ResNet's forward pass, block by block"). With a
    backward pass those outputs are kept for it anyway. The predicate's witness is the
    block's first floating-point weight (``h`` itself if it has none), so that a NaN in one
    image's activations never reaches the other images."""
    if differentiated((block, h)):
        return h
    weights = [w for w in jax.tree.leaves(block) if eqx.is_inexact_array(w)]
    return materialized(h, weights[0] if weights else None)


@jax.custom_vjp
def stored_gradient(h: Any) -> Any:
    """``h`` (any pytree of arrays) itself; in the backward pass, its cotangent is computed
    once and stored (``materialized``, with ``h``'s first element, saved by the forward pass,
    as the witness).

    Why: XLA fuses a cheap producer into every consumer that can take it.
    - A residual stream's gradient is a chain of elementwise adds, one per block, each read by
      the next one and by the block's LayerNorm backward: left alone, the fusion ``l`` blocks
      from the top recomputes the whole chain above it, ``O(depth^2)`` work (CLIP's LoRA
      step on XLA:CPU).
    - A depthwise convolution's input gradient is a sum of ``kh * kw`` shifted terms, and
      its output gradient a frozen BatchNorm's and ReLU6's backward: fused into each tap's
      term and into both products of a LoRA-adapted 1x1 convolution, they were recomputed
      per consumer, or stored as ``kh * kw`` full-size terms (EfficientNet-Lite0's LoRA step,
      on an int8 base most; benchmarks/README.md, "A depthwise convolution's gradients,
      stored").

    Values do not change. Like any ``custom_vjp``, it has no forward mode (``jax.jvp``).
    """
    return h


def _stored_forward(h):
    return h, jax.tree.map(lambda leaf: leaf.reshape(-1)[:1], h)


def _stored_backward(firsts, g):
    return (jax.tree.map(materialized, g, firsts),)


stored_gradient.defvjp(_stored_forward, _stored_backward)


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
