"""The big backbones' presets (aliases, issue 22): each builds, as shapes only (no memory),
to the parameter count of transformers' model built from the published checkpoint's
``config.json`` on torch's ``meta`` device (no memory either), and to the published size.
"""

import math

import equinox as eqx
import jax
import pytest
import torch
import transformers

import eqxtl

L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
SO400M = dict(
    hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16
)
GIANT = dict(
    hidden_size=1536,
    num_hidden_layers=40,
    num_attention_heads=24,
    mlp_ratio=4,
    image_size=518,
    patch_size=14,
)


def _vit(pooler: bool, **fields):
    return lambda: transformers.ViTModel(transformers.ViTConfig(**fields), add_pooling_layer=pooler)


# alias -> (transformers model of the hub config.json, parameters it has that eqxtl does not
# hold, published size in millions: model cards, timm's tables, the papers)
CASES = {
    "dinov2-giant": (  # the mask token (masked-image pretraining only) is not loaded
        lambda: transformers.Dinov2Model(transformers.Dinov2Config(**GIANT, use_swiglu_ffn=True)),
        GIANT["hidden_size"],
        1136,
    ),
    "dinov2-with-registers-giant": (
        lambda: transformers.Dinov2WithRegistersModel(
            transformers.Dinov2WithRegistersConfig(**GIANT, use_swiglu_ffn=True)
        ),
        GIANT["hidden_size"],
        1136,
    ),
    "vit-large-patch16-224-in21k": (_vit(True, **L14), 0, 304),
    "vit-large-patch16-224": (_vit(False, **L14), 0, 303),
    "vit_large_patch16_224.augreg_in21k_ft_in1k": (
        _vit(False, **L14, layer_norm_eps=1e-6),
        0,
        303,
    ),
    "vit-huge-patch14-224-in21k": (
        _vit(
            True,
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=16,
            patch_size=14,
        ),
        0,
        632,
    ),
    **{
        f"siglip-so400m-patch14-{size}": (
            lambda size=size: transformers.SiglipVisionModel(
                transformers.SiglipVisionConfig(**SO400M, image_size=size, patch_size=14)
            ),
            0,
            428,
        )
        for size in (224, 384)
    },
    **{
        name: (
            lambda size=size: transformers.CLIPVisionModelWithProjection(
                transformers.CLIPVisionConfig(
                    **L14, image_size=size, patch_size=14, projection_dim=768
                )
            ),
            0,
            304,
        )
        for name, size in (("clip-vit-large-patch14", 224), ("clip-vit-large-patch14-336", 336))
    },
}


def count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree) if hasattr(x, "shape"))


@pytest.mark.parametrize("alias", sorted(CASES))
def test_preset_parameter_count(alias):
    arch, entry = eqxtl.REGISTRY[alias]
    ours = count(eqx.filter_eval_shape(arch.build, entry.config, jax.random.key(0)))
    build, extra, published = CASES[alias]
    with torch.device("meta"):
        theirs = sum(p.numel() for p in build().parameters())
    assert ours == theirs - extra, (alias, ours, theirs)
    assert ours / 1e6 == pytest.approx(published, rel=6e-3), (alias, ours)
