"""Small real-architecture models for fast tests (same code paths as the full configs)."""

import dataclasses

import numpy as np

from eqxtl.io import checkpoint
from eqxtl.models import clip, mixer, resnet, siglip

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
TINY = {
    "clip": (clip.CLIP_VISION, TINY_CLIP),
    "resnet": (resnet.RESNET, TINY_RESNET),
    "siglip": (siglip.SIGLIP_VISION, TINY_SIGLIP),
    "mixer": (mixer.MIXER, TINY_MIXER),
}


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


def tiny(arch_name: str, seed: int = 0):
    """(backbone, state) of a tiny random backbone (a ``TINY`` key) in inference mode."""
    arch, config = TINY[arch_name]
    return checkpoint.fill(checkpoint.skeleton(arch, config), random_tensors(arch, config, seed))
