"""``fit``'s step form (``eqxtl.training.packed``; ``step.pack`` / ``step.packed`` /
``step.unpack``): interchangeable trained blocks stored stacked between steps, the
optimizer run once per row. Checked for every registered architecture that scans: the
same steps as ``step(model, ...)`` on the scanned model; what cannot be packed runs as the
plain step, with the reason; the compiled step does not grow with depth."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eqxtl
from eqxtl.io import checkpoint
from eqxtl.models import clip
from eqxtl.models.registry import ARCHITECTURES
from tests._tiny import TINY_CLIP, TINY_CONFIGS, random_tensors, tiny, tiny_architecture

NUM_CLASSES = 3
SCANNING = [
    n
    for n, a in ARCHITECTURES.items()
    if a.supports_scan and a.towers == "vision" and n in TINY_CONFIGS
]


def side(config) -> int:
    size = config.image_size
    return size if isinstance(size, int) else size[0]


def batches(image: int, n: int = 3, size: int = 4):
    rng = np.random.default_rng(0)
    return [
        {
            "image": rng.normal(size=(size, 3, image, image)).astype(np.float32),
            "label": rng.integers(0, NUM_CLASSES, size).astype(np.int32),
        }
        for _ in range(n)
    ]


def classifier(backbone):
    return eqxtl.Classifier(backbone, NUM_CLASSES, key=jax.random.key(1))


def run_both(model, state, spec, optimizer, data, scan=True, **options):
    """``(plain, packed, carry)``: ``(model, opt_state)`` after the same steps through
    ``step(model, ...)`` and through the step form, and the carry; blocks scanned
    (``with_scan(model, True)``) or by the default rule (``scan=None``: these tiny blocks
    then run unrolled)."""
    if scan is not None:
        model, spec = eqxtl.with_scan(model, scan), eqxtl.with_scan(spec, scan)
    plain_step = eqxtl.make_step(eqxtl.task_loss(), optimizer, spec, **options)
    m, s = model, state
    o = optimizer.init(eqx.filter(model, spec))
    for i, b in enumerate(data):
        m, s, o, _ = plain_step(m, s, o, b, jax.random.key(i))
    step = eqxtl.make_step(eqxtl.task_loss(), optimizer, spec, **options)
    carry = step.pack(model, optimizer.init(eqx.filter(model, spec)))
    s = state
    for i, b in enumerate(data):
        carry, s, _ = step.packed(carry, s, b, jax.random.key(i))
    packed_model, packed_opt = step.unpack(carry)
    return (m, o), (packed_model, packed_opt), carry


def assert_same(got, want, tol=1e-6):
    """The same leaves in the same places (a scan flag may differ), within ``tol``."""
    got_leaves = jax.tree.leaves(eqx.filter(got, eqx.is_array))
    want_leaves = jax.tree.leaves(eqx.filter(want, eqx.is_array))
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(got)]
    assert paths == [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(want)]
    for a, b in zip(got_leaves, want_leaves, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


@pytest.mark.parametrize("scan", [True, None])
@pytest.mark.parametrize("name", SCANNING)
def test_packed_steps_equal_the_plain_steps(name, scan):
    """Full fine-tuning with AdamW and ``decay_mask`` (per-leaf: biases and norms are not
    decayed, which stacked leaves would get wrong): three packed steps give the weights and
    optimizer state of three plain steps; every block is in one stack where the blocks
    scan. Where they run unrolled (most of these tiny blocks, by the default size rule),
    the first step unstacks them and says why: the step would copy each row out of its
    stack."""
    backbone, state = tiny_architecture(name, seed=1)
    model = classifier(backbone)
    spec = eqxtl.everything(model)
    optimizer = optax.adamw(1e-2, weight_decay=0.1, mask=eqxtl.decay_mask)
    data = batches(side(TINY_CONFIGS[name]))
    (m, o), (pm, po), carry = run_both(model, state, spec, optimizer, data, scan)
    if carry.layout is None:  # only by the size rule (the blocks are too small to scan)
        assert scan is None and "unrolled at this batch size" in carry.reason
    else:
        assert carry.layout is not None, carry.reason
        rows = [len(rows) for rows in carry.layout.segments]
        assert rows == [TINY_CONFIGS[name].num_hidden_layers]
    assert eqxtl.paths(pm) == eqxtl.paths(model)
    assert_same(pm, m)
    assert_same(po, o)


def test_pack_and_unpack_are_inverse_and_consume_what_they_stack():
    backbone, _ = tiny("clip")
    model = classifier(backbone)
    spec = eqxtl.everything(model)
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(eqx.filter(model, spec))
    kept = eqxtl.make_step(eqxtl.task_loss(), optimizer, spec, donate=False)
    carry = kept.pack(model, opt_state)
    back_model, back_state = kept.unpack(carry)
    assert_same(back_model, model, tol=0)
    assert_same(back_state, opt_state, tol=0)
    assert not any(x.is_deleted() for x in jax.tree.leaves(eqx.filter(model, eqx.is_array)))
    # a donating step's pack frees each stacked row once copied; the head stays as it is
    donating = eqxtl.make_step(eqxtl.task_loss(), optimizer, spec, donate=True)
    fresh = jax.tree.map(lambda x: jnp.copy(x) if eqx.is_array(x) else x, model)
    fresh_state = jax.tree.map(jnp.copy, opt_state)
    carry = donating.pack(fresh, fresh_state)
    assert all(x.is_deleted() for x in jax.tree.leaves(fresh.backbone.encoder.layers))
    assert not fresh.head.weight.is_deleted()
    assert carry.params[1][0] is not None and any(x is fresh.head.weight for x in carry.params[1])
    assert_same(donating.unpack(carry)[0], model, tol=0)
    with pytest.raises(eqxtl.EqxtlError, match="step.packed"):
        kept(kept.pack(model, opt_state), None, opt_state, batches(32, n=1)[0])
    with pytest.raises(eqxtl.EqxtlError, match="step.pack"):
        kept.packed(model, None, batches(32, n=1)[0])


def _plain_step(model, state, spec, optimizer, data):
    step = eqxtl.make_step(eqxtl.task_loss(), optimizer, spec)
    o = optimizer.init(eqx.filter(model, spec))
    for i, b in enumerate(data):
        model, state, o, _ = step(model, state, o, b, jax.random.key(i))
    return model, o


@pytest.mark.parametrize(
    "case, reason",
    [
        ("clip_global_norm", "cannot run once per row"),
        ("layerwise_decay", "the rows' updates differ"),
        ("head_only", "no run of two or more"),
    ],
)
def test_what_cannot_be_packed_runs_as_the_plain_step(case, reason):
    """A global-norm clip reads every gradient; per-block learning rates differ between
    rows; a head-only spec has no trained blocks: the step form holds the model as it is,
    says why, and steps exactly as ``step(model, ...)``."""
    backbone, state = tiny("clip")
    model = classifier(backbone)
    adam = optax.adam
    if case == "clip_global_norm":
        spec, optimizer = eqxtl.param_groups(model, [(".*", adam(1e-3))], clip_global_norm=1.0)
    elif case == "layerwise_decay":
        groups = eqxtl.layerwise_groups(model, adam, base_lr=1e-3, decay=0.7)
        spec, optimizer = eqxtl.param_groups(model, groups)
    else:
        spec = eqxtl.trainable(model, "head")
        optimizer = adam(1e-3)
    data = batches(side(TINY_CLIP), n=2)
    step = eqxtl.make_step(eqxtl.task_loss(), optimizer, spec)
    carry = step.pack(model, optimizer.init(eqx.filter(model, spec)))
    assert carry.layout is None and reason in carry.reason
    s = state
    for i, b in enumerate(data):
        carry, s, _ = step.packed(carry, s, b, jax.random.key(i))
    m, o = _plain_step(model, state, spec, optimizer, data)
    pm, po = step.unpack(carry)
    assert_same(pm, m, tol=0)
    assert_same(po, o, tol=0)


@pytest.mark.parametrize("what", ["last_blocks", "lora"])
def test_last_blocks_and_lora_pack_their_trained_blocks(what):
    """``last_blocks(model, 2)``: the two trained blocks form one stack, the frozen ones
    stay as they are; LoRA: every block's adapters stack, the frozen base does not."""
    backbone, state = tiny("clip")
    model = classifier(backbone)
    if what == "lora":
        model = eqxtl.lora(model, ".*(q_proj|v_proj)", rank=2, key=jax.random.key(3))
        spec = eqxtl.lora_spec(model, "head")
        model = _perturbed_lora(model)
        rows = TINY_CLIP.num_hidden_layers
    else:
        spec = eqxtl.trainable(model, "head", *eqxtl.last_blocks(model, 2))
        rows = 2
    optimizer = optax.adam(1e-2)
    (m, o), (pm, po), carry = run_both(model, state, spec, optimizer, batches(side(TINY_CLIP)))
    assert [len(r) for r in carry.layout.segments] == [rows]
    assert_same(pm, m)
    assert_same(po, o)


