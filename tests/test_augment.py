"""RandAugment, TrivialAugment and RandomErasing (eqxtl/data/augment.py): op-by-op parity with
timm's and torchvision's PIL ops (golden fixture tests/fixtures/timm_augment, made by
make_augment.py with the same Pillow, 13.0.0: exact, tolerance 0), the sampling
distributions, the box distribution of random erasing against timm's, the place of each
in ``Augment`` and the loaders, and bad input."""

import json
import math
import os
import pickle

import numpy as np
import pytest
from PIL import Image

import eqxtl
from eqxtl.data.augment import RandAugment, TrivialAugment

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "timm_augment")
IMAGENET = eqxtl.Preprocessing(
    resize=40, crop=40, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)
)  # bicubic: the fixture's filter; its fill (124, 116, 104) is this mean
RAW = eqxtl.Preprocessing(resize=48, crop=32, mean=(0, 0, 0), std=(1, 1, 1), scale=1.0)
"""Normalisation that keeps the uint8 values: Augment's output is the uint8 view itself."""


@pytest.fixture(scope="module")
def golden():
    with open(os.path.join(FIXTURE, "ops.json")) as f:
        manifest = json.load(f)
    with np.load(os.path.join(FIXTURE, "golden.npz")) as z:
        return manifest, {k: z[k] for k in z.files}


def test_fixture_was_made_with_this_pillow(golden):
    manifest, _ = golden
    assert manifest["versions"]["pillow"] == Image.__version__  # exact parity needs it


def test_rand_augment_ops_equal_the_reference(golden):
    manifest, g = golden
    rows = manifest["rand_augment"]["rows"]
    ra = eqxtl.RandAugment()
    assert {r["op"] for r in rows} == set(ra.op_names) | set(RandAugment(increasing=False).op_names)
    for row, want in zip(rows, g["rand_augment"], strict=True):
        image = g["input"][row["image"]]
        got = ra.op(image, row["op"], row["magnitude"], IMAGENET, negate=row["negate"])
        assert got.dtype == np.uint8 and got.shape == want.shape
        np.testing.assert_array_equal(got, want, err_msg=str(row))
        assert (got != image).any(-1).mean() > 0.01, row  # each row tells the op from none


def test_trivial_augment_ops_and_bins_equal_the_reference(golden):
    manifest, g = golden
    rows = manifest["trivial_augment"]["rows"]
    ta = eqxtl.TrivialAugment()
    assert {r["op"] for r in rows} | {"Identity"} == set(ta.op_names)
    for row, want in zip(rows, g["trivial_augment"], strict=True):
        got = ta.op(g["input"][row["image"]], row["op"], row["bin"], negate=row["negate"])
        np.testing.assert_array_equal(got, want, err_msg=str(row))
    for n in (31, 7):  # float32 bins to the last bit: int(15.999999) is not int(16.0)
        names = manifest["ta_bins"][f"ta_bins_{n}"]
        for name, want in zip(names, g[f"ta_bins_{n}"], strict=True):
            got = TrivialAugment(num_bins=n).magnitudes(name).astype(np.float32)
            np.testing.assert_array_equal(got, want, err_msg=f"{name} {n}")


def test_posterize_to_zero_bits_is_black():
    # Pillow 13 refuses 0 bits (the reference raises there); older Pillow gave black
    image = np.full((8, 8, 3), 200, np.uint8)
    ra = eqxtl.RandAugment()
    assert not ra.op(image, "PosterizeIncreasing", 10, IMAGENET).any()
    assert not ra.op(image, "Posterize", 2, IMAGENET).any()
    assert (ra.op(image, "Posterize", 10, IMAGENET) == 192).all()  # 4 bits


def test_affine_filter_falls_back_to_bicubic(golden):
    _, g = golden
    lanczos = eqxtl.Preprocessing(**{**vars(IMAGENET), "interpolation": "lanczos"})
    ra, image = eqxtl.RandAugment(), g["input"][0]
    want = ra.op(image, "Rotate", 7, IMAGENET)
    np.testing.assert_array_equal(ra.op(image, "Rotate", 7, lanczos), want)


def _record(monkeypatch, cls):
    calls = []

    def apply(self, im, name, *args):
        calls.append((name, *args))
        return im

    monkeypatch.setattr(cls, "_apply", apply)
    return calls


