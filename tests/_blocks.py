"""Shared check: a backbone's blocks serve ``last_blocks``, layer-wise decay and remat
(any architecture: the paths are arguments)."""

import jax
import numpy as np
import optax

import eqxtl


def assert_blocks_work(backbone, state, x, blocks: list[str], inside: str, stem: str, top: str):
    """``blocks`` (backbone paths, in order) are what ``eqxtl.blocks`` finds in a Classifier;
    ``last_blocks(1)`` trains ``{last block}.{inside}`` and not the first block's; depths:
    ``stem`` 0, blocks 1..L, ``top`` and the head L + 1; ``layerwise_groups`` one per depth;
    ``with_remat`` gives the same features."""
    model = eqxtl.Classifier(backbone, 3, key=jax.random.key(0))
    assert eqxtl.blocks(model) == [f"backbone.{b}" for b in blocks]
    spec = eqxtl.trainable(model, "head", *eqxtl.last_blocks(model, 1))
    trained = {p for p, on in zip(eqxtl.paths(model), jax.tree.leaves(spec), strict=True) if on}
    assert f"backbone.{blocks[-1]}.{inside}" in trained and "head.weight" in trained
    assert f"backbone.{blocks[0]}.{inside}" not in trained and f"backbone.{top}" not in trained
    depth_of, n = eqxtl.layer_depths(model)
    assert n == len(blocks)
    assert depth_of(f"backbone.{stem}") == 0
    assert depth_of(f"backbone.{blocks[-1]}.{inside}") == n
    assert depth_of(f"backbone.{top}") == depth_of("head.weight") == n + 1
    assert len(eqxtl.layerwise_groups(model, optax.sgd, 1.0, 0.5)) == n + 2
    want = backbone(x, state)[0]
    np.testing.assert_allclose(eqxtl.with_remat(backbone)(x, state)[0], want, rtol=1e-6)
