"""The optimizer run once per row, vectorised over stacked blocks (eqxtl.tuning._rowwise):
exact where the check accepts it, refused where a transform couples rows or leaves."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eqxtl
from eqxtl.tuning._rowwise import Vectorised, rowwise_refusal
from tests._tiny import TINY_CLIP

LAYERS = "backbone.encoder.layers."


@pytest.fixture(scope="module")
def tiny():
    """A tiny CLIP classifier (4 blocks), its trainable half (everything) and the blocks as
    rows: two segments (blocks 0-1 and 2-3), the other leaves outside."""
    backbone = eqxtl.from_config(TINY_CLIP)[0]
    model = eqxtl.Classifier(backbone, 3, key=jax.random.key(1))
    params = eqx.filter(model, eqx.is_inexact_array)
    paths = eqxtl.paths(params)
    rows = [[i for i, p in enumerate(paths) if p.startswith(f"{LAYERS}{r}.")] for r in range(4)]
    return params, [rows[:2], rows[2:]]


def _grads(params, t):
    """A deterministic gradient per step, different for every leaf and row."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(100 + t), len(leaves))
    return jax.tree.unflatten(
        treedef, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    )


def _run_both(optimizer, params, segments, steps=3):
    """The parameters after ``steps`` updates, per row (optax as is) and vectorised."""
    vec = Vectorised(optimizer, params, segments)
    reference, ref_state = params, optimizer.init(params)
    packed = vec.pack(params)
    state = vec.init(packed)
    update = jax.jit(vec.update)
    for t in range(steps):
        g = _grads(params, t)
        u, ref_state = optimizer.update(g, ref_state, reference)
        reference = optax.apply_updates(reference, u)
        u, state = update(vec.pack(g), state, packed)
        packed = optax.apply_updates(packed, u)
    return reference, vec.unpack(packed)


def _layerwise(params):
    labels = jax.tree.map(lambda _: "rest", params)
    for r in range(4):
        labels = eqx.tree_at(
            lambda t, r=r: t.backbone.encoder.layers[r],
            labels,
            jax.tree.map(lambda _, r=r: f"d{r}", params.backbone.encoder.layers[r]),
        )
    return labels


EXACT = {
    "adam": optax.adam(1e-2),
    "adamw, eqxtl.decay_mask": optax.adamw(1e-2, weight_decay=0.3, mask=eqxtl.decay_mask),
    "adamw, an ndim mask": optax.adamw(
        1e-2, weight_decay=0.3, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
    ),
    "sgd, nesterov": optax.sgd(0.1, momentum=0.9, nesterov=True),
    "lamb (a trust ratio per leaf)": optax.lamb(1e-2),
    "adafactor (factored per leaf)": optax.adafactor(1e-2, min_dim_size_to_factor=8),
    "clip_by_block_rms (per leaf)": optax.chain(optax.clip_by_block_rms(0.5), optax.adam(1e-2)),
    "a schedule": optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 10)),
}


@pytest.mark.parametrize("name", list(EXACT))
def test_accepted_optimizers_give_the_per_row_result(tiny, name):
    params, segments = tiny
    optimizer = EXACT[name]
    assert rowwise_refusal(optimizer, params, segments) is None
    reference, vectorised = _run_both(optimizer, params, segments)
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(vectorised), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


def test_a_per_leaf_transform_on_the_stacked_leaf_would_be_wrong(tiny):
    """Why the rows are vmapped, not handed to the optimizer stacked: an ndim mask would
    decay the stacked biases, and LAMB's trust ratio would span both rows."""
    params, segments = tiny
    for optimizer in (EXACT["adamw, an ndim mask"], EXACT["lamb (a trust ratio per leaf)"]):
        vec = Vectorised(optimizer, params, segments)
        packed, g = vec.pack(params), vec.pack(_grads(params, 0))
        naive, _ = optimizer.update(g, optimizer.init(packed), packed)
        right, _ = jax.jit(vec.update)(g, vec.init(packed), packed)
        differ = [
            not np.allclose(a, b, rtol=1e-4)
            for a, b in zip(jax.tree.leaves(naive[0]), jax.tree.leaves(right[0]), strict=True)
        ]
        assert any(differ)


def _coupled_init():
    """State scaled by the sum over every parameter, then used leaf by leaf."""

    def init(params):
        total = sum(jnp.sum(x) for x in jax.tree.leaves(params))
        return jax.tree.map(lambda x: x * total, params)

    def update(updates, state, params=None):
        return jax.tree.map(jnp.multiply, updates, state), state

    return optax.GradientTransformation(init, update)


