"""SigLIP vision tower: parity with transformers 5 at the real base config, interpolated
position embeddings, the big_vision ``.npz`` golden fixture, full SiglipModel files, saving,
learnability. (Batching, blocks, remat / scan, LoRA: tests/test_architectures.py.)"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from skimage import data as skdata

import eqxtl
from eqxtl.models.siglip import PREPROCESSING, SIGLIP_B16, SiglipVisionConfig
from tests._tiny import tiny
from tests._vitfamily import check_learns, perturb, rel_err

TOL = 1e-4  # transformers parity: max |Δ| relative to the output scale (float32)
GOLDEN_TOL = 1e-5  # golden fixtures, relative to the output scale
FIXTURE = Path(__file__).parent / "fixtures" / "big_vision_siglip"

SMALL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
)


def images(size, n=2, seed=3) -> np.ndarray:
    h, w = (size, size) if isinstance(size, int) else size
    return np.random.default_rng(seed).standard_normal((n, 3, h, w)).astype(np.float32)


# --------------------------------------------------------------------------------------
# Real-size parity: google/siglip-base-patch16-224's vision config, random init.
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.SiglipVisionConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        image_size=224,
        patch_size=16,
    )
    model = perturb(transformers.SiglipVisionModel(config), 0)
    directory = tmp_path_factory.mktemp("siglip_base")
    model.save_pretrained(directory)
    x = images(224)
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(x))
    return directory, x, out.pooler_output.numpy(), out.last_hidden_state.numpy()


def _tokens_and_features(model, x):
    tokens = model.hidden_states(x)
    return tokens, model.head(tokens)


def test_parity_base(base):
    directory, x, pooled, hidden = base
    model, state = eqxtl.from_pretrained(directory)
    assert model.config == SIGLIP_B16
    assert eqxtl.preprocessing_for(model) == PREPROCESSING
    # one batch-native forward; features = the MAP head on the post-norm tokens
    tokens, features = eqx.filter_jit(_tokens_and_features)(model, x)
    assert rel_err(tokens, hidden) <= TOL
    assert rel_err(features, pooled) <= TOL


def test_preprocessing_matches_the_siglip_processor():
    """Both sides resized to 224 (no crop, aspect ratio not kept), bicubic, mean = std = 0.5:
    transformers' SiglipImageProcessorPil on a non-square photo."""
    processor = transformers.SiglipImageProcessorPil()
    image = skdata.chelsea()  # (300, 451, 3)
    want = processor(images=image, return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(eqxtl.preprocess(image, PREPROCESSING), want, atol=1e-6)


# --------------------------------------------------------------------------------------
# Small config: every transformers file shape, interpolation, saving
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A SiglipModel (vision + text towers, logit_scale / logit_bias) and the
    SiglipVisionModel with the same vision weights, both saved."""
    torch.manual_seed(1)
    text = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=100,
        max_position_embeddings=16,
    )
    full = transformers.SiglipModel(
        transformers.SiglipConfig(vision_config=SMALL, text_config=text)
    )
    perturb(full, 1)
    vision = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**SMALL)).eval()
    vision.load_state_dict(full.vision_model.state_dict())
    root = tmp_path_factory.mktemp("siglip_small")
    full.save_pretrained(root / "full")
    vision.save_pretrained(root / "vision")
    return root, vision


def test_full_siglip_model_reads_the_vision_tower(small):
    root, vision = small
    keys = safetensors.numpy.load_file(root / "full" / "model.safetensors").keys()
    assert {"logit_scale", "logit_bias", "vision_model.head.probe"} <= keys
    assert any(k.startswith("text_model.") for k in keys)
    a, state = eqxtl.from_pretrained(root / "full")
    b, _ = eqxtl.from_pretrained(root / "vision")
    assert a.config == b.config == SiglipVisionConfig(**SMALL)
    assert jax.tree.all(jax.tree.map(jnp.array_equal, a, b))
    x = images(32)
    with torch.no_grad():
        want = vision(pixel_values=torch.from_numpy(x)).pooler_output.numpy()
    assert rel_err(a(x, state)[0], want) <= TOL


@pytest.mark.parametrize("size", [48, (48, 24)])
def test_interpolated_positions_match_transformers(small, size):
    root, vision = small
    model, state = eqxtl.from_pretrained(root / "vision", image_size=size)
    assert model.config.image_size == size
    x = images(size)
    with torch.no_grad():
        out = vision(pixel_values=torch.from_numpy(x), interpolate_pos_encoding=True)
    tokens, features = eqx.filter_jit(_tokens_and_features)(model, x)
    assert rel_err(features, out.pooler_output) <= TOL
    assert rel_err(tokens, out.last_hidden_state) <= TOL
    crop = size if isinstance(size, int) else size[0]
    assert eqxtl.preprocessing_for(model).crop == crop
    with pytest.raises(eqxtl.DataError, match="image_size"):
        model(images(32), state)


def test_save_round_trip_and_transformers_reads_it(small, tmp_path):
    root, vision = small
    backbone, state = eqxtl.from_pretrained(root / "vision")
    model = eqxtl.Classifier(backbone, 3, key=jax.random.key(0))
    eqxtl.save_pretrained(model, state, tmp_path / "with_head")
    keys = safetensors.numpy.load_file(tmp_path / "with_head" / "model.safetensors").keys()
    assert {"classifier.weight", "vision_model.head.attention.in_proj_weight"} <= keys
    again, _ = eqxtl.from_pretrained(tmp_path / "with_head", keep_head=True)
    assert jax.tree.all(jax.tree.map(jnp.array_equal, again, model))

    eqxtl.save_pretrained(backbone, state, tmp_path / "backbone")
    saved = safetensors.numpy.load_file(tmp_path / "backbone" / "model.safetensors")
    own = safetensors.numpy.load_file(root / "vision" / "model.safetensors")
    assert {k: v.shape for k, v in saved.items()} == {
        "vision_model." + k: v.shape for k, v in own.items()
    }
    reference, info = transformers.SiglipVisionModel.from_pretrained(
        tmp_path / "backbone", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    x = images(32)
    with torch.no_grad():
        ours = reference.eval()(pixel_values=torch.from_numpy(x)).pooler_output
        want = vision(pixel_values=torch.from_numpy(x)).pooler_output
    np.testing.assert_array_equal(ours.numpy(), want.numpy())
    with pytest.raises(ValueError, match="read-only"):
        eqxtl.save_pretrained(backbone, state, tmp_path / "npz", layout="big_vision")


# --------------------------------------------------------------------------------------
# big_vision .npz (golden fixture made through timm's big_vision loader)
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(FIXTURE / "golden.npz"))


@pytest.mark.parametrize("act", ["gelu_pytorch_tanh", "gelu"])
def test_big_vision_golden(golden, act):
    path = FIXTURE / "siglip_tiny.npz"
    if act == "gelu_pytorch_tanh":  # the layout's default (flax's tanh GELU), with a warning
        with pytest.warns(UserWarning, match="hidden_act"):
            model, state = eqxtl.from_pretrained(path, num_attention_heads=4)
        suffix = ""
    else:
        model, state = eqxtl.from_pretrained(path, num_attention_heads=4, hidden_act=act)
        suffix = "_gelu_exact"
    assert model.config == SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        hidden_act=act,
    )
    x = golden["input"]
    assert rel_err(model(x, state)[0], golden["pooled" + suffix]) <= GOLDEN_TOL
    assert rel_err(model.hidden_states(x), golden["features" + suffix]) <= GOLDEN_TOL


def timm_keys(depth: int) -> set[str]:
    """timm's VisionTransformer(class_token=False, global_pool="map") state-dict keys."""
    linear = ("weight", "bias")
    block = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]
    pool = ["q", "kv", "proj", "norm", "mlp.fc1", "mlp.fc2"]
    return {
        "pos_embed",
        "attn_pool.latent",
        *(f"{m}.{p}" for m in ("patch_embed.proj", "norm") for p in linear),
        *(f"blocks.{i}.{m}.{p}" for i in range(depth) for m in block for p in linear),
        *(f"attn_pool.{m}.{p}" for m in pool for p in linear),
    }


