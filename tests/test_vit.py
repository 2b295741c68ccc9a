"""ViT: parity with transformers 5 at ViT-B/16, resized position embeddings against
``interpolate_pos_encoding=True``, timm and vit_jax (.npz) golden fixtures, save/load in
every writable layout read by transformers, learnability. (Batching, blocks, remat / scan,
LoRA, layout round trips of every architecture: tests/test_architectures.py.)"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers

import eqxtl
from eqxtl.errors import CheckpointError
from eqxtl.io import checkpoint
from eqxtl.models.vit import VIT, VIT_B16, ViT, ViTConfig
from tests._tiny import random_tensors
from tests._vitfamily import check_learns, perturb, rel_err, same_tree

FIXTURES = Path(__file__).parent / "fixtures"
TOL = 1e-4  # transformers parity, relative to the output scale
GOLDEN_TOL = 1e-5  # timm / vit_jax goldens, relative to the output scale

TINY = dict(
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=128,
    image_size=32,
    patch_size=8,
)
SMALL = dict(
    hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, patch_size=8
)


def forward(model, state, x):
    return np.asarray(jax.jit(lambda x: model(x, state)[0])(x))


# --------------------------------------------------------------------------------------
# Real-size parity: google/vit-base-patch16-224-in21k's config (ViTModel with pooler).
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def b16(tmp_path_factory):
    torch.manual_seed(0)
    reference = perturb(transformers.ViTModel(transformers.ViTConfig()), seed=0)
    directory = tmp_path_factory.mktemp("vit_b16")
    reference.save_pretrained(directory)
    x = np.random.default_rng(0).normal(size=(2, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        out = reference(pixel_values=torch.from_numpy(x))
    return directory, x, out.pooler_output.numpy(), out.last_hidden_state.numpy()


def test_parity_b16(b16):
    directory, x, pooled, _ = b16
    model, state = eqxtl.from_pretrained(directory)
    assert isinstance(model, ViT) and model.config == VIT_B16
    assert rel_err(forward(model, state, x), pooled) <= TOL  # batch-native path


# --------------------------------------------------------------------------------------
# Tiny transformers models: layouts, heads, resizing, saving
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A ViTModel with pooler and a ViTForImageClassification (3 labels), saved."""
    torch.manual_seed(1)
    config = transformers.ViTConfig(**TINY, num_labels=3)
    root = tmp_path_factory.mktemp("vit_tiny")
    pooled = perturb(transformers.ViTModel(config), seed=1)
    pooled.save_pretrained(root / "model")
    classifier = perturb(transformers.ViTForImageClassification(config), seed=2)
    classifier.save_pretrained(root / "classifier")
    return root, pooled, classifier