REFUSED = {
    "clip_by_global_norm (reads every gradient)": (
        lambda p: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)),
        "reads",
    ),
    "MultiSteps (one finiteness flag over every gradient)": (
        lambda p: optax.MultiSteps(optax.adam(1e-2), 2),
        "reads",
    ),
    "add_noise (a key split per leaf)": (
        lambda p: optax.chain(optax.add_noise(0.1, 0.5, 0), optax.adam(1e-2)),
        "differ",
    ),
    "an init that reads every parameter": (lambda p: _coupled_init(), "initial state"),
    "a learning rate per block (layer-wise decay)": (
        lambda p: optax.multi_transform(
            {"rest": optax.adam(1e-2), **{f"d{r}": optax.adam(1e-2 * 0.5**r) for r in range(4)}},
            lambda _: _layerwise(p),  # a Module-shaped tree is callable: pass a function
        ),
        "differ",
    ),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_coupled_or_per_row_optimizers_are_refused(tiny, name):
    params, segments = tiny
    build, words = REFUSED[name]
    reason = rowwise_refusal(build(params), params, segments)
    assert reason is not None and words in reason
    with pytest.raises(eqxtl.OptimizerMismatchError, match="once per row"):
        Vectorised(build(params), params, segments)


def _scaled_per_block(params, rate):
    """One Adam state shared by every block, then a per-block ``optax.scale``: the rows'
    updates differ only in one constant."""
    labels = _layerwise(params)
    per_block = {f"d{r}": optax.scale(-rate(r)) for r in range(4)}
    return optax.chain(
        optax.scale_by_adam(),
        optax.multi_transform({**per_block, "rest": optax.scale(-1e-3)}, lambda _: labels),
    )


@pytest.mark.parametrize("scalar", [np.float32, jnp.float32])
def test_rows_that_differ_only_in_a_constant_are_refused(tiny, scalar):
    # constants were compared by repr, which prints numpy and jax scalars with numpy's
    # print options (8 decimals by default): these rates looked equal and every block
    # trained at block 0's
    params, segments = tiny
    close = _scaled_per_block(params, lambda r: scalar(1e-3 * (1 + 1e-6 * r)))
    assert "differ" in rowwise_refusal(close, params, segments)
    with np.printoptions(precision=2):
        apart = _scaled_per_block(params, lambda r: scalar(1e-3 * (1 + 0.2 * r)))
        assert "differ" in rowwise_refusal(apart, params, segments)
    same = _scaled_per_block(params, lambda r: scalar(1e-3))
    assert rowwise_refusal(same, params, segments) is None


def test_constants_a_nested_jit_closes_over_are_compared(tiny):
    # a nested jax.jit keeps the arrays it closes over inside its sub-program, which prints
    # without them: a mask per block looked like the same program in every row
    params, segments = tiny
    rng = np.random.default_rng(0)
    masks = jax.tree.map(lambda x: jnp.asarray(rng.random(x.shape) < 0.5, x.dtype), params)

    def update(updates, state, params=None):
        masked = jax.tree.map(lambda g, m: jax.jit(lambda g: g * m)(g), updates, masks)
        return masked, state

    sparse = optax.GradientTransformation(lambda p: optax.EmptyState(), update)
    reason = rowwise_refusal(optax.chain(sparse, optax.adam(1e-2)), params, segments)
    assert reason is not None and "differ" in reason


def test_per_block_rates_within_one_segment_only_are_refused_there(tiny):
    """Blocks 0-1 share a rate and blocks 2-3 another: each segment's rows agree."""
    params, segments = tiny
    labels = _layerwise(params)
    same = {"d0": "a", "d1": "a", "d2": "b", "d3": "b", "rest": "rest"}
    labels = jax.tree.map(lambda lab: same[lab], labels)
    optimizer = optax.multi_transform(
        {"a": optax.adam(1e-2), "b": optax.adam(1e-3), "rest": optax.sgd(1e-2)}, lambda _: labels
    )
    assert rowwise_refusal(optimizer, params, segments) is None
    assert "differ" in rowwise_refusal(optimizer, params, [segments[0][:1] + segments[1][:1]])
    reference, vectorised = _run_both(optimizer, params, segments, steps=2)
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(vectorised), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


def test_pack_and_unpack_are_inverse(tiny):
    params, segments = tiny
    vec = Vectorised(optax.adam(1e-3), params, segments)
    stacks, rest = vec.pack(params)
    assert [s[0].shape[0] for s in stacks] == [2, 2]
    back = vec.unpack((stacks, rest))
    assert jax.tree.structure(back) == jax.tree.structure(params)
    assert all(
        bool(jnp.array_equal(a, b))
        for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True)
    )
