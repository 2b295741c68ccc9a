"""Freezing as data: filter specs, per-group optimizers, and the train step."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eqxtl
from eqxtl._util.pytree_paths import leaves_with_paths
from eqxtl.models.clip import LayerNorm
from tests._tiny import tiny

IMAGE = 32
NUM_CLASSES = 3


def classifier(arch: str, seed: int = 0):
    backbone, state = tiny(arch, seed)
    return eqxtl.Classifier(backbone, NUM_CLASSES, key=jax.random.key(seed + 1)), state


def batch(seed: int, size: int = 4, valid: int | None = None):
    rng = np.random.default_rng(seed)
    valid = size if valid is None else valid
    return {
        "image": rng.normal(size=(size, 3, IMAGE, IMAGE)).astype(np.float32),
        "label": rng.integers(0, NUM_CLASSES, size).astype(np.int32),
        "mask": np.arange(size) < valid,
    }


def specs(model):
    return {
        "head-only": eqxtl.trainable(model, "head"),
        "last-two-blocks": eqxtl.trainable(model, "head", *eqxtl.last_blocks(model, 2)),
    }


def copy(tree):
    return jax.tree.map(lambda x: jnp.array(x, copy=True) if eqx.is_array(x) else x, tree)


@pytest.mark.parametrize("arch", ["clip", "resnet"])
@pytest.mark.parametrize("which", ["head-only", "last-two-blocks"])
def test_adamw_leaves_frozen_bit_identical(arch, which):
    model, state = classifier(arch)
    spec = specs(model)[which]
    optimizer = optax.adamw(1e-2, weight_decay=0.1)
    opt_state = optimizer.init(eqx.filter(model, spec))
    step = eqxtl.make_step(eqxtl.task_loss(), optimizer, spec)
    before, state_before = copy(model), copy(state)
    for i in range(20):
        model, state, opt_state, metrics = step(
            model, state, opt_state, batch(i), jax.random.key(i)
        )
    assert np.isfinite(float(metrics["loss"]))
    flat_before = jax.tree.leaves(eqx.filter(before, eqx.is_array))
    flat_after = jax.tree.leaves(eqx.filter(model, eqx.is_array))
    flat_spec = jax.tree.leaves(eqx.filter(spec, jax.tree.map(eqx.is_array, before)))
    assert len(flat_before) == len(flat_after) == len(flat_spec)
    n_trained = 0
    for b, a, on in zip(flat_before, flat_after, flat_spec, strict=True):
        if on:
            n_trained += 1
            assert not np.array_equal(np.asarray(a), np.asarray(b))
        else:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert n_trained > 0
    # BatchNorm statistics: frozen BNs keep theirs exactly; trained BNs update them.
    trained_paths = {p for p, on in _spec_items(model, spec) if on}
    stats_before = eqxtl.state_dict(before.backbone, state_before)
    stats_after = eqxtl.state_dict(model.backbone, state)
    for name in stats_before:
        if name.endswith(("running_mean", "running_var")):
            trains = f"backbone.{name.rsplit('.', 1)[0]}.weight" in trained_paths
            same = np.array_equal(stats_before[name], stats_after[name])
            assert same != trains, name


def _spec_items(model, spec):
    flat, treedef = jax.tree_util.tree_flatten_with_path(model)
    return [
        (eqxtl._util.pytree_paths.keypath_to_str(kp), on)
        for (kp, leaf), on in zip(flat, treedef.flatten_up_to(spec), strict=True)
        if eqx.is_array(leaf)
    ]


@pytest.mark.parametrize("arch", ["clip", "resnet"])
def test_optimizer_state_follows_trainable_count(arch):
    model, _ = classifier(arch)
    total = eqxtl.count(model)
    for spec in specs(model).values():
        n = eqxtl.count(model, spec)
        assert 0 < n < total
        opt_state = optax.adam(1e-3).init(eqx.filter(model, spec))
        sizes = [x.size for x in jax.tree.leaves(opt_state) if eqx.is_array(x) and x.ndim > 0]
        assert sum(sizes) == 2 * n  # Adam: mu and nu for trainable leaves only

    spec, optimizer = eqxtl.param_groups(model, [("head", optax.adamw(1e-3)), (".*", None)])
    opt_state = optimizer.init(eqx.filter(model, spec))
    sizes = [x.size for x in jax.tree.leaves(opt_state) if eqx.is_array(x) and x.ndim > 0]
    assert sum(sizes) == 2 * eqxtl.count(model, spec) == 2 * model.head.weight.size + 6


@pytest.mark.parametrize("arch", ["clip", "resnet"])
def test_layerwise_sgd_moves_each_leaf_by_its_lr(arch):
    model, state = classifier(arch)
    base, decay = 0.1, 0.5
    groups = eqxtl.layerwise_groups(model, optax.sgd, base, decay, frozen=["backbone.embed.*"])
    spec, optimizer = eqxtl.param_groups(model, groups)
    depth_of, n_blocks = eqxtl.layer_depths(model)
    b = batch(0)
    loss_fn = eqxtl.task_loss()

    def loss_of(trainable):
        m = eqxtl.batchnorm_modes(
            eqx.combine(trainable, eqx.filter(model, spec, inverse=True)), spec
        )
        # State.set retires the state it was called on: differentiate on a clone.
        leaves, treedef = jax.tree.flatten(state)
        return loss_fn(m, jax.tree.unflatten(treedef, leaves), b, None)[0]

    grads = eqx.filter_grad(loss_of)(eqx.filter(model, spec))
    step = eqxtl.make_step(loss_fn, optimizer, spec, donate=False)
    new, _, _, _ = step(model, state, optimizer.init(eqx.filter(model, spec)), b, None)
    old_items = dict(leaves_with_paths(model))
    new_items = dict(leaves_with_paths(new))
    grad_items = dict(leaves_with_paths(grads))
    trained = {p for p, on in _spec_items(model, spec) if on}
    lrs_seen = set()
    for path, old in old_items.items():
        if path not in trained:
            np.testing.assert_array_equal(new_items[path], old)
            assert path.startswith("backbone.embed"), path
            continue
        lr = base * decay ** (n_blocks + 1 - depth_of(path))
        lrs_seen.add(lr)
        grad = np.asarray(grad_items[path], np.float64)
        expected = np.asarray(old) - lr * grad
        # Exact up to float32 rounding (the step's gradient is compiled differently) ...
        atol = 1e-3 * np.abs(lr * grad).max() + 1e-7
        np.testing.assert_allclose(new_items[path], expected, rtol=1e-5, atol=atol)
        # ... and the learning rate itself, fitted from the move, within 0.1 %.
        move = np.asarray(old, np.float64) - np.asarray(new_items[path], np.float64)
        if np.abs(move).max() > 1e-4:
            assert abs(np.sum(move * grad) / np.sum(grad * grad) / lr - 1) < 1e-3, path
    assert len(lrs_seen) >= 3


def _flops(compiled) -> float:
    cost = compiled.compiled.cost_analysis()  # the jax Compiled inside equinox's
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


@pytest.mark.parametrize("arch", ["clip", "resnet"])
def test_step_flops_follow_what_trains(arch):
    model, state = classifier(arch)
    if arch == "clip":  # XLA's cost analysis counts a scanned loop's body once
        model = eqxtl.with_scan(model, False)
    b = batch(0, size=8)
    key = jax.random.key(0)

    @eqx.filter_jit
    def forward(model, state, images):
        return eqxtl.batched(model)(images, state)[0]

    forward_flops = _flops(forward.lower(model, state, b["image"]).compile())

    def step_flops(spec):
        optimizer = optax.adam(1e-3)
        step = eqxtl.make_step(eqxtl.task_loss(), optimizer, spec, donate=False)
        opt_state = optimizer.init(eqx.filter(model, spec))
        trainable, frozen = eqx.partition(model, spec)
        lowered = step.compiled.lower((frozen, state, b, key, None), trainable, opt_state)
        return _flops(lowered.compile())

    head = step_flops(specs(model)["head-only"])
    partial = step_flops(specs(model)["last-two-blocks"])
    full = step_flops(eqxtl.everything(model))
    assert head <= 1.1 * forward_flops, (head, forward_flops)
    assert forward_flops < partial < full, (forward_flops, partial, full)


def test_no_retrace_across_epochs_with_partial_batch():
    model, state = classifier("resnet")
    spec = eqxtl.trainable(model, "head", *eqxtl.last_blocks(model, 1))
    optimizer = optax.adamw(1e-3, weight_decay=1e-4)
    opt_state = optimizer.init(eqx.filter(model, spec))
    traces = []
    base_loss = eqxtl.task_loss(eqxtl.Classification(label_smoothing=0.1))

    def loss_fn(*args):
        traces.append(1)
        return base_loss(*args)

    step = eqxtl.make_step(loss_fn, optimizer, spec)
    # 10 examples at batch 4: two full batches and a padded one per epoch.
    for epoch in range(2):
        for i, valid in enumerate([4, 4, 2]):
            model, state, opt_state, metrics = step(
                model, state, opt_state, batch(epoch * 3 + i, valid=valid), jax.random.key(i)
            )
            assert float(metrics["count"]) == valid
    assert len(traces) == 1


def test_rule_errors_are_clear():
    model, _ = classifier("clip")
    with pytest.raises(eqxtl.RuleError, match="backbone.encoder.layers"):
        eqxtl.trainable(model, "backbone.encoder.layer.3")
    with pytest.raises(eqxtl.RuleError, match="match no group"):
        eqxtl.param_groups(model, [("head", optax.adam(1e-3))])
    spec, optimizer = eqxtl.param_groups(model, [("head", optax.adam(1e-3)), (".*", None)])
    other, _ = classifier("resnet")
    with pytest.raises(eqxtl.OptimizerMismatchError, match="built"):
        optimizer.init(eqx.filter(other, eqxtl.trainable(other, "head", "backbone.embedder")))
    with pytest.raises(eqxtl.OptimizerMismatchError):
        optimizer.init(model)  # the whole model instead of its trainable partition


def test_rules_types_predicates_pairs_and_summary():
    model, _ = classifier("clip")
    spec = eqxtl.frozen(model, LayerNorm, ("head", True), "backbone.embeddings")
    items = dict(_spec_items(model, spec))
    assert not items["backbone.pre_layrnorm.weight"]
    assert not items["backbone.encoder.layers.0.layer_norm1.bias"]
    assert not items["backbone.embeddings.class_embedding"]
    assert items["backbone.encoder.layers.0.mlp.fc1.weight"] and items["head.weight"]
    spec = eqxtl.trainable(model, lambda path, leaf: path.endswith("bias"))
    assert all(on == p.endswith("bias") for p, on in _spec_items(model, spec))
    # first match wins
    spec = eqxtl.trainable(model, ("backbone.encoder.layers.3.mlp", False), "backbone.encoder")
    items = dict(_spec_items(model, spec))
    assert not items["backbone.encoder.layers.3.mlp.fc1.weight"]
    assert items["backbone.encoder.layers.3.self_attn.q_proj.weight"]
    spec = eqxtl.trainable(model, "head", *eqxtl.last_blocks(model, 1))
    text = eqxtl.summary(model, spec, print_it=False)
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()}
    assert rows["backbone.encoder.layers.0-2"][0] == "no"
    assert rows["head"][:3] == ["yes", "2", f"{eqxtl.count(model.head):,}"]
    n, total = eqxtl.count(model, spec), eqxtl.count(model)
    assert f"trainable: {n:,} of {total:,} parameters" in text


@pytest.mark.parametrize(
    "n, words", [(0, ">= 1"), (2.5, "integer"), (True, "integer"), (99, "has 4 blocks")]
)
def test_last_blocks_refuses_a_count_it_cannot_give(n, words):
    model, _ = tiny("clip")
    assert len(eqxtl.blocks(model)) == 4
    with pytest.raises(eqxtl.RuleError, match=words):
        eqxtl.last_blocks(model, n)
