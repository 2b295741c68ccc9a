"""MLP-Mixer: the timm and vit_jax ``.npz`` golden fixtures (same weights), the fixed input
size, saving in both layouts with the fixtures' keys, learnability. (Batching, blocks,
remat, LoRA: tests/test_architectures.py.)"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import eqxtl
from eqxtl.models.mixer import MixerConfig
from tests._tiny import TINY_MIXER, tiny
from tests._vitfamily import check_learns, rel_err

GOLDEN_TOL = 1e-5  # relative to the output scale (float32)
FIXTURES = Path(__file__).parent / "fixtures"
TIMM = FIXTURES / "timm_mixer"
VIT_JAX = FIXTURES / "vit_jax_mixer" / "mixer_tiny.npz"
CONFIG = TINY_MIXER  # the fixtures' shape


def check_golden(model, state, golden, suffix=""):
    """Tokens after the final norm, pooled features and logits against the fixture's."""
    x = golden["input"]
    backbone = model.backbone
    assert rel_err(backbone.tokens(x), golden["features" + suffix]) <= GOLDEN_TOL
    assert rel_err(backbone(x, state)[0], golden["pooled" + suffix]) <= GOLDEN_TOL
    logits = jax.vmap(lambda xi: model(xi, state)[0])(x)
    assert rel_err(logits, golden["logits" + suffix]) <= GOLDEN_TOL


def test_timm_golden():
    model, state = eqxtl.from_pretrained(TIMM, keep_head=True)
    assert model.backbone.config == CONFIG  # exact GELU: timm's nn.GELU
    check_golden(model, state, np.load(TIMM / "golden.npz"))
    pre = eqxtl.preprocessing_for(model)
    assert (pre.crop, pre.mean, pre.interpolation) == (32, (0.5, 0.5, 0.5), "bicubic")


@pytest.mark.parametrize("act", ["gelu_pytorch_tanh", "gelu"])
def test_vit_jax_golden(act):
    golden = np.load(FIXTURES / "vit_jax_mixer" / "golden.npz")
    if act == "gelu_pytorch_tanh":  # the layout's default (flax's tanh GELU), with a warning
        with pytest.warns(UserWarning, match="hidden_act"):
            model, state = eqxtl.from_pretrained(VIT_JAX, keep_head=True)
        check_golden(model, state, golden)
    else:
        model, state = eqxtl.from_pretrained(VIT_JAX, keep_head=True, hidden_act=act)
        check_golden(model, state, golden, "_gelu_exact")
    assert model.backbone.config == MixerConfig(**{**CONFIG.__dict__, "hidden_act": act})
    # the same weights as the timm fixture, read through transposed flax kernels
    timm, _ = eqxtl.from_pretrained(TIMM, keep_head=True)
    for a, b in zip(jax.tree.leaves(model), jax.tree.leaves(timm), strict=True):
        np.testing.assert_array_equal(a, b)


def test_fixed_input_size():
    with pytest.raises(eqxtl.CheckpointError, match="fixed input size"):
        eqxtl.from_pretrained(TIMM, image_size=64)
    model, state = eqxtl.from_pretrained(TIMM, image_size=32)  # its own size is fine
    with pytest.raises(eqxtl.DataError, match="patch count"):
        model(jnp.zeros((3, 64, 64)), state)


@pytest.mark.parametrize("layout", ["timm", "vit_jax"])
def test_save_round_trip(tmp_path, layout):
    """Saved with the library's own keys and shapes, reloaded bit-identically."""
    model, state = eqxtl.from_pretrained(TIMM, keep_head=True)
    if layout == "vit_jax":  # no config file: reloading the classifier needs keep_head
        with pytest.warns(UserWarning, match="keep_head=True"):
            eqxtl.save_pretrained(model, state, tmp_path, layout=layout)
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            eqxtl.save_pretrained(model, state, tmp_path, layout=layout)
        assert not [w for w in caught if "keep_head=True" in str(w.message)]
    saved = load_file(tmp_path / "model.safetensors")
    original = load_file(TIMM / "model.safetensors") if layout == "timm" else np.load(VIT_JAX)
    assert {k: v.shape for k, v in saved.items()} == {k: original[k].shape for k in original}
    again, _ = eqxtl.from_pretrained(tmp_path, keep_head=True, hidden_act="gelu")
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(model), strict=True):
        np.testing.assert_array_equal(a, b)
    assert again.backbone.config == model.backbone.config
    if layout == "timm":  # what timm's create_model needs to rebuild it
        assert eqxtl.preprocessing_for(again) == eqxtl.preprocessing_for(model)
        saved = json.loads((tmp_path / "config.json").read_text())
        original = json.loads((TIMM / "config.json").read_text())
        assert saved["architecture"] == "mixer_b8_32"
        for key in ("embed_dim", "num_blocks", "patch_size", "img_size", "mlp_ratio"):
            assert saved["model_args"][key] == original["model_args"][key], key


def test_hub_repo_id_from_the_local_cache(tmp_path):
    from tests.test_layouts import _hub_cache

    repo = "timm/mixer_tiny.goog_in21k_ft_in1k"
    cache = _hub_cache(tmp_path, repo, TIMM, ["model.safetensors", "config.json"])
    model, state = eqxtl.from_pretrained(repo, cache_dir=cache)
    golden = np.load(TIMM / "golden.npz")
    assert rel_err(model(golden["input"], state)[0], golden["pooled"]) <= GOLDEN_TOL


def test_npz_with_object_arrays_is_refused(tmp_path):
    tensors = dict(np.load(VIT_JAX))
    np.savez(tmp_path / "pickled.npz", **tensors, meta=np.array([{"a": 1}], dtype=object))
    with pytest.raises(eqxtl.CheckpointError, match="pickled"):
        eqxtl.from_pretrained(tmp_path / "pickled.npz")


def test_frozen_backbone_learns(tmp_path):
    assert check_learns(*tiny("mixer"), tmp_path) >= 0.9
