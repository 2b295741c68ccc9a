"""Hugging Face ``datasets`` as a source (``HFDataset``) and few-shot linear probes during
training (``FewShotEval``), on datasets built from scikit-image's bundled photos (offline)."""

import json

import datasets
import equinox as eqx
import jax
import numpy as np
import optax
import pytest
import skimage.data
from sklearn.linear_model import RidgeClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

import eqxtl
import eqxtl.data.features
from eqxtl.data.images import as_rgb
from eqxtl.training.fewshot import BIAS_CONSTANT, ridge_fit, ridge_scores
from tests._tiny import tiny
from tests.test_fit_api import _tensorboard_scalars

PHOTOS = ("astronaut", "coffee", "chelsea", "camera")  # camera is grayscale


def crops(per_class: int, seed: int, size: int = 40):
    """Random ``size`` x ``size`` crops of each photo; the class is the photo."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for c, name in enumerate(PHOTOS):
        photo = getattr(skimage.data, name)()
        for _ in range(per_class):
            y, x = rng.integers(0, photo.shape[0] - size), rng.integers(0, photo.shape[1] - size)
            images.append(photo[y : y + size, x : x + size])
            labels.append(c)
    return images, labels


def photo_dataset(per_class: int, seed: int) -> datasets.Dataset:
    images, labels = crops(per_class, seed)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=list(PHOTOS)),
            "caption": datasets.Value("string"),
        }
    )
    captions = [f"{PHOTOS[c]} {i}" for i, c in enumerate(labels)]
    data = {"image": images, "label": labels, "caption": captions}
    return datasets.Dataset.from_dict(data, features=features)


@pytest.fixture(scope="module")
def photos():
    return photo_dataset(12, seed=0), photo_dataset(4, seed=1)


def test_hf_dataset_reads_images_labels_and_class_names(photos):
    ds = photos[0]
    images, labels = crops(12, seed=0)
    source = eqxtl.HFDataset(ds)
    assert len(source) == 48 and source.class_names == list(PHOTOS)
    np.testing.assert_array_equal(source.labels, labels)
    for i in (0, 20, 47):  # PNG is lossless; camera (index 47) is grayscale
        image, label = source[i]
        assert image.dtype == np.uint8 and image.shape == (40, 40, 3) and label == labels[i]
        np.testing.assert_array_equal(image, as_rgb(images[i]))
    with pytest.raises(IndexError):
        source[48]

    # rows reordered and selected (an indices mapping over the same table)
    picked = ds.shuffle(seed=3).select(range(7))
    sub = eqxtl.HFDataset(picked)
    for i in range(7):
        j = int(picked[i]["caption"].split()[-1])
        np.testing.assert_array_equal(sub[i][0], as_rgb(images[j]))
        assert sub[i][1] == labels[j] == sub.labels[i]

    # undecoded images, arrays (uint8 nested lists, float Array3D), integer labels + names
    undecoded = eqxtl.HFDataset(ds.cast_column("image", datasets.Image(decode=False)))
    np.testing.assert_array_equal(undecoded[5][0], as_rgb(images[5]))
    rgb = [as_rgb(im) for im in images[:3]]
    lists = datasets.Dataset.from_dict({"pixels": rgb, "y": labels[:3]})
    arrays = eqxtl.HFDataset(lists, "pixels", "y", class_names=PHOTOS)
    np.testing.assert_array_equal(arrays[2][0], rgb[2])
    floats = datasets.Dataset.from_dict(
        {"x": [im / 255.0 for im in rgb], "y": labels[:3]},
        features=datasets.Features(
            {"x": datasets.Array3D((40, 40, 3), "float32"), "y": datasets.Value("int64")}
        ),
    )
    np.testing.assert_array_equal(
        eqxtl.HFDataset(floats, "x", "y", class_names=PHOTOS)[1][0], rgb[1]
    )

    # the feature-cache key follows the contents: equal data, equal key; a label changes it
    assert eqxtl.HFDataset(photo_dataset(12, seed=0)).fingerprint() == source.fingerprint()
    relabelled = ds.map(lambda x, i: {"label": (x["label"] + (i == 0)) % 4}, with_indices=True)
    assert eqxtl.HFDataset(relabelled).fingerprint() != source.fingerprint()
    assert eqxtl.HFDataset(ds, class_names=PHOTOS).fingerprint() == source.fingerprint()


def test_hf_dataset_bad_input(photos):
    ds = photos[1]
    with pytest.raises(eqxtl.DataError, match=r"no column 'img'.*'image' \(Image.*'label'"):
        eqxtl.HFDataset(ds, image="img")
    with pytest.raises(eqxtl.DataError, match=r"label='labels'.*no column 'labels'"):
        eqxtl.HFDataset(ds, label="labels")
    with pytest.raises(eqxtl.DataError, match=r"'caption' holds Value\('string'\), not images.*"
                       r"file paths.*cast_column\('caption', datasets\.Image\(\)\)"):  # fmt: skip
        eqxtl.HFDataset(ds, image="caption")
    with pytest.raises(eqxtl.DataError, match=r"'label' holds ClassLabel"):
        eqxtl.HFDataset(ds, image="label")
    with pytest.raises(eqxtl.DataError, match=r"class_encode_column\('caption'\)"):
        eqxtl.HFDataset(ds, label="caption")
    with pytest.raises(eqxtl.DataError, match="differ from the names of the ClassLabel"):
        eqxtl.HFDataset(ds, class_names=["a", "b", "c", "d"])
    plain = ds.cast_column("label", datasets.Value("int64"))
    with pytest.raises(eqxtl.DataError, match=r"plain integer column.*class_names="):
        eqxtl.HFDataset(plain)
    with pytest.raises(eqxtl.DataError, match=r"label 3 of example 12 is outside 0\.\.2"):
        eqxtl.HFDataset(plain, class_names=PHOTOS[:3])
    unlabelled = ds.map(lambda x, i: {"label": -1 if i == 2 else x["label"]}, with_indices=True)
    with pytest.raises(eqxtl.DataError, match=r"label -1 of example 2 .*missing label"):
        eqxtl.HFDataset(unlabelled)
    no_label = ds.map(lambda x, i: {"label": None if i == 3 else x["label"]}, with_indices=True)
    with pytest.raises(eqxtl.DataError, match=r"1 examples have no label \(the first: example 3\)"):
        eqxtl.HFDataset(no_label)
    # labels beyond the head: the same check as every source
    with pytest.raises(eqxtl.DataError, match="has 4 classes but the model predicts 3"):
        eqxtl.check_labels(eqxtl.HFDataset(ds), 3)

    stream = ds.to_iterable_dataset()
    with pytest.raises(eqxtl.DataError, match=r"streaming IterableDataset.*stream\.take\(n\)"):
        eqxtl.HFDataset(stream)
    # the materialisation the message suggests works
    kept = datasets.Dataset.from_list(list(stream.take(5)), features=stream.features)
    assert eqxtl.HFDataset(kept).class_names == list(PHOTOS) and len(eqxtl.HFDataset(kept)) == 5
    with pytest.raises(
        eqxtl.DataError, match=r"splits \['train', 'test'\]: pass dataset\['train'\]"
    ):
        eqxtl.HFDataset(datasets.DatasetDict({"train": ds, "test": ds}))
    with pytest.raises(eqxtl.DataError, match="takes a datasets.Dataset, got list"):
        eqxtl.HFDataset([1, 2])

    # an example without an image is masked out by the Loader, with a warning
    holes = ds.map(lambda x, i: {"image": None if i == 1 else x["image"]}, with_indices=True)
    loader = eqxtl.Loader(eqxtl.HFDataset(holes), eqxtl.Preprocessing(resize=8, crop=8), 4)
    with pytest.warns(UserWarning, match="Example 1 .* has no image"):
        batch = next(iter(loader))
    np.testing.assert_array_equal(batch["mask"], [True, False, True, True])


def _sklearn_fewshot(features, labels, test_features, test_labels, shots, l2_reg, seed=0):
    """big_vision's draw (per class, a default_rng(seed) permutation; the first k), and
    scikit-learn's ridge classifier on standardised features with the bias column."""
    rng = np.random.default_rng(seed)
    order = [rng.permutation(np.flatnonzero(labels == c)) for c in range(len(PHOTOS))]
    out = {}
    for k in shots:
        idx = np.concatenate([o[:k] for o in order])
        bias = FunctionTransformer(lambda x: np.hstack([x, np.full((len(x), 1), BIAS_CONSTANT)]))
        ridge = RidgeClassifier(alpha=l2_reg, fit_intercept=False, solver="cholesky")
        probe = make_pipeline(StandardScaler(), bias, ridge).fit(features[idx], labels[idx])
        out[f"fewshot_{k}shot_accuracy"] = np.mean(probe.predict(test_features) == test_labels)
    return out


