"""ResNet v1.5: parity with transformers 5 (eval and training mode), every checkpoint layout
(transformers ResNetModel / ResNetForImageClassification, torchvision/timm names, bare
.safetensors), config inference, strict key errors, and files transformers reads back."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import dataclasses
import json
import re
import shutil

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import transformers
from skimage import data as skdata
from skimage.transform import resize

import eqxtl
from eqxtl.io import checkpoint
from eqxtl.models import resnet as R

# Float32 everywhere (on CPU default matmul/conv precision is full float32).
TOL = 1e-4  # max |Δ| against transformers: features, logits and BatchNorm statistics

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)

# The config.json fields of microsoft/resnet-18 and microsoft/resnet-50.
HF_CONFIGS = {
    "resnet-18": dict(
        num_channels=3,
        embedding_size=64,
        hidden_sizes=[64, 128, 256, 512],
        depths=[2, 2, 2, 2],
        layer_type="basic",
        hidden_act="relu",
        downsample_in_first_stage=False,
    ),
    "resnet-50": dict(
        num_channels=3,
        embedding_size=64,
        hidden_sizes=[256, 512, 1024, 2048],
        depths=[3, 4, 6, 3],
        layer_type="bottleneck",
        hidden_act="relu",
        downsample_in_first_stage=False,
    ),
}
PRESETS = {"resnet-18": R.RESNET18, "resnet-50": R.RESNET50}


def imagenet_image(image: np.ndarray, size: int) -> np.ndarray:
    """HWC uint8 -> (3, size, size): centre square crop, anti-aliased bilinear resize,
    ImageNet mean/std."""
    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    x = resize(image[top : top + s, left : left + s], (size, size), order=1, anti_aliasing=True)
    x = (x.astype(np.float32) - MEAN) / STD
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


def make_images(size: int, photos, n_random: int, seed: int) -> np.ndarray:
    out = [imagenet_image(p(), size) for p in photos]
    rng = np.random.default_rng(seed)
    out += [rng.normal(size=(3, size, size)).astype(np.float32) for _ in range(n_random)]
    return np.stack(out)


@pytest.fixture(scope="module")
def images():
    """Two real photos and one noise image, ImageNet-normalised, 224x224."""
    return make_images(224, (skdata.chelsea, skdata.coffee), 1, seed=0)


def randomize_bn(model: torch.nn.Module, seed: int, size: int = 112):
    """Make every BatchNorm non-trivial (random init leaves them the identity, which hides
    bugs) while keeping activations in a pretrained network's range: random affine
    parameters (small scales on each block's last BN, as in trained ResNets), then running
    statistics measured on a calibration batch (other photos than the test images)."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    last = {
        id(block.layer[-1].normalization) for block in model.modules() if hasattr(block, "layer")
    }
    with torch.no_grad():
        for bn in bns:
            lo, hi = (0.1, 0.4) if id(bn) in last else (0.5, 1.5)
            bn.weight.copy_(torch.empty(bn.num_features).uniform_(lo, hi, generator=g))
            bn.bias.copy_(0.1 * torch.randn(bn.num_features, generator=g))
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average: the calibration batch's statistics
        calibration = make_images(size, (skdata.astronaut, skdata.rocket), 2, seed=seed + 100)
        calibration = calibration[:, : model.config.num_channels]
        model.train()(pixel_values=torch.from_numpy(calibration))
        for bn in bns:
            bn.momentum = 0.1
            bn.num_batches_tracked.zero_()
    return model.eval()


@eqx.filter_jit
def _features(model, state, x):
    return jax.vmap(lambda xi: model(xi, state)[0])(x)


def features(model, state, x) -> np.ndarray:
    return np.asarray(_features(model, state, jnp.asarray(x)))


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def tree_equal(a, b) -> bool:
    """Same structure, bit-identical arrays (compared in numpy: no compile per shape)."""
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    return ta == tb and all(
        np.array_equal(np.asarray(x), np.asarray(y)) if eqx.is_array(x) else x == y
        for x, y in zip(la, lb, strict=True)
    )


