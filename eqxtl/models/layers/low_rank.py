"""Low-rank adapters (LoRA, DoRA) as layers: ``LoRALinear``, ``LoRAConv2d`` (built by
``eqxtl.lora``, see ``eqxtl/tuning/adapters``), ``dense`` (a plain or adapted linear layer
over the last axis) and the discovery of adapted layers in a model."""

from __future__ import annotations

import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Float, PRNGKeyArray

from ..._util.pytree_paths import keypath_to_str
from .conv import Conv2d, Padding, _convolve
from .quantized import Int8Weight, NF4Weight, apply_weight, as_float
from .schedule import gradients_first


class LoRALinear(eqx.Module):
    """A linear layer plus a low-rank update: ``x W^T + b + s (x A^T) B^T``, ``s = alpha / r``
    (``alpha / sqrt(r)`` with rsLoRA), as Hugging Face PEFT's ``lora.Linear``.

    ``weight`` and ``bias`` keep the paths of the ``eqx.nn.Linear`` it replaces (checkpoint
    names, filter rules and summaries keep working); ``lora_a`` ``(r, in)``, ``lora_b``
    ``(out, r)`` and, for DoRA, ``lora_magnitude`` ``(out,)`` sit beside them.

    DoRA (``lora_magnitude`` set): ``m / ||W + s B A||_row * (x (W + s B A)^T) + b``, the
    row norm treated as a constant in the backward pass, as PEFT does (DoRA paper, 4.3).

    Dropout (rate ``dropout``) applies to the adapter's input when a ``key`` is given.
    """

    weight: Float[Array, "out in"] | Int8Weight | NF4Weight
    bias: Float[Array, " out"] | None
    lora_a: Float[Array, "rank in"]
    lora_b: Float[Array, "out rank"]
    lora_magnitude: Float[Array, " out"] | None
    in_features: int = eqx.field(static=True)
    out_features: int = eqx.field(static=True)
    use_bias: bool = eqx.field(static=True)
    alpha: float = eqx.field(static=True)
    rslora: bool = eqx.field(static=True)
    dropout: float = eqx.field(static=True)

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]

    @property
    def scale(self) -> float:
        return _lora_scale(self.alpha, self.rank, self.rslora)

    def delta(self) -> Float[Array, "out in"]:
        """``s B A``: what merging adds to ``weight`` (before DoRA's rescaling)."""
        return self.scale * (self.lora_b @ self.lora_a)

    def __call__(
        self, x: Float[Array, "*n in"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*n out"]:
        return dense(self, x, key=key)


class LoRAConv2d(eqx.Module):
    """``Conv2d`` plus a low-rank update, as PEFT's ``lora.Conv2d``: ``A`` is a convolution
    to ``r`` channels with the base's kernel, stride and padding, ``B`` a 1x1 convolution
    back to ``out`` channels (for a 1x1 base both are matrices). Paths and DoRA as in
    ``LoRALinear``; ``lora_a`` ``(r, in, kh, kw)``, ``lora_b`` ``(out, r, 1, 1)``."""

    weight: Float[Array, "out in kh kw"] | Int8Weight
    bias: Float[Array, " out"] | None
    lora_a: Float[Array, "rank in kh kw"]
    lora_b: Float[Array, "out rank 1 1"]
    lora_magnitude: Float[Array, " out"] | None
    stride: tuple[int, int] = eqx.field(static=True)
    padding: Padding = eqx.field(static=True)
    dilation: tuple[int, int] = eqx.field(static=True)
    groups: int = eqx.field(static=True)
    alpha: float = eqx.field(static=True)
    rslora: bool = eqx.field(static=True)
    dropout: float = eqx.field(static=True)

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]

    @property
    def scale(self) -> float:
        return _lora_scale(self.alpha, self.rank, self.rslora)

    def delta(self) -> Float[Array, "out in kh kw"]:
        """``s B A`` as a kernel: what merging adds to ``weight`` (before DoRA's rescaling)."""
        b = self.lora_b.reshape(self.lora_b.shape[0], self.rank)
        a = self.lora_a.reshape(self.rank, -1)
        return (self.scale * (b @ a)).reshape(self.weight.shape)

    def __call__(
        self, x: Float[Array, "*n h w c"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*n h2 w2 o"]:
        """One image ``(H, W, C)`` or a batch ``(N, H, W, C)``."""
        batched = x.ndim == 4
        x = x if batched else x[None]

        def base(inputs):
            return apply_weight(
                lambda v, w: _convolve(v, w, self.stride, self.padding, self.dilation),
                inputs,
                self.weight,
            )

        def adapter(weights, inputs):
            a, b = (w.astype(x.dtype) for w in weights)
            h = _convolve(inputs, a, self.stride, self.padding, (1, 1))
            # B as one 2-D GEMM over all rows (its gradient too), like ``dense``
            rows = h.reshape(-1, self.rank) * self.scale
            return (rows @ b.reshape(b.shape[0], self.rank).T).reshape(*h.shape[:-1], b.shape[0])

        def low_rank(inputs):
            return gradients_first(adapter, (self.lora_a, self.lora_b), inputs)

        y = _adapted(self, x, base(x), base, low_rank, key)
        if self.bias is not None:
            y = y + self.bias.astype(y.dtype)
        return y if batched else y[0]


def _lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def dora_scale(layer) -> Array:
    """``m / ||W + s B A||`` per output channel, a constant for the backward pass (PEFT,
    DoRA paper 4.3), computed in float32."""
    weight = as_float(layer.weight, jnp.float32) + layer.delta().astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(weight.reshape(weight.shape[0], -1)), axis=1))
    return layer.lora_magnitude.astype(jnp.float32) / jax.lax.stop_gradient(norm)


def _adapted(layer, x, y, base, low_rank, key):
    """The base output ``y = base(x)`` (no bias) plus the adapter's term, PEFT's formula.

    With dropout (a key and ``layer.dropout > 0``) the adapter sees the dropped-out input
    ``xd``: LoRA adds ``low_rank(xd)``; DoRA adds ``(g - 1) base(xd) + g low_rank(xd)``
    (``g`` the DoRA scale), which without dropout is ``g (y + low_rank(x))``."""
    dropped = key is not None and layer.dropout > 0
    xd = x
    if dropped:
        keep = 1.0 - layer.dropout
        mask = jax.random.bernoulli(key, keep, x.shape)
        xd = jnp.where(mask, x / keep, jnp.zeros_like(x))
    if layer.lora_magnitude is None:
        return y + low_rank(xd)
    g = dora_scale(layer).astype(y.dtype)
    if not dropped:
        return g * (y + low_rank(x))
    return y + (g - 1) * base(xd) + g * low_rank(xd)


def dense(
    layer: eqx.nn.Linear | LoRALinear,
    x: Float[Array, "*n i"],
    *,
    key: PRNGKeyArray | None = None,
) -> Float[Array, "*n o"]:
    """A linear layer (plain or LoRA/DoRA-adapted) over the last axis of ``x``, in ``x``'s
    dtype; ``key`` drives the adapter's dropout.

    All leading axes are merged into one before each product: the weight gradients are then
    plain 2-D GEMMs. With several leading axes (a vmapped batch, or ``(batch, tokens)``)
    XLA:CPU contracts them through a full transpose of the incoming gradient, 2.5x slower.
    """
    rows = x.reshape(-1, x.shape[-1])

    def base(inputs):  # a quantized weight: int8 values times a scale (``apply_weight``)
        return apply_weight(lambda v, w: v @ w.T, inputs, layer.weight)

    y = base(rows)
    if isinstance(layer, LoRALinear):

        def low_rank(inputs):
            a, b = layer.lora_a.astype(x.dtype), layer.lora_b.astype(x.dtype)
            return ((inputs @ a.T) * layer.scale) @ b.T

        y = _adapted(layer, rows, y, base, low_rank, key)
    y = y.reshape(*x.shape[:-1], layer.weight.shape[0])
    return y if layer.bias is None else y + layer.bias.astype(x.dtype)


# --------------------------------------------------------------------------- in a model

ADAPTERS: dict[type, type] = {eqx.nn.Linear: LoRALinear, Conv2d: LoRAConv2d}
"""The plain layer types LoRA adapts, each with the adapted type it becomes."""
ADAPTED_TYPES = tuple(ADAPTERS.values())


def adaptable(layer: Any) -> bool:
    """Whether ``lora`` can adapt ``layer``: a linear layer with a matrix weight, or an
    ungrouped, undilated convolution (depthwise convolutions are left as they are)."""
    if isinstance(layer, eqx.nn.Linear):
        return layer.weight.ndim == 2
    if isinstance(layer, Conv2d):
        return layer.groups == 1 and layer.dilation == (1, 1)
    return False


def int8_layers(model: Any) -> list[tuple[str, Any]]:
    """``(module path, layer)`` of every layer whose weight ``eqxtl.quantize`` (or
    ``from_pretrained(quantize="int8")``) can store as int8: linear and ungrouped
    convolution layers, plain or adapted. Grouped (depthwise) convolutions stay float: with
    a few weights per output channel their scales save little, and their small kernels
    carry most of a network's quantization error (docs/guides/small-frozen-weights.md)."""
    layers = layers_of(model, (*ADAPTERS, *ADAPTED_TYPES))
    return [(path, layer) for path, layer in layers if getattr(layer, "groups", 1) == 1]


def layers_of(model: Any, types: tuple[type, ...]) -> list[tuple[str, Any]]:
    """``(module path, layer)`` of every module of ``model`` that is one of ``types``."""

    def is_layer(x: Any) -> bool:
        return isinstance(x, types)

    flat = jtu.tree_flatten_with_path(model, is_leaf=is_layer)[0]
    return [(keypath_to_str(kp), node) for kp, node in flat if is_layer(node)]


def adapted_layers(model: Any) -> list[tuple[str, Any]]:
    """``(module path, layer)`` of every LoRA/DoRA-adapted layer of ``model``."""
    return layers_of(model, ADAPTED_TYPES)


def has_adapters(model: Any) -> bool:
    """Whether ``model`` holds LoRA/DoRA adapters (``eqxtl.lora`` / ``load_adapter``)."""
    return bool(adapted_layers(model))
