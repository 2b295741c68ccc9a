"""Shared check: a batch-native backbone gives what the per-example ``jax.vmap`` path gives."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import eqxtl


def assert_batch_native_matches_vmap(model, state, x, *, state_tol, grad_tol):
    """``eqxtl.batched(model)`` (one call on the whole batch) against ``jax.vmap`` over the
    examples: the loss (rtol 1e-5), the updated state and every gradient, within
    ``state_tol`` / ``grad_tol`` = ``(rtol, atol)``."""
    assert model.batch_native
    n = x.shape[0]
    labels = jnp.arange(n) % 3

    def clone(state):  # eqx.nn.State is single-use: each path gets its own
        return jax.tree.unflatten(*reversed(jax.tree.flatten(state)))

    def loss(model, forward):
        logits, new_state = forward(model)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(n), labels]), new_state

    def native(m):
        return eqxtl.batched(m)(x, clone(state))

    def vmapped(m):
        s = clone(state)
        return jax.vmap(lambda xi: m(xi, s), axis_name="batch", out_axes=(0, None))(x)

    # one compiled computation per path: op-by-op dispatch of a whole backbone and its
    # gradient costs minutes on 2 cores
    value_and_grad = eqx.filter_jit(eqx.filter_value_and_grad(loss, has_aux=True))
    (got, got_state), got_grads = value_and_grad(model, native)
    (want, want_state), want_grads = value_and_grad(model, vmapped)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got_state), jax.tree.leaves(want_state), strict=True):
        np.testing.assert_allclose(a, b, rtol=state_tol[0], atol=state_tol[1])
    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=grad_tol[0], atol=grad_tol[1])
