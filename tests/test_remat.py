"""Rematerialisation (``eqxtl.with_remat``) in a train step, and not saved; that it changes
no value or gradient of any architecture: tests/test_architectures.py."""

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


@pytest.mark.parametrize("arch", ["resnet"])  # BatchNorm state through the step
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