def test_fit_on_hf_data_caches_features_shards_and_logs_fewshot(photos, tmp_path, monkeypatch):
    train, test = eqxtl.HFDataset(photos[0]), eqxtl.HFDataset(photos[1])
    backbone, state = tiny("vit")
    model = eqxtl.Classifier(backbone, 4, key=jax.random.key(1))
    prep = eqxtl.preprocessing_for(model)
    loader = eqxtl.Loader(train, prep, 16, shuffle=True, seed=2)

    # each process's part of each global batch (data parallel): the loader's batches
    parts = [list(eqxtl.ProcessShard(loader, index=i, count=2).epoch(1)) for i in range(2)]
    for i, want in enumerate(loader.epoch(1)):
        for key in ("image", "label", "mask"):
            joined = np.concatenate([parts[0][i][key], parts[1][i][key]])
            np.testing.assert_array_equal(joined, want[key])

    fewshot = eqxtl.FewShotEval(train, test, shots=(1, 5, 10))
    result = eqxtl.fit(
        model,
        state,
        optax.adam(1e-2),
        eqxtl.trainable(model, "head"),
        loader,
        test_data=eqxtl.Loader(test, prep, 16),
        callbacks=[eqxtl.TensorBoard(), fewshot],  # before it, and still sees its metrics
        checkpoint=eqxtl.Checkpoint(tmp_path / "run", best="fewshot_5shot_accuracy"),
        runtime=eqxtl.Runtime(cache_features=tmp_path / "cache", progress=False),
    )
    record = result.history[-1]
    assert record["step"] == 3 and "test_accuracy" in record
    logged = json.loads((tmp_path / "run" / "history.jsonl").read_text().splitlines()[-1])
    assert logged == pytest.approx(record) and "fewshot_5shot_accuracy" in logged
    best = json.loads((tmp_path / "run" / "best" / "meta.json").read_text())
    assert best["best_metric"] == "fewshot_5shot_accuracy"
    assert best["best"] == record["fewshot_5shot_accuracy"]
    scalars = _tensorboard_scalars(tmp_path / "run" / "tensorboard")
    assert scalars["fewshot/10shot_accuracy"] == [
        (3, pytest.approx(record["fewshot_10shot_accuracy"]))
    ]

    # the probes equal scikit-learn's ridge classifier on the same features
    feats = eqxtl.extract_features(result.model, result.state, train, cache_dir=tmp_path / "cache")
    test_feats = eqxtl.extract_features(result.model, result.state, test)
    want = _sklearn_fewshot(
        np.asarray(feats.features), feats.labels, test_feats.features, test_feats.labels,
        (1, 5, 10), fewshot.l2_reg,
    )  # fmt: skip
    assert {k: record[k] for k in want} == pytest.approx(want, abs=1e-12)
    assert want["fewshot_10shot_accuracy"] > 0.25  # above chance with 4 classes

    # the features fit cached were reused (one entry per dataset), keyed on the HF data
    entries = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 2
    monkeypatch.setattr(eqxtl.data.features, "_compute", pytest.fail)
    again = eqxtl.extract_features(model, state, eqxtl.HFDataset(photo_dataset(12, seed=0)),
                                   cache_dir=tmp_path / "cache")  # fmt: skip
    np.testing.assert_array_equal(again.features, feats.features)


