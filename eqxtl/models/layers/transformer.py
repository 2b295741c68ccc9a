"""Transformer pieces (CLIP, ViT, DINOv2, SigLIP, Mixer): activations, ``PatchEmbedding``,
``MLP``, ``SwiGLU``, ``multihead_attention``. They take any leading axes ``(*b, tokens, d)``: a
batch-native forward runs every matmul as one 2-D GEMM over ``batch * tokens`` rows."""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jaxtyping import Array, Float, PRNGKeyArray

from .gelu import gelu_erf
from .low_rank import dense

ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh", "silu")
"""transformers' names: ``gelu`` is exact (erf); ``gelu_new`` / ``gelu_pytorch_tanh`` the tanh
approximation (flax's ``nn.gelu``); ``quick_gelu`` openai CLIP's ``x * sigmoid(1.702 x)``."""


def activation(name: str, x: Array) -> Array:
    """The activation transformers calls ``name`` (one of ``ACTIVATIONS``)."""
    if name == "quick_gelu":
        return x * jax.nn.sigmoid(1.702 * x)
    if name == "silu":
        return jax.nn.silu(x)
    if name == "gelu":  # exact; jax.nn.gelu defaults to the tanh approximation
        return gelu_erf(x)
    return jax.nn.gelu(x, approximate=True)


def split_key(key: PRNGKeyArray | None, n: int) -> list:
    """``n`` keys from ``key`` (``n`` times ``None`` without one): what a block hands its
    layers for dropout (e.g. of LoRA adapters)."""
    return [None] * n if key is None else list(jax.random.split(key, n))


def linear(in_features: int, out_features: int, key: PRNGKeyArray, use_bias: bool = True):
    """``eqx.nn.Linear`` (weights ``(out, in)``, as torch)."""
    return eqx.nn.Linear(in_features, out_features, use_bias=use_bias, key=key)


class PatchEmbedding(eqx.Module):
    """Non-overlapping patches -> tokens: ``(*b, C, H, W) -> (*b, H/p * W/p, hidden)``,
    row-major over the ``(H/p, W/p)`` grid.

    Same weights as torch's ``Conv2d(C, hidden, p, stride=p, bias=...)``, computed as one
    matmul of the patches against the flattened kernel.
    """

    weight: Float[Array, "hidden c p p"]
    bias: Float[Array, " hidden"] | None

    def __init__(
        self, channels: int, hidden: int, patch: int, key: PRNGKeyArray, use_bias: bool = False
    ):
        bound = 1.0 / math.sqrt(channels * patch * patch)
        shape = (hidden, channels, patch, patch)
        wkey, bkey = jax.random.split(key)
        self.weight = jax.random.uniform(wkey, shape, minval=-bound, maxval=bound)
        self.bias = (
            jax.random.uniform(bkey, (hidden,), minval=-bound, maxval=bound) if use_bias else None
        )

    def __call__(self, x: Float[Array, "*b c h w"]) -> Float[Array, "*b n hidden"]:
        hidden, c, p, _ = self.weight.shape
        *lead, _, h, w = x.shape
        gh, gw = h // p, w // p
        patches = x.reshape(*lead, c, gh, p, gw, p)
        patches = jnp.moveaxis(patches, (-5, -3, -1), (-3, -2, -1))  # (*b, gh, gw, c, p, p)
        patches = patches.reshape(-1, c * p * p)
        y = patches @ self.weight.reshape(hidden, -1).astype(x.dtype).T  # one 2-D GEMM
        if self.bias is not None:
            y = y + self.bias.astype(x.dtype)
        return y.reshape(*lead, gh * gw, hidden)


