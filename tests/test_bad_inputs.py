"""Bad input gets a clear error (or a correct result), never a silently wrong one: labels and
classes, feature-cache keys, resource-safe ``.pth`` reading, atomic folder saves and rule
sanity (issue 11). Each test names the case it covers; all run offline in seconds."""

import importlib.util
import struct
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import eqxtl
from eqxtl import (
    ArraySource,
    DataError,
    ImageFolder,
    Loader,
    Preprocessing,
    Subset,
    check_labels,
    check_same_classes,
)
from eqxtl.data.images import as_rgb
from eqxtl.io.torch_pickle import TorchLimits, load_torch_file
from tests._tiny import tiny

IDENTITY = Preprocessing(resize=8, crop=8, mean=(0, 0, 0), std=(1, 1, 1), scale=1.0)


def _png(path, value=0, size=(10, 12), **save_kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(path, **save_kwargs)


def _folder(root, classes=("cat", "dog"), per_class=2):
    for c, name in enumerate(classes):
        for i in range(per_class):
            _png(root / name / f"{i}.png", value=40 * c + i)
    return root


# ---------------------------------------------------------------- labels and classes


def test_label_out_of_range_for_the_model_names_label_and_source():
    source = ArraySource(np.zeros((4, 6, 6, 3), np.uint8), [0, 1, 2, 1], ["a", "b", "c"])
    check_labels(source, 3)  # fits
    with pytest.raises(DataError, match=r"3 classes but the model predicts 2"):
        check_labels(source, 2)

    class Labelled:  # a custom source that knows its labels, one of them negative
        class_names = ["a", "b"]
        labels = np.array([0, 1, -1, 1])

        def __len__(self):
            return 4

        def __repr__(self):
            return "Labelled()"

    with pytest.raises(DataError, match=r"Label -1 of example 2 of Subset\(3 of Labelled"):
        check_labels(Subset(Labelled(), [0, 1, 2]), 2)


def test_loader_refuses_a_label_outside_the_class_list():
    class Custom:  # no cheap labels: the Loader checks each one it reads
        class_names = ["a", "b"]

        def __len__(self):
            return 3

        def __getitem__(self, i):
            return np.zeros((6, 6, 3), np.uint8), [0, 1, 7][i]

        def __repr__(self):
            return "Custom()"

    check_labels(Custom(), 2)  # nothing to see without reading
    with pytest.raises(DataError, match=r"Label 7 of example 2 of Custom\(\)"):
        list(Loader(Custom(), IDENTITY, 2, num_workers=0).epoch(0))


def test_giant_label_is_a_data_error_not_a_memory_error():
    with pytest.raises(DataError, match="Label 10000000000 would make"):
        ArraySource(np.zeros((2, 4, 4, 3), np.uint8), [0, 10**10])


def test_nan_pixels_in_array_source():
    images = np.zeros((3, 4, 4, 3), np.float32)
    images[2, 1, 1, 0] = np.nan
    with pytest.raises(DataError, match="Image 2: The image holds 1 NaN"):
        ArraySource(images, [0, 1, 0])
    with pytest.raises(DataError, match="Image 1: Float images must hold values in"):
        ArraySource([np.zeros((4, 4, 3), np.float32), np.full((5, 5, 3), 2.0)], [0, 1])


@pytest.mark.parametrize(
    "val_classes, phrase",
    [
        (["cat"], r"missing \['dog'\]"),
        (["cat", "dog", "fox"], r"not in the training data \['fox'\]"),
        (["dog", "cat"], "another order"),
    ],
)
def test_class_names_must_match_the_training_data(val_classes, phrase):
    train = ArraySource(np.zeros((2, 4, 4, 3), np.uint8), [0, 1], ["cat", "dog"])
    val = ArraySource(np.zeros((1, 4, 4, 3), np.uint8), [0], val_classes)
    with pytest.raises(DataError, match=phrase):
        check_same_classes(train, val, "validation data")
    check_same_classes(train, Loader(train, IDENTITY, 2))  # a Loader of the same source


def test_image_folder_maps_classes_by_name(tmp_path):
    train = _folder(tmp_path / "train", ("cat", "dog", "fox"))
    (tmp_path / "val" / "dog").mkdir(parents=True)  # val lacks "cat": sorted position differs
    _png(tmp_path / "val" / "dog" / "x.png")
    _png(tmp_path / "val" / "fox" / "y.png")
    train = ImageFolder(tmp_path / "train")
    by_position = ImageFolder(tmp_path / "val")  # its own class list: ["dog", "fox"]
    with pytest.raises(DataError, match=r"missing \['cat'\]"):
        check_same_classes(train, by_position)
    with pytest.warns(UserWarning, match="Empty classes .*: cat"):
        val = ImageFolder(tmp_path / "val", class_names=train.class_names)
    assert val.class_names == ["cat", "dog", "fox"] and val.labels.tolist() == [1, 2]
    check_same_classes(train, val)
    _png(tmp_path / "val" / "wolf" / "z.png")
    with pytest.raises(DataError, match=r"folders \['wolf'\] that are not among"):
        ImageFolder(tmp_path / "val", class_names=train.class_names)


def test_image_folder_warns_about_empty_classes_and_other_file_types(tmp_path):
    _folder(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "cat" / "notes.txt").write_text("x")
    (tmp_path / "dog" / "table.csv").write_text("x")
    (tmp_path / "dog" / "more.csv").write_text("x")
    with pytest.warns(UserWarning) as record:
        folder = ImageFolder(tmp_path)
    message = str(record[0].message)
    assert "Empty classes (no images): empty" in message
    assert "Ignored 3 files that are not images (.csv: 2, .txt: 1)" in message
    assert len(folder.ignored) == 3 and folder.empty_classes == ["empty"]


def test_image_folder_ignores_hidden_folders_and_files(tmp_path):
    _folder(tmp_path)
    _png(tmp_path / "cat" / ".ipynb_checkpoints" / "0-checkpoint.png")
    _png(tmp_path / ".ipynb_checkpoints" / "x.png")
    (tmp_path / "dog" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (tmp_path / "dog" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: hidden files do not count
        folder = ImageFolder(tmp_path)
    assert folder.class_names == ["cat", "dog"] and len(folder) == 4
    assert not folder.skipped and not folder.ignored


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((4, 8, 3), np.uint8)  # wide, with a bright left column
    pixels[:, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    (tmp_path / "a").mkdir()
    Image.fromarray(pixels).save(tmp_path / "a" / "photo.jpg", exif=exif, quality=100)
    image, _ = ImageFolder(tmp_path)[0]
    assert image.shape == (8, 4, 3)  # displayed tall
    assert image[0].mean() > 200 and image[-1].mean() < 50  # the left column is now the top
    with Image.open(tmp_path / "a" / "photo.jpg") as im:
        np.testing.assert_array_equal(as_rgb(im), image)


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    levels = np.array([[0, 257 * 100, 65535, 32768]], np.uint16)
    (tmp_path / "a").mkdir()
    Image.fromarray(levels).save(tmp_path / "a" / "deep.png")
    with Image.open(tmp_path / "a" / "deep.png") as im:
        assert im.mode.startswith("I")  # PIL reads it as 16-bit
    image, _ = ImageFolder(tmp_path)[0]
    assert image[0, :, 0].tolist() == [0, 100, 255, 128]
    assert (image == image[..., :1]).all()  # gray


# ---------------------------------------------------------------- feature cache


class _MeanBackbone(eqx.Module):
    """A stand-in backbone: per-channel means times a weight, ``(3, S, S) -> (3,)``."""

    weight: jax.Array

    def __call__(self, x, state, *, key=None):
        return jnp.mean(x, axis=(1, 2)) * self.weight, state


def _cached(source, cache_dir):
    backbone = _MeanBackbone(jnp.ones(3))
    return eqxtl.extract_features(
        backbone, None, source, preprocessing=IDENTITY, cache_dir=cache_dir, num_workers=0
    )


def _entries(cache_dir):
    return sorted(p.name for p in cache_dir.iterdir() if not p.name.startswith("."))


def test_feature_cache_recomputes_when_a_label_changes(tmp_path):
    images = np.arange(4, dtype=np.uint8)[:, None, None, None] * np.ones((4, 6, 6, 3), np.uint8)
    first = _cached(ArraySource(images, [0, 1, 0, 1], ["a", "b"]), tmp_path)
    again = _cached(ArraySource(images.copy(), [0, 1, 0, 1], ["a", "b"]), tmp_path)
    assert len(_entries(tmp_path)) == 1  # same content: reused
    np.testing.assert_array_equal(first.features, again.features)
    relabelled = _cached(ArraySource(images, [1, 1, 0, 1], ["a", "b"]), tmp_path)
    assert relabelled.labels.tolist() == [1, 1, 0, 1] and len(_entries(tmp_path)) == 2


def test_feature_cache_recomputes_when_the_class_list_changes(tmp_path):
    images = np.zeros((2, 6, 6, 3), np.uint8)
    _cached(ArraySource(images, [0, 1], ["a", "b"]), tmp_path)
    renamed = _cached(ArraySource(images, [0, 1], ["b", "a"]), tmp_path)
    assert renamed.class_names == ["b", "a"] and len(_entries(tmp_path)) == 2


def test_feature_cache_recomputes_when_an_image_changes(tmp_path):
    root = _folder(tmp_path / "data")
    cache = tmp_path / "cache"
    first = _cached(ImageFolder(root), cache)
    _cached(Subset(ImageFolder(root), [0, 1, 2, 3]), cache)
    _cached(Subset(ImageFolder(root), [0, 1, 2, 3]), cache)  # a Subset is recognised too
    assert len(_entries(cache)) == 2
    _png(root / "dog" / "1.png", value=200)  # same name, same size on disk, new pixels
    changed = _cached(ImageFolder(root), cache)
    assert len(_entries(cache)) == 3
    assert changed.features[3, 0] == pytest.approx(200) != first.features[3, 0]
    in_memory = ArraySource([np.zeros((4, 4, 3), np.uint8), np.ones((5, 3, 3), np.uint8)], [0, 0])
    _cached(in_memory, cache)  # differently sized images hash too
    assert len(_entries(cache)) == 4


# ---------------------------------------------------------------- rules, specs, opt_state


def _toy(num_classes=2, seed=0):
    """A Classifier on the stand-in backbone: leaves backbone.weight, head.weight, head.bias."""
    head = eqx.nn.Linear(3, num_classes, key=jax.random.key(seed))
    return eqxtl.Classifier(_MeanBackbone(jnp.ones(3)), head=head)


def _toy_batch(num_classes=2):
    return {
        "image": np.ones((2, 3, 4, 4), np.float32),
        "label": np.arange(2, dtype=np.int32) % num_classes,
        "mask": np.ones(2, bool),
    }


def test_invalid_regex_in_a_rule_names_the_rule():
    with pytest.raises(eqxtl.RuleError, match=r"Rule 'head\[' is not a valid regex"):
        eqxtl.trainable(_toy(), "head[")
    with pytest.raises(eqxtl.RuleError, match=r"'backbone\(' is not a valid regex"):
        eqxtl.param_groups(_toy(), [("backbone(", None), (".*", None)])


def test_a_shadowed_group_warns_or_fails_under_strict():
    import optax

    model = _toy()
    groups = [("backbone|head", None), ("head", optax.sgd(0.1)), (".*", None)]
    with pytest.raises(eqxtl.RuleError, match=r"Group 1 \('head'\) matches only .* \(rule 0"):
        eqxtl.param_groups(model, groups, strict=True)
    with pytest.warns(UserWarning, match="changes nothing"), pytest.raises(eqxtl.RuleError):
        eqxtl.param_groups(model, groups)  # warns, then: no group trains anything
    with pytest.warns(UserWarning, match=r"Rule 1 \('head.bias'\) matches only"):
        eqxtl.trainable(model, "head", "head.bias")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a final catch-all is no mistake
        eqxtl.param_groups(model, [("head", optax.sgd(0.1)), ("backbone", None), (".*", None)])


def test_nothing_trainable_is_an_error():
    model = _toy()
    assert eqxtl.tuning.filters.require_trainable(model, eqxtl.trainable(model, "head")) == 8
    with pytest.raises(eqxtl.RuleError, match="Nothing trains"):
        eqxtl.tuning.filters.require_trainable(model, eqxtl.trainable(model, ("head", False)))


def test_a_spec_from_another_model_is_a_rule_error():
    import optax

    model, other = _toy(2), _toy(3)
    spec = eqxtl.trainable(other, "head")
    with pytest.raises(
        eqxtl.RuleError,
        match="not built for this Classifier: the same 3 leaf paths, but the static field "
        "head.out_features is 3 in one and 2",
    ):
        eqxtl.count(model, spec)
    optimizer = optax.sgd(0.1)
    opt_state = optimizer.init(eqx.filter(model, eqxtl.trainable(model, "head")))
    step = eqxtl.make_step(eqxtl.task_loss(), optimizer, spec)
    with pytest.raises(eqxtl.RuleError, match="not built for this Classifier"):
        step(model, None, opt_state, _toy_batch())
    frozen_backbone = eqxtl.trainable(model.backbone, "weight")  # another structure
    with pytest.raises(eqxtl.RuleError, match="leaf 0 is 'weight' in one and 'backbone.weight'"):
        eqxtl.tuning.filters.require_trainable(model, frozen_backbone)


def test_a_spec_built_before_with_scan_or_with_remat_says_which_call_to_repeat():
    import optax

    backbone, state = tiny("clip")
    model = eqxtl.Classifier(backbone, 3, key=jax.random.key(0))
    spec = eqxtl.trainable(model, "head", "backbone.encoder.layers.3")
    unrolled = eqxtl.with_scan(model, False)
    with pytest.raises(eqxtl.RuleError) as caught:
        eqxtl.count(unrolled, spec)
    message = str(caught.value)
    assert "backbone.encoder.scan is None in the spec, False in the model" in message
    assert "spec = eqxtl.with_scan(spec, False)" in message
    # the advice works: the same call on the spec fits the model, and the step runs
    fitted = eqxtl.with_scan(spec, False)
    assert eqxtl.count(unrolled, fitted) == eqxtl.count(model, spec)
    remat = eqxtl.with_remat(unrolled)
    with pytest.raises(eqxtl.RuleError, match=r"spec = eqxtl.with_remat\(spec, True\)"):
        eqxtl.tuning.filters.require_trainable(remat, fitted)
    fitted = eqxtl.with_remat(fitted)
    optimizer = optax.sgd(0.1)
    opt_state = optimizer.init(eqx.filter(remat, fitted))
    step = eqxtl.make_step(eqxtl.task_loss(), optimizer, spec)  # the stale spec: refused
    image = np.zeros((2, 3, 32, 32), np.float32)
    batch = {"image": image, "label": np.zeros(2, np.int32)}
    with pytest.raises(eqxtl.RuleError, match=r"eqxtl.with_(scan|remat) changed one of them"):
        step(remat, state, opt_state, batch)
    _, _, _, metrics = eqxtl.make_step(eqxtl.task_loss(), optimizer, fitted)(
        remat, state, opt_state, batch
    )
    assert np.isfinite(float(metrics["loss"]))
    # a spec built on the unrolled model, used on the default one: rebuilding is the advice
    # (with_scan cannot set the default, None, back)
    with pytest.raises(eqxtl.RuleError, match="To train the model as it is, build the spec"):
        eqxtl.count(model, eqxtl.trainable(unrolled, "head"))


def test_an_opt_state_from_another_model_is_an_optimizer_mismatch():
    import optax

    model, other = _toy(2), _toy(3)
    spec = eqxtl.trainable(model, "head")
    optimizer = optax.adam(1e-3)
    foreign = optimizer.init(eqx.filter(other, eqxtl.trainable(other, "head")))
    step = eqxtl.make_step(eqxtl.task_loss(), optimizer, spec)
    with pytest.raises(eqxtl.OptimizerMismatchError, match="comes from another model"):
        step(model, None, foreign, _toy_batch())
    other_spec = optimizer.init(eqx.filter(model, eqxtl.trainable(model, "backbone")))
    with pytest.raises(eqxtl.OptimizerMismatchError, match="does not fit"):
        step(model, None, other_spec, _toy_batch())
    model, _, _, metrics = step(model, None, optimizer.init(eqx.filter(model, spec)), _toy_batch())
    assert np.isfinite(float(metrics["loss"]))


# ---------------------------------------------------------------- resource-safe .pth reading


def _pth(path, size, stride, numel=4, payload=None, compression=zipfile.ZIP_STORED, pkl=None):
    """A torch zip checkpoint ``{"w": tensor}`` written opcode by opcode: one float32
    storage that declares ``numel`` elements and holds ``payload`` (default: 0, 1, 2, 3),
    viewed with any size and stride."""

    def ints(xs):
        return b"(" + b"".join(b"J" + struct.pack("<i", x) for x in xs) + b"t"

    def text(s):
        return b"X" + struct.pack("<I", len(s)) + s

    if pkl is None:
        pkl = (
            b"\x80\x02}" + text(b"w") + b"ctorch._utils\n_rebuild_tensor_v2\n("
            + b"(" + text(b"storage") + b"ctorch\nFloatStorage\n" + text(b"0") + text(b"cpu")
            + b"J" + struct.pack("<i", numel) + b"tQ" + b"K\x00" + ints(size) + ints(stride)
            + b"\x89ccollections\nOrderedDict\n)RtRs."
        )  # fmt: skip
    payload = np.arange(4, dtype="<f4").tobytes() if payload is None else payload
    with zipfile.ZipFile(path, "w", compression) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/data/0", payload)
    return path


def _billion_laughs() -> bytes:
    """A list of ten references to a list of ten references ... (9 levels) to ten strings:
    under 300 bytes of pickle, 10**9 items to walk."""
    out = b"\x80\x02]q\x00(" + b"X\x03\x00\x00\x00lol" * 10 + b"e"
    for level in range(1, 9):
        out += b"0]q" + bytes([level]) + b"(" + (b"h" + bytes([level - 1])) * 10 + b"e"
    return out + b"."


def test_billion_laughs_pickle_fails_fast(tmp_path):
    pkl = _billion_laughs()
    assert len(pkl) < 300
    path = _pth(tmp_path / "bomb.pt", (), (), pkl=pkl)
    with pytest.raises(eqxtl.TorchFileError, match="more than TorchLimits.max_objects"):
        load_torch_file(path)
    # the bound is configurable, and the limit, not the file, is what stops the walk
    with pytest.raises(eqxtl.TorchFileError, match=r"max_objects \(50\)"):
        load_torch_file(path, limits=TorchLimits(max_objects=50))


def test_strides_that_expand_a_small_storage_are_refused(tmp_path):
    path = _pth(tmp_path / "expand.pt", (20000, 20000), (0, 0))  # 1.6 GB from 16 bytes
    with pytest.raises(eqxtl.TorchFileError, match="would take 1600000000 bytes from 16"):
        load_torch_file(path)
    small = _pth(tmp_path / "broadcast.pt", (3, 4), (0, 1))  # a legitimate broadcast view
    np.testing.assert_array_equal(load_torch_file(small)["w"], np.tile(np.arange(4.0), (3, 1)))


def test_zip_member_inflating_past_its_tensors_is_refused(tmp_path):
    zeros = bytes(1 << 20)  # 1 MiB of zeros deflates to ~1 KiB; the tensor declares 16 bytes
    path = _pth(
        tmp_path / "inflate.pt", (4,), (1,), payload=zeros, compression=zipfile.ZIP_DEFLATED
    )
    assert path.stat().st_size < 4096
    with pytest.raises(eqxtl.TorchFileError, match="inflates to 1048576 bytes but the tensors"):
        load_torch_file(path)


def test_zip_crc_is_checked(tmp_path):
    path = _pth(tmp_path / "flipped.pt", (4,), (1,))
    np.testing.assert_array_equal(load_torch_file(path)["w"], [0, 1, 2, 3])
    raw = bytearray(path.read_bytes())
    at = raw.index(np.arange(4, dtype="<f4").tobytes()) + 13  # a byte of the value 3.0
    raw[at] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(eqxtl.TorchFileError, match="fails the zip's CRC-32 check"):
        load_torch_file(path)
    assert load_torch_file(path, limits=TorchLimits(check_crc=False))["w"][3] != 3.0


def test_oversized_pickle_is_refused(tmp_path):
    path = _pth(tmp_path / "ok.pt", (4,), (1,))
    with pytest.raises(eqxtl.TorchFileError, match="over TorchLimits.max_pickle_bytes"):
        load_torch_file(path, limits=TorchLimits(max_pickle_bytes=32))


# ---------------------------------------------------------------- atomic folder writes

_ATOMIC = Path(eqxtl.__file__).parent / "_util" / "atomic.py"
_WRITER = """
import importlib.util, os, sys
spec = importlib.util.spec_from_file_location("_atomic", sys.argv[1])
atomic = importlib.util.module_from_spec(spec)
spec.loader.exec_module(atomic)
target, kill_at, mode = sys.argv[2:]
if mode == "renames":
    atomic._RENAMEAT2 = None
def hook(step):
    if step == kill_at:
        os._exit(9)
atomic._step_hook = hook
with atomic.atomic_directory(target, replacing=["a.txt", "b.txt"]) as tmp:
    (tmp / "a.txt").write_text("new")
    hook("half-written")
    (tmp / "b.txt").write_text("new")
"""
_STEPS = ["created", "half-written", "written", "synced", "moved-old", "swapped", "none"]


def _load_atomic():
    spec = importlib.util.spec_from_file_location("_atomic_under_test", _ATOMIC)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _contents(folder):
    return {p.name: p.read_text() for p in folder.iterdir()}


@pytest.mark.parametrize("mode", ["exchange", "renames"])
def test_atomic_directory_survives_a_kill_at_every_step(tmp_path, mode):
    atomic = _load_atomic()
    if mode == "exchange":  # this platform must have the one-step swap
        (tmp_path / "x").mkdir(), (tmp_path / "y").mkdir()
        assert atomic._exchange(tmp_path / "x", tmp_path / "y")
    old = {"a.txt": "old", "b.txt": "old", "keep.txt": "kept"}
    new = {"a.txt": "new", "b.txt": "new", "keep.txt": "kept"}
    for step in _STEPS:
        target = tmp_path / step / "model"
        target.mkdir(parents=True)
        for name, text in old.items():
            (target / name).write_text(text)
        run = subprocess.run(
            [sys.executable, "-c", _WRITER, str(_ATOMIC), str(target), step, mode],
            capture_output=True,
            text=True,
        )
        killed = step != "none" and not (mode == "exchange" and step == "moved-old")
        assert run.returncode == (9 if killed else 0), (step, run.stderr)
        if mode == "exchange" or step != "moved-old":  # never a mix, never missing
            assert _contents(target) in (old, new), step
        atomic.recover(target)  # what the next write (or a careful reader) does first
        expected = new if step == "swapped" or not killed else old
        assert _contents(target) == expected, (mode, step)
        assert [p.name for p in target.parent.iterdir()] == ["model"], (mode, step)


def test_save_pretrained_is_atomic_per_folder(tmp_path):
    backbone, state = tiny("resnet")
    folder = tmp_path / "ckpt"
    eqxtl.save_pretrained(backbone, state, folder)
    (folder / "train_state.eqx").write_bytes(b"other files in the folder are kept")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    # Another process writes new weights and is killed once they are written, before the
    # swap: the folder must hold the old weights, whole.
    code = (
        "import os, sys, jax, eqxtl, eqxtl._util.atomic as atomic\n"
        "from eqxtl._util.pytree_paths import _is_array\n"
        "model, state = eqxtl.from_pretrained(sys.argv[1])\n"
        "model = jax.tree.map(lambda x: x + 1 if _is_array(x) else x, model)\n"
        "atomic._step_hook = lambda step: os._exit(9) if step == 'written' else None\n"
        "eqxtl.save_pretrained(model, state, sys.argv[1])\n"
    )
    run = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True)
    assert run.returncode == 9, run.stderr.decode()[-2000:]
    eqxtl._util.atomic.recover(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    loaded, _ = eqxtl.from_pretrained(folder)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(backbone), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # A save that completes replaces both weight files and keeps the rest.
    bigger = jax.tree.map(lambda x: x * 2 if eqx.is_inexact_array(x) else x, backbone)
    eqxtl.save_pretrained(bigger, state, folder)
    assert (folder / "train_state.eqx").read_bytes() == before["train_state.eqx"]
    assert (folder / "model.safetensors").read_bytes() != before["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
