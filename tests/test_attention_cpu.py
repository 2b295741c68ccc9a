"""``multihead_attention``'s CPU path (a loop over a few images at a time, from 64 tokens on)
against ``jax.nn.dot_product_attention``: values and gradients, any leading axes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqxtl.models.layers.transformer import _CHUNKED_MIN_TOKENS, multihead_attention

HEADS, DIM = 2, 16


def _reference(q, k, v):
    def split(y):  # jax's takes one batch axis at most
        return y.reshape(-1, y.shape[-2], HEADS, DIM // HEADS)

    return jax.nn.dot_product_attention(split(q), split(k), split(v)).reshape(q.shape)


@pytest.mark.parametrize(
    ("lead", "tq", "dtype"),
    [((5,), 70, jnp.float32), ((2, 3), 65, jnp.bfloat16)],
)
def test_matches_dot_product_attention(lead, tq, dtype):
    assert jax.default_backend() == "cpu" and tq >= _CHUNKED_MIN_TOKENS  # the path tested
    rng = np.random.default_rng(0)
    q, k, v = (
        jnp.asarray(rng.normal(size=(*lead, t, DIM)), dtype) for t in (tq, 67, 67)
    )  # cross-attention: tq queries, 67 keys

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v).astype(jnp.float32) ** 2)

    ours = jax.jit(multihead_attention, static_argnums=3)(q, k, v, HEADS)
    ref = jax.jit(_reference)(q, k, v)
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.float32(ours), np.float32(ref), rtol=tol, atol=tol)
    grads = jax.jit(
        jax.grad(lambda *a: loss(lambda *b: multihead_attention(*b, HEADS), *a), (0, 1, 2))
    )
    ref_grads = jax.jit(jax.grad(lambda *a: loss(_reference, *a), (0, 1, 2)))
    for g, r in zip(grads(q, k, v), ref_grads(q, k, v), strict=True):
        scale = float(jnp.max(jnp.abs(r.astype(jnp.float32))))
        np.testing.assert_allclose(np.float32(g), np.float32(r), rtol=tol, atol=tol * scale)
