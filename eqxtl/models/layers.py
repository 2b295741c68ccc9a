"""Layers shared by the backbones.

Weights keep PyTorch's layout (conv ``(out, in/groups, kh, kw)``, linear ``(out, in)``), so
loading a checkpoint is renaming only. Activations inside convolutional backbones are
channels-last ``(H, W, C)``: XLA's CPU and GPU convolution kernels favour NHWC, and a
channel-first graph gets transposes around every convolution. Backbones transpose once at
their input. The transformer pieces (``dense``, ``LayerNorm``, ``PatchEmbedding``,
``multihead_attention``, ``activation``) take any leading axes ``(*b, tokens, d)``: a
batch-native forward runs every matmul as one 2-D GEMM over ``batch * tokens`` rows.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero
from jaxtyping import Array, Float, PRNGKeyArray

Padding = str | Sequence[tuple[int, int]]


class Conv2d(eqx.Module):
    """2-D convolution on one channels-last image ``(H, W, C_in) -> (H', W', C_out)``.

    ``padding`` is an int (symmetric, like PyTorch), explicit ``((top, bottom), (left, right))``
    pairs, or ``"SAME"`` for TensorFlow's asymmetric same-padding (checkpoints converted
    from TF need it; PyTorch-trained ones need the symmetric form: XLA's ``SAME`` puts the
    extra pixel at the end, a one-pixel shift against torch).
    """

    weight: Float[Array, "out in_per_group kh kw"]
    bias: Float[Array, " out"] | None
    stride: tuple[int, int] = eqx.field(static=True)
    padding: Padding = eqx.field(static=True)
    dilation: tuple[int, int] = eqx.field(static=True)
    groups: int = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int | str | Sequence[tuple[int, int]] = 0,
        dilation: int = 1,
        groups: int = 1,
        use_bias: bool = True,
        key: PRNGKeyArray,
    ):
        wkey, bkey = jax.random.split(key)
        fan_in = in_channels // groups * kernel_size * kernel_size
        bound = 1.0 / math.sqrt(fan_in)
        shape = (out_channels, in_channels // groups, kernel_size, kernel_size)
        self.weight = jax.random.uniform(wkey, shape, minval=-bound, maxval=bound)
        self.bias = (
            jax.random.uniform(bkey, (out_channels,), minval=-bound, maxval=bound)
            if use_bias
            else None
        )
        self.stride = (stride, stride)
        if isinstance(padding, int):
            padding = ((padding, padding), (padding, padding))
        elif not isinstance(padding, str):
            padding = tuple(tuple(p) for p in padding)
        self.padding = padding
        self.dilation = (dilation, dilation)
        self.groups = groups

    def __call__(self, x: Float[Array, "*n h w c"]) -> Float[Array, "*n h2 w2 o"]:
        """One image ``(H, W, C)`` or a batch ``(N, H, W, C)``."""
        batched = x.ndim == 4
        x = x if batched else x[None]
        y = _convolve(x, self.weight.astype(x.dtype), self.stride, self.padding, self.dilation)
        if self.bias is not None:
            y = y + self.bias.astype(y.dtype)
        return y if batched else y[0]


def _convolve(
    x: Float[Array, "n h w c"],
    weight: Float[Array, "o i kh kw"],
    stride: tuple[int, int],
    padding: Padding,
    dilation: tuple[int, int],
) -> Float[Array, "n h2 w2 o"]:
    """The convolution behind ``Conv2d`` (groups = ``c / i``), on the fastest path for it."""
    groups = x.shape[-1] // weight.shape[1]
    depthwise = groups > 1 and groups == x.shape[-1] == weight.shape[0]
    if depthwise and dilation == (1, 1):
        return _depthwise(x, weight, stride, padding)
    elif groups == 1:
        if isinstance(padding, str):
            kernel = weight.shape[2:]
            dilated = tuple((k - 1) * d + 1 for k, d in zip(kernel, dilation, strict=True))
            padding = tuple(jax.lax.padtype_to_pads(x.shape[1:3], dilated, stride, padding))
        if weight.shape[2:] == (1, 1):
            return _pointwise(x, weight, stride, padding)
        return _conv(x, weight, stride, padding, dilation)
    return jax.lax.conv_general_dilated(
        x,
        weight,
        window_strides=stride,
        padding=padding,
        rhs_dilation=dilation,
        dimension_numbers=_DIMENSIONS,
        feature_group_count=groups,
    )


def _pointwise(
    x: Float[Array, "n h w i"],
    weight: Float[Array, "o i 1 1"],
    stride: tuple[int, int],
    padding: tuple[tuple[int, int], tuple[int, int]],
) -> Float[Array, "n h2 w2 o"]:
    """A 1x1 convolution as one 2-D matrix product over ``n * h2 * w2`` rows (ResNet's
    bottleneck and shortcut convolutions, EfficientNet's expand/project).

    XLA:CPU (jaxlib 0.10) runs a 1x1 ``convolution`` 4-5x slower than the same product
    written as a ``dot`` on ResNet-50's large maps (``(32, 56, 56, 256) -> 64``: 116 ms vs
    23 ms on an AVX2 EPYC; ``benchmarks/README.md``); reverse mode then gives both
    gradients as plain GEMMs too (the kernel gradient ``g^T x`` contracts all rows at once).
    """
    if any(p for pair in padding for p in pair):
        x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    x = x[:, :: stride[0], :: stride[1]]
    out, channels = weight.shape[:2]
    rows = x.reshape(-1, channels) @ weight.reshape(out, channels).T
    return rows.reshape(*x.shape[:-1], out)


def _depthwise(
    x: Float[Array, "n h w c"],
    weight: Float[Array, "c 1 kh kw"],
    stride: tuple[int, int],
    padding: Padding,
) -> Float[Array, "n h2 w2 c"]:
    """Depthwise convolution as a sum of ``kh * kw`` shifted views of ``x``, each scaled per
    channel. XLA:CPU lowers ``feature_group_count`` convolutions to a slow generic loop;
    on EfficientNet's shapes this form is 4-7x faster forward and 3-8x faster in the
    backward pass (both are elementwise work that fuses)."""
    _, _, kh, kw = weight.shape
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(x.shape[1:3], (kh, kw), stride, padding)
    taps = jnp.moveaxis(weight[:, 0], 0, -1)  # (kh, kw, c)
    y = None
    for (i, j), view in _shifted_views(x, (kh, kw), stride, padding, (1, 1)):
        term = view * taps[i, j]
        y = term if y is None else y + term
    return y


def _shifted_views(x, kernel, stride, padding, dilation, fill=0.0):
    """``((i, j), view)`` per kernel tap: the strided window of the padded ``x`` (NHWC) that
    tap ``(i, j)`` multiplies, shaped like the convolution's output ``(n, h2, w2, c)``."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    x = jnp.pad(x, ((0, 0), *padding, (0, 0)), constant_values=fill)
    n, h, w, c = x.shape
    out_h = (h - (kh - 1) * dh - 1) // sh + 1
    out_w = (w - (kw - 1) * dw - 1) // sw + 1
    for i in range(kh):
        for j in range(kw):
            top, left = i * dh, j * dw
            view = jax.lax.slice(
                x,
                (0, top, left, 0),
                (n, top + (out_h - 1) * sh + 1, left + (out_w - 1) * sw + 1, c),
                (1, sh, sw, 1),
            )
            yield (i, j), view


