"""Bad input and faults around ``fit``: non-finite training, run folders (lock, resume
checks, corrupt checkpoints, leftovers of a kill, unwritable folders), phases and metrics
that cannot work, and ``predict`` misuse. One test per case: the error type and a phrase of
its message, or the correct result."""

import json
import os
import shutil
import signal
import subprocess
import sys
import warnings

import equinox as eqx
import jax
import numpy as np
import optax
import pytest

import eqxtl
from eqxtl.training import runs
from eqxtl.training.callbacks import metric_mode
from tests._tiny import tiny

IMAGE = 32


class Batches:
    """A batch source for ``fit``: fixed batches, the same every epoch."""

    def __init__(self, batches):
        self.batches = batches
        self.batch_size = len(batches[0]["label"])

    def __len__(self):
        return len(self.batches)

    def epoch(self, epoch, start_step=0):
        yield from self.batches[start_step:]


def make_batches(n, seed=0, nan_at=None, size=4):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        image = rng.normal(size=(size, 3, IMAGE, IMAGE)).astype(np.float32)
        if i == nan_at:
            image[1, 0, 0, 0] = np.nan
        labels = rng.integers(0, 3, size).astype(np.int32)
        out.append({"image": image, "label": labels, "mask": np.ones(size, bool)})
    return out


@pytest.fixture(scope="module")
def clip_model():
    backbone, state = tiny("clip", 0)
    return eqxtl.Classifier(backbone, 3, key=jax.random.key(1)), state


def run_fit(clip_model, out_dir=None, batches=None, *, steps=4, callback=None, **kwargs):
    """``fit`` for ``steps`` steps on fixed batches; the ``Checkpoint`` and ``Runtime``
    options by name (``resume``, ``best``; ``seed``, ``eval_every``, ``max_nonfinite``)."""
    model, state = clip_model
    spec = kwargs.pop("spec", eqxtl.trainable(model, "head"))
    phase = eqxtl.Phase(spec, kwargs.pop("optimizer", optax.adam(1e-2)), steps=steps)
    saving = {k: kwargs.pop(k) for k in ("resume", "best") if k in kwargs}
    callbacks = list(kwargs.pop("callbacks", []))
    if callback is not None:
        callbacks.append(eqxtl.Lambda(on_step=lambda run, m: callback(run.step, m)))
    return eqxtl.fit(
        model,
        state,
        train_data=Batches(batches or make_batches(4)),
        phases=[phase],
        callbacks=callbacks,
        checkpoint=None if out_dir is None else eqxtl.Checkpoint(out_dir, **saving),
        runtime=eqxtl.Runtime(progress=False, **kwargs),
    )


@pytest.fixture(scope="module")
def base_run(clip_model, tmp_path_factory):
    """A finished 2-step run folder (last = best = step 2) and its result, copied by the
    tests that need one (one compilation for all of them)."""
    path = tmp_path_factory.mktemp("base") / "run"
    return path, run_fit(clip_model, path, steps=2)


def copy_of(base_run, tmp_path):
    shutil.copytree(base_run[0], tmp_path, symlinks=True, dirs_exist_ok=True)
    return base_run[1]


def arrays(tree):
    return [np.asarray(x) for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array))]


def strict_load(path):
    def no_constants(name):
        raise AssertionError(f"non-strict JSON constant {name} in {path}")

    return json.loads(path.read_text(), parse_constant=no_constants)


# ------------------------------------------------------------------ non-finite training


def test_nan_loss_stops_with_the_step_and_last_finite_loss(clip_model, tmp_path):
    losses = []
    with pytest.raises(eqxtl.TrainingError, match="at step 5") as err:
        run_fit(
            clip_model,
            tmp_path,
            make_batches(6, nan_at=4),
            steps=6,
            eval_every=2,
            callback=lambda step, m: losses.append(float(m["loss"])),
        )
    assert f"last finite loss was {losses[3]:.6g}" in str(err.value)
    # last/ holds step 4 (best/ one before it), finite; history.json is strict JSON
    assert strict_load(tmp_path / "last" / "meta.json")["step"] == 4
    for link in ("last", "best"):
        loaded, _ = eqxtl.from_pretrained(tmp_path / link, keep_head=True)
        assert all(np.isfinite(a).all() for a in arrays(loaded))
    assert [h["step"] for h in strict_load(tmp_path / "history.json")] == [2, 4]


