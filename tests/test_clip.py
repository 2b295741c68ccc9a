"""CLIP vision tower: parity with transformers 5, every checkpoint layout, config inference,
strict key errors, and files transformers reads back."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import dataclasses
import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from PIL import Image
from skimage import data as skdata

import eqxtl
from eqxtl.io import checkpoint
from eqxtl.models.clip import (
    CLIP_VISION,
    CLIP_VIT_B32,
    CLIP_VIT_L14,
    CLIPVision,
    CLIPVisionConfig,
)

# Float32 everywhere, default matmul precision (on CPU that is full float32).
TOL = 1e-4  # max |Δ| against transformers

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)

# Small enough to be fast, big enough that infer_config's heads = hidden // 64 holds.
TINY = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
    projection_dim=16,
)
TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    vocab_size=49408,
    max_position_embeddings=16,
)


def clip_images(size: int) -> np.ndarray:
    """Two real photos as CLIP preprocesses them: bicubic shortest side -> size, center
    crop, /255, CLIP mean/std. ``(2, 3, size, size)`` float32."""
    out = []
    for img in (skdata.chelsea(), skdata.astronaut()):
        pil = Image.fromarray(img)
        scale = size / min(pil.size)
        w, h = max(size, round(pil.width * scale)), max(size, round(pil.height * scale))
        pil = pil.resize((w, h), Image.BICUBIC)
        left, top = (w - size) // 2, (h - size) // 2
        pil = pil.crop((left, top, left + size, top + size))
        x = (np.asarray(pil, np.float32) / 255 - MEAN) / STD
        out.append(x.transpose(2, 0, 1))
    return np.stack(out)


def load(directory) -> tuple[CLIPVision, eqx.nn.State]:
    """The generic loader path: canonicalize -> config.json + reconcile -> fill."""
    tensors = safetensors.numpy.load_file(os.path.join(directory, "model.safetensors"))
    canon = checkpoint.canonicalize(CLIP_VISION, tensors)
    with open(os.path.join(directory, "config.json")) as f:
        hf = json.load(f)
    shapes = {k: v.shape for k, v in canon.items()}
    config = CLIP_VISION.reconcile(CLIP_VISION.config_from_hf(hf), shapes)
    return checkpoint.fill(checkpoint.skeleton(CLIP_VISION, config), canon)


def features(model, state, images) -> np.ndarray:
    return np.asarray(jax.jit(jax.vmap(lambda x: model(x, state)[0]))(images))


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def save_safetensors(tensors: dict, directory, config: dict):
    os.makedirs(directory, exist_ok=True)
    safetensors.numpy.save_file(
        tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"}
    )
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)


# --------------------------------------------------------------------------------------
# Real-size parity: openai/clip-vit-base-patch32's config, random init.
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def b32(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        image_size=224,
        patch_size=32,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=512,
    )
    model = transformers.CLIPVisionModelWithProjection(config).eval()
    directory = tmp_path_factory.mktemp("clip_b32")
    model.save_pretrained(directory)
    images = clip_images(224)
    with torch.no_grad():
        pixels = torch.from_numpy(images)
        pooled = model.vision_model(pixel_values=pixels).pooler_output.numpy()
        embeds = model(pixel_values=pixels).image_embeds.numpy()
    return directory, images, pooled, embeds


def test_parity_b32(b32):
    directory, images, pooled, embeds = b32
    model, state = load(directory)
    assert model.config == CLIP_VIT_B32
    ours = features(model, state, images)
    assert max_diff(ours, pooled) <= TOL
    assert max_diff(jax.vmap(model.project)(ours), embeds) <= TOL
    # the batch-native path (what eqxtl.batched and fit use) against transformers too
    batch = np.asarray(jax.jit(lambda x: model(x, state)[0])(images))
    assert max_diff(batch, pooled) <= TOL
    assert max_diff(model.project(batch), embeds) <= TOL


def test_infer_config_from_shapes(b32):
    directory = b32[0]
    with safetensors.safe_open(os.path.join(directory, "model.safetensors"), "numpy") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert CLIP_VISION.detect(shapes)
    names = checkpoint.canonical_names(CLIP_VISION, shapes)
    canon = {name: shapes[key] for name, key in names.items()}
    assert CLIP_VISION.infer_config(canon) == CLIP_VIT_B32


# --------------------------------------------------------------------------------------
# Every layout, tiny: one set of weights written four ways.
# --------------------------------------------------------------------------------------

LAYOUTS = ("vision", "vision_projection", "vision_t4", "clip")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{layout: directory}, plus the torch references for the shared weights."""
    torch.manual_seed(1)
    clip_config = transformers.CLIPConfig(
        vision_config=TINY, text_config=TINY_TEXT, projection_dim=TINY["projection_dim"]
    )
    full = transformers.CLIPModel(clip_config).eval()
    vision_config = transformers.CLIPVisionConfig(**TINY)
    vision = transformers.CLIPVisionModel(vision_config).eval()
    vision.load_state_dict(full.vision_model.state_dict())
    projection = transformers.CLIPVisionModelWithProjection(vision_config).eval()
    projection.vision_model.load_state_dict(full.vision_model.state_dict())
    projection.visual_projection.load_state_dict(full.visual_projection.state_dict())

    root = tmp_path_factory.mktemp("clip_tiny")
    dirs = {name: root / name for name in LAYOUTS}
    full.save_pretrained(dirs["clip"])
    vision.save_pretrained(dirs["vision"])
    projection.save_pretrained(dirs["vision_projection"])
    # transformers-4 CLIPVisionModel files: `vision_model.` prefix and a position_ids buffer.
    tensors = safetensors.numpy.load_file(dirs["vision"] / "model.safetensors")
    t4 = {"vision_model." + k: v for k, v in tensors.items()}
    t4["vision_model.embeddings.position_ids"] = np.arange(17, dtype=np.int64)[None]
    with open(dirs["vision"] / "config.json") as f:
        save_safetensors(t4, dirs["vision_t4"], json.load(f))

    images = clip_images(TINY["image_size"])
    with torch.no_grad():
        pixels = torch.from_numpy(images)
        pooled = vision(pixel_values=pixels).pooler_output.numpy()
        embeds = full.get_image_features(pixel_values=pixels).pooler_output.numpy()
    return dirs, images, pooled, embeds


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_load_identically(tiny, layout):
    dirs, images, pooled, embeds = tiny
    model, state = load(dirs[layout])
    want = CLIPVisionConfig(**TINY)
    if layout in ("vision", "vision_t4"):
        want = dataclasses.replace(want, projection_dim=None)
    assert model.config == want
    ours = features(model, state, images)
    assert max_diff(ours, pooled) <= TOL
    if want.projection_dim is None:
        with pytest.raises(ValueError, match="no visual_projection"):
            model.project(ours[0])
    else:
        assert max_diff(jax.vmap(model.project)(ours), embeds) <= TOL

    # The public loader gives the same model; a bare .safetensors infers the same config.
    loaded, _ = eqxtl.from_pretrained(dirs[layout])
    assert jax.tree.all(jax.tree.map(jnp.array_equal, loaded, model))
    bare, _ = eqxtl.from_pretrained(dirs[layout] / "model.safetensors")
    assert bare.config == want


