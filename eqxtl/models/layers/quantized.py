"""Frozen weights stored small: ``Int8Weight``, a linear or convolution weight kept as int8
with one float32 scale per output channel (absmax), and ``apply_weight``, the product of an
input with a plain or quantized weight.

Built by ``eqxtl.quantize`` (``eqxtl/tuning/quantization.py``). An ``Int8Weight`` sits where
the float weight was (``q_proj.weight`` holds ``values`` and ``scale``), so the layers,
filter rules and LoRA keep their paths; ``save_pretrained`` writes it back as the float
weight (``state_dict`` dequantizes).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero
from jaxtyping import Array, Float, Int8

_LEVELS = 127  # symmetric: -127..127 (-128 unused, so that negating a weight is exact)


class Int8Weight(eqx.Module):
    """A frozen weight ``W ~ values * scale`` (per output channel: ``scale`` broadcasts over
    every axis but the first), PyTorch layout kept: linear ``(out, in)``, convolution
    ``(out, in/groups, kh, kw)``. ``scale = max |W[o]| / 127``, ``values = round(W / scale)``:
    each element is within ``scale / 2`` of the float weight.

    ``shape``, ``ndim`` and ``dtype`` describe the float weight it stands for (float32), so
    code that only asks about the weight's shape (``lora``, ``merge_lora``) reads it as it
    reads a plain one; ``dequantize()`` gives the float weight.
    """

    values: Int8[Array, " out *rest"]
    scale: Float[Array, " out"]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    @property
    def ndim(self) -> int:
        return self.values.ndim

    @property
    def dtype(self):
        return self.scale.dtype

    def dequantize(self, dtype=None) -> Float[Array, " out *rest"]:
        """The float weight ``values * scale`` (in ``dtype``, default float32)."""
        dtype = self.scale.dtype if dtype is None else dtype
        scale = self.scale.reshape(-1, *(1,) * (self.ndim - 1))
        return self.values.astype(dtype) * scale.astype(dtype)


@jax.jit
def _absmax_int8(weight: Array) -> tuple[Array, Array, Array]:
    """``(values, scale, finite)`` of a float weight (one compilation per shape)."""
    w = weight.astype(jnp.float32).reshape(weight.shape[0], -1)
    finite = jnp.all(jnp.isfinite(w))
    scale = jnp.max(jnp.abs(w), axis=1) / _LEVELS
    safe = jnp.where(scale > 0, scale, 1.0)[:, None]  # an all-zero channel: values 0
    values = jnp.clip(jnp.round(w / safe), -_LEVELS, _LEVELS).astype(jnp.int8)
    return values.reshape(weight.shape), scale, finite


def int8_weight(weight: Array) -> tuple[Int8Weight | None, str]:
    """``(Int8Weight, "")``, or ``(None, why)`` when ``weight`` does not fit the scheme (no
    element, or not finite: a NaN/inf weight has no absmax scale)."""
    if weight.size == 0:
        return None, f"it has no element (shape {tuple(weight.shape)}), so no scale"
    values, scale, finite = _absmax_int8(weight)
    if not bool(finite):
        return None, "it holds NaN or infinite values, which int8 with a scale cannot store"
    return Int8Weight(values, scale), ""


def as_float(weight: Array | Int8Weight, dtype) -> Array:
    """A plain or quantized weight as a float array in ``dtype``."""
    if isinstance(weight, Int8Weight):
        return weight.dequantize(dtype)
    return weight.astype(dtype)


def apply_weight(
    op: Callable[[Array, Array], Array], x: Array, weight: Array | Int8Weight
) -> Array:
    """``op(x, W)`` in ``x``'s dtype, for ``op`` linear in each argument with its output
    channels on the last axis (a matmul by ``W^T``, a channels-last convolution).

    Quantized: ``op(x, values) * scale``, the scale applied to the output (one multiply
    that fuses with the bias add). A quantized weight, or one stored in fewer bits than
    ``x`` (bfloat16 under float32 compute), goes through ``_small_product``.
    """
    if isinstance(weight, Int8Weight):
        values, scale = weight.values, weight.scale
    elif jnp.finfo(weight.dtype).bits < jnp.finfo(x.dtype).bits:
        values, scale = weight, None
    else:
        return op(x, weight.astype(x.dtype))
    return _small_product(op, jax.ShapeDtypeStruct(x.shape, x.dtype), x, values, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _small_product(op, like, x, values, scale):
    """``op(x, values) (* scale)`` whose backward pass keeps only the stored weight.

    Under plain reverse mode the float copy of each weight made in the forward pass is a
    residual of the input gradient, so every layer's float weight is alive from its
    forward use to its backward one: the whole base in float32 again (XLA merges a
    recomputed copy with the forward one too, ``jax.checkpoint`` or not: +90% temporary
    memory on a CLIP-B/32 LoRA step; an optimization barrier does not stop it either).
    Here the backward pass converts ``values + 0 * g[0]``: the same numbers, but an
    operand no forward instruction has, which exists only once the incoming gradient
    does, so the float copy is made in the backward pass and dies with the input gradient.
    A stored weight that trains (bfloat16) gets its gradient too; a scale never does.
    """
    y = op(x, values.astype(x.dtype))
    return y if scale is None else y * scale.astype(x.dtype)


def _small_fwd(op, like, x, values, scale):
    if scale is not None and scale.perturbed:
        raise TypeError(
            "The scale of an int8 weight (eqxtl.quantize) is being differentiated: quantized "
            "weights are frozen. Build the filter spec from the quantized model (e.g. "
            "eqxtl.lora_spec) so that they stay out of the trainable half."
        )
    keep_x = values.perturbed  # a stored weight that trains: its gradient needs x
    x, values = x.value, values.value
    scale = None if scale is None else scale.value
    return _small_product(op, like, x, values, scale), (values, scale, x if keep_x else None)


def _small_bwd(op, like, residuals, g):
    values, scale, x = residuals
    if isinstance(g, SymbolicZero):
        return jnp.zeros(like.shape, like.dtype), None, None
    if scale is not None:
        g = g * scale.astype(g.dtype)
    if g.size:  # a zero that XLA cannot fold: 0 * g is NaN for a NaN g
        values = values + (jnp.ravel(g)[0] * 0).astype(values.dtype)
    weight = values.astype(g.dtype)
    if x is None:
        _, transpose = jax.vjp(lambda t: op(t, weight), jnp.zeros(like.shape, like.dtype))
        return transpose(g)[0], None, None
    _, transpose = jax.vjp(op, x, weight)
    dx, dweight = transpose(g)
    return dx, dweight.astype(values.dtype), None


_small_product.defvjp(_small_fwd, _small_bwd, symbolic_zeros=True)


def is_quantized(x) -> bool:
    return isinstance(x, Int8Weight)