def test_rand_augment_sampling(monkeypatch):
    calls = _record(monkeypatch, RandAugment)
    image, n = np.zeros((4, 4, 3), np.uint8), 4000
    for i in range(n):
        eqxtl.RandAugment()(image, IMAGENET, np.random.default_rng(i))
    # 2 ops per image, each applied with probability 1/2
    assert abs(len(calls) / n - 1.0) < 5 * math.sqrt(0.5 / n)
    names = [c[0] for c in calls]
    ops = eqxtl.RandAugment().op_names
    assert len(ops) == 15 and "SolarizeIncreasing" in ops and "Solarize" not in ops
    counts = np.array([names.count(op) for op in ops])
    expected = len(calls) / len(ops)
    assert ((counts - expected) ** 2 / expected).sum() < 50  # chi2, 14 dof: p ~ 1e-5
    m = np.array([c[1] for c in calls])
    assert m.min() >= 0 and m.max() == 10  # N(9, 0.5) clipped to [0, 10]
    assert abs((m == 10).mean() - 0.02275) < 0.012
    assert abs(np.median(m) - 9) < 0.05 and 0.42 < m.std() < 0.5
    signed = [c[2] for c in calls if c[0] in ("Rotate", "ShearX", "ShearY", "ColorIncreasing")]
    assert abs(np.mean(signed) - 0.5) < 0.1
    assert not any(c[2] for c in calls if c[0] in ("Equalize", "PosterizeIncreasing"))
    calls.clear()
    fixed = eqxtl.RandAugment(num_ops=3, magnitude=4, magnitude_std=0, prob=1, increasing=False)
    uniform = eqxtl.RandAugment(magnitude=6, magnitude_std=math.inf, prob=1, ops=("Rotate",))
    for i in range(300):
        fixed(image, IMAGENET, np.random.default_rng(i))
    assert (
        len(calls) == 900 and {c[1] for c in calls} == {4.0} and "Solarize" in {c[0] for c in calls}
    )
    calls.clear()
    for i in range(600):
        uniform(image, IMAGENET, np.random.default_rng(i))
    m = np.array([c[1] for c in calls])
    assert m.min() >= 0 and m.max() <= 6 and abs(m.mean() - 3) < 0.3


def test_trivial_augment_sampling(monkeypatch):
    calls = _record(monkeypatch, TrivialAugment)
    image, n, ta = np.zeros((4, 4, 3), np.uint8), 2800, eqxtl.TrivialAugment()
    for i in range(n):
        ta(image, IMAGENET, np.random.default_rng(i))
    names = [c[0] for c in calls]
    counts = np.array([names.count(op) for op in ta.op_names])
    assert ((counts - n / 14) ** 2 / (n / 14)).sum() < 45  # chi2, 13 dof
    rotations = np.array([v for name, v in calls if name == "Rotate"])
    assert set(np.abs(rotations)) <= {float(b) for b in ta.magnitudes("Rotate")}
    assert len(set(np.abs(rotations))) > 25 and 0.35 < (rotations < 0).mean() < 0.65
    assert all(v >= 0 for name, v in calls if name == "Solarize")  # unsigned: never negated


def test_random_erasing_boxes_match_the_reference(golden):
    _, g = golden
    ref = g["erase_boxes"].astype(np.int64)
    erase, ones = eqxtl.RandomErasing(prob=1.0, mode="const"), np.ones((3, 64, 64), np.float32)
    ours = []
    for i in range(len(ref)):
        zero = erase(ones, np.random.default_rng(i))[0] == 0
        ours.append((zero.any(1).sum(), zero.any(0).sum()))
    ours = np.array(ours)

    def ks(a, b):  # two-sample Kolmogorov-Smirnov statistic
        grid = np.union1d(a, b)
        cdf = lambda x: np.searchsorted(np.sort(x), grid, side="right") / len(x)  # noqa: E731
        return np.abs(cdf(a) - cdf(b)).max()

    area = lambda hw: hw[:, 0] * hw[:, 1]  # noqa: E731
    aspect = lambda hw: np.log(np.maximum(hw[:, 0], 1) / np.maximum(hw[:, 1], 1))  # noqa: E731
    assert ks(area(ours), area(ref)) < 0.045  # 4000 each: p < 0.001 above ~0.044
    assert ks(aspect(ours), aspect(ref)) < 0.045
    assert area(ours).max() <= 64 * 64 / 3 + 2 * 64 and area(ours).min() >= 0.02 * 64 * 64 - 2 * 8