def test_all_layouts_same_features(tiny):
    dirs, images, _, _ = tiny
    outs = [features(*load(dirs[layout]), images) for layout in LAYOUTS]
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])


@pytest.mark.parametrize("act", ["quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh"])
def test_activations_match_transformers(tmp_path, act):
    torch.manual_seed(2)
    reference = transformers.CLIPVisionModel(
        transformers.CLIPVisionConfig(**{**TINY, "hidden_act": act})
    ).eval()
    reference.save_pretrained(tmp_path)
    images = clip_images(TINY["image_size"])
    with torch.no_grad():
        out = reference(pixel_values=torch.from_numpy(images))
    model, state = load(tmp_path)
    assert model.config.hidden_act == act
    assert max_diff(features(model, state, images), out.pooler_output) <= TOL
    hidden = jax.vmap(model.hidden_states)(images)
    assert max_diff(hidden, out.last_hidden_state) <= TOL


# --------------------------------------------------------------------------------------
# Strict key errors
# --------------------------------------------------------------------------------------


def _tiny_canonical(tiny):
    tensors = safetensors.numpy.load_file(tiny[0]["vision_projection"] / "model.safetensors")
    canon = checkpoint.canonicalize(CLIP_VISION, tensors)
    return canon, checkpoint.skeleton(CLIP_VISION, CLIPVisionConfig(**TINY))


def test_missing_key(tiny):
    canon, skel = _tiny_canonical(tiny)
    del canon["encoder.layers.1.mlp.fc1.bias"]
    with pytest.raises(checkpoint.CheckpointError, match=r"encoder\.layers\.1\.mlp\.fc1\.bias"):
        checkpoint.fill(skel, canon)


