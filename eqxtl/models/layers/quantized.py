"""Frozen weights stored small: ``Int8Weight``, a linear or convolution weight kept as int8
with one float32 scale per output channel (absmax); ``NF4Weight``, a linear weight kept as
4-bit NormalFloat codes (QLoRA's data type) with one float32 absmax per block of 64; and
``apply_weight``, the product of an input with a plain or quantized weight.

Built by ``eqxtl.quantize`` (``eqxtl/tuning/quantization.py``). An ``Int8Weight`` sits where
the float weight was (``q_proj.weight`` holds ``values`` and ``scale``), so the layers,
filter rules and LoRA keep their paths; ``save_pretrained`` writes it back as the float
weight (``state_dict`` dequantizes).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero
from jaxtyping import Array, Float, Int8, UInt8

from ..._util.finite import all_finite

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

    def __matmul__(self, x: Float[Array, " in *n"]) -> Float[Array, " out *n"]:
        return weight_times(self, x)


@jax.jit
def _absmax_int8(weight: Array) -> tuple[Array, Array, Array]:
    """``(values, scale, finite)`` of a float weight (one compilation per shape)."""
    w = weight.astype(jnp.float32).reshape(weight.shape[0], -1)
    finite = all_finite([w])
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


# QLoRA's NormalFloat4 levels (Dettmers et al. 2023), as bitsandbytes' kernels.cu lists them:
# quantiles of N(0, 1) scaled to [-1, 1], with an exact 0.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
NF4_BLOCK = 64  # weights per absmax, as in QLoRA


class NF4Weight(eqx.Module):
    """A frozen linear weight ``(out, in)`` as 4-bit NormalFloat codes: the weight read in
    row-major order, cut into blocks of ``NF4_BLOCK`` (the last one zero-padded); each block
    is divided by its absmax and each element rounded to the nearest of the 16
    ``NF4_LEVELS``. ``codes`` holds two 4-bit level indices per byte (the first in the low
    nibble); ``absmax`` one float32 per block. Each element is within half the gap between
    its two nearest levels, times its block's absmax, of the float weight.

    ``shape``, ``ndim`` and ``dtype`` describe the float weight it stands for, as for
    ``Int8Weight``; ``dequantize()`` gives it.
    """

    codes: UInt8[Array, " half_padded"]
    absmax: Float[Array, " blocks"]
    weight_shape: tuple[int, ...] = eqx.field(static=True)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.weight_shape

    @property
    def ndim(self) -> int:
        return len(self.weight_shape)

    @property
    def dtype(self):
        return self.absmax.dtype

    def dequantize(self, dtype=None) -> Float[Array, "out in"]:
        """The float weight ``level[code] * absmax`` (in ``dtype``, default float32)."""
        dtype = self.absmax.dtype if dtype is None else dtype
        return _nf4_decode(self.codes, self.absmax, self.weight_shape, dtype)

    def __matmul__(self, x: Float[Array, " in *n"]) -> Float[Array, " out *n"]:
        return weight_times(self, x)


def _nf4_decode(codes: Array, absmax: Array, shape: tuple[int, ...], dtype) -> Array:
    levels = jnp.asarray(NF4_LEVELS, dtype)
    index = jnp.stack([codes & 15, codes >> 4], axis=-1).reshape(-1)
    blocks = levels[index].reshape(-1, NF4_BLOCK) * absmax.astype(dtype)[:, None]
    return blocks.reshape(-1)[: math.prod(shape)].reshape(shape)


@jax.jit
def _nf4_encode(weight: Array) -> tuple[Array, Array, Array]:
    """``(codes, absmax, finite)`` of a float weight (one compilation per shape)."""
    w = weight.astype(jnp.float32).reshape(-1)
    finite = all_finite([w])
    blocks = jnp.pad(w, (0, -w.size % NF4_BLOCK)).reshape(-1, NF4_BLOCK)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    safe = jnp.where(absmax > 0, absmax, 1.0)[:, None]  # an all-zero block: level 0.0
    levels = jnp.asarray(NF4_LEVELS, jnp.float32)
    midpoints = (levels[1:] + levels[:-1]) / 2
    index = jnp.searchsorted(midpoints, blocks / safe).astype(jnp.uint8).reshape(-1, 2)
    return index[:, 0] | (index[:, 1] << 4), absmax, finite


def nf4_weight(weight: Array) -> tuple[NF4Weight | None, str]:
    """``(NF4Weight, "")``, or ``(None, why)`` when ``weight`` does not fit the scheme (not a
    matrix, no element, or not finite)."""
    if weight.ndim != 2:
        return None, f"NF4 stores linear (2-D) weights, this one has shape {tuple(weight.shape)}"
    if weight.size == 0:
        return None, f"it has no element (shape {tuple(weight.shape)}), so no absmax"
    codes, absmax, finite = _nf4_encode(weight)
    if not bool(finite):
        return None, "it holds NaN or infinite values, which NF4 with an absmax cannot store"
    return NF4Weight(codes, absmax, tuple(weight.shape)), ""


def as_float(weight: Array | Int8Weight | NF4Weight, dtype) -> Array:
    """A plain or quantized weight as a float array in ``dtype``."""
    if is_quantized(weight):
        return weight.dequantize(dtype)
    return weight.astype(dtype)


def apply_weight(
    op: Callable[[Array, Array], Array], x: Array, weight: Array | Int8Weight | NF4Weight
) -> Array:
    """``op(x, W)`` in ``x``'s dtype, for ``op`` linear in each argument with its output
    channels on the last axis (a matmul by ``W^T``, a channels-last convolution).

    int8: ``op(x, values) * scale``, the scale applied to the output (one multiply that
    fuses with the bias add). NF4: ``op(x, W)`` with ``W`` decoded from the codes. A
    quantized weight, or one stored in fewer bits than ``x`` (bfloat16 under float32
    compute), goes through ``_small_product``.
    """
    decode = _scaled_output
    if isinstance(weight, Int8Weight):
        values, scale = weight.values, weight.scale
    elif isinstance(weight, NF4Weight):
        values, scale = weight.codes, weight.absmax
        decode = functools.partial(_nf4_weight, shape=weight.weight_shape)
    elif jnp.finfo(weight.dtype).bits < jnp.finfo(x.dtype).bits:
        values, scale = weight, None
    else:
        return op(x, weight.astype(x.dtype))
    like = jax.ShapeDtypeStruct(x.shape, x.dtype)
    return _small_product(op, like, decode, x, values, scale)


def weight_times(weight: Int8Weight | NF4Weight, x: Array) -> Array:
    """``W @ x`` for a quantized linear weight ``(out, in)``, through ``apply_weight``:
    what ``eqx.nn.Linear.__call__`` computes, so that a user's own module calling its
    quantized linear layer directly works as ``eqxtl.dense`` does."""
    if weight.ndim != 2:
        raise TypeError(
            f"W @ x needs a linear weight (out, in); this quantized weight is "
            f"{tuple(weight.shape)}: call its layer (a convolution) instead."
        )
    if x.ndim == 1:
        return apply_weight(lambda v, w: v @ w.T, x, weight)
    y = apply_weight(lambda v, w: v @ w.T, jnp.swapaxes(x, -1, -2), weight)
    return jnp.swapaxes(y, -1, -2)


def _scaled_output(values, scale, dtype):
    """``(weight, output scale)``: int8 values and per-output-channel scales, or a plain
    low-precision weight (no scale). Under a compute dtype with a narrow exponent
    (float16) the scale goes on the weight instead (``(weight * scale, None)``)."""
    if scale is None:
        return values.astype(dtype), None
    if jnp.finfo(dtype).maxexp < jnp.finfo(scale.dtype).maxexp:
        # The unscaled product is 127 / absmax times the layer's output: in float16 it
        # overflows (a row with absmax 0.05 from outputs of 26 on), and a scale under
        # 6e-5 is subnormal. The dequantized weight lies within the float weight's range.
        per_row = scale.reshape(-1, *(1,) * (values.ndim - 1))  # output channels first
        return (values.astype(scale.dtype) * per_row).astype(dtype), None
    return values.astype(dtype), scale.astype(dtype)


def _nf4_weight(codes, absmax, dtype, *, shape):
    return _nf4_decode(codes, absmax, shape, dtype), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _small_product(op, like, decode, x, values, scale):
    """``op(x, weight) (* output scale)``, ``(weight, output scale) = decode(values, scale,
    x.dtype)``, whose backward pass keeps only the stored weight.

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
    weight, out_scale = decode(values, scale, x.dtype)
    y = op(x, weight)
    return y if out_scale is None else y * out_scale