def max_pool(
    x: Float[Array, "*n h w c"],
    kernel: int,
    stride: int,
    padding: int,
) -> Float[Array, "*n h2 w2 c"]:
    """Max pooling over ``kernel x kernel`` windows of one image ``(H, W, C)`` or a batch,
    padded with ``-inf`` (``torch.nn.MaxPool2d``).

    Written as a running maximum over the ``kernel ** 2`` shifted views: XLA:CPU runs
    ``reduce_window`` and its gradient (a ``select_and_scatter`` lowered to a scatter)
    ~5x slower on ResNet-50's stem (batch 32: 0.5 s of a 9 s training step). Ties send the
    gradient to the first maximum in the window, like PyTorch; NaN propagates.
    """
    batched = x.ndim == 4
    x = x if batched else x[None]
    pads = ((padding, padding), (padding, padding))
    best = None
    for _, view in _shifted_views(x, (kernel, kernel), (stride, stride), pads, (1, 1), -jnp.inf):
        best = view if best is None else jnp.where((view > best) | jnp.isnan(view), view, best)
    return best if batched else best[0]


_DIMENSIONS = ("NHWC", "OIHW", "NHWC")


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _conv(
    x: Float[Array, "n h w i"],
    weight: Float[Array, "o i kh kw"],
    stride: tuple[int, int],
    padding: tuple[tuple[int, int], tuple[int, int]],
    dilation: tuple[int, int],
) -> Float[Array, "n h2 w2 o"]:
    """Ungrouped convolution with a kernel larger than 1x1, NHWC activations, OIHW kernel.
    Its value, and its derivative with respect to ``x``, are XLA's; its derivative with
    respect to the kernel is written as matrix products (``_kernel_term``) instead of the
    convolution that JAX's transpose rule emits for it.

    That convolution has the whole feature map as its window and runs behind full-size
    transposes of both operands: on ResNet-50 (batch 32, 2-core AVX2 EPYC, jaxlib 0.10)
    12 GFLOP/s for the 3x3 kernels at 56x56 and 10 for the 7x7 stem. As ``kh * kw``
    products of shifted views (``_kernel_term``) the 3x3 kernel gradients run 1.1-2.9x
    faster, the stem's 2.1x (``benchmarks/README.md``). XLA:CPU's default scheduler
    computes those views early and keeps them alive (+1.6 GB on ResNet-50 at batch 32);
    ``make_step`` compiles with the memory-optimised one, which does not.
    """
    return jax.lax.conv_general_dilated(
        x, weight, stride, padding, rhs_dilation=dilation, dimension_numbers=_DIMENSIONS
    )


