"""fit / evaluate / predict, feature caching, resume, mixed precision, data parallelism and
the examples/finetune_rps.py script (offline, on tfds mock data)."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eqxtl
import eqxtl.data.features
from tests._tiny import tiny

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def colour_task(n: int, seed: int, size: int = 40) -> eqxtl.ArraySource:
    """Learnable synthetic images: class c has its colour channel c brightest, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    images = rng.integers(0, 120, (n, size, size, 3))
    for i, c in enumerate(labels):
        images[i, ..., c] += 120
    return eqxtl.ArraySource(images.astype(np.uint8), labels, ["red", "green", "blue"])


def classifier(arch: str, seed: int = 0):
    backbone, state = tiny(arch, seed)
    return eqxtl.Classifier(backbone, 3, key=jax.random.key(seed + 1)), state


def arrays(tree):
    return [np.asarray(x) for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array))]


def test_fit_learns_with_frozen_random_backbone(tmp_path):
    model, state = classifier("clip")
    spec = eqxtl.trainable(model, "head")
    result = eqxtl.fit(
        model,
        state,
        optax.adam(1e-2),
        spec,
        eqxtl.Loader(colour_task(96, seed=0), eqxtl.preprocessing_for(model), 16, shuffle=True),
        test_data=eqxtl.Loader(colour_task(48, seed=1), eqxtl.preprocessing_for(model), 16),
        epochs=8,
        checkpoint=eqxtl.Checkpoint(tmp_path),
        runtime=eqxtl.Runtime(eval_every=12, progress=False),
    )
    assert result.final["test_accuracy"] >= 0.9, result.history
    assert result.step == 8 * 6
    history = json.loads((tmp_path / "history.json").read_text())
    assert [h["step"] for h in history if "test_accuracy" in h] == [12, 24, 36, 48]
    assert (tmp_path / "history.png").read_bytes()[:8] == PNG_SIGNATURE
    for name in ("last", "best"):
        loaded, _ = eqxtl.from_pretrained(tmp_path / name, keep_head=True)
        assert loaded.num_classes == 3
    # evaluate sees every example (48 = 3 batches of 20 with the last one padded)
    out = eqxtl.evaluate(result.model, result.state, colour_task(48, seed=1), batch_size=20)
    assert out["count"] == 48
    assert out["accuracy"] == pytest.approx(result.final["test_accuracy"], abs=1e-6)
    probs = eqxtl.predict(result.model, result.state, colour_task(5, seed=2).images)
    assert probs.shape == (5, 3)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)


def test_fit_leaves_the_callers_model_and_state_usable(monkeypatch):
    """The step donates what trains; fit must not consume the arrays it was given, so that
    one set of pretrained weights can seed several runs (BatchNorm state included)."""
    import eqxtl.training.step

    monkeypatch.setattr(eqxtl.training.step, "DONATE_MIN_BYTES", 0)  # donate even tiny models
    backbone, state = tiny("resnet", 0)
    model = eqxtl.Classifier(backbone, 3, key=jax.random.key(1))
    # copies: a NumPy view of a buffer would pin it and silently prevent its donation
    before = [a.copy() for a in arrays((model, state))]
    for rules, bn in [(["head"], "auto"), (["head", "backbone.encoder.stages.1"], "train")]:
        spec = eqxtl.trainable(model, *rules)  # the first run trains on cached features
        eqxtl.fit(
            model,
            state,
            train_data=eqxtl.Loader(colour_task(16, seed=0), eqxtl.preprocessing_for(model), 8),
            phases=[eqxtl.Phase(spec, optax.adam(1e-2), steps=2, bn=bn)],
            runtime=eqxtl.Runtime(progress=False),
        )
    for a, b in zip(before, arrays((model, state)), strict=True):
        np.testing.assert_array_equal(a, b)


def _resume_run(tmp_path, kill_at=None):
    model, state = classifier("resnet", seed=3)
    spec = eqxtl.trainable(model, "head", *eqxtl.last_blocks(model, 1))
    optimizer = optax.adamw(eqxtl.warmup_cosine(1e-2, 10, 2), weight_decay=1e-2)

    def on_step(run, metrics):
        if run.step == kill_at:
            raise Killed  # (Ctrl-C would write last first)

    preprocessing = eqxtl.preprocessing_for(model)
    train = eqxtl.Loader(
        colour_task(40, seed=4), preprocessing, 8, shuffle=True, seed=7, augment=eqxtl.Augment()
    )
    return eqxtl.fit(
        model,
        state,
        train_data=train,
        phases=[eqxtl.Phase(spec, optimizer, steps=10)],
        callbacks=[eqxtl.Lambda(on_step=on_step)],
        checkpoint=eqxtl.Checkpoint(tmp_path, every=3),
        runtime=eqxtl.Runtime(seed=7, progress=False),
    )


