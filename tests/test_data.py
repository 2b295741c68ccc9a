"""Data: preprocessing parity with transformers, sources, augmentation and fixed-shape,
resumable batching. Offline and fast."""

import dataclasses
import socket
import threading

import numpy as np
import pytest
from PIL import Image

from eqxtl import (
    CLIP_PREPROCESSING,
    LITE0_PREPROCESSING,
    ArraySource,
    Augment,
    DataError,
    ImageFolder,
    Loader,
    Preprocessing,
    Subset,
    TFDSSource,
    preprocess,
    split,
)
from eqxtl.models.resnet import PREPROCESSING as IMAGENET_PREPROCESSING  # removed from eqxtl

# An identity preprocessing on tiny images: a constant image of value v comes out as v, so a
# batch tells which source examples it holds.
IDENTITY = Preprocessing(resize=8, crop=8, mean=(0, 0, 0), std=(1, 1, 1), scale=1.0)


def numbered(n: int, size: int = 12) -> ArraySource:
    """``n`` constant images; image ``i`` has value ``i`` and label ``i % 3``."""
    images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, size, size, 3))
    return ArraySource(np.array(images), np.arange(n) % 3, ["a", "b", "c"])


def ids(batch) -> np.ndarray:
    return batch["image"][:, 0, 0, 0].round().astype(int)


def noise(n: int, seed: int = 0, shape=(40, 56, 3)) -> ArraySource:
    rng = np.random.default_rng(seed)
    return ArraySource(rng.integers(0, 256, (n, *shape), dtype=np.uint8), np.zeros(n, int))


def stack(batches) -> dict:
    return {k: np.stack([b[k] for b in batches]) for k in ("image", "label", "mask")}


# ---------------------------------------------------------------- preprocessing


def _images() -> dict[str, np.ndarray]:
    import skimage.data as skimage_data

    astronaut = skimage_data.astronaut()
    return {
        "chelsea": skimage_data.chelsea(),  # (300, 451, 3)
        "coffee": skimage_data.coffee(),  # (400, 600, 3)
        "small_portrait": np.asarray(Image.fromarray(astronaut).resize((61, 97))),  # upsampled
    }


@pytest.mark.parametrize("name", ["chelsea", "coffee", "small_portrait"])
@pytest.mark.parametrize("resize", [224, 200])  # 200 < crop 224: the crop zero-pads
def test_clip_preprocessing_matches_transformers(name, resize):
    import transformers

    image = _images()[name]
    reference = transformers.CLIPImageProcessorPil(size={"shortest_edge": resize})
    expected = reference(image, return_tensors="np")["pixel_values"][0]
    p = dataclasses.replace(CLIP_PREPROCESSING, resize=resize)
    got = preprocess(image, p)
    assert got.shape == expected.shape == (3, 224, 224) and got.dtype == np.float32
    # Same algorithm (PIL resize of uint8, same rounding and crop offsets): only float32 vs
    # float64 arithmetic differs. Measured: max |diff| <= 4.8e-7, cosine 1 - 1e-7.
    assert np.max(np.abs(got - expected)) < 1e-5
    got64, expected64 = got.ravel().astype(np.float64), expected.ravel().astype(np.float64)
    cosine = got64 @ expected64 / (np.linalg.norm(got64) * np.linalg.norm(expected64))
    assert cosine > 0.999999


@pytest.mark.parametrize("name", ["chelsea", "small_portrait"])
def test_imagenet_preprocessing_matches_transformers_resnet(name):
    import transformers
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    # microsoft/resnet-*'s preprocessor_config: ConvNext processor, size 224, crop_pct 0.875.
    reference = transformers.ConvNextImageProcessorPil(
        size={"shortest_edge": 224},
        crop_pct=0.875,
        resample=3,
        image_mean=IMAGENET_DEFAULT_MEAN,
        image_std=IMAGENET_DEFAULT_STD,
    )
    image = _images()[name]
    expected = reference(image, return_tensors="np")["pixel_values"][0]
    got = preprocess(image, IMAGENET_PREPROCESSING)
    assert got.shape == expected.shape == (3, 224, 224)
    assert np.max(np.abs(got - expected)) < 1e-5