def _conv_jvp(stride, padding, dilation, primals, tangents):
    x, weight = primals
    dx, dweight = tangents
    y = _conv(x, weight, stride, padding, dilation)
    dy = None
    if not isinstance(dx, SymbolicZero):
        dy = _conv(dx, weight, stride, padding, dilation)
    if not isinstance(dweight, SymbolicZero):
        # Checkpointed: the backward pass slices its shifted views of ``x`` when it needs
        # them instead of keeping ``kh * kw`` copies of ``x`` alive from the forward pass.
        term = jax.checkpoint(_kernel_term, static_argnums=(2, 3, 4))(
            x, dweight, stride, padding, dilation
        )
        dy = term if dy is None else dy + term
    if dy is None:
        dy = jnp.zeros_like(y)
    return y, dy


_conv.defjvp(_conv_jvp, symbolic_zeros=True)


def _kernel_term(
    x: Float[Array, "n h w i"],
    dweight: Float[Array, "o i kh kw"],
    stride: tuple[int, int],
    padding: tuple[tuple[int, int], tuple[int, int]],
    dilation: tuple[int, int],
) -> Float[Array, "n h2 w2 o"]:
    """``conv(x, dweight)`` as matrix products over shifted views of ``x``: the same value,
    linear in ``dweight``.

    Only its transpose matters: reverse mode turns it into the kernel gradient. With enough
    input channels, one product per kernel tap, ``dW[:, :, i, j] = g^T view_ij``; with few
    (the 3-channel stem), the views side by side (im2col, ``kh * kw * i`` columns) and one
    product for the whole kernel, since a product with 3 columns per tap is all overhead
    (49 of them: 2.5x slower). Under ``jax.vmap`` the batch is one more contraction
    dimension of the same products (per-example gradients, ``grad`` inside ``vmap``, stay
    per example).
    """
    out, channels, kh, kw = dweight.shape
    views = _shifted_views(x, (kh, kw), stride, padding, dilation)
    if channels < _IM2COL_BELOW_CHANNELS:
        patches = jnp.concatenate([view for _, view in views], axis=-1)  # (..., taps * i)
        kernel = dweight.transpose(0, 2, 3, 1).reshape(out, -1)  # taps-major, like patches
        rows = patches.reshape(-1, patches.shape[-1]) @ kernel.T
        return rows.reshape(*patches.shape[:-1], out)
    y = None
    for (i, j), view in views:
        # one 2-D product: its transpose (the kernel gradient) is a plain GEMM; with
        # (n, h, w) left as separate contraction axes XLA:CPU transposes first, ~2x slower
        term = view.reshape(-1, view.shape[-1]) @ dweight[:, :, i, j].T
        term = term.reshape(*view.shape[:-1], out)
        y = term if y is None else y + term
    return y


# Below this many input channels the kernel gradient takes the im2col form (measured: the
# 3-channel 7x7 stem 2.1x faster that way; 3x3 kernels on 64+ channels faster per tap).
_IM2COL_BELOW_CHANNELS = 16


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


# --------------------------------------------------------------------------------------
# Low-rank adapters (LoRA, DoRA): built by ``eqxtl.lora``, see ``eqxtl/adapters.py``
# --------------------------------------------------------------------------------------


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

    weight: Float[Array, "out in"]
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

    weight: Float[Array, "out in kh kw"]
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
            return _convolve(
                inputs, self.weight.astype(x.dtype), self.stride, self.padding, self.dilation
            )

        def low_rank(inputs):
            h = _convolve(inputs, self.lora_a.astype(x.dtype), self.stride, self.padding, (1, 1))
            b = self.lora_b.reshape(self.lora_b.shape[0], self.rank).astype(x.dtype)
            # B as one 2-D GEMM over all rows (its gradient too), like ``dense``
            rows = h.reshape(-1, self.rank) * self.scale
            return (rows @ b.T).reshape(*h.shape[:-1], b.shape[0])

        y = _adapted(self, x, base(x), base, low_rank, key)
        if self.bias is not None:
            y = y + self.bias.astype(y.dtype)
        return y if batched else y[0]


