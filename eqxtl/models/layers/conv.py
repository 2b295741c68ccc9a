"""Convolution and pooling on channels-last images (``Conv2d``, ``max_pool``).

Weights keep PyTorch's layout ``(out, in/groups, kh, kw)``; activations are channels-last
``(H, W, C)``: XLA's CPU and GPU convolution kernels favour NHWC, and a channel-first graph
gets transposes around every convolution. Backbones transpose once at their input.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero
from jaxtyping import Array, Float, PRNGKeyArray

from .quantized import Int8Weight, apply_weight
from .schedule import stored_gradient

Padding = str | Sequence[tuple[int, int]]


class Conv2d(eqx.Module):
    """2-D convolution on one channels-last image ``(H, W, C_in) -> (H', W', C_out)``.

    ``padding`` is an int (symmetric, like PyTorch), explicit ``((top, bottom), (left, right))``
    pairs, or ``"SAME"`` for TensorFlow's asymmetric same-padding (checkpoints converted
    from TF need it; PyTorch-trained ones need the symmetric form: XLA's ``SAME`` puts the
    extra pixel at the end, a one-pixel shift against torch).
    """

    weight: Float[Array, "out in_per_group kh kw"] | Int8Weight  # int8: eqxtl.quantize
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
        y = apply_weight(
            lambda v, w: _convolve(v, w, self.stride, self.padding, self.dilation), x, self.weight
        )
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
    # The depthwise, pointwise and kernel-gradient paths were chosen by measurement on
    # XLA:CPU. On a GPU, XLA's own convolutions are cuDNN's, and XLA:GPU's Triton GEMM fusion
    # aborts on ResNet-50's training step written with those paths (jaxlib 0.11.2, H200:
    # "triton_tiling_propagation Check failed: subdim_size_accumulator == dim_size").
    on_cpu = jax.default_backend() == "cpu"
    depthwise = groups > 1 and groups == x.shape[-1] == weight.shape[0]
    if on_cpu and depthwise and dilation == (1, 1):
        return _depthwise(x, weight, stride, padding)
    if on_cpu and groups == 1:
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
    # Both cotangents stored: each is read by kh * kw tap terms (schedule.stored_gradient).
    x = stored_gradient(x)
    y = None
    for (i, j), view in _shifted_views(x, (kh, kw), stride, padding, (1, 1)):
        term = view * weight[:, 0, i, j]  # per channel (no transposed copy of the kernel)
        y = term if y is None else y + term
    return stored_gradient(y)


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