class MLP(eqx.Module):
    """``fc2(act(fc1(x)))``: ``(*b, t, d) -> (*b, t, d)``."""

    fc1: eqx.nn.Linear
    fc2: eqx.nn.Linear
    activation: str = eqx.field(static=True)

    def __init__(self, dim: int, hidden: int, activation: str, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        self.fc1 = linear(dim, hidden, k1)
        self.fc2 = linear(hidden, dim, k2)
        self.activation = activation

    def __call__(
        self, x: Float[Array, "*b t d"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*b t d"]:
        k1, k2 = split_key(key, 2)
        return dense(self.fc2, activation(self.activation, dense(self.fc1, x, key=k1)), key=k2)


class SwiGLU(eqx.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))`` (transformers' ``Dinov2SwiGLUFFN``
    names; its files and timm pack ``gate_proj`` over ``up_proj`` in one tensor):
    ``(*b, t, d) -> (*b, t, d)``."""

    gate_proj: eqx.nn.Linear
    up_proj: eqx.nn.Linear
    down_proj: eqx.nn.Linear

    def __init__(self, dim: int, hidden: int, key: PRNGKeyArray):
        k1, k2, k3 = jax.random.split(key, 3)
        self.gate_proj = linear(dim, hidden, k1)
        self.up_proj = linear(dim, hidden, k2)
        self.down_proj = linear(hidden, dim, k3)

    def __call__(
        self, x: Float[Array, "*b t d"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*b t d"]:
        k1, k2, k3 = split_key(key, 3)
        gate = jax.nn.silu(dense(self.gate_proj, x, key=k1))
        return dense(self.down_proj, gate * dense(self.up_proj, x, key=k2), key=k3)


def multihead_attention(
    q: Float[Array, "*b tq d"],
    k: Float[Array, "*b t d"],
    v: Float[Array, "*b t d"],
    heads: int,
    *,
    causal: bool = False,
) -> Float[Array, "*b tq d"]:
    """Scaled dot-product attention of projected queries, keys and values split into
    ``heads`` heads (softmax in float32); heads merged back. ``causal``: each query attends
    to its own position and those before it."""

    def split(y):  # (*b, t, d) -> (*b, t, heads, d / heads)
        return y.reshape(*y.shape[:-1], heads, y.shape[-1] // heads)

    if causal or q.ndim < 3 or q.shape[-2] < _CHUNKED_MIN_TOKENS or jax.default_backend() != "cpu":
        o = jax.nn.dot_product_attention(split(q), split(k), split(v), is_causal=causal)
        return o.reshape(q.shape)
    o = _chunked_attention(split(q), split(k), split(v)).reshape(q.shape)
    return checkpoint_name(o, ATTENTION_OUTPUT)


ATTENTION_OUTPUT = "eqxtl.attention_output"
"""``jax.ad_checkpoint.checkpoint_name`` of the CPU attention's merged heads ``(*b, tq, d)``.
The scan over blocks saves it (``blockwise``): the output projection's weight gradient needs
it, and without it the backward pass would run the whole attention forward again (the scores
it recomputes for the attention's own gradient are kept out: they are ``t / d`` times larger)."""


# XLA:CPU runs the (batch, heads) attention as whole-batch dots and softmax over
# (batch, heads, tq, t) arrays, tens of MB that leave the caches between one op and the
# next (DINOv2-S/14 at 224 px, batch 32: ~50 MB per layer; its scores dot ran at a third of
# the GEMMs' FLOP rate, attention took 30% of the eval step for 11% of the FLOPs). A loop
# over a few images at a time keeps each chunk's scores in cache, as PyTorch's CPU
# flash-attention kernel does: 1.7-3x faster forward, ~1.5x forward + backward
# (benchmarks/README.md). Same arithmetic as jax.nn.dot_product_attention's XLA path.
_CHUNKED_MIN_TOKENS = 64
_CHUNK_HEADS = 32  # (image, head) pairs per loop step


def _attention_core(q, k, v):
    """``(..., tq, n, h)`` queries, ``(..., t, n, h)`` keys and values -> ``(..., tq, n, h)``,
    as ``jax.nn.dot_product_attention``'s XLA implementation computes it."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    # jax's choice: a half-precision product with float32 logits needs this preset for a
    # consistent backward pass (jax-ml/jax#24047)
    precision = {
        jnp.dtype(jnp.bfloat16): jax.lax.DotAlgorithmPreset.BF16_BF16_F32,
        jnp.dtype(jnp.float16): jax.lax.DotAlgorithmPreset.F16_F16_F32,
    }.get(jnp.dtype(q.dtype))
    logits = jnp.einsum(
        "...tnh,...snh->...nts", q, k, precision=precision, preferred_element_type=jnp.float32
    )
    probs = jax.nn.softmax(logits * scale, axis=-1).astype(k.dtype)
    return jnp.einsum("...nts,...snh->...tnh", probs, v)


def _chunked_attention(q, k, v):
    """``_attention_core`` over the leading axes flattened, a few images per loop step."""
    lead = q.shape[:-3]
    groups = math.prod(lead)
    heads = q.shape[-2]
    chunk = max(d for d in range(1, max(1, _CHUNK_HEADS // heads) + 1) if groups % d == 0)

    def chunks(y):
        return y.reshape(groups // chunk, chunk, *y.shape[-3:])

    o = jax.lax.map(lambda qkv: _attention_core(*qkv), (chunks(q), chunks(k), chunks(v)))
    return o.reshape(*lead, *o.shape[-3:])