def _lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def _dora_scale(layer) -> Array:
    """``m / ||W + s B A||`` per output channel, a constant for the backward pass (PEFT,
    DoRA paper 4.3), computed in float32."""
    weight = layer.weight.astype(jnp.float32) + layer.delta().astype(jnp.float32)
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
    g = _dora_scale(layer).astype(y.dtype)
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
    weight = layer.weight.astype(x.dtype)
    y = rows @ weight.T
    if isinstance(layer, LoRALinear):

        def low_rank(inputs):
            a, b = layer.lora_a.astype(x.dtype), layer.lora_b.astype(x.dtype)
            return ((inputs @ a.T) * layer.scale) @ b.T

        y = _adapted(layer, rows, y, lambda inputs: inputs @ weight.T, low_rank, key)
    y = y.reshape(*x.shape[:-1], weight.shape[0])
    return y if layer.bias is None else y + layer.bias.astype(x.dtype)


def checkpointed(fn, enabled: bool):
    """``eqx.filter_checkpoint(fn)`` if ``enabled``, else ``fn`` (for the models' block loops;
    ``eqxtl.with_remat`` sets the flag)."""
    return eqx.filter_checkpoint(fn) if enabled else fn


def with_static_flag(model, name: str, value: bool, what: str, supported: str):
    """A copy of ``model`` (any pytree) with the static boolean field ``name`` set to
    ``value`` in every module that has one (arrays shared, not copied); for the opt-in
    switches ``eqxtl.with_remat`` and ``eqxtl.with_scan``.

    Raises ``EqxtlError`` if no module has the field: the option would do nothing.
    ``what`` names the option and ``supported`` the models that have it, in the message.
    """
    from ..errors import EqxtlError

    def has_flag(x) -> bool:
        return isinstance(x, eqx.Module) and any(f.name == name for f in dataclasses.fields(x))

    found = False

    def set_flag(x):
        nonlocal found
        if has_flag(x):
            found = True
            return replace_static(x, **{name: bool(value)})
        return x

    out = jax.tree_util.tree_map(set_flag, model, is_leaf=has_flag)
    if not found:
        raise EqxtlError(
            f"{type(model).__name__} has no module with a '{name}' flag: {what} is supported "
            f"for {supported} (and classifiers built on them)."
        )
    return out


def replace_static(module: eqx.Module, **fields) -> eqx.Module:
    """``module`` with static fields replaced, the other fields shared.

    A static field is not a pytree leaf, so ``eqx.tree_at`` cannot reach it, and
    ``dataclasses.replace`` would call the module's own ``__init__`` (which builds layers
    from a config). This copies the fields onto a fresh instance, as Equinox's own
    unflattening does.
    """
    new = object.__new__(type(module))
    for field in dataclasses.fields(module):
        object.__setattr__(new, field.name, getattr(module, field.name))
    for name, value in fields.items():
        object.__setattr__(new, name, value)
    return new


# --------------------------------------------------------------------------------------
# Position-embedding resampling (fine-tuning at another resolution)
# --------------------------------------------------------------------------------------


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def _bicubic_matrix(n_in: int, n_out: int, antialias: bool) -> np.ndarray:
    """``(n_out, n_in)`` weights of PyTorch's 1-D bicubic interpolation, ``align_corners=
    False``: without antialias, Keys' kernel a = -0.75 with edge-replicated taps
    (``F.interpolate(mode="bicubic")``); with it, a = -0.5, a support widened by the
    downscale factor and weights renormalised inside the image (``antialias=True``, PIL's
    filter)."""
    scale = n_in / n_out
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        if antialias:
            center = (i + 0.5) * scale
            stretch = max(scale, 1.0)
            lo = max(int(center - 2 * stretch + 0.5), 0)
            hi = min(int(center + 2 * stretch + 0.5), n_in)
            taps = np.arange(lo, hi)
            w = _cubic((taps - center + 0.5) / stretch, -0.5)
            m[i, taps] += w / w.sum()
        else:
            src = (i + 0.5) * scale - 0.5
            base = math.floor(src)
            for k in range(-1, 3):
                m[i, min(max(base + k, 0), n_in - 1)] += _cubic(np.array(src - (base + k)), -0.75)
    return m