def _perturbed_lora(model):
    """LoRA's B starts at zero, which would leave A's gradients zero: perturb B."""
    rng = np.random.default_rng(5)

    def perturb(path, x):
        if path.endswith("lora_b"):
            return jnp.asarray(rng.normal(size=x.shape) * 0.1, x.dtype)
        return x

    from eqxtl._util.pytree_paths import map_with_path

    return map_with_path(perturb, model)


def _hlo_size(layers: int, form: str) -> int:
    config = dataclasses.replace(TINY_CLIP, num_hidden_layers=layers)
    tensors = random_tensors(clip.CLIP_VISION, config, 0)
    backbone, state = checkpoint.fill(checkpoint.skeleton(clip.CLIP_VISION, config), tensors)
    model = eqxtl.with_scan(classifier(backbone))  # these tiny blocks would run unrolled
    spec = eqxtl.everything(model)
    optimizer = optax.adamw(1e-3, mask=eqxtl.decay_mask)
    step = eqxtl.make_step(eqxtl.task_loss(), optimizer, spec)
    opt_state = optimizer.init(eqx.filter(model, spec))
    if form == "packed":
        model, opt_state = step.pack(model, opt_state), None
    b = batches(side(config), n=1)[0]
    text = step.lower(model, state, opt_state, b, jax.random.key(0)).compile().as_text()
    return sum(1 for line in text.splitlines() if " = " in line)