def test_nan_is_detected_without_per_step_sync(clip_model):
    """No callback, no progress bar, no evaluation before the end: the check happens at
    the end, and the skipped steps left the model finite."""
    with pytest.raises(eqxtl.TrainingError, match="at step 2"):
        run_fit(clip_model, batches=make_batches(4, nan_at=1))


def test_skipped_nonfinite_steps_change_nothing(clip_model):
    """With max_nonfinite=1 the NaN batch is skipped (weights and optimizer state as
    before it), so the result equals a run without that batch."""
    batches = make_batches(5, nan_at=2)
    skipped = run_fit(clip_model, batches=batches, steps=5, max_nonfinite=1)
    without = run_fit(clip_model, batches=batches[:2] + batches[3:], steps=4)
    assert skipped.history[-1]["nonfinite_steps"] == 1
    for a, b in zip(arrays(skipped.model), arrays(without.model), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_the_step_skips_exactly_the_nonfinite_gradients():
    """Gradients of 1e37 in every element are finite (their sum would overflow float32):
    the step updates. One infinite or NaN gradient element: the step changes nothing. The
    loss is 0 throughout, so only the gradients can make a step non-finite."""
    dtype = jax.numpy.dtype("float32")

    @jax.custom_vjp
    def zero_with_gradient(w, g):  # 0, with gradient g with respect to w
        return jax.numpy.zeros(())

    zero_with_gradient.defvjp(
        lambda w, g: (jax.numpy.zeros(()), g),
        lambda g, ct: ((ct * g).astype(dtype), jax.numpy.zeros_like(g)),
    )

    def loss_fn(model, state, batch, key):
        return zero_with_gradient(model["w"], batch["g"]), (state, {})

    model = {"w": jax.numpy.ones((64, 64), dtype), "frozen": jax.numpy.ones(3)}
    spec = {"w": True, "frozen": False}
    optimizer = optax.sgd(1e-36)
    step = eqxtl.make_step(loss_fn, optimizer, spec)
    for bad in (None, np.inf, -np.inf, np.nan):
        g = np.full((64, 64), 1e37, np.float32)
        if bad is not None:
            g[5, 7] = bad
        opt_state = optimizer.init(eqx.filter(model, spec))
        new, _, _, metrics = step(model, None, opt_state, {"g": jax.numpy.asarray(g)})
        assert float(metrics["nonfinite"]) == (bad is not None), bad
        changed = not np.array_equal(np.asarray(new["w"]), np.asarray(model["w"]))
        assert changed == (bad is None), bad


def test_a_nonfinite_model_is_never_written(clip_model, tmp_path):
    model, state = clip_model
    bad = eqx.tree_at(lambda m: m.head.bias, model, model.head.bias.at[0].set(np.inf))
    with pytest.raises(eqxtl.TrainingError, match="non-finite weights"):
        run_fit((bad, state), tmp_path, max_nonfinite=10)
    assert not (tmp_path / "last").exists() and not (tmp_path / "best").exists()


def test_history_is_strict_json():
    text = runs.dumps([{"test_loss": float("nan"), "x": np.float32(np.inf), "ok": 1.5}])
    assert json.loads(text) == [{"test_loss": None, "x": None, "ok": 1.5}]


# ------------------------------------------------------------------ run folders


def test_a_locked_run_folder_is_refused(clip_model, tmp_path):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": os.uname()[1]}))
    with pytest.raises(eqxtl.TrainingError, match="in use by process"):
        run_fit(clip_model, tmp_path)
    assert (tmp_path / ".lock").exists()  # the other run's lock stays


def test_a_stale_lock_is_taken_over(clip_model, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], text=True,
                          capture_output=True).stdout.strip()  # fmt: skip
    (tmp_path / ".lock").write_text(json.dumps({"pid": int(dead), "host": os.uname()[1]}))
    with pytest.warns(UserWarning, match="stale lock"):
        result = run_fit(clip_model, tmp_path, steps=1)
    assert result.step == 1 and not (tmp_path / ".lock").exists()