def state_dicts_equal(a, b) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def shapes_of(path) -> dict:
    with safetensors.safe_open(str(path), "numpy") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def assert_loaded_cleanly(info: dict):
    """transformers found every tensor. eqxtl does not save BatchNorm's
    ``num_batches_tracked`` counters (not model state; transformers re-initialises them to 0,
    which only matters for ``momentum=None``)."""
    missing = [k for k in info["missing_keys"] if not k.endswith("num_batches_tracked")]
    assert not missing and not info["unexpected_keys"] and not info["mismatched_keys"], info


_TV_RULES = [
    (r"embedder\.embedder\.convolution\.", "conv1."),
    (r"embedder\.embedder\.normalization\.", "bn1."),
    (
        r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.convolution\.",
        lambda m: f"layer{int(m[1]) + 1}.{m[2]}.conv{int(m[3]) + 1}.",
    ),
    (
        r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.normalization\.",
        lambda m: f"layer{int(m[1]) + 1}.{m[2]}.bn{int(m[3]) + 1}.",
    ),
    (
        r"encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.convolution\.",
        lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.0.",
    ),
    (
        r"encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.normalization\.",
        lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.1.",
    ),
    (r"classifier\.1\.", "fc."),
]


def to_torchvision(key: str) -> str:
    """A transformers ResNet key -> the torchvision/timm name of the same tensor."""
    key = key.removeprefix("resnet.")
    for pattern, repl in _TV_RULES:
        new, n = re.subn("^" + pattern, repl, key)
        if n:
            return new
    raise AssertionError(f"no torchvision name for {key}")


# --------------------------------------------------------------------------------------
# Real configs (microsoft/resnet-18, microsoft/resnet-50), random weights
# --------------------------------------------------------------------------------------


_REAL: dict = {}


def _real(name, tmp_path_factory, images) -> dict:
    """One random ResNetForImageClassification (1000 classes) at a real config, saved as
    a ResNetModel directory (``base``), a classification directory (``cls``), a torchvision
    file and a bare transformers file; torch's outputs on ``images``; and the model eqxtl
    loads from ``base`` (built once per session)."""
    if name in _REAL:
        return _REAL[name]
    torch.manual_seed(0)
    config = transformers.ResNetConfig(**HF_CONFIGS[name], num_labels=1000)
    model = randomize_bn(transformers.ResNetForImageClassification(config), seed=1)
    root = tmp_path_factory.mktemp(name)
    dirs = {k: root / k for k in ("base", "cls", "torchvision", "bare")}
    model.save_pretrained(dirs["cls"])
    model.resnet.save_pretrained(dirs["base"])
    sd = {to_torchvision(k): v.contiguous() for k, v in model.state_dict().items()}
    dirs["torchvision"].mkdir()
    safetensors.torch.save_file(sd, dirs["torchvision"] / "resnet.safetensors")
    dirs["bare"].mkdir()
    shutil.copy(dirs["base"] / "model.safetensors", dirs["bare"] / "weights.safetensors")
    with torch.no_grad():
        pixels = torch.from_numpy(images)
        pooled = model.resnet(pixel_values=pixels).pooler_output
        logits = model.classifier(pooled).numpy()  # = model(pixels).logits
        pooled = pooled.flatten(1).numpy()
    backbone, state = eqxtl.from_pretrained(dirs["base"])
    _REAL[name] = dict(
        name=name,
        model=model,
        dirs=dirs,
        pooled=pooled,
        logits=logits,
        loaded=(backbone, state),
        ours=features(backbone, state, images),
    )
    return _REAL[name]


@pytest.fixture(scope="module", params=["resnet-18", "resnet-50"])
def real(request, tmp_path_factory, images):
    return _real(request.param, tmp_path_factory, images)


@pytest.fixture(scope="module")
def real18(tmp_path_factory, images):
    return _real("resnet-18", tmp_path_factory, images)