def test_random_erasing_modes():
    x = np.random.default_rng(0).standard_normal((3, 32, 32)).astype(np.float32)
    same = x.copy()
    assert eqxtl.RandomErasing(prob=0.0)(x, np.random.default_rng(0)) is x
    for mode in ("const", "rand", "pixel"):
        out = eqxtl.RandomErasing(prob=1.0, mode=mode)(x, np.random.default_rng(1))
        np.testing.assert_array_equal(x, same)  # the input is not changed
        changed = (out != x).any(0)
        rows, cols = np.nonzero(changed)
        box = out[:, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert changed.sum() == box[0].size  # one rectangle, the rest untouched
        if mode == "const":
            assert not box.any()
        elif mode == "rand":  # one colour per channel
            assert (box == box[:, :1, :1]).all() and len(np.unique(box[:, 0, 0])) == 3
        else:
            assert len(np.unique(box)) == box.size and 0.6 < box.std() < 1.4
    many = eqxtl.RandomErasing(prob=1.0, mode="const", max_count=4)
    sizes = {
        (many(np.ones((3, 64, 64), np.float32), np.random.default_rng(i)) == 0).sum()
        for i in range(20)
    }
    assert len(sizes) > 5


def _photos():
    from skimage import data

    return [
        np.asarray(Image.fromarray(p).resize((64, 48))) for p in (data.astronaut(), data.coffee())
    ]


def test_augment_order_crop_flip_policy_normalise_erase():
    image, policy = _photos()[0], eqxtl.TrivialAugment()
    for seed in range(6):
        rng = np.random.default_rng(seed)
        view = eqxtl.Augment()(image, RAW, rng).transpose(1, 2, 0).astype(np.uint8)
        want = policy(view, RAW, rng).transpose(2, 0, 1)
        got = eqxtl.Augment(policy=policy)(image, RAW, np.random.default_rng(seed))
        np.testing.assert_array_equal(got, want)
    # erasing comes after normalisation: 'const' leaves 0.0 (the mean colour), not -mean/std
    erase = eqxtl.Augment(erasing=eqxtl.RandomErasing(prob=1.0, mode="const"))
    p = eqxtl.Preprocessing(resize=48, crop=32, mean=(0.4, 0.5, 0.6), std=(0.2, 0.2, 0.2))
    out = erase(image, p, np.random.default_rng(0))
    plain = eqxtl.Augment()(image, p, np.random.default_rng(0))
    erased = (out != plain).any(0)
    assert erased.any() and not out[:, erased].any()


def test_loader_batches_are_a_function_of_the_seed():
    photos = _photos()
    source = eqxtl.ArraySource(np.stack(photos * 3), np.arange(6) % 2, class_names=["a", "b"])
    augment = eqxtl.Augment(policy=eqxtl.RandAugment(), erasing=eqxtl.RandomErasing(prob=0.5))
    assert pickle.loads(pickle.dumps(augment)) == augment  # grain workers receive it pickled
    p = eqxtl.Preprocessing(resize=40, crop=32)

    def epoch(workers, e, seed=0):
        loader = eqxtl.Loader(
            source, p, 4, shuffle=True, seed=seed, augment=augment, num_workers=workers
        )
        return np.concatenate([b["image"] for b in loader.epoch(e)])

    first = epoch(0, 0)
    np.testing.assert_array_equal(epoch(2, 0), first)  # threads: the same images
    assert not np.array_equal(epoch(0, 1), first) and not np.array_equal(epoch(0, 0, seed=1), first)
    plain = eqxtl.Loader(source, p, 4, shuffle=True, augment=eqxtl.Augment(), num_workers=0)
    assert not np.array_equal(np.concatenate([b["image"] for b in plain.epoch(0)]), first)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: eqxtl.RandAugment(magnitude=11), "magnitude"),
        (lambda: eqxtl.RandAugment(magnitude=-1), "magnitude"),
        (lambda: eqxtl.RandAugment(num_ops=0), "num_ops"),
        (lambda: eqxtl.RandAugment(prob=1.5), "prob"),
        (lambda: eqxtl.RandAugment(magnitude_std=-0.5), "magnitude_std"),
        (lambda: eqxtl.RandAugment(magnitude_std=math.nan), "magnitude_std"),
        (lambda: eqxtl.RandAugment(ops=("Rotate", "Cutout")), "Cutout"),
        (lambda: eqxtl.RandAugment(ops="Rotate"), "tuple of op names"),
        (lambda: eqxtl.TrivialAugment(num_bins=1), "num_bins"),
        (lambda: eqxtl.TrivialAugment(interpolation="lanczos"), "interpolation"),
        (lambda: eqxtl.RandomErasing(prob=2), "prob"),
        (lambda: eqxtl.RandomErasing(area=(0.5, 0.1)), "lo <= hi"),
        (lambda: eqxtl.RandomErasing(area=(0.0, 0.3)), "area"),
        (lambda: eqxtl.RandomErasing(area=(0.1, 1.5)), "area"),
        (lambda: eqxtl.RandomErasing(aspect=(1.0,)), "pair"),
        (lambda: eqxtl.RandomErasing(mode="zeros"), "mode"),
        (lambda: eqxtl.RandomErasing(max_count=0), "max_count"),
        (lambda: eqxtl.Augment(policy="rand-m9-mstd0.5-inc1"), "policy"),
        (lambda: eqxtl.Augment(erasing=0.25), "erasing"),
        (
            lambda: eqxtl.RandAugment().op(np.zeros((4, 4, 3), np.uint8), "Blur", 5, IMAGENET),
            "Blur",
        ),
        (
            lambda: eqxtl.RandAugment().op(np.zeros((4, 4, 3), np.uint8), "Rotate", 12, IMAGENET),
            "magnitude",
        ),
        (lambda: eqxtl.TrivialAugment().op(np.zeros((4, 4, 3), np.uint8), "Rotate", 31), "bin"),
        (lambda: eqxtl.TrivialAugment().op(np.zeros((4, 4, 3), np.uint8), "Cutout"), "Cutout"),
        (lambda: eqxtl.TrivialAugment()(np.zeros((3, 4, 4), np.float32), IMAGENET, None), "uint8"),
        (lambda: eqxtl.RandomErasing()(np.zeros((4, 4), np.float32), None), "C, H, W"),
    ],
)
def test_bad_input(make, match):
    with pytest.raises(eqxtl.DataError, match=match):
        make()