class Killed(BaseException):
    """A kill: the process ends where it is, nothing more is written."""


def test_kill_and_resume_is_bit_identical(tmp_path):
    straight = _resume_run(tmp_path / "straight")
    with pytest.raises(Killed):
        _resume_run(tmp_path / "killed", kill_at=5)  # last checkpoint: step 3
    meta = json.loads((tmp_path / "killed" / "last" / "meta.json").read_text())
    assert meta["step"] == 3
    resumed = _resume_run(tmp_path / "killed")
    assert resumed.step == straight.step == 10
    for a, b in zip(arrays(straight.model), arrays(resumed.model), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(arrays(straight.state), arrays(resumed.state), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(arrays(straight.opt_state), arrays(resumed.opt_state), strict=True):
        np.testing.assert_array_equal(a, b)
    # the record after the resume averages steps 1-5, as without the kill (the checkpoint
    # at step 3 keeps the train metrics' sums of steps 1-3)
    assert [r["step"] for r in resumed.history] == [r["step"] for r in straight.history]
    for a, b in zip(straight.history, resumed.history, strict=True):
        for key in ("train_loss", "train_accuracy"):
            assert a[key] == pytest.approx(b[key], rel=1e-6), (key, a, b)


def test_cached_features_train_the_same_head(tmp_path, monkeypatch):
    train, test = colour_task(50, seed=5), colour_task(20, seed=6)
    runs = {}
    for cache in (False, True, tmp_path / "cache"):
        model, state = classifier("clip", seed=1)
        spec = eqxtl.trainable(model, "head")
        runs[str(cache)] = eqxtl.fit(
            model,
            state,
            optax.adam(1e-2),
            spec,
            eqxtl.Loader(train, eqxtl.preprocessing_for(model), 16, shuffle=True),
            test_data=eqxtl.Loader(test, eqxtl.preprocessing_for(model), 16),
            epochs=3,
            task=eqxtl.Classification(label_smoothing=0.1),
            runtime=eqxtl.Runtime(cache_features=cache, progress=False),
        )
    live = runs["False"]
    for key in ("True", str(tmp_path / "cache")):
        cached = runs[key]
        np.testing.assert_allclose(cached.model.head.weight, live.model.head.weight, atol=1e-5)
        np.testing.assert_allclose(cached.model.head.bias, live.model.head.bias, atol=1e-5)
        assert cached.final["test_accuracy"] == pytest.approx(live.final["test_accuracy"])

    # the on-disk cache holds one entry per dataset (train, test) and is reused
    def entries():
        return [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]

    assert len(entries()) == 2
    model, state = classifier("clip", seed=1)
    with monkeypatch.context() as patch:  # a cache hit computes nothing

        def no_compute(*args, **kwargs):
            raise AssertionError("recomputed features that are cached")

        patch.setattr(eqxtl.data.features, "_compute", no_compute)
        again = eqxtl.extract_features(model, state, train, cache_dir=tmp_path / "cache")
    assert isinstance(again.features, np.memmap) and again.features.shape == (50, 64)
    assert len(entries()) == 2
    # a different backbone gets its own entry
    other, other_state = classifier("clip", seed=2)
    eqxtl.extract_features(other, other_state, train, cache_dir=tmp_path / "cache")
    assert len(entries()) == 3


def test_a_grain_loader_trains_on_cached_features_like_a_loader(monkeypatch):
    """Feature caching works from any SourceBatches: a GrainLoader run extracts the
    features once and trains the same head as the Loader run."""
    calls = []
    compute = eqxtl.data.features._compute

    def counting(*args, **kwargs):
        calls.append(1)
        return compute(*args, **kwargs)

    monkeypatch.setattr(eqxtl.data.features, "_compute", counting)
    results = []
    for wrap in (lambda x: x, lambda x: eqxtl.GrainLoader(x, num_workers=0)):
        model, state = classifier("clip", seed=1)
        p = eqxtl.preprocessing_for(model)
        train = eqxtl.Loader(colour_task(24, seed=5), p, 8, shuffle=True, num_workers=0)
        result = eqxtl.fit(
            model,
            state,
            optax.adam(1e-2),
            eqxtl.trainable(model, "head"),
            wrap(train),
            test_data=wrap(eqxtl.Loader(colour_task(8, seed=6), p, 8, num_workers=0)),
            epochs=2,
            runtime=eqxtl.Runtime(progress=False),
        )
        results.append(result)
    assert len(calls) == 4  # train and test features, once per run
    live, grain = results
    np.testing.assert_allclose(grain.model.head.weight, live.model.head.weight, atol=1e-6)
    assert grain.class_names == ["red", "green", "blue"]


class _NoLabels:
    """A source that does not know its labels up front (like ``TFDSSource``)."""

    def __init__(self, source, class_names):
        self.source, self.class_names = source, class_names

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        return self.source[i]


@pytest.mark.parametrize("source", ["more classes", "label outside class_names"])
def test_a_grain_loader_refuses_labels_the_head_cannot_predict(source):
    """Labels are checked for every loader, as for ``Loader``: a source with more classes
    than the head before training, a label beyond the source's classes when it is read."""
    model, state = classifier("clip")
    if source == "more classes":
        data = colour_task(8, seed=0)
        data = eqxtl.ArraySource(data.images, data.labels, ["red", "green", "blue", "grey"])
        match = "has 4 classes but the model predicts 3"
    else:
        data = _NoLabels(colour_task(8, seed=0), ["red", "green"])  # labels reach 2
        match = r"outside \[0, 2\)"
    train = eqxtl.Loader(data, eqxtl.preprocessing_for(model), 4, num_workers=0)
    with pytest.raises(eqxtl.DataError, match=match):
        eqxtl.fit(
            model,
            state,
            optax.adam(1e-2),
            eqxtl.trainable(model, "head", *eqxtl.last_blocks(model, 1)),  # no caching
            eqxtl.GrainLoader(train, num_workers=0),
            runtime=eqxtl.Runtime(progress=False),
        )


def test_bf16_compute_keeps_f32_master_weights():
    model, state = classifier("clip")
    spec = eqxtl.trainable(model, "head", *eqxtl.last_blocks(model, 1))
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(eqx.filter(model, spec))
    images = np.random.default_rng(0).normal(size=(4, 3, 32, 32)).astype(np.float32)
    batch = {"image": images, "label": np.array([0, 1, 2, 0], np.int32)}
    losses = {}
    for dtype in (None, jnp.bfloat16):
        step = eqxtl.make_step(eqxtl.task_loss(compute_dtype=dtype), optimizer, spec, donate=False)
        new, _, new_opt, metrics = step(model, state, opt_state, batch)
        losses[dtype] = float(metrics["loss"])
        assert {x.dtype for x in jax.tree.leaves(eqx.filter(new, eqx.is_array))} == {
            jnp.dtype(jnp.float32)
        }
        assert {x.dtype for x in jax.tree.leaves(new_opt) if eqx.is_inexact_array(x)} == {
            jnp.dtype(jnp.float32)
        }
    assert losses[jnp.bfloat16] == pytest.approx(losses[None], abs=0.05)


_PARALLEL = textwrap.dedent(
    """
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import json, sys
    import equinox as eqx, jax, numpy as np, optax
    sys.path.insert(0, sys.argv[1])
    import eqxtl
    from tests._tiny import tiny

    assert jax.device_count() == 8
    backbone, state = tiny("resnet")
    model = eqxtl.Classifier(backbone, 3, key=jax.random.key(1))
    # BatchNorm trains here: its batch statistics must span all 8 devices' examples.
    spec = eqxtl.trainable(model, "head", *eqxtl.last_blocks(model, 1))
    optimizer = optax.sgd(0.1)  # (Adam would amplify float noise in tiny gradients)
    rng = np.random.default_rng(0)
    batches = [
        {"image": rng.normal(size=(16, 3, 32, 32)).astype(np.float32),
         "label": rng.integers(0, 3, 16).astype(np.int32), "mask": np.ones(16, bool)}
        for _ in range(3)
    ]
    out = {}
    for name, mesh in (("single", None), ("sharded", eqxtl.make_mesh())):
        m, s = model, state
        o = optimizer.init(eqx.filter(m, spec))
        if mesh is not None:
            m, s, o = eqxtl.shard((m, s, o), mesh)
        step = eqxtl.make_step(eqxtl.task_loss(), optimizer, spec, mesh=mesh,
                               donate=False)
        losses = []
        for b in batches:
            m, s, o, metrics = step(m, s, o, b)
            losses.append(float(metrics["loss"]))
        leaves = jax.tree.leaves(eqx.filter((m, s), eqx.is_array))
        out[name] = {"losses": losses, "params": [np.asarray(x).tolist() for x in leaves],
                     "devices": len(leaves[-1].sharding.device_set)}
    print(json.dumps(out))
    """
)


def test_data_parallel_on_8_cpu_devices_matches_one_device():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    run = subprocess.run(
        [sys.executable, "-c", _PARALLEL, str(ROOT)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["single"]["devices"] == 1 and out["sharded"]["devices"] == 8
    np.testing.assert_allclose(out["sharded"]["losses"], out["single"]["losses"], rtol=1e-5)
    for a, b in zip(out["sharded"]["params"], out["single"]["params"], strict=True):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------- examples/finetune_rps.py


def _example():
    spec = importlib.util.spec_from_file_location("finetune_rps", ROOT / "examples/finetune_rps.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("arch", ["clip", "resnet"])
def test_finetune_rps_runs_on_tfds_mock_data(tmp_path, arch, capsys):
    import tensorflow_datasets as tfds

    backbone, state = tiny(arch)
    eqxtl.save_pretrained(backbone, state, tmp_path / "weights")
    last = [f"backbone.{block}" for block in eqxtl.last_blocks(backbone, 1)]
    train = ["head"] if arch == "clip" else ["head=1e-3", *last]
    argv = [
        "--weights", str(tmp_path / "weights"), "--batch-size", "8", "--eval-every", "2",
        "--out", str(tmp_path / "out"), "--train", *train,
    ]  # fmt: skip
    with tfds.testing.mock_data(num_examples=20):
        result = _example().main(argv)
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and str(tmp_path / "out" / "best") in printed
    assert result.step == 3  # one epoch of 20 examples in batches of 8
    out = tmp_path / "out"
    history = json.loads((out / "history.json").read_text())
    assert [h["step"] for h in history] == [2, 3]
    assert (out / "history.png").read_bytes()[:8] == PNG_SIGNATURE
    model, _ = eqxtl.from_pretrained(out / "best", keep_head=True)
    assert model.num_classes == 3


def test_finetune_rps_offline_without_weights_fails_fast_and_clearly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no weights/ folder here
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    script = ROOT / "examples" / "finetune_rps.py"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    env["HF_HUB_CACHE"] = str(tmp_path / "hub")
    run = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120
    )
    assert run.returncode != 0
    assert "Traceback" not in run.stderr, run.stderr
    assert "--weights" in run.stderr and "--model" in run.stderr, run.stderr
    assert "retry" not in run.stderr.lower(), run.stderr  # no hub retry loop


def test_fetch_saves_a_loadable_copy_and_fails_clearly_offline(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("fetch", ROOT / "weights" / "fetch.py")
    fetch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fetch)
    backbone, state = tiny("resnet", 0)
    source = tmp_path / "tiny-resnet"
    eqxtl.save_pretrained(backbone, state, source)
    (saved,) = fetch.main([str(source), "--out", str(tmp_path / "weights")])
    assert saved == tmp_path / "weights" / "tiny-resnet"
    loaded, loaded_state = eqxtl.from_pretrained(saved)
    for a, b in zip(arrays((backbone, state)), arrays((loaded, loaded_state)), strict=True):
        np.testing.assert_array_equal(a, b)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(SystemExit, match="resnet50"):
        fetch.main(["resnet50", "--out", str(tmp_path / "weights")])


def test_test_data_is_preprocessed_as_the_training_loader_and_scored_whole():
    """A plain test source is preprocessed as the training Loader's examples (it was given
    the checkpoint's default, so best/ was chosen on other inputs), and an evaluation
    refuses a Loader that would augment or drop examples."""
    import dataclasses

    model, state = classifier("clip")
    own = dataclasses.replace(eqxtl.preprocessing_for(model), mean=(0.2, 0.3, 0.4), std=(0.9,) * 3)
    train, test = colour_task(16, seed=0), colour_task(6, seed=1)
    spec = eqxtl.trainable(model, "head")
    result = eqxtl.fit(
        model, state, optax.adam(1e-2), spec, eqxtl.Loader(train, own, 8, num_workers=0),
        test_data=test, runtime=eqxtl.Runtime(progress=False),
    )  # fmt: skip
    scored = {
        p: eqxtl.evaluate(result.model, result.state, eqxtl.Loader(test, p, 8))["loss"]
        for p in (own, eqxtl.preprocessing_for(model))
    }
    assert result.final["test_loss"] == pytest.approx(scored[own], rel=1e-5)
    assert scored[own] != pytest.approx(scored[eqxtl.preprocessing_for(model)], rel=1e-3)
    for loader in (
        eqxtl.Loader(test, own, 4, augment=eqxtl.Augment()),
        eqxtl.Loader(test, own, 4, drop_last=True),
    ):
        with pytest.raises(eqxtl.DataError, match=r"evaluate\(data=...\): .*augment=, drop_last="):
            eqxtl.evaluate(result.model, result.state, loader)
        with pytest.raises(eqxtl.DataError, match=r"test_data: .*augment=, drop_last="):
            eqxtl.fit(model, state, optax.adam(1e-2), spec, train, test_data=loader)
    with pytest.raises(eqxtl.DataError, match=r"evaluate\(preprocessing=...\) applies to a source"):
        eqxtl.evaluate(result.model, result.state, eqxtl.Loader(test, own, 4), preprocessing=own)