@pytest.mark.parametrize("n", [30, 3])  # primal (N > D + 1) and dual (N < D + 1) forms
def test_ridge_probe_equals_scikit_learn(n):
    rng = np.random.default_rng(n)
    x, y = rng.normal(size=(n, 8)) * rng.uniform(0.5, 3, 8) + 1.0, np.arange(n) % 3
    test = rng.normal(size=(50, 8)) * 2 + 1.0
    fitted = ridge_fit(x, y, 3, 0.5)
    z = (x - x.mean(0)) / (x.std(0) + 1e-5)
    ridge = RidgeClassifier(alpha=0.5, fit_intercept=False).fit(
        np.hstack([z, np.full((n, 1), BIAS_CONSTANT)]), y
    )
    zt = np.hstack([(test - x.mean(0)) / (x.std(0) + 1e-5), np.full((50, 1), BIAS_CONSTANT)])
    np.testing.assert_allclose(ridge_scores(fitted, test), ridge.decision_function(zt), rtol=1e-8)
    np.testing.assert_array_equal(ridge_scores(fitted, test).argmax(1), ridge.predict(zt))


def test_fewshot_bad_input(photos):
    train, test = eqxtl.HFDataset(photos[0]), eqxtl.HFDataset(photos[1])
    with pytest.raises(eqxtl.DataError, match=r"up to 13 examples.*'astronaut': 12.*at most 12"):
        eqxtl.FewShotEval(train, test, shots=(1, 13))
    for bad, match in [
        ((0,), r"shots=\.\.\.\) \(examples per class\) must be an integer >= 1, got 0"),
        ((1, -5), "got -5"),
        ((2.5,), "got 2.5"),
        ((), "non-empty list"),
        (5, "non-empty list"),
        ((5, 5), "repeats"),
    ]:
        with pytest.raises(eqxtl.DataError, match=match):
            eqxtl.FewShotEval(train, test, shots=bad)
    for l2 in (0, -1.0, float("nan")):
        with pytest.raises(eqxtl.DataError, match=r"l2_reg=\.\.\.\) must be a finite number > 0"):
            eqxtl.FewShotEval(train, test, l2_reg=l2)
    other = eqxtl.HFDataset(photos[1].cast_column("label", datasets.ClassLabel(names=list("abcd"))))
    with pytest.raises(eqxtl.DataError, match="few-shot test data classes differ"):
        eqxtl.FewShotEval(train, other)
    with pytest.raises(eqxtl.DataError, match="takes a source"):
        eqxtl.FewShotEval(train, None)
    probe = eqxtl.FewShotEval(train, test, shots=(2,))
    linear = eqx.nn.Linear(3, 4, key=jax.random.key(0))
    with pytest.raises(eqxtl.TrainingError, match="has none: it needs an eqxtl.Classifier"):
        probe.evaluate(linear, eqx.nn.State(linear))