def test_parity(real):
    model, _ = real["loaded"]
    assert isinstance(model, R.ResNet)
    assert model.config == PRESETS[real["name"]]
    ours = real["ours"]
    err = max_diff(ours, real["pooled"])
    print(f"{real['name']}: max |Δ| pooler_output = {err:.2e} (max |x| {np.abs(ours).max():.2f})")
    assert ours.shape == (3, model.config.hidden_sizes[-1])
    assert err <= TOL


def test_classification_file(real):
    """``resnet.`` prefix + ``classifier.1``: the backbone by default, the ImageNet head with
    ``keep_head``."""
    backbone, state = real["loaded"]
    plain, plain_state = eqxtl.from_pretrained(real["dirs"]["cls"])
    assert isinstance(plain, R.ResNet)
    assert tree_equal(plain, backbone) and tree_equal(plain_state, state)

    model, state = eqxtl.from_pretrained(real["dirs"]["cls"], keep_head=True)
    assert isinstance(model, eqxtl.Classifier) and model.num_classes == 1000
    assert tree_equal(model.backbone, backbone)
    logits = jax.vmap(model.head)(jnp.asarray(real["ours"]))  # = Classifier's forward
    err = max_diff(logits, real["logits"])
    print(f"{real['name']}: max |Δ| logits = {err:.2e}")
    assert err <= TOL


def test_torchvision_layout(real):
    """torchvision/timm names in a bare file: detected, config inferred, same tensors."""
    backbone, state = real["loaded"]
    path = real["dirs"]["torchvision"] / "resnet.safetensors"
    assert R.RESNET.detect(shapes_of(path))
    model, tv_state = eqxtl.from_pretrained(path)
    assert model.config == PRESETS[real["name"]]
    assert state_dicts_equal(eqxtl.state_dict(model, tv_state), eqxtl.state_dict(backbone, state))
    with_head, _ = eqxtl.from_pretrained(path, keep_head=True)
    cls, _ = eqxtl.from_pretrained(real["dirs"]["cls"], keep_head=True)
    assert tree_equal(with_head.head, cls.head)


def test_bare_transformers_file(real):
    backbone, state = real["loaded"]
    model, bare_state = eqxtl.from_pretrained(real["dirs"]["bare"] / "weights.safetensors")
    assert model.config == PRESETS[real["name"]]
    assert tree_equal(model, backbone) and tree_equal(bare_state, state)


def test_paths_are_transformers_keys(real):
    """Same names, same order as torch's state dict (less ``num_batches_tracked``)."""
    backbone, state = real["loaded"]
    reference = real["model"].resnet
    assert eqxtl.paths(backbone) == [k for k, _ in reference.named_parameters()]
    want = [k for k in reference.state_dict() if not k.endswith("num_batches_tracked")]
    assert list(eqxtl.state_dict(backbone, state)) == want
    assert R.expected_shapes(backbone.config) == {
        k: tuple(v.shape) for k, v in reference.state_dict().items() if k in want
    }
    blocks = eqxtl.blocks(backbone)
    assert blocks == [
        f"encoder.stages.{s}.layers.{i}"
        for s, d in enumerate(backbone.config.depths)
        for i in range(d)
    ]


def test_save_round_trip(real18, tmp_path, images):
    """load -> save_pretrained -> load is bit-identical, and transformers reads the files
    (ResNetModel and ResNetForImageClassification) to the same outputs."""
    real = real18
    backbone, state = real["loaded"]
    eqxtl.save_pretrained(backbone, state, tmp_path / "base")
    again, again_state = eqxtl.from_pretrained(tmp_path / "base")
    assert again.config == backbone.config
    assert state_dicts_equal(
        eqxtl.state_dict(again, again_state), eqxtl.state_dict(backbone, state)
    )

    reference, info = transformers.ResNetModel.from_pretrained(
        tmp_path / "base", output_loading_info=True
    )
    assert_loaded_cleanly(info)
    with torch.no_grad():
        out = reference.eval()(pixel_values=torch.from_numpy(images)).pooler_output.flatten(1)
    assert max_diff(out, real["pooled"]) <= TOL

    model, state = eqxtl.from_pretrained(real["dirs"]["cls"], keep_head=True)
    eqxtl.save_pretrained(model, state, tmp_path / "cls")
    hf = json.loads((tmp_path / "cls" / "config.json").read_text())
    assert hf["architectures"] == ["ResNetForImageClassification"] and len(hf["id2label"]) == 1000
    again, again_state = eqxtl.from_pretrained(tmp_path / "cls", keep_head=True)
    assert state_dicts_equal(eqxtl.state_dict(again, again_state), eqxtl.state_dict(model, state))
    reference, info = transformers.ResNetForImageClassification.from_pretrained(
        tmp_path / "cls", output_loading_info=True
    )
    assert_loaded_cleanly(info)
    with torch.no_grad():
        logits = reference.eval()(pixel_values=torch.from_numpy(images)).logits
    assert max_diff(logits, real["logits"]) <= TOL


