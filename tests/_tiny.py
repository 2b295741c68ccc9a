"""Small real-architecture models for fast tests (same code paths as the full configs)."""

import dataclasses

import equinox as eqx
import jax

from eqxtl.models import clip, resnet

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


def tiny(arch_name: str, seed: int = 0):
    """(backbone, state) of a tiny random CLIP or ResNet in inference mode."""
    arch, config = {
        "clip": (clip.CLIP_VISION, TINY_CLIP),
        "resnet": (resnet.RESNET, TINY_RESNET),
    }[arch_name]
    model, state = eqx.nn.make_with_state(arch.build)(config, jax.random.key(seed))
    return eqx.nn.inference_mode(model, True), state
