"""memory_report: the bytes of a compiled train step, from shapes alone."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eqxtl
from eqxtl.errors import EqxtlError

WIDTH = 256


class Net(eqx.Module):
    body: eqx.nn.Linear
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.body = eqx.nn.Linear(WIDTH, WIDTH, key=k1)
        self.head = eqx.nn.Linear(WIDTH, 3, key=k2)


def loss_fn(model, state, batch, key):
    hidden = jax.nn.relu(jax.vmap(model.body)(batch["x"]))
    logits = jax.vmap(model.head)(jnp.tanh(hidden))
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
    return loss, (state, {})


def shapes(batch_size, width=WIDTH):
    return {
        "x": jax.ShapeDtypeStruct((batch_size, width), jnp.float32),
        "y": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
    }


def nbytes(tree):
    return sum(x.nbytes for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array)))


@pytest.fixture(scope="module")
def setup():
    model = Net(jax.random.key(0))
    spec = eqxtl.trainable(model, "head")  # body frozen
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(eqx.filter(model, spec))
    return model, spec, optimizer, opt_state


@pytest.fixture(scope="module")
def small(setup):
    """The report of the step without donation, batch 8, from shapes alone."""
    model, spec, optimizer, _ = setup
    step = eqxtl.make_step(loss_fn, optimizer, spec, donate=False)
    model_shapes = eqx.filter_eval_shape(Net, jax.random.key(0))
    opt_shapes = jax.eval_shape(optimizer.init, eqx.filter(model_shapes, spec))
    return eqxtl.memory_report(step, model_shapes, None, opt_shapes, shapes(8))


def test_components_are_the_bytes_of_the_leaves(setup, small):
    model, spec, optimizer, opt_state = setup
    report = small
    trainable, frozen = eqx.partition(model, spec)
    assert report.trainable == nbytes(trainable) == (WIDTH * 3 + 3) * 4
    assert report.frozen == nbytes(frozen) == (WIDTH * WIDTH + WIDTH) * 4
    assert report.gradients == report.trainable
    assert report.optimizer_state == nbytes(opt_state) > 2 * report.trainable
    assert report.batch == 8 * WIDTH * 4 + 8 * 4
    held = report.trainable + report.frozen + report.optimizer_state + report.batch
    assert report.argument >= held  # plus the key
    assert report.alias == 0 and not report.donated
    assert report.peak == report.argument + report.output + report.temp
    text = str(report)
    for row in ("parameters, trainable", "optimizer state", "temp", "peak estimate"):
        assert row in text
    assert f"{report.frozen / 2**20:.1f}" in text


def test_shapes_or_arrays_compile_the_step_the_first_call_compiles(setup, small):
    model, spec, optimizer, opt_state = setup
    step = eqxtl.make_step(loss_fn, optimizer, spec, donate=False)
    rng = np.random.default_rng(0)
    batch = {"x": rng.normal(size=(8, WIDTH)).astype(np.float32), "y": np.zeros(8, np.int32)}
    key = jax.random.key(0)
    from_arrays = eqxtl.memory_report(step, model, None, opt_state, batch, key)
    assert (from_arrays.argument, from_arrays.temp) == (small.argument, small.temp)
    assert abs(from_arrays.output - small.output) <= 64  # a scalar or two of bookkeeping
    # what step(...) itself compiles (eqx.filter_jit): the same buffer assignment
    trainable, frozen = eqx.partition(model, spec)
    args = ((frozen, None, batch, key, None), trainable, opt_state)
    stats = step.compiled.lower(*args).compile().compiled.memory_analysis()
    assert stats.temp_size_in_bytes == from_arrays.temp
    assert stats.argument_size_in_bytes == from_arrays.argument
    assert stats.output_size_in_bytes == from_arrays.output
    # ... and the report compiled it: the first call compiles nothing more
    compiles = []

    def listen(event, *_, **__):
        if "backend_compile" in event:
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        jax.block_until_ready(step(model, None, opt_state, batch, key)[3])
        fresh = eqxtl.make_step(loss_fn, optimizer, spec, donate=False)  # the check can fail
        jax.block_until_ready(fresh(model, None, opt_state, batch, key)[3])
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert len(compiles) == 1  # the fresh step's, not the reported one's


def test_temp_grows_with_the_batch(setup, small):
    model, spec, optimizer, opt_state = setup
    step = eqxtl.make_step(loss_fn, optimizer, spec, donate=False)
    big = eqxtl.memory_report(step, model, None, opt_state, shapes(512))
    # the activations kept for the backward pass: at least (512 - 8) x WIDTH floats
    assert big.temp - small.temp >= (512 - 8) * WIDTH * 4
    assert big.batch - small.batch == (512 - 8) * (WIDTH + 1) * 4


def test_donation_shows_as_alias_bytes(setup, small):
    model, spec, optimizer, opt_state = setup
    step = eqxtl.make_step(loss_fn, optimizer, spec, donate=True)
    report = eqxtl.memory_report(step, model, None, opt_state, shapes(8))
    assert small.alias == 0
    donated = report.trainable + report.optimizer_state
    assert report.donated and report.alias >= donated - 64  # all but Adam's count (4 B)
    assert report.argument == small.argument and report.peak < small.peak


def test_a_batch_the_model_cannot_take_is_a_clear_error(setup):
    model, spec, optimizer, opt_state = setup
    step = eqxtl.make_step(loss_fn, optimizer, spec)
    with pytest.raises(EqxtlError, match=r"batch \{'x': float32\[8, 100\]"):
        eqxtl.memory_report(step, model, None, opt_state, shapes(8, width=100))
    with pytest.raises(EqxtlError, match="make_step"):
        eqxtl.memory_report(loss_fn, model, None, opt_state, shapes(8))
    with pytest.raises(EqxtlError, match="dict"):
        eqxtl.memory_report(step, model, None, opt_state, jnp.zeros((8, WIDTH)))
