"""Rematerialisation (``eqxtl.with_remat``) changes memory, never values or gradients."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eqxtl
from tests._tiny import tiny

IMAGE = 32
NUM_CLASSES = 3


def classifier(arch: str):
    backbone, state = tiny(arch)
    return eqxtl.Classifier(backbone, NUM_CLASSES, key=jax.random.key(1)), state


def batch(seed: int = 0, size: int = 4):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.normal(size=(size, 3, IMAGE, IMAGE)).astype(np.float32),
        "label": rng.integers(0, NUM_CLASSES, size).astype(np.int32),
    }


def loss_and_grads(model, state):
    """Full fine-tuning loss, gradients and new state (BatchNorm in training mode)."""
    spec = eqxtl.everything(model)
    loss_fn = eqxtl.task_loss()

    @eqx.filter_jit
    def run(model, state, data):
        def loss_of(m):
            return loss_fn(eqxtl.batchnorm_modes(m, spec), state, data, None)

        (loss, (new_state, _)), grads = eqx.filter_value_and_grad(loss_of, has_aux=True)(model)
        return loss, grads, new_state

    return run(model, state, batch())


def flags(model) -> list[bool]:
    return [
        m.remat
        for m in jax.tree.leaves(model, is_leaf=lambda x: hasattr(x, "remat"))
        if hasattr(m, "remat")
    ]


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    la = jax.tree.leaves(eqx.filter(a, eqx.is_array))
    lb = jax.tree.leaves(eqx.filter(b, eqx.is_array))
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.parametrize("arch", ["clip", "resnet"])
def test_flag_is_set_and_cleared(arch):
    model, _ = classifier(arch)
    assert flags(model) == [False]
    on = eqxtl.with_remat(model)
    assert flags(on) == [True]
    assert flags(eqxtl.with_remat(on, False)) == [False]
    assert flags(model) == [False]  # the original is untouched
    # Same leaves (shared, not copied), same paths.
    assert all(
        x is y
        for x, y in zip(
            jax.tree.leaves(eqx.filter(model, eqx.is_array)),
            jax.tree.leaves(eqx.filter(on, eqx.is_array)),
            strict=True,
        )
    )
    assert eqxtl.paths(on) == eqxtl.paths(model)


@pytest.mark.parametrize("arch", ["clip", "resnet"])
def test_same_loss_gradients_and_state(arch):
    model, state = classifier(arch)
    loss, grads, new_state = loss_and_grads(model, state)
    loss_r, grads_r, new_state_r = loss_and_grads(eqxtl.with_remat(model), state)
    np.testing.assert_allclose(float(loss_r), float(loss), rtol=1e-5)
    assert_trees_close(grads_r, grads)
    assert_trees_close(new_state_r, new_state)
    if arch == "resnet":  # BatchNorm in training mode: running statistics were updated
        assert jax.tree.leaves(eqx.filter(new_state, eqx.is_array))
    # The gradients are not trivially zero.
    leaves = jax.tree.leaves(eqx.filter(grads, eqx.is_array))
    assert leaves and any(float(jnp.abs(g).max()) > 0 for g in leaves)


def test_remat_actually_recomputes():
    """The compiled backward pass holds checkpoint markers: the flag reaches the model."""
    model, state = classifier("clip")
    loss_fn = eqxtl.task_loss()

    def grads_jaxpr(m):
        def loss_of(m):
            return loss_fn(m, state, batch(), None)[0]

        return str(jax.make_jaxpr(eqx.filter_grad(loss_of))(m))

    assert "checkpoint" not in grads_jaxpr(model) and "remat" not in grads_jaxpr(model)
    jaxpr = grads_jaxpr(eqxtl.with_remat(model))
    assert "checkpoint" in jaxpr or "remat" in jaxpr


@pytest.mark.parametrize("arch", ["clip", "resnet"])
def test_train_step_and_save_load(arch, tmp_path):
    model, state = classifier(arch)
    model = eqxtl.with_remat(model)
    spec = eqxtl.everything(model)
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(eqx.filter(model, spec))
    step = eqxtl.make_step(eqxtl.task_loss(), optimizer, spec)
    model, state, opt_state, metrics = step(model, state, opt_state, batch(), jax.random.key(0))
    assert np.isfinite(float(metrics["loss"]))
    assert flags(model) == [True]

    eqxtl.save_pretrained(model, state, tmp_path / "m")
    loaded, loaded_state = eqxtl.from_pretrained(tmp_path / "m", keep_head=True)
    assert flags(loaded) == [False]  # a runtime option, not part of the checkpoint
    assert_trees_close(eqx.filter(loaded, eqx.is_array), eqx.filter(model, eqx.is_array), 0, 0)
    assert_trees_close(loaded_state, state, 0, 0)
    # And a loaded model takes the flag like any other.
    assert flags(eqxtl.with_remat(loaded)) == [True]


def test_nothing_to_remat_is_an_error():
    with pytest.raises(ValueError, match="remat"):
        eqxtl.with_remat({"w": jnp.ones(3)})