def test_preset_normalisations():
    white, grey = np.full((300, 400, 3), 255, np.uint8), np.full((300, 400, 3), 127, np.uint8)
    # EfficientNet-Lite0: (x - 127) / 128 on 0..255.
    np.testing.assert_allclose(preprocess(grey, LITE0_PREPROCESSING), 0.0, atol=1e-6)
    np.testing.assert_allclose(preprocess(white, LITE0_PREPROCESSING), 1.0, atol=1e-6)
    out = preprocess(white, IMAGENET_PREPROCESSING)
    assert out.shape == (3, 224, 224)
    np.testing.assert_allclose(
        out[:, 0, 0], (1 - np.array([0.485, 0.456, 0.406])) / [0.229, 0.224, 0.225], rtol=1e-5
    )


def test_preprocess_accepts_other_image_kinds():
    rgb = _images()["chelsea"]
    gray = rgb[..., 0]
    expected_gray = preprocess(np.repeat(gray[..., None], 3, -1), CLIP_PREPROCESSING)
    np.testing.assert_array_equal(preprocess(gray, CLIP_PREPROCESSING), expected_gray)
    np.testing.assert_array_equal(preprocess(gray[..., None], CLIP_PREPROCESSING), expected_gray)
    expected = preprocess(rgb, CLIP_PREPROCESSING)
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 7, np.uint8)], -1)
    np.testing.assert_array_equal(preprocess(rgba, CLIP_PREPROCESSING), expected)
    np.testing.assert_array_equal(preprocess(Image.fromarray(rgb), CLIP_PREPROCESSING), expected)
    np.testing.assert_array_equal(preprocess(rgb / 255.0, CLIP_PREPROCESSING), expected)
    np.testing.assert_array_equal(preprocess(rgb.astype(np.int64), CLIP_PREPROCESSING), expected)


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((5,), np.uint8), "shape"),
        (np.zeros((2, 4, 4, 3), np.uint8), "one image at a time"),
        (np.zeros((0, 5, 3), np.uint8), "empty"),
        (np.zeros((8, 8, 5), np.uint8), "channels"),
        (np.zeros((3, 32, 32), np.uint8), "channels-first"),
        (np.full((8, 8, 3), 2.0), r"\[0, 1\]"),
        (np.full((8, 8, 3), 300), "0..255"),
        (np.zeros((8, 8, 3), np.complex64), "dtype"),
    ],
)
def test_preprocess_bad_input(image, message):
    with pytest.raises(DataError, match=message):
        preprocess(image, CLIP_PREPROCESSING)


def test_bad_preprocessing_and_augment():
    with pytest.raises(DataError, match="interpolation"):
        Preprocessing(interpolation="cubic")
    with pytest.raises(DataError, match="scale"):
        Augment(scale=(0.0, 1.0))


# ---------------------------------------------------------------- loader


def test_loader_fixed_shapes_and_every_example_once():
    source = numbered(10)
    loader = Loader(source, IDENTITY, 4, shuffle=True, seed=3)
    assert len(loader) == 3
    batches = list(loader.epoch(0))
    assert len(batches) == 3
    for b in batches:
        assert b["image"].shape == (4, 3, 8, 8) and b["image"].dtype == np.float32
        assert b["label"].shape == (4,) and b["label"].dtype == np.int32
        assert b["mask"].shape == (4,) and b["mask"].dtype == bool
    out = stack(batches)
    assert out["mask"].sum() == len(source)
    seen = np.concatenate([ids(b)[b["mask"]] for b in batches])
    assert sorted(seen) == list(range(10))
    np.testing.assert_array_equal(
        np.concatenate([b["label"][b["mask"]] for b in batches]), seen % 3
    )
    last = batches[-1]  # 2 real examples, 2 padding copies of the first, label 0
    assert last["mask"].tolist() == [True, True, False, False]
    np.testing.assert_array_equal(last["image"][2:], last["image"][[0, 0]])
    assert last["label"][2:].tolist() == [0, 0]