def test_classifier_head_and_hidden_states(tiny):
    root, _, reference = tiny
    x = np.random.default_rng(1).normal(size=(2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        out = reference(pixel_values=torch.from_numpy(x), output_hidden_states=True)
        hidden = reference.vit(pixel_values=torch.from_numpy(x)).last_hidden_state
    model, state = eqxtl.from_pretrained(root / "classifier", keep_head=True)
    assert model.backbone.pooler is None and model.num_classes == 3
    logits = jax.vmap(lambda xi: model(xi, state)[0])(x)
    assert rel_err(logits, out.logits) <= TOL
    assert rel_err(model.backbone.hidden_states(x), hidden) <= TOL


@pytest.mark.parametrize("size", [48, (40, 24)])
def test_resize_matches_interpolate_pos_encoding(tiny, size):
    root, reference, _ = tiny
    h, w = (size, size) if isinstance(size, int) else size
    x = np.random.default_rng(2).normal(size=(2, 3, h, w)).astype(np.float32)
    with torch.no_grad():
        want = reference(pixel_values=torch.from_numpy(x), interpolate_pos_encoding=True)
    model, state = eqxtl.from_pretrained(root / "model", image_size=size)
    assert model.config.image_size == size
    assert rel_err(forward(model, state, x), want.pooler_output) <= TOL
    assert eqxtl.preprocessing_for(model).crop == h
    with pytest.raises(ValueError, match="image_size"):
        model(np.zeros((3, 32, 32), np.float32), state)


def test_save_load_round_trips(tiny, tmp_path):
    root, _, _ = tiny
    pooled, state = eqxtl.from_pretrained(root / "model")
    eqxtl.save_pretrained(pooled, state, tmp_path / "t")
    again, _ = eqxtl.from_pretrained(tmp_path / "t")
    assert same_tree(again, pooled)
    # transformers reads what eqxtl wrote
    reread = transformers.ViTModel.from_pretrained(tmp_path / "t").eval()
    x = np.random.default_rng(3).normal(size=(2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want = reread(pixel_values=torch.from_numpy(x)).pooler_output
    assert rel_err(forward(pooled, state, x), want) <= TOL
    # timm has no pre-logits pooler: a clear error, nothing written
    with pytest.raises(CheckpointError, match="pooler"):
        eqxtl.save_pretrained(pooled, state, tmp_path / "no", layout="timm")
    assert not (tmp_path / "no").exists()

    classifier, state = eqxtl.from_pretrained(root / "classifier", keep_head=True)
    for layout in ("transformers", "timm"):
        eqxtl.save_pretrained(classifier, state, tmp_path / layout, layout=layout)
        again, _ = eqxtl.from_pretrained(tmp_path / layout, keep_head=True)
        if layout == "transformers":
            assert same_tree(again, classifier)
        else:  # the same weights; timm's own LayerNorm eps and resampling filter
            assert again.backbone.config.layer_norm_eps == 1e-6
            for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(classifier), strict=True):
                np.testing.assert_array_equal(a, b)
    with pytest.raises(CheckpointError, match="vit_jax"):
        eqxtl.save_pretrained(classifier, state, tmp_path / "npz", layout="vit_jax")


def test_learns_with_frozen_backbone(tmp_path):
    config = ViTConfig(**TINY, add_pooling_layer=False)
    backbone, state = checkpoint.fill(
        checkpoint.skeleton(VIT, config), random_tensors(VIT, config, seed=0)
    )
    assert check_learns(backbone, state, tmp_path) >= 0.9


# --------------------------------------------------------------------------------------
# timm and vit_jax golden fixtures
# --------------------------------------------------------------------------------------


def test_timm_augreg_golden(tmp_path):
    golden = np.load(FIXTURES / "timm_vit_augreg" / "golden.npz")
    model, state = eqxtl.from_pretrained(FIXTURES / "timm_vit_augreg", keep_head=True)
    backbone = model.backbone
    assert backbone.config.layer_norm_eps == 1e-6 and backbone.config.hidden_act == "gelu"
    x = golden["input"]
    assert rel_err(forward(backbone, state, x), golden["pooled"]) <= GOLDEN_TOL
    assert rel_err(backbone.hidden_states(x), golden["features"]) <= GOLDEN_TOL
    assert rel_err(jax.vmap(lambda xi: model(xi, state)[0])(x), golden["logits"]) <= GOLDEN_TOL
    pre = eqxtl.preprocessing_for(backbone)
    assert (pre.crop, pre.resize, pre.interpolation) == (32, 35, "bicubic")
    # save back as timm: the same files up to the float bits
    eqxtl.save_pretrained(model, state, tmp_path, layout="timm")
    import safetensors.numpy

    ours = safetensors.numpy.load_file(tmp_path / "model.safetensors")
    theirs = safetensors.numpy.load_file(FIXTURES / "timm_vit_augreg" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k])


@pytest.mark.parametrize("act", ["tanh", "exact"])
def test_vit_jax_npz_golden(act):
    golden = np.load(FIXTURES / "vit_jax_vit" / "golden.npz")
    suffix = "" if act == "tanh" else "_gelu_exact"
    override = {} if act == "tanh" else {"hidden_act": "gelu"}
    # heads are not in the file (hidden // 64 = 0 for this width-32 model): say them
    with pytest.warns(UserWarning, match="not stored in the weights"):
        model, state = eqxtl.from_pretrained(
            FIXTURES / "vit_jax_vit" / "vit_tiny.npz",
            keep_head=True,
            num_attention_heads=4,
            **override,
        )
    assert model.backbone.config.hidden_act == ("gelu_pytorch_tanh" if act == "tanh" else "gelu")
    x = golden["input"]
    assert rel_err(forward(model.backbone, state, x), golden["pooled" + suffix]) <= GOLDEN_TOL
    assert rel_err(model.backbone.hidden_states(x), golden["features" + suffix]) <= GOLDEN_TOL
    logits = jax.vmap(lambda xi: model(xi, state)[0])(x)
    assert rel_err(logits, golden["logits" + suffix]) <= GOLDEN_TOL


def test_npz_object_array_is_refused(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, cls=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CheckpointError, match="pickled"):
        eqxtl.from_pretrained(path)


def test_partial_npz_names_missing_keys(tmp_path):
    with np.load(FIXTURES / "vit_jax_vit" / "vit_tiny.npz") as f:
        tensors = {k: f[k] for k in f.files if "encoderblock_1/LayerNorm_2" not in k}
    np.savez(tmp_path / "partial.npz", **tensors)
    with (
        pytest.raises(CheckpointError, match=r"encoder\.layer\.1\.layernorm_after"),
        pytest.warns(UserWarning, match="not stored in the weights"),
    ):
        eqxtl.from_pretrained(tmp_path / "partial.npz", num_attention_heads=4)


def test_config_and_aliases():
    assert VIT.feature_dim(VIT_B16) == 768
    assert eqxtl.REGISTRY["vit-base-patch16-224-in21k"][1].repo == (
        "google/vit-base-patch16-224-in21k"
    )
    assert "vit_base_patch16_224.augreg2_in21k_ft_in1k" in eqxtl.REGISTRY
    pre = VIT.preprocessing(VIT_B16)
    assert (pre.mean, pre.interpolation, pre.crop) == ((0.5,) * 3, "bilinear", 224)
    assert ViTConfig(image_size=[224, 160]).grid == (14, 10)
    with pytest.raises(ValueError, match="multiple"):
        ViTConfig(image_size=100)


def test_transformers5_state_dict_names(tiny, tmp_path):
    """transformers 5 holds ViT's blocks as ``layers.N`` with ``q_proj`` ... in memory (its
    files keep the hub names): a raw ``state_dict()`` loads to the same model."""
    import shutil

    import safetensors.torch

    root, _, reference = tiny
    tensors = {k: v.contiguous() for k, v in reference.state_dict().items()}
    assert "vit.layers.0.attention.q_proj.weight" in tensors
    safetensors.torch.save_file(tensors, tmp_path / "model.safetensors")
    shutil.copy(root / "classifier" / "config.json", tmp_path)
    raw, _ = eqxtl.from_pretrained(tmp_path, keep_head=True)
    saved, _ = eqxtl.from_pretrained(root / "classifier", keep_head=True)
    assert same_tree(raw, saved)
