"""The convolutional families' activations, by transformers' ``ACT2FN`` names, and the choice
of ReLU after a BatchNorm."""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array

from .gelu import gelu_erf
from .sign_bits import relu_keeping_sign_bits

CNN_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": jax.nn.relu,
    "relu6": jax.nn.relu6,
    "gelu": gelu_erf,
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "leaky_relu": functools.partial(jax.nn.leaky_relu, negative_slope=0.01),
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
}
"""transformers' ``ACT2FN`` names that make sense in a CNN."""


def activate_after_batchnorm(name: str, x: Array, frozen_batchnorm: bool) -> Array:
    """``CNN_ACTIVATIONS[name](x)`` for ``x`` that comes out of a BatchNorm.

    After a frozen BatchNorm (an affine map) a ReLU keeps only the signs of ``x`` for its
    backward pass (``relu_keeping_sign_bits``): nothing else needs the float arrays that
    computed ``x`` then (LoRA on a frozen base). A BatchNorm that trains needs its input for
    its own backward pass, so there the plain ReLU costs nothing more.
    """
    if frozen_batchnorm and name == "relu":
        return relu_keeping_sign_bits(x)
    return CNN_ACTIVATIONS[name](x)