def test_loader_order_is_a_function_of_seed_and_epoch():
    source = numbered(10)
    a, b = (Loader(source, IDENTITY, 4, shuffle=True, seed=3) for _ in range(2))
    order = lambda loader, e: np.concatenate([ids(x) for x in loader.epoch(e)])  # noqa: E731
    np.testing.assert_array_equal(order(a, 0), order(b, 0))
    assert not np.array_equal(order(a, 0), order(a, 1))
    other = Loader(source, IDENTITY, 4, shuffle=True, seed=4)
    assert not np.array_equal(order(a, 0), order(other, 0))
    plain = Loader(source, IDENTITY, 4)
    assert order(plain, 0)[:10].tolist() == list(range(10))


@pytest.mark.parametrize("augment", [None, Augment()])
def test_loader_resume_is_the_tail(augment):
    loader = Loader(noise(11), IDENTITY, 3, shuffle=True, seed=1, augment=augment)
    full = stack(list(loader.epoch(2)))
    tail = stack(list(loader.epoch(2, start_step=2)))
    for k in full:
        np.testing.assert_array_equal(full[k][2:], tail[k])


def test_loader_without_threads_and_drop_last():
    source = numbered(10)
    threaded = stack(list(Loader(source, IDENTITY, 4, shuffle=True).epoch(1)))
    inline = stack(list(Loader(source, IDENTITY, 4, shuffle=True, num_workers=0).epoch(1)))
    for k in threaded:
        np.testing.assert_array_equal(threaded[k], inline[k])
    dropped = Loader(source, IDENTITY, 4, drop_last=True)
    assert len(dropped) == 2 and all(b["mask"].all() for b in dropped.epoch(0))


def test_augment_is_deterministic_and_changes_pixels():
    source = noise(4)
    p = Preprocessing(resize=32, crop=32)
    make = lambda: Loader(source, p, 4, seed=7, augment=Augment())  # noqa: E731
    first, again = next(make().epoch(0)), next(make().epoch(0))
    np.testing.assert_array_equal(first["image"], again["image"])
    plain = next(Loader(source, p, 4).epoch(0))
    assert not np.allclose(first["image"], plain["image"])
    next_epoch = next(make().epoch(1))
    assert not np.allclose(first["image"], next_epoch["image"])
    assert first["image"].shape == plain["image"].shape == (4, 3, 32, 32)


@pytest.mark.parametrize("shape", [(40, 56), (4, 500), (500, 4)])
def test_augment_window_inside_image(shape):
    augment, rng = Augment(), np.random.default_rng(0)
    for _ in range(200):
        left, top, right, bottom = augment.window(*shape, rng)
        assert 0 <= left < right <= shape[1] and 0 <= top < bottom <= shape[0]


def test_flip_only_augment_mirrors():
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    p = Preprocessing(resize=16, crop=16)
    flip = Augment(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=1.0)
    out = flip(image, p, np.random.default_rng(0))
    np.testing.assert_allclose(out, preprocess(image, p)[:, :, ::-1], atol=1e-6)


def _loader_threads() -> int:
    return sum(t.name.startswith("eqxtl-loader") for t in threading.enumerate())


def test_loader_stops_its_threads_when_abandoned():
    before = _loader_threads()
    batches = Loader(noise(64), IDENTITY, 2, num_workers=4).epoch(0)
    next(batches)
    assert _loader_threads() > before
    batches.close()
    for thread in threading.enumerate():  # each finishes its current example, then exits
        if thread.name.startswith("eqxtl-loader"):
            thread.join(timeout=60)  # a guard against a hang, not a speed limit
    assert _loader_threads() == before


def test_loader_reraises_source_errors():
    class Broken(ArraySource):
        def __getitem__(self, index):
            raise RuntimeError("boom")

    loader = Loader(Broken(np.zeros((3, 4, 4, 3), np.uint8), [0, 1, 2]), IDENTITY, 2)
    with pytest.raises(RuntimeError, match="boom"):
        next(loader.epoch(0))


# ---------------------------------------------------------------- sources


def test_array_source_validation():
    with pytest.raises(DataError, match="2 labels"):
        ArraySource(np.zeros((3, 4, 4, 3), np.uint8), [0, 1])
    with pytest.raises(DataError, match="0..1"):
        ArraySource(np.zeros((2, 4, 4, 3), np.uint8), [0, 2], ["a", "b"])
    with pytest.raises(DataError, match="integer"):
        ArraySource(np.zeros((2, 4, 4, 3), np.uint8), [0.5, 1.0])
    source = ArraySource(np.zeros((2, 4, 4), np.uint8), [0, 2])
    assert source.class_names == ["0", "1", "2"]
    assert source[-1][1] == 2
    with pytest.raises(IndexError):
        source[2]