def test_timm_layout_round_trip(golden, tmp_path):
    """big_vision -> timm's names (what timm's big_vision loader makes of the file) ->
    bit-identical reload; the tanh activation survives as timm's act_layer."""
    model, state = eqxtl.from_pretrained(
        FIXTURE / "siglip_tiny.npz", num_attention_heads=4, hidden_act="gelu_pytorch_tanh"
    )
    eqxtl.save_pretrained(model, state, tmp_path, layout="timm")
    saved = safetensors.numpy.load_file(tmp_path / "model.safetensors")
    assert set(saved) == timm_keys(2)
    assert saved["pos_embed"].shape == (1, 16, 32)
    assert saved["attn_pool.kv.weight"].shape == (64, 32)
    again, _ = eqxtl.from_pretrained(tmp_path)
    assert again.config == model.config
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(model), strict=True):
        np.testing.assert_array_equal(a, b)
    assert rel_err(again(golden["input"], state)[0], golden["pooled"]) <= GOLDEN_TOL
    # the same weights saved in the transformers layout load identically too
    eqxtl.save_pretrained(model, state, tmp_path / "hf")
    hf, _ = eqxtl.from_pretrained(tmp_path / "hf")
    assert jax.tree.all(jax.tree.map(jnp.array_equal, hf, model))


def test_big_vision_drops_text_tower(tmp_path):
    tensors = dict(np.load(FIXTURE / "siglip_tiny.npz"))
    extra = {
        "params/txt/Embed_0/embedding": np.zeros((10, 4), np.float32),
        "params/t": np.zeros((1,), np.float32),
        "params/b": np.zeros((1,), np.float32),
    }
    np.savez(tmp_path / "two_towers.npz", **tensors, **extra)
    a, _ = eqxtl.from_pretrained(
        tmp_path / "two_towers.npz", num_attention_heads=4, hidden_act="gelu"
    )
    b, _ = eqxtl.from_pretrained(
        FIXTURE / "siglip_tiny.npz", num_attention_heads=4, hidden_act="gelu"
    )
    assert jax.tree.all(jax.tree.map(jnp.array_equal, a, b))


def test_npz_with_object_arrays_is_refused(tmp_path):
    tensors = dict(np.load(FIXTURE / "siglip_tiny.npz"))
    np.savez(tmp_path / "pickled.npz", **tensors, meta=np.array([{"a": 1}], dtype=object))
    with pytest.raises(eqxtl.CheckpointError, match="pickled"):
        eqxtl.from_pretrained(tmp_path / "pickled.npz")


# --------------------------------------------------------------------------------------
# Batching, blocks, remat, learnability (tiny random model)
# --------------------------------------------------------------------------------------


def test_frozen_backbone_learns(tmp_path):
    assert check_learns(*tiny("siglip"), tmp_path) >= 0.9