def resample_grid(
    grid: Float[np.ndarray, "h w d"], size: tuple[int, int], *, antialias: bool = False
) -> Float[np.ndarray, "h2 w2 d"]:
    """Bicubic resize of a ``(h, w, d)`` grid of position embeddings to ``size``, as
    PyTorch's ``F.interpolate(mode="bicubic", align_corners=False)`` does (what timm's
    ``resample_abs_pos_embed`` and transformers' ``interpolate_pos_encoding`` call; DINOv2
    passes ``antialias=True``). Computed in float64, returned in the input's dtype."""
    h, w, _ = grid.shape
    mh = _bicubic_matrix(h, size[0], antialias)
    mw = _bicubic_matrix(w, size[1], antialias)
    out = np.einsum("ih,hwd,jw->ijd", mh, np.asarray(grid, np.float64), mw)
    return out.astype(grid.dtype)


# --------------------------------------------------------------------------------------
# Transformer pieces (CLIP, ViT, DINOv2, SigLIP, Mixer)
# --------------------------------------------------------------------------------------

ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh", "silu")
"""transformers' names: ``gelu`` is exact (erf); ``gelu_new`` / ``gelu_pytorch_tanh`` the tanh
approximation (flax's ``nn.gelu``); ``quick_gelu`` openai CLIP's ``x * sigmoid(1.702 x)``."""


def activation(name: str, x: Array) -> Array:
    """The activation transformers calls ``name`` (one of ``ACTIVATIONS``)."""
    if name == "quick_gelu":
        return x * jax.nn.sigmoid(1.702 * x)
    if name == "silu":
        return jax.nn.silu(x)
    # jax.nn.gelu defaults to the tanh approximation; transformers' "gelu" is exact (erf).
    return jax.nn.gelu(x, approximate=name != "gelu")


def split_key(key: PRNGKeyArray | None, n: int) -> list:
    """``n`` keys from ``key`` (``n`` times ``None`` without one): what a block hands its
    layers for dropout (e.g. of LoRA adapters)."""
    return [None] * n if key is None else list(jax.random.split(key, n))


def linear(in_features: int, out_features: int, key: PRNGKeyArray, use_bias: bool = True):
    """``eqx.nn.Linear`` (weights ``(out, in)``, as torch)."""
    return eqx.nn.Linear(in_features, out_features, use_bias=use_bias, key=key)


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

    o = jax.nn.dot_product_attention(split(q), split(k), split(v), is_causal=causal)
    return o.reshape(q.shape)


def resample_grid_traced(
    grid: Float[Array, "h w d"], size: tuple[int, int], *, antialias: bool = False
) -> Float[Array, "h2 w2 d"]:
    """``resample_grid`` inside a traced computation (the resize of transformers' DINOv2 on
    every forward): the same torch-exact weights as float32 constants, differentiable in
    ``grid``, computed in float32 as transformers does."""
    h, w, _ = grid.shape
    mh = jnp.asarray(_bicubic_matrix(h, size[0], antialias), jnp.float32)
    mw = jnp.asarray(_bicubic_matrix(w, size[1], antialias), jnp.float32)
    out = jnp.einsum(
        "ih,hwd,jw->ijd", mh, grid.astype(jnp.float32), mw, precision=jax.lax.Precision.HIGHEST
    )
    return out.astype(grid.dtype)


def resample_positions(
    pos: Float[np.ndarray, "n d"],
    prefix: int,
    grid: tuple[int, int],
    size: tuple[int, int],
    *,
    antialias: bool = False,
) -> Float[np.ndarray, "m d"]:
    """Position embeddings ``(prefix + gh * gw, d)`` of a ``grid = (gh, gw)`` of patches
    (row-major, after ``prefix`` class / register positions) resampled to a ``size`` grid
    with ``resample_grid``; the prefix positions are kept as they are."""
    pos = np.asarray(pos)
    if grid == tuple(size):
        return pos
    patches = pos[prefix:].reshape(*grid, pos.shape[-1])
    new = resample_grid(patches, tuple(size), antialias=antialias)
    return np.concatenate([pos[:prefix], new.reshape(-1, pos.shape[-1])])


def image_hw(value, name: str = "image_size") -> tuple[int, int]:
    """``(h, w)`` from an int or an ``(h, w)`` pair (a config's image or patch size)."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or (height, width), got {value!r}.")
        return int(value[0]), int(value[1])
    return int(value), int(value)