def test_split_is_stratified_disjoint_and_deterministic():
    source = ArraySource(np.zeros((40, 2, 2, 3), np.uint8), np.repeat([0, 1, 2, 3], 10))
    train, test = split(source, 0.2, seed=0)
    assert isinstance(train, Subset) and len(train) == 32 and len(test) == 8
    assert np.bincount(test.labels).tolist() == [2, 2, 2, 2]
    assert sorted(np.concatenate([train.indices, test.indices]).tolist()) == list(range(40))
    again, _ = split(source, 0.2, seed=0)
    np.testing.assert_array_equal(train.indices, again.indices)
    other, _ = split(source, 0.2, seed=1)
    assert not np.array_equal(train.indices, other.indices)
    assert test[0][1] == test.labels[0] and test.class_names == source.class_names


def _write_image(path, seed, size=(20, 30)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def test_image_folder(tmp_path):
    for d in ("dogs", "cats"):
        (tmp_path / d).mkdir()
    _write_image(tmp_path / "cats" / "a.png", 0)
    _write_image(tmp_path / "cats" / "b.JPG", 1)
    _write_image(tmp_path / "dogs" / "c.jpeg", 2, size=(31, 17))
    (tmp_path / "dogs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (tmp_path / "dogs" / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match="Skipped 1"):
        folder = ImageFolder(tmp_path)
    assert folder.class_names == ["cats", "dogs"]
    assert len(folder) == 3 and folder.labels.tolist() == [0, 0, 1]
    assert [p.name for p, _ in folder.skipped] == ["broken.png"]
    assert len(folder.ignored) == 1
    assert "broken.png" in folder.report() and "cats: 2, dogs: 1" in folder.report()
    image, label = folder[2]
    assert image.shape == (31, 17, 3) and image.dtype == np.uint8 and label == 1
    batch = next(Loader(folder, IDENTITY, 4).epoch(0))
    assert batch["mask"].tolist() == [True, True, True, False]


def test_image_folder_corrupt_at_load_time_is_masked(tmp_path):
    (tmp_path / "x").mkdir()
    _write_image(tmp_path / "x" / "good.png", 0)
    (tmp_path / "x" / "truncated.png").write_bytes(b"garbage")
    folder = ImageFolder(tmp_path, verify=False)  # the bad file is only found when read
    with pytest.warns(UserWarning, match="truncated.png"):
        batch = next(Loader(folder, IDENTITY, 2).epoch(0))
    assert batch["mask"].tolist() == [True, False]


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        ImageFolder(tmp_path / "missing")
    with pytest.raises(DataError, match="No readable images"):
        ImageFolder(tmp_path)
    (tmp_path / "empty_class").mkdir()
    (tmp_path / "empty_class" / "readme.md").write_text("hi")
    with pytest.raises(DataError, match="root/<class_name>/<image>"):
        ImageFolder(tmp_path)


def test_tfds_source_under_mock_data():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=5):
        source = TFDSSource("rock_paper_scissors", "train")
        assert len(source) == 5
        assert source.class_names == ["rock", "paper", "scissors"]
        image, label = source[0]
        assert image.shape == (300, 300, 3) and image.dtype == np.uint8
        assert isinstance(label, int) and 0 <= label < 3
        batches = list(Loader(source, IDENTITY, 2).epoch(0))
    assert len(batches) == 3 and sum(b["mask"].sum() for b in batches) == 5


def test_tfds_source_not_prepared_fails_fast(tmp_path, monkeypatch):
    import tensorflow_datasets  # noqa: F401  (the test extra installs it)

    def no_network(*args, **kwargs):
        raise AssertionError("TFDSSource tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(DataError) as info:  # at once: no download, no retry loop
        TFDSSource("rock_paper_scissors", "train", data_dir=tmp_path)
    message = str(info.value)
    assert "not prepared" in message and str(tmp_path) in message
    assert 'pip install -e ".[tfds-prepare]"' in message  # from the clone: not on PyPI
    assert "tfds.data_source('rock_paper_scissors'" in message