def test_unexpected_key(tiny):
    canon, skel = _tiny_canonical(tiny)
    canon["encoder.layers.0.mlp.fc3.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(checkpoint.CheckpointError, match=r"encoder\.layers\.0\.mlp\.fc3\.weight"):
        checkpoint.fill(skel, canon)


def test_misshaped_key(tiny):
    canon, skel = _tiny_canonical(tiny)
    canon["post_layernorm.weight"] = np.ones((7,), np.float32)
    with pytest.raises(checkpoint.CheckpointError, match=r"post_layernorm\.weight: checkpoint"):
        checkpoint.fill(skel, canon)


# --------------------------------------------------------------------------------------
# Saving: transformers reads what hf_name / config_to_hf write
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("projection", [True, False])
def test_transformers_reads_saved(tiny, tmp_path, projection):
    dirs, images, pooled, embeds = tiny
    model, state = load(dirs["clip" if projection else "vision"])
    tensors = {
        CLIP_VISION.hf_name(name, False): np.asarray(value)
        for name, value in checkpoint.state_dict(model, state).items()
    }
    save_safetensors(tensors, tmp_path, CLIP_VISION.config_to_hf(model.config, None))

    cls = transformers.CLIPVisionModelWithProjection if projection else transformers.CLIPVisionModel
    auto = transformers.AutoModel.from_pretrained(tmp_path)
    assert type(auto) is transformers.CLIPVisionModel
    reference, info = cls.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        out = reference.eval()(pixel_values=torch.from_numpy(images))
    if projection:
        assert max_diff(out.image_embeds, embeds) <= TOL
    else:
        assert max_diff(out.pooler_output, pooled) <= TOL
    # And back: eqxtl reads its own file to the same model.
    again, _ = load(tmp_path)
    assert jax.tree.all(jax.tree.map(jnp.array_equal, again, model))


# --------------------------------------------------------------------------------------
# Module and architecture details
# --------------------------------------------------------------------------------------


def test_paths_are_transformers_names():
    model = eqx.filter_eval_shape(CLIPVision, CLIP_VIT_B32, key=jax.random.key(0))
    paths = eqxtl.paths(model)
    assert paths[:3] == [
        "embeddings.class_embedding",
        "embeddings.patch_embedding.weight",
        "embeddings.position_embedding.weight",
    ]
    for p in (
        "pre_layrnorm.weight",
        "encoder.layers.3.self_attn.q_proj.weight",
        "encoder.layers.3.self_attn.out_proj.bias",
        "encoder.layers.3.mlp.fc1.bias",
        "encoder.layers.3.layer_norm1.weight",
        "post_layernorm.weight",
        "visual_projection.weight",
    ):
        assert p in paths
    assert "visual_projection.bias" not in paths
    assert len(paths) == 3 + 2 + 16 * 12 + 2 + 1


def test_canonical_names():
    name = CLIP_VISION.canonical_name
    assert name("vision_model.encoder.layers.0.mlp.fc1.weight") == "encoder.layers.0.mlp.fc1.weight"
    assert name("encoder.layers.0.mlp.fc1.weight") == "encoder.layers.0.mlp.fc1.weight"
    assert name("clip.vision_model.pre_layrnorm.bias") == "pre_layrnorm.bias"
    assert name("visual_projection.weight") == "visual_projection.weight"
    assert name("classifier.weight") == "head.weight"
    for dropped in (
        "vision_model.embeddings.position_ids",
        "embeddings.position_ids",
        "text_model.embeddings.position_ids",
        "text_model.final_layer_norm.weight",
        "text_projection.weight",
        "logit_scale",
    ):
        assert name(dropped) is None, dropped
    assert name("something.else") == "something.else"
    for canonical in ("pre_layrnorm.weight", "visual_projection.weight", "head.bias"):
        assert name(CLIP_VISION.hf_name(canonical, True)) == canonical


def test_config_from_hf_clip_model():
    hf = {
        "model_type": "clip",
        "projection_dim": 768,
        "vision_config": {
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "patch_size": 14,
            "projection_dim": 512,
        },
    }
    config = CLIP_VISION.config_from_hf(hf)
    assert config == CLIP_VIT_L14
    assert CLIP_VISION.feature_dim(config) == 1024
    with pytest.raises(ValueError, match="model_type"):
        CLIP_VISION.config_from_hf({"model_type": "resnet"})


def test_input_checks_and_bf16(tiny):
    dirs, images, _, _ = tiny
    model, state = load(dirs["clip"])
    with pytest.raises(ValueError, match="image_size"):
        model(jnp.zeros((3, 64, 64)), state)
    x = jnp.asarray(images)
    f32 = features(model, state, x)
    bf16 = jax.jit(jax.vmap(lambda x: model(x, state)[0]))(x.astype(jnp.bfloat16))
    assert bf16.dtype == jnp.bfloat16
    assert max_diff(bf16.astype(jnp.float32), f32) < 0.1 * float(np.max(np.abs(f32)))
    # The class-token-only last block equals the full one.
    full = jax.jit(jax.vmap(lambda x: model.post_layernorm(model.hidden_states(x)[0])))(x)
    assert max_diff(full, f32) <= 1e-5
