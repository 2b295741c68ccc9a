"""The parts of ``fit``: tasks (multi-label, regression), callbacks (early stopping, LR on
plateau, a user callback), phases (two-phase fine-tuning, resume inside the second phase)
and BatchNorm modes independent of what trains."""

import json

import equinox as eqx
import jax
import numpy as np
import optax
import pytest

import eqxtl
from eqxtl.models.layers import BatchNorm
from tests._tiny import tiny
from tests.test_fit_faults import Batches

IMAGE = 32


def arrays(tree):
    return [np.asarray(x) for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array))]


def colour_batches(n_batches, seed, *, kind, size=16):
    """Images whose channel brightness is the target: multi-hot (each channel bright or
    not) or a regression target (the mean brightness of channel 0)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_batches):
        bright = rng.integers(0, 2, (size, 3)).astype(np.float32)
        level = rng.uniform(0, 1, (size, 1)).astype(np.float32)
        image = rng.normal(0, 0.3, (size, 3, IMAGE, IMAGE)).astype(np.float32)
        if kind == "multilabel":
            image += 1.5 * bright[:, :, None, None]
            label = bright
        else:
            image[:, 0] += 2.0 * level[:, :, None]
            label = level[:, 0]
        out.append({"image": image, "label": label, "mask": np.ones(size, bool)})
    return Batches(out)


@pytest.fixture(scope="module")
def clip_parts():
    return tiny("clip", 0)


def test_multilabel_task_learns(clip_parts):
    backbone, state = clip_parts
    model = eqxtl.Classifier(backbone, 3, key=jax.random.key(0))
    result = eqxtl.fit(
        model,
        state,
        optax.adam(3e-2),
        eqxtl.trainable(model, "head"),
        colour_batches(6, 0, kind="multilabel"),
        test_data=colour_batches(2, 1, kind="multilabel"),
        task=eqxtl.MultiLabel(),
        epochs=8,
        runtime=eqxtl.Runtime(eval_every=6, progress=False),
    )
    first, last = result.history[0], result.history[-1]
    assert last["test_accuracy"] >= 0.9, result.history
    assert last["test_loss"] < first["test_loss"]
    probs = eqxtl.predict(result.model, state, np.zeros((2, 32, 32, 3), np.uint8),
                          task=eqxtl.MultiLabel())  # fmt: skip
    assert probs.shape == (2, 3) and np.all((probs > 0) & (probs < 1))
    assert not np.allclose(probs.sum(-1), 1.0)  # independent sigmoids, not a softmax


def test_regression_task_learns(clip_parts):
    backbone, state = clip_parts
    model = eqxtl.Classifier(backbone, 1, key=jax.random.key(0))
    result = eqxtl.fit(
        model,
        state,
        optax.adam(3e-2),
        eqxtl.trainable(model, "head"),
        colour_batches(6, 0, kind="regression"),
        test_data=colour_batches(2, 1, kind="regression"),
        task=eqxtl.Regression(),
        epochs=8,
        runtime=eqxtl.Runtime(eval_every=6, progress=False),
    )
    first, last = result.history[0], result.history[-1]
    # predicting the mean everywhere gives MSE = var(U(0, 1)) = 1/12; 8 epochs of a head
    # on frozen random features get to about half of that
    assert last["test_loss"] < 0.6 / 12, result.history
    assert last["test_mae"] < first["test_mae"]
    assert "test_accuracy" not in last


def test_early_stopping_stops_and_the_result_says_why(clip_parts):
    backbone, state = clip_parts
    model = eqxtl.Classifier(backbone, 3, key=jax.random.key(0))
    data = colour_batches(2, 0, kind="multilabel")
    result = eqxtl.fit(
        model,
        state,
        optax.sgd(0.0),  # nothing improves
        eqxtl.trainable(model, "head"),
        data,
        test_data=data,
        task=eqxtl.MultiLabel(),
        epochs=10,
        callbacks=[eqxtl.EarlyStopping("test_loss", patience=2)],
        runtime=eqxtl.Runtime(eval_every=1, progress=False),
    )
    assert result.step == 3 and "did not improve" in result.stopped


def test_reduce_lr_on_plateau_and_a_user_callback(clip_parts):
    backbone, state = clip_parts
    model = eqxtl.Classifier(backbone, 3, key=jax.random.key(0))
    data = colour_batches(1, 0, kind="multilabel")
    seen, scales = [], []
    watch = eqxtl.Lambda(
        on_step=lambda run, metrics: seen.append((run.step, float(metrics["loss"]),
                                                  type(run.model).__name__)),
        on_eval=lambda run, record: scales.append(run.lr_scale),
    )  # fmt: skip
    plateau = eqxtl.ReduceLROnPlateau("train_loss", factor=0.5, patience=1, mode="max")
    result = eqxtl.fit(
        model,
        state,
        train_data=data,
        phases=[eqxtl.Phase(eqxtl.trainable(model, "head"), optax.sgd(1e-2), steps=4)],
        task=eqxtl.MultiLabel(),
        callbacks=[plateau, watch],  # "max" of a falling loss: never improves after the 1st
        runtime=eqxtl.Runtime(eval_every=1, progress=False),
    )
    assert [s for s, _, _ in seen] == [1, 2, 3, 4]
    assert {name for _, _, name in seen} == {"Classifier"}
    assert scales == [1.0, 0.5, 0.25, 0.125]
    # the scale is in the optimizer state: the update shrinks with it
    assert float(result.opt_state[1].hyperparams["step_size"]) == 0.125


def colour_source(n, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    images = rng.integers(0, 120, (n, 40, 40, 3))
    for i, c in enumerate(labels):
        images[i, ..., c] += 120
    return eqxtl.ArraySource(images.astype(np.uint8), labels, ["red", "green", "blue"])


def _two_phase_run(out_dir, kill_at=None):
    backbone, state = tiny("resnet", 3)
    model = eqxtl.Classifier(backbone, 3, key=jax.random.key(4))
    phases = eqxtl.two_phases(model, head_epochs=2, epochs=2, head_lr=1e-2, lr=1e-3)

    def on_step(run, metrics):
        if run.step == kill_at:
            raise KeyboardInterrupt("simulated kill")

    p = eqxtl.preprocessing_for(model)
    return (
        model,
        state,
        eqxtl.fit(
            model,
            state,
            train_data=eqxtl.Loader(colour_source(16, 0), p, 8, shuffle=True, seed=2),
            test_data=eqxtl.Loader(colour_source(8, 1), p, 8),
            phases=phases,
            callbacks=[eqxtl.Lambda(on_step=on_step)],
            checkpoint=eqxtl.Checkpoint(out_dir),
            runtime=eqxtl.Runtime(seed=2, eval_every=2, progress=False),
        ),
    )


def test_two_phases_continuous_history_and_resume_in_phase_two(tmp_path):
    model, state, straight = _two_phase_run(tmp_path / "straight")
    assert straight.step == 8
    history = json.loads((tmp_path / "straight" / "history.json").read_text())
    assert [(h["step"], h["phase"]) for h in history] == [(2, 0), (4, 0), (6, 1), (8, 1)]
    # phase 2 trained the backbone; BatchNorm stayed in inference mode ("frozen")
    assert not np.array_equal(
        straight.model.backbone.embedder.embedder.convolution.weight,
        model.backbone.embedder.embedder.convolution.weight,
    )
    for a, b in zip(arrays(straight.state), arrays(state), strict=True):
        np.testing.assert_array_equal(a, b)

    with pytest.raises(KeyboardInterrupt):
        _two_phase_run(tmp_path / "killed", kill_at=7)  # Ctrl-C writes last at step 7
    meta = json.loads((tmp_path / "killed" / "last" / "meta.json").read_text())
    assert (meta["step"], meta["phase"]) == (7, 1)
    _, _, resumed = _two_phase_run(tmp_path / "killed")
    assert resumed.step == 8
    assert [h["step"] for h in resumed.history] == [2, 4, 6, 8]
    for a, b in zip(arrays(straight.model), arrays(resumed.model), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(arrays(straight.opt_state), arrays(resumed.opt_state), strict=True):
        np.testing.assert_array_equal(a, b)


def _bn_leaves(model):
    bns = [x for x in jax.tree.leaves(model, is_leaf=lambda x: isinstance(x, BatchNorm))
           if isinstance(x, BatchNorm)]  # fmt: skip
    return [np.asarray(b.weight) for b in bns]


@pytest.mark.parametrize("bn", ["frozen", "train"])
def test_batchnorm_mode_is_independent_of_what_trains(bn):
    backbone, state = tiny("resnet", 0)
    model = eqxtl.Classifier(backbone, 3, key=jax.random.key(1))
    # "frozen": everything trains, statistics do not; "train": only the head trains, yet
    # every BatchNorm updates its statistics (batch statistics, fastai's train_bn)
    spec = eqxtl.everything(model) if bn == "frozen" else eqxtl.trainable(model, "head")
    result = eqxtl.fit(
        model,
        state,
        train_data=eqxtl.Loader(colour_source(16, 0), eqxtl.preprocessing_for(model), 8),
        phases=[eqxtl.Phase(spec, optax.adam(1e-2), steps=2, bn=bn)],
        runtime=eqxtl.Runtime(progress=False),
    )
    stats_same = [
        np.array_equal(a, b) for a, b in zip(arrays(result.state), arrays(state), strict=True)
    ]
    affine_same = [
        np.array_equal(a, b)
        for a, b in zip(_bn_leaves(result.model), _bn_leaves(model), strict=True)
    ]
    if bn == "frozen":
        assert all(stats_same) and not any(affine_same)
    else:
        assert not any(stats_same) and all(affine_same)


def test_bad_bn_mode_is_named(clip_parts):
    backbone, state = clip_parts
    model = eqxtl.Classifier(backbone, 3, key=jax.random.key(0))
    with pytest.raises(eqxtl.EqxtlError, match="bn must be one of"):
        eqxtl.Phase(eqxtl.trainable(model, "head"), optax.adam(1e-3), bn="inference")
    with pytest.raises(eqxtl.EqxtlError, match="bn must be one of"):
        eqxtl.make_step(eqxtl.task_loss(), optax.adam(1e-3), eqxtl.trainable(model, "head"),
                        bn="inference")  # fmt: skip


def test_a_fine_tuned_folder_reloads_whole(tmp_path):
    """Head, class names (id2label/label2id as transformers writes them) and the training
    preprocessing come back in one from_pretrained call; predict names the classes."""
    backbone, state = tiny("clip", 0)
    model = eqxtl.Classifier(backbone, 3, key=jax.random.key(0))
    preprocessing = eqxtl.Preprocessing(resize=36, crop=32, interpolation="bilinear")
    train = colour_source(24, 0)
    result = eqxtl.fit(
        model,
        state,
        optax.adam(3e-2),
        eqxtl.trainable(model, "head"),
        eqxtl.Loader(train, preprocessing, 8, shuffle=True),
        epochs=6,
        checkpoint=eqxtl.Checkpoint(tmp_path),
        runtime=eqxtl.Runtime(progress=False),
    )
    config = json.loads((tmp_path / "best" / "config.json").read_text())
    assert config["id2label"] == {"0": "red", "1": "green", "2": "blue"}
    assert config["label2id"] == {"red": 0, "green": 1, "blue": 2}
    loaded, loaded_state = eqxtl.from_pretrained(tmp_path / "best")  # no keep_head needed
    assert isinstance(loaded, eqxtl.Classifier)
    assert loaded.class_names == ("red", "green", "blue")
    assert eqxtl.preprocessing_for(loaded) == preprocessing
    np.testing.assert_array_equal(loaded.head.weight, result.model.head.weight)
    names = eqxtl.predict(loaded, loaded_state, list(train.images[:6]), labels=True)
    assert names == [train.class_names[i] for i in train.labels[:6]]
    # a bare backbone folder still loads as a backbone
    eqxtl.save_pretrained(backbone, state, tmp_path / "backbone")
    again, _ = eqxtl.from_pretrained(tmp_path / "backbone")
    assert not isinstance(again, eqxtl.Classifier)


def _tensorboard_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """Scalars of the TFRecord event files under ``log_dir`` (length, crc, event, crc)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list] = {}
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        i = 0
        while i < len(data):
            n = int.from_bytes(data[i : i + 8], "little")
            event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_logs_json_lines_plot_and_tensorboard(clip_parts, tmp_path):
    backbone, state = clip_parts
    model = eqxtl.Classifier(backbone, 3, key=jax.random.key(0))
    data = colour_batches(3, 0, kind="multilabel")
    phases = [
        eqxtl.Phase(eqxtl.trainable(model, "head"), optax.adam(1e-2), epochs=1),
        eqxtl.Phase(eqxtl.trainable(model, "head"), optax.sgd(1e-2), epochs=1),
    ]
    result = eqxtl.fit(
        model,
        state,
        train_data=data,
        test_data=data,
        phases=phases,
        task=eqxtl.MultiLabel(),
        callbacks=[eqxtl.TensorBoard()],
        checkpoint=eqxtl.Checkpoint(tmp_path),
        runtime=eqxtl.Runtime(eval_every=2, progress=False),
    )
    steps = [json.loads(x) for x in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert [(s["step"], s["phase"]) for s in steps] == [
        (i, 0 if i <= 3 else 1) for i in range(1, 7)
    ]
    evals = [json.loads(x) for x in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert evals == json.loads((tmp_path / "history.json").read_text()) == result.history
    assert [e["step"] for e in evals] == [2, 3, 4, 6]
    assert (tmp_path / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    scalars = _tensorboard_scalars(tmp_path / "tensorboard")
    assert [s for s, _ in scalars["train/step_loss"]] == list(range(1, 7))
    np.testing.assert_allclose([v for _, v in scalars["train/step_loss"]],
                               [s["loss"] for s in steps], rtol=1e-6)  # fmt: skip
    assert [s for s, _ in scalars["test/accuracy"]] == [2, 3, 4, 6]


@pytest.mark.parametrize("workers", [0, 1])
def test_grain_loader_and_process_shards_give_the_loaders_batches(workers):
    """GrainLoader (grain worker processes) and ProcessShard (threads) make exactly the
    Loader's batches (order, augmentation, last-batch padding and mask), or each process's
    part of them, from any start step (the resume position)."""
    source = colour_source(21, 0)
    p = eqxtl.Preprocessing(resize=36, crop=32)
    loader = eqxtl.Loader(source, p, 8, shuffle=True, seed=3, augment=eqxtl.Augment())
    expected = list(loader.epoch(2, start_step=1))
    got = list(eqxtl.GrainLoader(loader, num_workers=workers).epoch(2, start_step=1))
    assert len(got) == len(expected) == 2
    parts = [
        list(eqxtl.ProcessShard(loader, index=i, count=2).epoch(2, start_step=1)) for i in range(2)
    ]
    for i, want in enumerate(expected):
        joined = {k: np.concatenate([parts[0][i][k], parts[1][i][k]]) for k in want}
        for batch in (got[i], joined):
            for key in ("image", "label", "mask"):
                np.testing.assert_array_equal(batch[key], want[key])


def test_every_loader_is_a_source_batches_and_features_follow_its_process_part():
    """Loader, ProcessShard, GrainLoader and FeatureLoader implement the one declared batch
    protocol; cached features come in each process's part of the global batch, as images
    do."""
    from eqxtl.data.loader import BatchSource, SourceBatches

    source = colour_source(21, 0)
    loader = eqxtl.Loader(source, eqxtl.Preprocessing(resize=36, crop=32), 8, shuffle=True)
    n = len(source)
    features = eqxtl.Features(
        np.arange(2 * n, dtype=np.float32).reshape(n, 2),
        source.labels.astype(np.int32),
        np.ones(n, bool),
        source.class_names,
    )
    whole = eqxtl.FeatureLoader(features, loader)
    shards = [eqxtl.ProcessShard(loader, index=i, count=2) for i in range(2)]
    for batches in (loader, *shards, eqxtl.GrainLoader(loader, num_workers=0), whole):
        assert isinstance(batches, SourceBatches) and isinstance(batches, BatchSource)
    parts = [list(eqxtl.FeatureLoader(features, s).epoch(1, start_step=1)) for s in shards]
    for i, want in enumerate(whole.epoch(1, start_step=1)):
        for key in ("features", "label", "mask"):
            joined = np.concatenate([parts[0][i][key], parts[1][i][key]])
            np.testing.assert_array_equal(joined, want[key])