# --------------------------------------------------------------------------------------
# Training mode: batch statistics and torch's running-statistics update
# --------------------------------------------------------------------------------------


def test_training_mode_parity(real18):
    """A batch of 4 in training mode (resnet-18's config): features and every updated
    running mean/variance match torch's ``train()`` forward."""
    real = real18
    batch = make_images(224, (skdata.chelsea, skdata.coffee, skdata.astronaut), 1, seed=3)
    reference = real["model"].resnet
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    try:
        with torch.no_grad():
            out = reference.train()(pixel_values=torch.from_numpy(batch)).pooler_output
        want = {k: v.numpy().copy() for k, v in reference.state_dict().items()}
    finally:
        reference.load_state_dict(before)
        reference.eval()

    backbone, state = real["loaded"]
    model = eqx.nn.inference_mode(backbone, False)
    ours, new_state = eqx.filter_jit(lambda m, s, x: eqxtl.batched(m)(x, s))(
        model, state, jnp.asarray(batch)
    )
    err = max_diff(ours, out.flatten(1))
    got = eqxtl.state_dict(model, new_state)
    stats = [k for k in got if k.endswith(("running_mean", "running_var"))]
    assert len(stats) == 2 * 20
    stats_err = max(max_diff(got[k], want[k]) for k in stats)
    print(f"training mode: max |Δ| features = {err:.2e}, running stats = {stats_err:.2e}")
    assert err <= TOL and stats_err <= TOL
    # The statistics moved (momentum 0.1), and the parameters did not.
    assert max_diff(got[stats[0]], before[stats[0]]) > 1e-3
    params = [k for k in got if k not in stats]
    assert all(np.array_equal(got[k], want[k]) for k in params)


# --------------------------------------------------------------------------------------
# Tiny variants: every config switch against transformers
# --------------------------------------------------------------------------------------

