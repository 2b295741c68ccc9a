"""``relu_keeping_sign_bits``: a ReLU whose backward pass needs one bit per element."""

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, UInt8

_BIT_VALUES = 2 ** jnp.arange(8, dtype=jnp.uint8)


def pack_bits(flags: Array) -> UInt8[Array, " n8"]:
    """``flags`` (bool, any shape, ``n`` elements), flattened and packed eight to a byte
    (element ``8 * i + j`` is bit ``j`` of byte ``i``), zero-padded: ``(ceil(n / 8),)``."""
    flat = flags.reshape(-1)
    flat = jnp.pad(flat, (0, -flat.size % 8)).reshape(-1, 8).astype(jnp.uint8)
    return jnp.sum(flat * _BIT_VALUES, axis=-1, dtype=jnp.uint8)


def unpack_bits(bits: UInt8[Array, " n8"], shape: tuple[int, ...]) -> Array:
    """The bool array of ``shape`` that ``pack_bits`` packed into ``bits``."""
    flat = ((bits[:, None] & _BIT_VALUES) != 0).reshape(-1)
    return flat[: math.prod(shape)].reshape(shape)


@jax.custom_vjp
def relu_keeping_sign_bits(x: Float[Array, "..."]) -> Float[Array, "..."]:
    """``max(x, 0)``, as ``jax.nn.relu`` (the same values and gradients, 0 at ``x = 0``), but
    its backward pass keeps only the signs of ``x``, packed eight to a byte.

    ``jax.nn.relu`` keeps ``x > 0`` for its backward pass. XLA recomputes that mask from
    whatever made ``x`` (a convolution's output, a frozen BatchNorm, a LoRA branch, the
    residual sum) and so keeps those float arrays alive from the forward pass to the
    backward pass. Where nothing else needs them, as with a frozen BatchNorm (LoRA on a
    ResNet), they cost a float32 array or two per layer; the packed signs cost 1/32 of one.
    """
    return _relu(x)


def _relu(x):
    # A zero of x's dtype: jax2onnx traces `maximum(x, 0)` as float64 under x64.
    return jnp.maximum(x, jnp.zeros((), x.dtype))


def _forward(x):
    bits = pack_bits(x > 0)
    if not bits.size:
        return _relu(x), bits
    # The output takes a (zero) dependency on the bits: otherwise XLA's scheduler packs them
    # just before the backward pass needs them, keeping x's producers alive until then.
    return _relu(x) + 0 * bits[0].astype(x.dtype), bits


def _backward(bits, g):
    return (jnp.where(unpack_bits(bits, g.shape), g, jnp.zeros((), g.dtype)),)


relu_keeping_sign_bits.defvjp(_forward, _backward)
