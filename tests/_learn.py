"""Shared learnability check: a frozen backbone with a new linear head learns a separable
toy task (the quickstart recipe, on a tiny random backbone)."""

import jax
import optax

import eqxtl
from tests.test_fit import colour_task


def assert_frozen_backbone_learns(backbone, state, *, minimum: float = 0.9):
    """``fit`` trains only the head on ``colour_task``; held-out accuracy >= ``minimum``."""
    model = eqxtl.Classifier(backbone, 3, key=jax.random.key(1))
    result = eqxtl.fit(
        model,
        state,
        optax.adam(1e-2),
        eqxtl.trainable(model, "head"),
        colour_task(96, seed=0),
        test_data=colour_task(48, seed=1),
        epochs=8,
        batch_size=16,
        progress=False,
    )
    assert result.final["test_accuracy"] >= minimum, result.history
    for a, b in zip(jax.tree.leaves(result.model.backbone), jax.tree.leaves(backbone), strict=True):
        assert (a == b).all()  # frozen: bit-identical after training