TINY_BASIC = dict(embedding_size=8, hidden_sizes=[8, 16, 24], depths=[2, 1, 2], layer_type="basic")
TINY_BOTTLENECK = dict(
    embedding_size=8, hidden_sizes=[16, 32, 48], depths=[1, 2, 1], layer_type="bottleneck"
)
# Plain basic and bottleneck blocks are covered at the real configs above.
VARIANTS = {
    "basic_downsample_first": {**TINY_BASIC, "downsample_in_first_stage": True},
    "bottleneck_v1": {**TINY_BOTTLENECK, "downsample_in_bottleneck": True},
    "bottleneck_gelu_2ch": {**TINY_BOTTLENECK, "hidden_act": "gelu", "num_channels": 2},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tiny_variants(variant, tmp_path):
    hf = VARIANTS[variant]
    torch.manual_seed(4)
    reference = randomize_bn(transformers.ResNetModel(transformers.ResNetConfig(**hf)), 5)
    reference.save_pretrained(tmp_path)
    images = make_images(64, (skdata.chelsea,), 2, seed=6)[:, : hf.get("num_channels", 3)]
    with torch.no_grad():
        want = reference(pixel_values=torch.from_numpy(images)).pooler_output.flatten(1)
    model, state = eqxtl.from_pretrained(tmp_path)
    assert model.config == R.ResNetConfig(**hf)
    assert max_diff(features(model, state, images), want) <= TOL
    # What the shapes tell (v1 vs v1.5 and the activation are not in the weights).
    inferred = R.RESNET.infer_config(R.expected_shapes(model.config))
    assert inferred == dataclasses.replace(
        model.config, hidden_act="relu", downsample_in_bottleneck=False
    )


def test_tiny_resnet_trains():
    """tests/_tiny.py's TINY_RESNET under ``eqxtl.batched`` in training mode (filled from
    numpy: eager random init compiles once per weight shape)."""
    from _tiny import TINY_RESNET

    rng = np.random.default_rng(0)
    tensors = {
        k: rng.uniform(0.5, 1.5, s) if k.endswith("running_var") else 0.3 * rng.normal(size=s)
        for k, s in R.expected_shapes(TINY_RESNET).items()
    }
    model, state = checkpoint.fill(checkpoint.skeleton(R.RESNET, TINY_RESNET), tensors)
    assert R.RESNET.infer_config({k: v.shape for k, v in tensors.items()}) == TINY_RESNET
    x = jax.random.normal(jax.random.key(0), (2, 3, 32, 32))
    assert features(model, state, x).shape == (2, 64)
    train = eqx.nn.inference_mode(model, False)
    out, new_state = eqx.filter_jit(lambda m, s, x: eqxtl.batched(m)(x, s))(train, state, x)
    assert out.shape == (2, 64) and bool(jnp.all(jnp.isfinite(out)))
    name = "embedder.embedder.normalization.running_mean"
    assert not np.allclose(eqxtl.state_dict(train, new_state)[name], tensors[name])
    with pytest.raises(ValueError, match="channel-first"):
        model(jnp.zeros((32, 32, 3)), state)


# --------------------------------------------------------------------------------------
# Strict key errors (through from_pretrained, config.json given)
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.manual_seed(7)
    directory = tmp_path_factory.mktemp("resnet_tiny")
    transformers.ResNetModel(transformers.ResNetConfig(**TINY_BOTTLENECK)).save_pretrained(
        directory
    )
    return directory


def _rewrite(tiny_dir, tmp_path, edit):
    tensors = safetensors.numpy.load_file(tiny_dir / "model.safetensors")
    edit(tensors)
    safetensors.numpy.save_file(tensors, tmp_path / "model.safetensors")
    shutil.copy(tiny_dir / "config.json", tmp_path / "config.json")
    return tmp_path


def test_missing_key(tiny_dir, tmp_path):
    key = "encoder.stages.1.layers.1.layer.2.normalization.running_var"
    path = _rewrite(tiny_dir, tmp_path, lambda t: t.pop(key))
    with pytest.raises(eqxtl.CheckpointError, match=r"missing.*\n.*" + re.escape(key)):
        eqxtl.from_pretrained(path)


def test_unexpected_key(tiny_dir, tmp_path):
    key = "encoder.stages.0.layers.0.layer.3.convolution.weight"
    path = _rewrite(
        tiny_dir, tmp_path, lambda t: t.__setitem__(key, np.zeros((4, 4, 1, 1), np.float32))
    )
    with pytest.raises(eqxtl.CheckpointError, match=r"unexpected.*\n.*" + re.escape(key)):
        eqxtl.from_pretrained(path)


def test_misshaped_key(tiny_dir, tmp_path):
    key = "encoder.stages.2.layers.0.shortcut.convolution.weight"
    path = _rewrite(
        tiny_dir, tmp_path, lambda t: t.__setitem__(key, np.zeros((48, 31, 1, 1), np.float32))
    )
    with pytest.raises(eqxtl.CheckpointError, match=re.escape(f"{key}: checkpoint (48, 31, 1, 1)")):
        eqxtl.from_pretrained(path)


def test_infer_config_mismatch():
    shapes = R.expected_shapes(R.RESNET18)
    shapes["encoder.stages.1.layers.0.layer.1.convolution.weight"] = (128, 100, 3, 3)
    with pytest.raises(eqxtl.CheckpointError, match="Cannot infer a ResNet config"):
        R.RESNET.infer_config(shapes)


# --------------------------------------------------------------------------------------
# Names, configs, presets
# --------------------------------------------------------------------------------------


def test_canonical_names():
    name = R.RESNET.canonical_name
    conv = "encoder.stages.2.layers.1.layer.0.convolution.weight"
    assert name(conv) == conv
    assert name("resnet." + conv) == conv
    assert name("classifier.1.weight") == "head.weight"
    assert name("resnet.embedder.embedder.normalization.running_var") == (
        "embedder.embedder.normalization.running_var"
    )
    tv = {
        "conv1.weight": "embedder.embedder.convolution.weight",
        "bn1.running_mean": "embedder.embedder.normalization.running_mean",
        "layer1.0.conv3.weight": "encoder.stages.0.layers.0.layer.2.convolution.weight",
        "layer4.2.bn2.bias": "encoder.stages.3.layers.2.layer.1.normalization.bias",
        "layer2.0.downsample.0.weight": "encoder.stages.1.layers.0.shortcut.convolution.weight",
        "layer2.0.downsample.1.running_var": (
            "encoder.stages.1.layers.0.shortcut.normalization.running_var"
        ),
        "fc.bias": "head.bias",
        "module.layer3.5.conv1.weight": "encoder.stages.2.layers.5.layer.0.convolution.weight",
    }
    for key, want in tv.items():
        assert name(key) == want, key
    for dropped in (
        "bn1.num_batches_tracked",
        "resnet.embedder.embedder.normalization.num_batches_tracked",
        "layer1.0.downsample.1.num_batches_tracked",
    ):
        assert name(dropped) is None, dropped
    assert name("something.else") == "something.else"
    for canonical in (conv, "head.weight", "embedder.embedder.normalization.running_mean"):
        assert name(R.RESNET.hf_name(canonical, True)) == canonical
        assert name(R.RESNET.hf_name(canonical, False)) == canonical
    assert R.RESNET.hf_name(conv, True) == "resnet." + conv
    assert R.RESNET.hf_name("head.bias", True) == "classifier.1.bias"
    assert not R.RESNET.detect({"_conv_stem.weight": (), "_blocks.0._depthwise_conv.weight": ()})
    assert not R.RESNET.detect({"embeddings.patch_embedding.weight": ()})


def test_presets_and_hf_configs():
    for preset in (R.RESNET18, R.RESNET34, R.RESNET50, R.RESNET101, R.RESNET152):
        assert R.RESNET.infer_config(R.expected_shapes(preset)) == preset
        hf = R.RESNET.config_to_hf(preset, None)
        assert hf["model_type"] == "resnet" and hf["architectures"] == ["ResNetModel"]
        assert R.RESNET.config_from_hf(json.loads(json.dumps(hf))) == preset
        # transformers builds the same network from it.
        t = transformers.ResNetConfig.from_dict(hf)
        assert (t.hidden_sizes, t.depths, t.layer_type) == (
            list(preset.hidden_sizes),
            list(preset.depths),
            preset.layer_type,
        )
    for name, hf in HF_CONFIGS.items():
        assert R.RESNET.config_from_hf({"model_type": "resnet", **hf}) == PRESETS[name]
    assert R.RESNET.config_from_hf({"model_type": "resnet"}) == R.RESNET50
    hf = R.RESNET.config_to_hf(R.RESNET18, 3)
    assert hf["architectures"] == ["ResNetForImageClassification"]
    assert transformers.ResNetConfig.from_dict(hf).num_labels == 3
    assert R.RESNET.feature_dim(R.RESNET18) == 512 and R.RESNET.feature_dim(R.RESNET50) == 2048
    with pytest.raises(ValueError, match="model_type"):
        R.RESNET.config_from_hf({"model_type": "clip"})
    with pytest.raises(ValueError, match="hidden_act"):
        R.ResNetConfig(hidden_act="mish")
    with pytest.raises(ValueError, match="layer_type"):
        R.ResNetConfig(layer_type="preact")
    with pytest.raises(ValueError, match="same length"):
        R.ResNetConfig(depths=(1, 1))
    assert hash(R.ResNetConfig(hidden_sizes=[256, 512, 1024, 2048])) == hash(R.RESNET50)
