"""The depthwise fast path of ``eqxtl.Conv2d`` equals XLA's grouped convolution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqxtl


@pytest.mark.parametrize(
    "size, kernel, stride, padding",
    [
        (17, 3, 1, 1),
        (17, 3, 2, "SAME"),
        (16, 5, 2, "SAME"),
        (15, 5, 1, ((1, 3), (2, 2))),
        (9, 3, 2, 0),
    ],
)
def test_depthwise_matches_grouped_convolution(size, kernel, stride, padding):
    channels = 6
    conv = eqxtl.Conv2d(
        channels,
        channels,
        kernel,
        stride=stride,
        padding=padding,
        groups=channels,
        key=jax.random.key(0),
    )
    x = jax.random.normal(jax.random.key(1), (size, size, channels))

    def reference(conv, x):
        y = jax.lax.conv_general_dilated(
            x[None],
            conv.weight,
            conv.stride,
            conv.padding,
            dimension_numbers=("NHWC", "OIHW", "NHWC"),
            feature_group_count=channels,
        )[0]
        return y + conv.bias

    np.testing.assert_allclose(conv(x), reference(conv, x), rtol=1e-5, atol=1e-5)

    def loss(fn):
        return lambda conv, x: jnp.sum(jnp.sin(fn(conv, x)))

    got = jax.grad(loss(lambda c, x: c(x)), argnums=(0, 1))(conv, x)
    want = jax.grad(loss(reference), argnums=(0, 1))(conv, x)
    np.testing.assert_allclose(got[0].weight, want[0].weight, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-5)