@pytest.mark.parametrize(
    "change, phrase",
    [
        ({"seed": 1}, "seed: 0 -> 1"),
        ({"spec": "backbone"}, "phase 0 trains"),
        ({"optimizer": optax.sgd(1e-2)}, "phase 0 optimizer state"),
        ({"batches": make_batches(5)}, "train_length: 4 -> 5"),
    ],
)
def test_resume_with_another_configuration_is_refused(
    clip_model, base_run, tmp_path, change, phrase
):
    copy_of(base_run, tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    change = dict(change)
    if change.get("spec") == "backbone":
        change["spec"] = eqxtl.trainable(
            clip_model[0], "head", *eqxtl.last_blocks(clip_model[0], 1)
        )
    with pytest.raises(eqxtl.TrainingError, match="resume=False") as err:
        run_fit(clip_model, tmp_path, steps=2, **change)
    assert phrase in str(err.value)
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # nothing written


def test_resume_false_starts_over(clip_model, base_run, tmp_path):
    copy_of(base_run, tmp_path)
    result = run_fit(clip_model, tmp_path, steps=3, seed=5, resume=False)
    assert result.step == 3 and [h["step"] for h in result.history] == [3]
    assert strict_load(tmp_path / "run.json")["seed"] == 5


def truncate(train_state, keep):
    """Cut every file of a checkpoint's training state (orbax's folder) to ``keep(size)``."""
    for p in train_state.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            p.write_bytes(data[: keep(len(data))])


def test_a_corrupt_last_falls_back_to_best(clip_model, base_run, tmp_path):
    first = copy_of(base_run, tmp_path)
    target = (tmp_path / "last").resolve()
    corrupt = target.with_name(target.name + "-corrupt")
    shutil.copytree(target, corrupt)
    truncate(corrupt / runs.TRAIN_STATE, lambda n: n // 2)
    (tmp_path / "last").unlink()
    os.symlink(os.path.relpath(corrupt, tmp_path), tmp_path / "last")
    with pytest.warns(UserWarning, match="last/ is unreadable"):
        again = run_fit(clip_model, tmp_path, steps=2)
    assert again.step == 2
    for a, b in zip(arrays(first.model), arrays(again.model), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_checkpoint_of_the_one_file_layout_resumes(clip_model, base_run, tmp_path):
    """Run folders written before the training state was sharded: one train_state.eqx."""
    first = copy_of(base_run, tmp_path)
    last = (tmp_path / "last").resolve()
    shutil.rmtree(last / runs.TRAIN_STATE)
    with open(last / runs.OLD_TRAIN_STATE, "wb") as f:
        eqx.tree_serialise_leaves(f, (first.model, first.state, first.opt_state))
    again = run_fit(clip_model, tmp_path, steps=2)  # resumed at its end: nothing to train
    assert again.resumed_from == 2
    trees = [(r.model, r.state, r.opt_state) for r in (first, again)]
    assert len(arrays(trees[0])) > 10
    for a, b in zip(arrays(trees[0]), arrays(trees[1]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_every_checkpoint_corrupt_fails_clearly(clip_model, base_run, tmp_path):
    copy_of(base_run, tmp_path)
    truncate(tmp_path / "last" / runs.TRAIN_STATE, lambda n: min(n, 100))  # best: the same
    with pytest.raises(eqxtl.TrainingError, match="best/ is unreadable"):
        run_fit(clip_model, tmp_path, steps=2)


def test_leftovers_of_a_kill_are_cleaned_at_start(clip_model, base_run, tmp_path):
    copy_of(base_run, tmp_path)
    ckpts = tmp_path / "checkpoints"
    (ckpts / ".tmp-step-9-dead").mkdir()
    (ckpts / "step-9-unlinked").mkdir()
    (tmp_path / ".best.link").symlink_to("nowhere")
    (tmp_path / ".last-new-abc").mkdir()
    run_fit(clip_model, tmp_path, steps=2)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert len(list(ckpts.iterdir())) == 1


def test_a_kill_while_replacing_best_keeps_the_old_best(
    clip_model, base_run, tmp_path, monkeypatch
):
    copy_of(base_run, tmp_path)
    old_best = (tmp_path / "best").resolve()
    real_link = runs.RunDir._link

    def killed(self, link, target):
        if link == "best":
            raise KeyboardInterrupt("killed while replacing best")
        real_link(self, link, target)

    monkeypatch.setattr(runs.RunDir, "_link", killed)
    fit_module = sys.modules["eqxtl.training.session"]
    monkeypatch.setattr(fit_module, "improved", lambda *a, **k: True)  # step 4 is "better"
    with pytest.raises(KeyboardInterrupt):
        run_fit(clip_model, tmp_path, steps=4, eval_every=2)
    monkeypatch.undo()
    assert (tmp_path / "best").resolve() == old_best
    assert strict_load(tmp_path / "last" / "meta.json")["step"] == 4
    eqxtl.from_pretrained(tmp_path / "best", keep_head=True)  # complete


def test_old_layout_interrupted_best_swap_is_recovered(clip_model, base_run, tmp_path):
    """The previous layout renamed best away before renaming the new one in: a kill in
    between left only .best-old-*. It is restored as best/ at the next start."""
    copy_of(base_run, tmp_path)
    saved = tmp_path / "keep"
    os.rename((tmp_path / "best").resolve(), saved)
    for link in ("best", "last"):
        (tmp_path / link).unlink()
    os.rename(saved, tmp_path / ".best-old-123-456")
    with pytest.warns(UserWarning, match="last/ is missing"):
        result = run_fit(clip_model, tmp_path, steps=2)
    assert result.step == 2  # resumed from the recovered best
    assert (tmp_path / "best" / "meta.json").is_file()


def test_an_unwritable_out_dir_fails_before_training(clip_model, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    steps = []
    with pytest.raises(eqxtl.TrainingError, match="Cannot write to the run folder"):
        run_fit(clip_model, tmp_path / "file" / "run", callback=lambda s, m: steps.append(s))
    assert steps == []


# ------------------------------------------------------------------ phases, metrics


def test_a_phase_that_trains_nothing_is_refused(clip_model):
    model, state = clip_model
    phases = [
        eqxtl.Phase(eqxtl.trainable(model, "head"), optax.adam(1e-3), steps=1),
        eqxtl.Phase(eqxtl.trainable(model), optax.adam(1e-3), steps=1, name="empty"),
    ]
    with pytest.raises(eqxtl.TrainingError, match=r"Phase 1 \(empty\) trains nothing"):
        eqxtl.fit(model, state, train_data=Batches(make_batches(2)), phases=phases)


def test_epochs_next_to_phases_is_refused(clip_model):
    model, state = clip_model
    phases = [eqxtl.Phase(eqxtl.trainable(model, "head"), optax.adam(1e-3), epochs=1)]
    with pytest.raises(eqxtl.TrainingError, match=r"each Phase has its own epochs"):
        eqxtl.fit(model, state, train_data=Batches(make_batches(2)), phases=phases, epochs=3)


def test_fit_with_nothing_trainable_is_refused(clip_model):
    with pytest.raises(eqxtl.TrainingError, match="trains nothing"):
        run_fit(clip_model, spec=eqxtl.trainable(clip_model[0]))


def test_an_unknown_best_metric_is_refused_before_training(clip_model, tmp_path):
    steps = []
    with pytest.raises(eqxtl.TrainingError, match="'test_f1' is not a metric") as err:
        run_fit(clip_model, tmp_path, best="test_f1", callback=lambda s, m: steps.append(s))
    assert "train_accuracy" in str(err.value) and steps == []


@pytest.mark.parametrize("option", ["checkpoint", "runtime"])
def test_options_must_be_option_objects(clip_model, tmp_path, option):
    model, state = clip_model
    with pytest.raises(eqxtl.TrainingError, match=f"fit\\({option}=...\\) takes an eqxtl"):
        eqxtl.fit(model, state, optax.adam(1e-3), eqxtl.trainable(model, "head"),
                  Batches(make_batches(1)), **{option: str(tmp_path)})  # fmt: skip


def test_swapped_spec_and_optimizer_are_named(clip_model):
    model, state = clip_model
    spec, optimizer = eqxtl.param_groups(model, [("head", optax.adam(1e-3)), (".*", None)])
    with pytest.raises(eqxtl.TrainingError, match="spec and the optimizer are swapped"):
        eqxtl.fit(model, state, spec, optimizer, Batches(make_batches(1)))


def test_an_early_stopping_metric_that_does_not_exist_is_named_before_training(clip_model):
    for callback in (eqxtl.EarlyStopping("test_loss"), eqxtl.ReduceLROnPlateau("train_los")):
        with pytest.raises(
            eqxtl.TrainingError, match=r"\(metric='(test_loss|train_los)'\): not a metric"
        ):
            run_fit(clip_model, callbacks=[callback], callback=lambda step, m: pytest.fail())


class _Probe:
    """Adds the metric ``probe_value`` (whose name says no direction) to each evaluation."""

    metric_names = ("probe_value",)

    def eval_metrics(self, run, model):
        return {"probe_value": float(run.step)}


def test_a_metric_whose_direction_is_unknown_is_refused_before_training(clip_model, tmp_path):
    # mode="auto" took every name without loss/mae/mse/error as one to maximise: a custom
    # nll or top1_err kept the worst checkpoint and stopped while improving
    assert metric_mode("test_nll") == metric_mode("test_top1_err") == "min"
    assert metric_mode("fewshot_5shot_accuracy") == metric_mode("probe_score") == "max"
    steps = []
    for kwargs in (
        {"callbacks": [_Probe(), eqxtl.EarlyStopping("probe_value")]},
        {"callbacks": [_Probe()], "best": "probe_value"},
    ):
        with pytest.raises(eqxtl.TrainingError, match="'probe_value' is better lower or higher"):
            run_fit(clip_model, tmp_path, callback=lambda s, m: steps.append(s), **kwargs)
    assert steps == []
    stop = eqxtl.EarlyStopping("probe_value", mode="min", patience=1)  # rises: stops at 2
    result = run_fit(clip_model, callbacks=[_Probe(), stop], eval_every=1)
    assert result.step == 2


def test_callbacks_that_act_at_evaluations_warn_when_there_is_one_per_phase(clip_model):
    # with the default Runtime(eval_every=None) they never acted within a phase, silently
    for callback in (
        eqxtl.EarlyStopping("train_loss"),
        eqxtl.ReduceLROnPlateau("train_loss"),
        eqxtl.LRSchedule(lambda step: 1.0),
    ):
        name = type(callback).__name__
        with pytest.warns(
            UserWarning, match=rf"{name}: these callbacks act at evaluations.*eval_every=N"
        ):
            run_fit(clip_model, steps=2, callbacks=[callback])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            run_fit(clip_model, steps=2, callbacks=[callback], eval_every=1)


def test_data_whose_classes_are_the_models_in_another_order_is_refused(clip_model):
    # a zero-shot head's (or a reloaded classifier's) rows are named; a sorted ImageFolder
    # of the same classes in another order was scored, and trained, row against label
    model, state = clip_model
    named = model.with_training_info(class_names=["cat", "dog", "airplane"])
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, IMAGE, IMAGE, 3)).astype(np.uint8)
    labels = np.arange(6) % 3

    def source(names, labels=labels):
        return eqxtl.ArraySource(images, labels, class_names=names)

    sorted_names = source(["airplane", "cat", "dog"])
    with pytest.raises(eqxtl.DataError, match=r"evaluate\(data=...\): .*another order"):
        eqxtl.evaluate(named, state, sorted_names)
    with pytest.raises(eqxtl.DataError, match=r"train_data: .*another order"):
        eqxtl.fit(named, state, optax.adam(1e-3), eqxtl.trainable(named, "head"),
                  sorted_names, runtime=eqxtl.Runtime(progress=False))  # fmt: skip
    with pytest.raises(eqxtl.DataError, match="4 classes but the model predicts 3"):
        eqxtl.evaluate(model, state, source(["a", "b", "c", "d"], np.arange(6) % 4))
    assert eqxtl.evaluate(named, state, source(["cat", "dog", "airplane"]))["count"] == 6
    assert eqxtl.evaluate(named, state, source(["x", "y", "z"]))["count"] == 6  # renamed: kept


# ------------------------------------------------------------------ predict


def test_predict_on_a_bare_backbone_is_an_error(clip_model):
    images = np.zeros((2, 32, 32, 3), np.uint8)
    with pytest.raises(eqxtl.EqxtlError, match="bare CLIPVision"):
        eqxtl.predict(clip_model[0].backbone, clip_model[1], images)


def test_predict_refuses_a_single_image_with_a_hint(clip_model):
    with pytest.raises(eqxtl.DataError, match=r"single \(H, W, 3\) image"):
        eqxtl.predict(*clip_model, np.zeros((32, 32, 3), np.uint8))
    probs = eqxtl.predict(*clip_model, [np.zeros((32, 32, 3), np.uint8)])
    assert probs.shape == (1, 3)


def test_predict_reads_pil_images_as_the_loader_does(clip_model):
    """A palette image is its colours (not its palette indices), a CMYK one its RGB."""
    from PIL import Image

    from eqxtl.data.images import as_rgb

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (32, 32, 3)).astype(np.uint8))
    images = [rgb.convert("P"), rgb.convert("CMYK")]
    want = eqxtl.predict(*clip_model, [as_rgb(im) for im in images])
    np.testing.assert_array_equal(eqxtl.predict(*clip_model, images), want)


def test_a_callback_used_again_starts_a_fresh_run_afresh(clip_model):
    """EarlyStopping's best and wait, and EMA's average, do not leak into the next fit."""
    stop = eqxtl.EarlyStopping("train_loss", patience=1, mode="min", min_delta=1e9)
    ema = eqxtl.EMA(0.5)
    first = run_fit(clip_model, steps=6, eval_every=1, callbacks=[stop, ema])
    second = run_fit(clip_model, steps=6, eval_every=1, callbacks=[stop, ema])
    assert first.step == second.step == 2  # one evaluation to set best, one without gain
    counts = [[int(x) for x in arrays(r.opt_state) if x.dtype == np.int32] for r in (first, second)]
    assert counts[0] == counts[1]
    for a, b in zip(arrays(first.model), arrays(second.model), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_resume_on_other_classes_is_refused(clip_model, tmp_path):
    model, state = clip_model
    images = np.random.default_rng(0).integers(0, 255, (8, 16, 16, 3)).astype(np.uint8)

    def run(names):
        source = eqxtl.ArraySource(images, np.arange(8) % 3, names)
        return eqxtl.fit(
            model,
            state,
            optax.adam(1e-3),
            eqxtl.trainable(model, "head"),
            eqxtl.Loader(source, eqxtl.preprocessing_for(model), 4, num_workers=0),
            checkpoint=eqxtl.Checkpoint(tmp_path),
            runtime=eqxtl.Runtime(progress=False),
        )

    run(["cat", "dog", "owl"])
    with pytest.raises(eqxtl.TrainingError, match=r"train_classes: \['cat', 'dog', 'owl'\]"):
        run(["apple", "pear", "fig"])


class _Killed(BaseException):
    pass


@pytest.mark.parametrize("ema", [False, True])
@pytest.mark.parametrize("second", ["head", "everything"])
def test_resume_from_a_phase_boundary_starts_the_next_phase_afresh(tmp_path, second, ema):
    """The last checkpoint is the last step of phase 0: the resumed run loads phase 0's
    optimizer state (whatever phase 1's spec) and gives phase 1 a fresh one, as the run that
    was never stopped did; an ``EMA`` average goes on from phase 0's, as it did there."""
    backbone, state = tiny("resnet", 3)
    model = eqxtl.Classifier(backbone, 3, key=jax.random.key(4))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (16, 16, 16, 3)).astype(np.uint8)
    source = eqxtl.ArraySource(images, rng.integers(0, 3, 16), ["r", "g", "b"])
    head = eqxtl.trainable(model, "head")
    spec2 = head if second == "head" else eqxtl.everything(model)

    def run(out, kill_at=None):
        def stop(run, metrics):
            if run.step == kill_at:
                raise _Killed

        phases = [
            eqxtl.Phase(head, optax.adam(1e-2), steps=4),
            eqxtl.Phase(spec2, optax.adam(1e-3), steps=4),
        ]
        loader = eqxtl.Loader(source, eqxtl.preprocessing_for(model), 8, seed=2, num_workers=0)
        return eqxtl.fit(
            model,
            state,
            train_data=loader,
            phases=phases,
            callbacks=[eqxtl.Lambda(on_step=stop), *([eqxtl.EMA(decay=0.5)] if ema else [])],
            checkpoint=eqxtl.Checkpoint(out),
            runtime=eqxtl.Runtime(seed=2, eval_every=2, progress=False),
        )

    straight = run(tmp_path / "straight")
    with pytest.raises(_Killed):
        run(tmp_path / "killed", kill_at=5)
    assert json.loads((tmp_path / "killed" / "last" / "meta.json").read_text())["phase"] == 0
    resumed = run(tmp_path / "killed")
    assert resumed.resumed_from == 4
    for a, b in zip(arrays(resumed.opt_state), arrays(straight.opt_state), strict=True):
        np.testing.assert_array_equal(a, b)  # Adam's count: phase 1's 4 steps, not 8
    for a, b in zip(arrays(resumed.model), arrays(straight.model), strict=True):
        np.testing.assert_array_equal(a, b)


def _tiny_classifier_and_source():
    """A tiny ResNet classifier, its state, and 32 random 16x16 images of 3 classes."""
    backbone, state = tiny("resnet", 3)
    model = eqxtl.Classifier(backbone, 3, key=jax.random.key(4))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (32, 16, 16, 3)).astype(np.uint8)
    return model, state, eqxtl.ArraySource(images, rng.integers(0, 3, 32), ["r", "g", "b"])


def _fit_head(tiny_run, out, optimizer, steps, callbacks=(), *, every=None, test=False, **rt):
    """``fit`` of ``_tiny_classifier_and_source()``'s head, batches of 8 (seed 2; ``test``:
    the same images as test data, seed 3), checkpoints in ``out``."""
    model, state, source = tiny_run

    def loader(seed):
        return eqxtl.Loader(source, eqxtl.preprocessing_for(model), 8, seed=seed, num_workers=0)

    return eqxtl.fit(
        model,
        state,
        train_data=loader(2),
        test_data=loader(3) if test else None,
        phases=[eqxtl.Phase(eqxtl.trainable(model, "head"), optimizer, steps=steps)],
        callbacks=list(callbacks),
        checkpoint=eqxtl.Checkpoint(out, every=every),
        runtime=eqxtl.Runtime(seed=2, progress=False, **rt),
    )


def test_lr_schedule_resumed_between_evaluations_keeps_its_scale(tmp_path):
    """The schedule sets the scale at phase begin and at evaluations only: a run resumed
    from a checkpoint written between them (every=3) must not take schedule(3)."""
    tiny_run = _tiny_classifier_and_source()

    def run(out, kill_at=None):
        def stop(run, metrics):
            if run.step == kill_at:
                raise _Killed

        schedule = eqxtl.LRSchedule(lambda s: 1.0 if s < 2 else 0.1)
        callbacks = [schedule, eqxtl.Lambda(on_step=stop)]
        return _fit_head(tiny_run, out, optax.sgd(0.5), 8, callbacks, every=3)

    straight = run(tmp_path / "straight")
    with pytest.raises(_Killed):
        run(tmp_path / "killed", kill_at=4)
    resumed = run(tmp_path / "killed")
    assert resumed.resumed_from == 3
    for a, b in zip(arrays(resumed.model), arrays(straight.model), strict=True):
        np.testing.assert_array_equal(a, b)


class _CutEvaluation:
    """An evaluation metric that raises ``KeyboardInterrupt`` (what a second Ctrl-C does)
    while the evaluation of step ``at`` runs, once."""

    def __init__(self, at):
        self.at = at

    def eval_metrics(self, run, model):
        if run.step == self.at:
            self.at = None
            raise KeyboardInterrupt
        return {"cut_probe": float(run.step)}


@pytest.mark.parametrize("at", [4, 8])  # mid-run, and the run's last evaluation
@pytest.mark.parametrize("ctrl_c", ["second, during the evaluation", "first, before it"])
def test_an_evaluation_cut_by_ctrl_c_is_run_on_resume(tmp_path, at, ctrl_c):
    """Ctrl-C at an evaluation step saves ``last`` before that evaluation's record: a second
    Ctrl-C during the evaluation, or a first one that arrived while the step ran. The
    resumed run evaluates that step first, after its phase began (TensorBoard's writer),
    with the train metrics of the steps it covers: the same history (but the throughput)
    and weights as a run never interrupted."""
    tiny_run = _tiny_classifier_and_source()

    def first_ctrl_c(run, metrics):
        if run.step == at - 1 and ctrl_c.startswith("first"):
            os.kill(os.getpid(), signal.SIGINT)  # handled between bytecodes: the next step ends

    def run(out, cut=None):
        callbacks = [
            eqxtl.LRSchedule(lambda s: 1.0 if s < 4 else 0.1),
            _CutEvaluation(cut if ctrl_c.startswith("second") else None),
            eqxtl.Lambda(on_step=first_ctrl_c if cut else None),
            eqxtl.TensorBoard(str(tmp_path / out / "tb")),
        ]
        opt = optax.adam(0.05)
        return _fit_head(tiny_run, tmp_path / out, opt, 8, callbacks, test=True, eval_every=4)

    straight = run("straight")
    with pytest.raises(KeyboardInterrupt, match=f"saved at step {at} of 8"):
        run("cut", cut=at)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    saved = json.loads((tmp_path / "cut" / "history.json").read_text())
    assert at not in [r["step"] for r in saved]  # the record was cut
    resumed = run("cut")
    assert resumed.resumed_from == at
    timing = {"images_per_sec"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in resumed.history] == [
        {k: v for k, v in r.items() if k not in timing} for r in straight.history
    ]
    for a, b in zip(arrays(resumed.model), arrays(straight.model), strict=True):
        np.testing.assert_array_equal(a, b)


def test_ctrl_c_twice_while_a_step_is_recorded_saves_that_step_whole(tmp_path, monkeypatch):
    """Two Ctrl-C while the loop records a step's results (after the step ran): ``last`` is
    that step with its weights, not a step count ahead of them; the resumed run ends where
    the uninterrupted one does."""
    from eqxtl.training import session

    tiny_run = _tiny_classifier_and_source()
    accumulate = session._accumulate

    def run(out):
        return _fit_head(tiny_run, tmp_path / out, optax.adam(0.05), 6, eval_every=4)

    def twice_at_step_3(acc, guard, metrics, step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # handled between bytecodes, as Ctrl-C
            os.kill(os.getpid(), signal.SIGINT)
        return accumulate(acc, guard, metrics, step)

    straight = run("straight")
    monkeypatch.setattr(session, "_accumulate", twice_at_step_3)
    with pytest.raises(KeyboardInterrupt, match="saved at step 3 of 6"):
        run("cut")
    monkeypatch.setattr(session, "_accumulate", accumulate)
    resumed = run("cut")
    assert resumed.resumed_from == 3
    for a, b in zip(arrays(resumed.model), arrays(straight.model), strict=True):
        np.testing.assert_array_equal(a, b)


def test_an_evaluation_cut_at_a_phase_boundary_keeps_the_ema_going(tmp_path):
    """A second Ctrl-C during phase 0's last evaluation: the resumed run evaluates it in
    phase 0, then phase 1 starts afresh with ``EMA``'s average carried on, as in the run
    that was never stopped (history, optimizer state with the average, and weights)."""
    tiny_run = _tiny_classifier_and_source()
    model = tiny_run[0]

    def run(out, cut=None):
        phases = [
            eqxtl.Phase(eqxtl.trainable(model, "head"), optax.adam(1e-2), steps=4),
            eqxtl.Phase(eqxtl.everything(model), optax.adam(1e-3), steps=4),
        ]
        return eqxtl.fit(
            model,
            tiny_run[1],
            train_data=eqxtl.Loader(
                tiny_run[2], eqxtl.preprocessing_for(model), 8, seed=2, num_workers=0
            ),
            phases=phases,
            callbacks=[eqxtl.EMA(decay=0.5), _CutEvaluation(cut)],
            checkpoint=eqxtl.Checkpoint(tmp_path / out),
            runtime=eqxtl.Runtime(seed=2, eval_every=2, progress=False),
        )

    straight = run("straight")
    with pytest.raises(KeyboardInterrupt, match="saved at step 4 of 8"):
        run("cut", cut=4)
    assert json.loads((tmp_path / "cut" / "last" / "meta.json").read_text())["eval_due"]
    resumed = run("cut")
    assert resumed.resumed_from == 4
    timing = {"images_per_sec"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in resumed.history] == [
        {k: v for k, v in r.items() if k not in timing} for r in straight.history
    ]
    for a, b in zip(arrays(resumed.opt_state), arrays(straight.opt_state), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(arrays(resumed.model), arrays(straight.model), strict=True):
        np.testing.assert_array_equal(a, b)