def test_the_packed_step_does_not_grow_with_depth():
    """Scanned blocks: the compiled step form of 4 and 8 blocks has the same number of
    instructions: one scanned block and one vectorised optimizer update, whatever the depth;
    the plain step holds per-block optimizer kernels, stacking and slicing. (Not 2: XLA
    unrolls a loop of two.)"""
    assert _hlo_size(8, "packed") == _hlo_size(4, "packed")
    assert _hlo_size(8, "model") > _hlo_size(4, "model") + 100


def test_fit_hands_callbacks_the_model_in_its_own_form():
    """A callback that reads ``run.model`` and ``run.opt_state`` at every step sees the
    per-block model and ``optimizer.init``'s state, and reading them changes nothing: the
    fit ends bit-identical to one without the callback."""
    backbone, _ = tiny("clip")
    model = classifier(backbone)
    spec = eqxtl.everything(model)
    optimizer = optax.adam(1e-3)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(16, 32, 32, 3)).astype(np.uint8)
    labels = (np.arange(16) % NUM_CLASSES).astype(np.int32)
    source = eqxtl.ArraySource(images, labels, class_names=["a", "b", "c"])
    train = eqxtl.Loader(source, eqxtl.preprocessing_for(model), 8)
    want_paths = eqxtl.paths(model)
    want_state = jax.tree.structure(optimizer.init(eqx.filter(model, spec)))
    seen = []

    def look(run, values):
        seen.append(eqxtl.paths(run.model) == want_paths)
        seen.append(jax.tree.structure(run.opt_state) == want_state)

    runtime = eqxtl.Runtime(progress=False)
    args = (model, None, optimizer, spec, train)
    watched = eqxtl.fit(*args, epochs=2, runtime=runtime, callbacks=[eqxtl.Lambda(on_step=look)])
    alone = eqxtl.fit(*args, epochs=2, runtime=runtime)
    assert seen and all(seen)
    assert_same(watched.model, alone.model, tol=0)
    assert_same(watched.opt_state, alone.opt_state, tol=0)