def _small_fwd(op, like, decode, x, values, scale):
    if scale is not None and scale.perturbed:
        raise TypeError(
            "The scale of a quantized weight (eqxtl.quantize) is being differentiated: "
            "quantized weights are frozen. Build the filter spec from the quantized model "
            "(e.g. eqxtl.lora_spec) so that they stay out of the trainable half."
        )
    keep_x = values.perturbed  # a stored weight that trains: its gradient needs x
    x, values = x.value, values.value
    scale = None if scale is None else scale.value
    y = _small_product(op, like, decode, x, values, scale)
    return y, (values, scale, x if keep_x else None)


def _small_bwd(op, like, decode, residuals, g):
    values, scale, x = residuals
    if isinstance(g, SymbolicZero):
        return jnp.zeros(like.shape, like.dtype), None, None
    # A zero XLA cannot fold, since 0 * g is NaN for a NaN g (an integer cast makes that a
    # number again; a NaN g already makes the step non-finite, which make_step skips).
    if g.size:
        values = values + (jnp.ravel(g)[0] * 0).astype(values.dtype)
    weight, out_scale = decode(values, scale, g.dtype)
    if out_scale is not None:
        g = g * out_scale
    if x is None:
        _, transpose = jax.vjp(lambda t: op(t, weight), jnp.zeros(like.shape, like.dtype))
        return transpose(g)[0], None, None
    _, transpose = jax.vjp(op, x, weight)
    dx, dweight = transpose(g)
    return dx, dweight.astype(values.dtype), None


_small_product.defvjp(_small_fwd, _small_bwd, symbolic_zeros=True)


def is_quantized(x) -> bool:
    """Whether ``x`` is a weight stored quantized (``Int8Weight``, ``NF4Weight``)."""
    return isinstance(x, (Int8Weight, NF4Weight))
