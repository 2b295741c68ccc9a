"""Small real-architecture models for fast tests (same code paths as the full configs).

``TINY_CONFIGS`` has one tiny config per registered architecture, keyed by
``Architecture.name``: tests/test_architectures.py runs every generic check on each, and
fails for an architecture that has none here."""

import dataclasses

import numpy as np

from eqxtl.io import checkpoint
from eqxtl.models import clip, clip_text, dinov2, efficientnet, mixer, resnet, siglip, vit
from eqxtl.models.registry import ARCHITECTURES

TINY_CLIP = dataclasses.replace(
    clip.CLIP_VIT_B32,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    projection_dim=None,
)
TINY_RESNET = dataclasses.replace(
    resnet.RESNET18, embedding_size=8, hidden_sizes=(8, 16, 32, 64), depths=(1, 1, 1, 1)
)
TINY_SIGLIP = siglip.SiglipVisionConfig(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
)
TINY_MIXER = mixer.MixerConfig(
    hidden_size=32,
    num_blocks=2,
    tokens_mlp_dim=24,
    channels_mlp_dim=128,
    image_size=32,
    patch_size=8,
)
TINY_VIT = vit.ViTConfig(  # with the pooler (transformers' ViTModel default)
    hidden_size=32,
    num_hidden_layers=3,  # the last block computes the class token alone: 2 to scan
    num_attention_heads=2,
    intermediate_size=64,
    image_size=16,
    patch_size=8,
)
TINY_DINOV2 = dinov2.Dinov2Config(  # registers and cls+mean: every token reaches the features
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    mlp_ratio=2.0,
    image_size=28,
    patch_size=14,
    num_register_tokens=2,
    pooling="cls+mean",
    interpolate_antialias=True,  # what transformers' and timm's register models do
)
TINY_EFFICIENTNET = efficientnet.EfficientNetLiteConfig(  # 7 blocks, one per stage
    width_coefficient=0.25,
    depth_coefficient=0.1,
    image_size=32,
    dropout_rate=0.0,
    drop_path_rate=0.0,
    head_size=32,
)
TINY_CLIP_VISION = dataclasses.replace(  # 3 blocks, as TINY_VIT
    TINY_CLIP, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2
)
TINY_CLIP_TWO_TOWERS = clip_text.CLIPConfig(
    vision_config=dataclasses.replace(TINY_CLIP_VISION, projection_dim=16),
    text_config=clip_text.CLIPTextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=8,
        projection_dim=16,
        pad_token_id=1,
        bos_token_id=62,
        eos_token_id=63,
    ),
)
TINY_CONFIGS = {
    clip.CLIP_VISION.name: TINY_CLIP_VISION,
    clip_text.CLIP_MODEL.name: TINY_CLIP_TWO_TOWERS,
    resnet.RESNET.name: TINY_RESNET,
    siglip.SIGLIP_VISION.name: TINY_SIGLIP,
    mixer.MIXER.name: TINY_MIXER,
    vit.VIT.name: TINY_VIT,
    dinov2.DINOV2.name: TINY_DINOV2,
    efficientnet.EFFICIENTNET_LITE.name: TINY_EFFICIENTNET,
}
"""``Architecture.name`` -> a tiny config of it."""

TINY_VARIANTS = {
    "dinov2+swiglu": (  # DINOv2-giant's MLP: 48 wide (two thirds of 64, rounded up to 8s)
        dinov2.DINOV2.name,
        dataclasses.replace(TINY_DINOV2, use_swiglu_ffn=True),
    ),
}
"""A name -> (``Architecture.name``, a second tiny config of it), for a structure its
``TINY_CONFIGS`` one does not have: tests/test_architectures.py checks its build, layouts
and LoRA."""

TINY = {
    "clip": (clip.CLIP_VISION, TINY_CLIP),
    "resnet": (resnet.RESNET, TINY_RESNET),
    "siglip": (siglip.SIGLIP_VISION, TINY_SIGLIP),
    "mixer": (mixer.MIXER, TINY_MIXER),
    "vit": (vit.VIT, TINY_VIT),
    "dinov2": (dinov2.DINOV2, TINY_DINOV2),
    "efficientnet_lite": (efficientnet.EFFICIENTNET_LITE, TINY_EFFICIENTNET),
}
"""Short names (what older tests call ``tiny(...)`` with) -> (architecture, tiny config)."""


def random_tensors(arch, config, seed: int = 0) -> dict[str, np.ndarray]:
    """Random checkpoint tensors (canonical names) for ``config``: weights ~ N(0, 1/fan_in),
    norm scales near 1, running variances in [0.5, 1.5]. Built in numpy: eager JAX random
    init compiles once per weight shape, which costs tens of seconds."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, leaf in checkpoint.array_shapes(checkpoint.skeleton(arch, config)).items():
        shape = tuple(leaf.shape)
        if name.endswith("running_var"):
            out[name] = rng.uniform(0.5, 1.5, shape)
        elif name.endswith("running_mean") or name.endswith("bias"):
            out[name] = 0.1 * rng.normal(size=shape)
        elif len(shape) == 1:  # norm scales
            out[name] = 1.0 + 0.1 * rng.normal(size=shape)
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            out[name] = rng.normal(size=shape) / np.sqrt(fan_in)
    return {k: v.astype(np.float32) for k, v in out.items()}


def tiny(name: str, seed: int = 0):
    """(backbone, state) of a tiny random backbone in inference mode; ``name``: a ``TINY``
    short name (``"clip"``: the vision tower) or else an ``Architecture.name``."""
    if name in TINY:
        arch, config = TINY[name]
    else:
        arch, config = ARCHITECTURES[name], TINY_CONFIGS[name]
    return checkpoint.fill(checkpoint.skeleton(arch, config), random_tensors(arch, config, seed))


def tiny_config(name: str):
    """(architecture, config) of an ``Architecture.name`` (its ``TINY_CONFIGS`` config) or
    of a ``TINY_VARIANTS`` name."""
    if name in TINY_VARIANTS:
        arch, config = TINY_VARIANTS[name]
        return ARCHITECTURES[arch], config
    return ARCHITECTURES[name], TINY_CONFIGS[name]


def tiny_architecture(name: str, seed: int = 0):
    """(model, state) of an architecture at its ``TINY_CONFIGS`` config, or of a
    ``TINY_VARIANTS`` name."""
    arch, config = tiny_config(name)
    return checkpoint.fill(checkpoint.skeleton(arch, config), random_tensors(arch, config, seed))