def test_a_callback_editing_the_optimizer_state_in_place_takes_effect():
    """The optax idiom ``opt_state.hyperparams["learning_rate"] = 0`` in a callback: the
    state ``run.opt_state`` gives is the live one, so the steps after it change nothing."""
    backbone, state = tiny("clip")
    model = classifier(backbone)
    spec = eqxtl.everything(model)
    optimizer = optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(24, 32, 32, 3)).astype(np.uint8)
    source = eqxtl.ArraySource(images, np.arange(24) % NUM_CLASSES, class_names=["a", "b", "c"])
    train = eqxtl.Loader(source, eqxtl.preprocessing_for(model), 8)
    after_first = []

    def stop_learning(run, values):
        if run.step == 1:
            run.opt_state.hyperparams["learning_rate"] = jnp.zeros(())
            after_first.append(jax.tree.map(jnp.copy, eqx.filter(run.model, eqx.is_array)))

    runtime = eqxtl.Runtime(progress=False)
    result = eqxtl.fit(
        model,
        state,
        optimizer,
        spec,
        train,
        epochs=1,
        runtime=runtime,
        callbacks=[eqxtl.Lambda(on_step=stop_learning)],
    )
    assert result.step == 3
    assert_same(result.model, after_first[0], tol=0)


def test_pack_refuses_an_optimizer_state_of_another_optimizer():
    backbone, _ = tiny("clip")
    model = classifier(backbone)
    spec = eqxtl.everything(model)
    other = optax.chain(optax.trace(0.9), optax.scale_by_rss())
    step = eqxtl.make_step(
        eqxtl.task_loss(), optax.chain(optax.scale_by_rss(), optax.trace(0.9)), spec
    )
    with pytest.raises(eqxtl.OptimizerMismatchError, match="does not fit"):
        step.pack(model, other.init(eqx.filter(model, spec)))


def test_memory_report_of_the_step_form():
    """``memory_report`` of a model in step form reports ``step.packed``'s program: the same
    parameter and optimizer-state bytes as the model as it is, from arrays or from shapes
    (``eqx.filter_eval_shape(step.pack, ...)``, which stacks nothing), and a donating step
    form writes its stacks in place."""
    backbone, state = tiny("clip")
    model = classifier(backbone)
    spec = eqxtl.everything(model)
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(eqx.filter(model, spec))
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batches(32, n=1)[0].items()}
    step = eqxtl.make_step(eqxtl.task_loss(), optimizer, spec, donate=True)
    plain = eqxtl.memory_report(step, model, state, opt_state, batch)
    shapes = eqx.filter_eval_shape(step.pack, model, opt_state)
    assert shapes.layout is not None
    assert not any(x.is_deleted() for x in jax.tree.leaves(eqx.filter(model, eqx.is_array)))
    from_shapes = eqxtl.memory_report(step, shapes, state, None, batch)
    from_arrays = eqxtl.memory_report(step, step.pack(model, opt_state), state, None, batch)
    for report in (from_shapes, from_arrays):
        assert report.trainable == plain.trainable and report.frozen == plain.frozen
        assert report.optimizer_state == plain.optimizer_state
        assert report.gradients == plain.gradients
        assert report.donated and report.alias >= report.trainable + report.optimizer_state - 64
    assert (from_shapes.argument, from_shapes.temp) == (from_arrays.argument, from_arrays.temp)


def test_blocks_that_run_unrolled_are_unstacked_once_and_stay_so():
    """By the default size rule these tiny blocks run unrolled on a batch of one: the first
    ``step.packed`` unstacks them (the step would copy each row out of its stack), and
    packing again after a read keeps them as they are, without a second look."""
    backbone, state = tiny("clip")
    model = classifier(backbone)
    spec = eqxtl.everything(model)
    optimizer = optax.adam(1e-3)
    step = eqxtl.make_step(eqxtl.task_loss(), optimizer, spec)
    carry = step.pack(model, optimizer.init(eqx.filter(model, spec)))
    assert carry.layout is not None  # nothing says yet how the blocks run
    one = batches(side(TINY_CLIP), n=1, size=1)[0]
    # a report (step.lower) on that batch lowers the unstacked step, but only looks
    shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in one.items()}
    report = eqxtl.memory_report(step, carry, state, None, shapes)
    plain = eqxtl.memory_report(step, model, state, optimizer.init(eqx.filter(model, spec)), shapes)
    assert (report.temp, report.argument) == (plain.temp, plain.argument)  # the same program
    assert step.pack(model, optimizer.init(eqx.filter(model, spec))).layout is not None
    assert not any(x.is_deleted() for x in jax.tree.leaves(carry.params))
    carry, _, _ = step.packed(carry, state, one, jax.random.key(0))
    assert carry.layout is None and "unrolled at this batch size" in carry.reason
    again = step.pack(*step.unpack(carry))
    assert again.layout is None and again.reason == carry.reason
    model, spec = eqxtl.with_scan(model, True), eqxtl.with_scan(spec, True)
    scanned = eqxtl.make_step(eqxtl.task_loss(), optimizer, spec)
    forced = scanned.pack(model, optimizer.init(eqx.filter(model, spec)))
    forced, _, _ = scanned.packed(forced, state, one, jax.random.key(0))
    assert forced.layout is not None  # with_scan(model, True) scans at any size


class _Killed(BaseException):
    pass


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_run_resumed_mid_phase_with_stacked_blocks_is_the_straight_run(tmp_path, accumulate):
    """``fit`` with the blocks kept stacked (forced to scan, so that the size rule cannot
    unstack them), EMA, AdamW with ``decay_mask`` and a checkpoint at every step: killed
    in step 4's callbacks (before its checkpoint) and resumed from step 3's, it ends
    bit-identical to the run never killed (weights, and the optimizer state that holds
    EMA's average)."""
    backbone, _ = tiny("clip")
    model = eqxtl.with_scan(classifier(backbone), True)
    spec = eqxtl.everything(model)
    optimizer = optax.adamw(1e-3, weight_decay=0.1, mask=eqxtl.decay_mask)
    step = eqxtl.make_step(eqxtl.task_loss(), optimizer, spec)
    carry = step.pack(model, optimizer.init(eqx.filter(model, spec)))
    assert carry.layout is not None, carry.reason  # what this test is about
    del carry
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(24, 32, 32, 3)).astype(np.uint8)
    source = eqxtl.ArraySource(images, np.arange(24) % NUM_CLASSES, class_names=["a", "b", "c"])

    def run(out, kill_at=None):
        def stop(run, values):
            if run.step == kill_at:
                raise _Killed

        return eqxtl.fit(
            model,
            None,
            optimizer,
            spec,
            eqxtl.Loader(source, eqxtl.preprocessing_for(model), 8, seed=1, num_workers=0),
            epochs=2,
            callbacks=[eqxtl.EMA(0.9), eqxtl.Lambda(on_step=stop)],
            checkpoint=eqxtl.Checkpoint(out, every=1),
            runtime=eqxtl.Runtime(progress=False, seed=0, accumulate=accumulate),
        )

    straight = run(tmp_path / "straight")
    with pytest.raises(_Killed):
        run(tmp_path / "killed", kill_at=4)
    resumed = run(tmp_path / "killed")
    assert resumed.resumed_from == 3 and resumed.step == straight.step == 6  # before step 4
    assert_same(resumed.model, straight.model, tol=0)
    assert_same(resumed.opt_state, straight.opt_state, tol=0)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_nonfinite_step_leaves_the_stacked_carry_as_it_was(accumulate):
    """A batch with a NaN image, in the step form with the blocks stacked (forced to scan):
    the step reports it and hands back the stacked weights and optimizer state unchanged,
    bit for bit; the next finite step then equals the plain step's after skipping it too."""

    def fresh():  # the same weights each time: packing consumes what it stacks
        backbone, state = tiny("clip")
        return eqxtl.with_scan(classifier(backbone), True), state

    model, state0 = fresh()
    spec = eqxtl.everything(model)
    optimizer = optax.adam(1e-2)
    good, bad = batches(side(TINY_CLIP), n=2)
    state = state0
    bad["image"][1, 0, 3, 3] = np.nan
    step = eqxtl.make_step(eqxtl.task_loss(), optimizer, spec, accumulate=accumulate)
    carry = step.pack(model, optimizer.init(eqx.filter(model, spec)))
    carry, state, _ = step.packed(carry, state, good, jax.random.key(0))
    assert carry.layout is not None, carry.reason
    before = jax.tree.map(np.array, (carry.params, carry.opt_state))
    carry, state, metrics = step.packed(carry, state, bad, jax.random.key(1))
    assert float(metrics["nonfinite"]) == 1.0
    after = jax.tree.map(np.array, (carry.params, carry.opt_state))
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(a, b)
    plain = fresh()
    (m, o), _, _ = run_both(*plain, spec, optimizer, [good, good], accumulate=accumulate)
    packed_model, packed_opt = step.unpack(step.packed(carry, state, good, jax.random.key(1))[0])
    assert_same(packed_model, m, tol=1e-6)
    assert_same(packed_opt, o, tol=1e-6)
