"""CLIP's vision tower: its checkpoint ``Architecture`` (transformers, open_clip and timm
layouts); the modules are in ``_clip_model.py`` and re-exported here.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import equinox as eqx
import numpy as np
from jaxtyping import PRNGKeyArray

from ..errors import CheckpointError
from ._arch import (
    INTERPOLATIONS,
    TRAINING_FIELDS,
    Alias,
    Architecture,
    Layout,
    Meta,
    Preprocessing,
    Shapes,
    claims_timm,
    claims_transformers,
    timm_meta,
    timm_preprocessing,
    timm_write,
    transformers_head_reads,
    transformers_meta,
    transformers_write,
)
from ._clip_model import (
    CLIP_VIT_B16,
    CLIP_VIT_B32,
    CLIP_VIT_L14,
    CLIP_VIT_L14_336,
    Activation,
    Attention,
    CLIPVision,
    CLIPVisionConfig,
    Embeddings,
    Encoder,
    EncoderLayer,
)
from ._layout import TRANSPOSE, Drop, KeyMap, Map, packed, squeeze
from .layers import (
    LayerNorm,
    PatchEmbedding,
    resample_grid,
)

__all__ = [
    "CLIP_VISION",
    "CLIP_VIT_B16",
    "CLIP_VIT_B32",
    "CLIP_VIT_L14",
    "CLIP_VIT_L14_336",
    "PREPROCESSING",
    "TIMM_BLOCKS",
    "Activation",
    "Attention",
    "CLIPVision",
    "CLIPVisionConfig",
    "Embeddings",
    "Encoder",
    "EncoderLayer",
]

# --------------------------------------------------------------------------------------
# Checkpoint architecture: transformers, open_clip and timm layouts
# --------------------------------------------------------------------------------------

PREPROCESSING = Preprocessing(
    resize=224,
    crop=224,
    mean=(0.48145466, 0.4578275, 0.40821073),
    std=(0.26862954, 0.26130258, 0.27577711),
    interpolation="bicubic",
)
"""OpenAI CLIP (``openai/clip-vit-*``): bicubic shortest side 224, center crop 224."""

_ACT_HINT = {"hidden_act": "hidden_act='quick_gelu' for OpenAI-trained CLIP weights"}
OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
"""The weight files of an open_clip hub repo (the first is what eqxtl writes)."""

_LAYER = "encoder.layers.{i}"

# ---- transformers: the canonical names, under `vision_model.` (CLIPModel, transformers 4,
# and what eqxtl writes), bare (transformers-5 CLIPVisionModel) or `clip.vision_model.`
# (CLIPSeg).
_TOP = ("embeddings", "pre_layrnorm", "encoder", "post_layernorm")
_TRANSFORMERS_KEYS = KeyMap(
    (
        Drop(r"(clip\.)?(vision_model\.)?embeddings\.position_ids"),
        Drop(r"(clip\.)?(logit_scale|text_model\..*|text_projection\..*)"),
        *[
            Map(prefix + top, top, save=prefix == "vision_model.")
            for prefix in ("vision_model.", "", "clip.vision_model.")
            for top in _TOP
        ],
        Map("visual_projection", "visual_projection"),
        Map("clip.visual_projection", "visual_projection", save=False),
        # eqxtl's own saved heads (a transformers CLIPForImageClassification head, trained
        # on the mean of the patch tokens, is refused: the layout's foreign_head)
        Map("classifier", "head"),
    )
)

# ---- open_clip: `visual.*` (the text tower sits at the top level and is not loaded here).
# q/k/v are packed in `in_proj_weight (3D, D)`; `visual.proj` is `(D, E)`, the transpose
# of transformers' `visual_projection.weight (E, D)`.
_RESBLOCK = "visual.transformer.resblocks.{i}"
_OPEN_CLIP_KEYS = KeyMap(
    (
        Map("visual.class_embedding", "embeddings.class_embedding"),
        Map("visual.positional_embedding", "embeddings.position_embedding.weight"),
        Map("visual.conv1", "embeddings.patch_embedding"),
        Map("visual.ln_pre", "pre_layrnorm"),
        packed(
            "visual.transformer.resblocks.{i}.attn.in_proj_weight",
            f"{_LAYER}.self_attn.*_proj.weight",
        ),
        packed(
            "visual.transformer.resblocks.{i}.attn.in_proj_bias", f"{_LAYER}.self_attn.*_proj.bias"
        ),
        Map(_RESBLOCK + ".attn.out_proj", f"{_LAYER}.self_attn.out_proj"),
        Map(_RESBLOCK + ".ln_1", f"{_LAYER}.layer_norm1"),
        Map(_RESBLOCK + ".ln_2", f"{_LAYER}.layer_norm2"),
        Map(_RESBLOCK + ".mlp.c_fc", f"{_LAYER}.mlp.fc1"),
        Map(_RESBLOCK + ".mlp.c_proj", f"{_LAYER}.mlp.fc2"),
        Map("visual.ln_post", "post_layernorm"),
        Map("visual.proj", "visual_projection.weight", TRANSPOSE),
        Map("classifier", "head"),
        # The text tower (issue: CLIP text), at the top level.
        Drop(
            r"(token_embedding\..*|positional_embedding|transformer\..*|ln_final\..*"
            r"|text_projection|logit_scale|attn_mask)"
        ),
    )
)

# ---- timm `vit_*_clip_*`: `(1, 1, D)` class token, `(1, N, D)` positions, packed qkv, and
# the projection as `head` with a zero bias.
TIMM_BLOCKS = (
    packed("blocks.{i}.attn.qkv.weight", f"{_LAYER}.self_attn.*_proj.weight"),
    packed("blocks.{i}.attn.qkv.bias", f"{_LAYER}.self_attn.*_proj.bias"),
    Map("blocks.{i}.attn.proj", f"{_LAYER}.self_attn.out_proj"),
    Map("blocks.{i}.norm1", f"{_LAYER}.layer_norm1"),
    Map("blocks.{i}.norm2", f"{_LAYER}.layer_norm2"),
    Map("blocks.{i}.mlp.fc1", f"{_LAYER}.mlp.fc1"),
    Map("blocks.{i}.mlp.fc2", f"{_LAYER}.mlp.fc2"),
)
"""timm's ``blocks.N`` <-> these ``encoder.layers.N`` (also SigLIP's timm layout)."""

_TIMM_TOWER = (
    Map("cls_token", "embeddings.class_embedding", squeeze(2)),
    Map("pos_embed", "embeddings.position_embedding.weight", squeeze(1)),
    Map("patch_embed.proj", "embeddings.patch_embedding"),
    Map("norm_pre", "pre_layrnorm"),
    *TIMM_BLOCKS,
    Map("norm", "post_layernorm"),
)
_TIMM_KEYS = KeyMap(
    (
        *_TIMM_TOWER,
        Map("head.weight", "visual_projection.weight"),
        Drop(r"head\.bias"),
        Map("classifier", "head"),
    ),
    constants=lambda saved: (
        {"head.bias": np.zeros(saved["head.weight"].shape[0], saved["head.weight"].dtype)}
        if "head.weight" in saved
        else {}
    ),
)
# timm's ImageNet fine-tunes of the CLIP towers (`openai_ft_in1k`, `laion2b_ft_in12k_in1k`,
# ...) have no projection: their `head` (with a bias) classifies the pooled class token.
_TIMM_CLASSIFIER_KEYS = KeyMap((*_TIMM_TOWER, Map("head", "head")))
_FINE_TUNED_TAG = re.compile(r"(^|_)ft_in")


def _timm_has_classifier(meta: Meta, tensors: Mapping[str, Any]) -> bool:
    """A classification head: the config's tag says ImageNet fine-tune, or ``head.bias``
    (zero in a projection) is not zero."""
    cfg = timm_meta(meta) or {}
    tag = str((cfg.get("pretrained_cfg") or {}).get("tag") or "")
    if _FINE_TUNED_TAG.search(tag):
        return True
    return "head.bias" in tensors and bool(np.any(np.asarray(tensors["head.bias"]) != 0))


def _build(config: CLIPVisionConfig, key: PRNGKeyArray) -> CLIPVision:
    return CLIPVision(config, key=key)


def _count_layers(shapes: Shapes) -> int:
    indices = {int(k.split(".")[2]) for k in shapes if k.startswith("encoder.layers.")}
    return max(indices) + 1 if indices else 0


def _infer_config(shapes: Shapes) -> CLIPVisionConfig:
    """Config from canonical shapes alone.

    Not in the weights, so by convention: ``num_attention_heads = hidden_size // 64`` (every
    openai CLIP ViT: B/32, B/16 -> 12, L/14 -> 16; and open_clip's default head width);
    ``hidden_act`` and ``layer_norm_eps`` from the layout. Pass ``config=`` or the field
    (``num_attention_heads=...``) otherwise.
    """
    try:
        hidden = shapes["embeddings.class_embedding"][0]
        _, channels, patch, _ = shapes["embeddings.patch_embedding.weight"]
        positions = shapes["embeddings.position_embedding.weight"][0]
        intermediate = shapes["encoder.layers.0.mlp.fc1.weight"][0]
    except KeyError as e:
        msg = f"Cannot infer a CLIP vision config: no {e.args[0]!r} in the checkpoint."
        raise CheckpointError(msg) from None
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1:
        raise CheckpointError(f"{positions - 1} patch positions do not form a square grid.")
    projection = shapes.get("visual_projection.weight")
    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=_count_layers(shapes),
        num_attention_heads=max(1, hidden // 64),
        num_channels=channels,
        image_size=grid * patch,
        patch_size=patch,
        projection_dim=None if projection is None else projection[0],
    )


def _square(value: Any, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise CheckpointError(f"CLIP needs a square {name}, got {value}.")
        value = value[0]
    return int(value)


def _transformers_config(meta: Meta, shapes: Shapes) -> CLIPVisionConfig | None:
    """From a ``clip_vision_model`` config.json, or a ``clip`` one (its ``vision_config``).

    Missing fields take transformers' ``CLIPVisionConfig`` defaults (= ViT-B/32), as
    transformers does. transformers always writes ``projection_dim`` (default 512), even for
    a CLIPVisionModel without projection: ``reconcile`` settles it from the weights.
    """
    hf = transformers_meta(meta, "clip", "clip_vision_model")
    if hf is None:
        return None
    if hf["model_type"] == "clip":
        vision = hf.get("vision_config") or hf.get("vision_config_dict") or {}
    else:
        vision = hf
    d = CLIPVisionConfig()
    fields = {f.name for f in dataclasses.fields(CLIPVisionConfig)} - {
        "projection_dim",
        *TRAINING_FIELDS,
    }
    values = {k: vision.get(k, getattr(d, k)) for k in fields}
    values["image_size"] = _square(values["image_size"], "image_size")
    values["patch_size"] = _square(values["patch_size"], "patch_size")
    return CLIPVisionConfig(**values, projection_dim=hf.get("projection_dim", 512))


def _reconcile(config: CLIPVisionConfig, shapes: Shapes) -> CLIPVisionConfig:
    """``projection_dim`` from the weights: ``None`` without ``visual_projection.weight``."""
    projection = shapes.get("visual_projection.weight")
    return dataclasses.replace(config, projection_dim=None if projection is None else projection[0])


def _transformers_write(config: CLIPVisionConfig, extra: dict) -> dict[str, dict]:
    # num_labels is not written: transformers' CLIPForImageClassification pools differently
    # (mean of the patch tokens, no post_layernorm) and takes a full CLIPConfig, so it is no
    # vision-only equivalent of Classifier(CLIPVision). A head is saved as `classifier.*`,
    # which transformers reports as unexpected and skips.
    projection = config.projection_dim
    return transformers_write(
        "clip_vision_model",
        "CLIPVisionModel" if projection is None else "CLIPVisionModelWithProjection",
        config,
        extra,
        skip=("projection_dim",),
        num_labels=False,
        **({} if projection is None else {"projection_dim": projection}),
    )


def _open_clip_config(meta: Meta, shapes: Shapes) -> CLIPVisionConfig | None:
    """From ``open_clip_config.json`` (``model_cfg.vision_cfg``, ``model_cfg.quick_gelu``)."""
    oc = meta.get("open_clip_config.json")
    if oc is None:
        return None
    model_cfg = oc.get("model_cfg", oc)
    vision = model_cfg.get("vision_cfg") or {}
    unsupported = {
        k: vision[k]
        for k in ("timm_model_name", "ls_init_value", "attentional_pool", "no_ln_pre")
        if vision.get(k)
    }
    if vision.get("pool_type", "tok") != "tok" or vision.get("final_ln_after_pool"):
        unsupported["pool_type"] = vision.get("pool_type")
    if unsupported:
        raise CheckpointError(
            f"open_clip_config.json describes a vision tower eqxtl does not build "
            f"({unsupported}); eqxtl reads plain open_clip ViTs (class-token pooling, "
            "ln_pre, no layer scale)."
        )
    inferred = _infer_config(shapes)
    width = int(vision.get("width", inferred.hidden_size))
    return dataclasses.replace(
        inferred,
        num_attention_heads=max(1, width // int(vision.get("head_width", 64))),
        image_size=_square(vision.get("image_size", inferred.image_size), "image_size"),
        hidden_act="quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu",
    )


def _open_clip_preprocessing(meta: Meta) -> Preprocessing | None:
    oc = meta.get("open_clip_config.json")
    if oc is None:
        return None
    size = _square(oc.get("model_cfg", oc).get("vision_cfg", {}).get("image_size", 224), "size")
    pre = oc.get("preprocess_cfg") or {}
    interpolation = pre.get("interpolation", "bicubic")
    return Preprocessing(
        resize=size,
        crop=size,
        mean=tuple(pre.get("mean", PREPROCESSING.mean)),
        std=tuple(pre.get("std", PREPROCESSING.std)),
        interpolation=interpolation if interpolation in INTERPOLATIONS else "bicubic",
    )


def _open_clip_write(config: CLIPVisionConfig, extra: dict) -> dict[str, dict]:
    pre: Preprocessing = extra["preprocessing"]
    if config.hidden_act not in ("quick_gelu", "gelu"):
        raise CheckpointError(f"open_clip has no {config.hidden_act!r} activation.")
    vision_cfg = {
        "image_size": config.image_size,
        "layers": config.num_hidden_layers,
        "width": config.hidden_size,
        "head_width": config.hidden_size // config.num_attention_heads,
        "mlp_ratio": config.intermediate_size / config.hidden_size,
        "patch_size": config.patch_size,
    }
    model_cfg = {
        "embed_dim": config.projection_dim,
        "quick_gelu": config.hidden_act == "quick_gelu",
        "vision_cfg": vision_cfg,
    }
    preprocess_cfg = {
        "mean": list(pre.mean),
        "std": list(pre.std),
        "interpolation": pre.interpolation,
        "resize_mode": "shortest",
    }
    return {"open_clip_config.json": {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}}


def _timm_config(meta: Meta, shapes: Shapes) -> CLIPVisionConfig | None:
    """timm names the activation in the architecture: ``*_quickgelu_*`` builds QuickGELU,
    every other ``vit_*_clip_*`` (``.openai`` tags included) nn.GELU."""
    cfg = timm_meta(meta)
    if cfg is None:
        return None
    quick = "quickgelu" in cfg["architecture"]
    config = _infer_config(shapes)
    heads = (cfg.get("model_args") or {}).get("num_heads", config.num_attention_heads)
    return dataclasses.replace(
        config, num_attention_heads=int(heads), hidden_act="quick_gelu" if quick else "gelu"
    )


def _timm_write(config: CLIPVisionConfig, extra: dict) -> dict[str, dict]:
    # A name timm registers (the dimensions that differ travel in model_args); the name
    # alone says the activation, and there are two.
    if config.hidden_act not in ("gelu", "quick_gelu"):
        raise CheckpointError(
            f"timm's CLIP towers have no {config.hidden_act!r} activation (they build gelu "
            "or quick_gelu): save this model with layout='transformers'."
        )
    act = "_quickgelu" if config.hidden_act == "quick_gelu" else ""
    if config.hidden_size == 1024 and config.patch_size == 14:
        name = f"vit_large_patch14_clip{act}_224"
    elif config.hidden_size == 1280 and config.patch_size == 14:
        name = f"vit_huge_patch14_clip{act}_224"
    else:
        name = f"vit_base_patch{16 if config.patch_size == 16 else 32}_clip{act}_224"
    model_args = {
        "embed_dim": config.hidden_size,
        "depth": config.num_hidden_layers,
        "num_heads": config.num_attention_heads,
        "mlp_ratio": config.intermediate_size / config.hidden_size,
        "img_size": [config.image_size, config.image_size],
        "patch_size": config.patch_size,
    }
    return timm_write(
        name,
        extra,
        model_args,
        num_features=config.hidden_size,
        global_pool="token",
        # timm's head: CLIP's projection, or in its ImageNet fine-tunes the classifier.
        num_classes=config.projection_dim or extra["num_labels"] or 0,
    )


def _resize(
    config: CLIPVisionConfig, tensors: Mapping[str, np.ndarray], image_size: Any
) -> tuple[CLIPVisionConfig, dict[str, np.ndarray]]:
    """CLIP at another input size: the patch grid of the position embeddings resampled
    bicubically (as transformers' ``interpolate_pos_encoding``), the class token's kept."""
    size = _square(image_size, "image_size")
    if size % config.patch_size:
        raise CheckpointError(
            f"image_size {size} is not a multiple of the patch size {config.patch_size}."
        )
    pos = np.asarray(tensors["embeddings.position_embedding.weight"])
    old, new = config.image_size // config.patch_size, size // config.patch_size
    grid = resample_grid(pos[1:].reshape(old, old, -1), (new, new))
    resampled = np.concatenate([pos[:1], grid.reshape(new * new, -1)])
    return (
        dataclasses.replace(config, image_size=size),
        {"embeddings.position_embedding.weight": resampled},
    )


def _feature_dim(config: CLIPVisionConfig) -> int:
    return config.hidden_size


CLIP_VISION = Architecture(
    name="clip_vision",
    adapter_prefix="vision_model.",  # transformers 5.25 flattened the vision-only class
    config_cls=CLIPVisionConfig,
    build=_build,
    layouts=(
        Layout(
            "transformers",
            _TRANSFORMERS_KEYS,
            signature=(r"(clip\.)?(vision_model\.)?embeddings\.class_embedding",),
            claims=claims_transformers("clip", "clip_vision_model"),
            read_config=_transformers_config,
            write_config=_transformers_write,
            defaults={"hidden_act": "quick_gelu"},
            default_hints=_ACT_HINT,
            foreign_head=transformers_head_reads(
                ("CLIPForImageClassification",),
                "the mean of the patch tokens before post_layernorm (eqxtl's CLIP features "
                "are the class token after it)",
            ),
        ),
        Layout(
            "open_clip",
            _OPEN_CLIP_KEYS,
            signature=(r"visual\.class_embedding", r"visual\.transformer\.resblocks\.0\..*"),
            claims=lambda meta: "open_clip_config.json" in meta,
            read_config=_open_clip_config,
            write_config=_open_clip_write,
            preprocessing=_open_clip_preprocessing,
            defaults={"hidden_act": "gelu"},
            default_hints=_ACT_HINT,
            weights_file=OPEN_CLIP_FILES[0],
            files=OPEN_CLIP_FILES,
            config_files=("open_clip_config.json",),
        ),
        Layout(
            "timm",
            _TIMM_KEYS,
            signature=(r"cls_token", r"norm_pre\.weight", r"blocks\.0\.attn\.qkv\.weight"),
            claims=claims_timm(r"vit_\w+_clip_\w+"),
            read_config=_timm_config,
            write_config=_timm_write,
            preprocessing=timm_preprocessing,
            defaults={"hidden_act": "gelu"},
            default_hints=_ACT_HINT,
            classifier_keys=_TIMM_CLASSIFIER_KEYS,
            has_classifier=_timm_has_classifier,
        ),
    ),
    infer_config=_infer_config,
    feature_dim=_feature_dim,
    preprocessing=lambda config: PREPROCESSING.at_size(config.image_size),
    blocks=r"encoder\.layers\.\d+",
    norm_types=(LayerNorm,),
    linear_types=(eqx.nn.Linear, PatchEmbedding),
    aliases={
        # openai/clip-vit-base-patch32 keeps model.safetensors on a PR branch, not on main.
        "clip-vit-base-patch32": Alias(CLIP_VIT_B32, "openai/clip-vit-base-patch32", "refs/pr/32"),
        "clip-vit-base-patch16": Alias(CLIP_VIT_B16, "openai/clip-vit-base-patch16"),
        "clip-vit-large-patch14": Alias(CLIP_VIT_L14, "openai/clip-vit-large-patch14"),
        "clip-vit-large-patch14-336": Alias(CLIP_VIT_L14_336, "openai/clip-vit-large-patch14-336"),
    },
    reconcile=_reconcile,
    resize=_resize,
    supports_remat=True,
    supports_scan=True,
    keyed_layers=r"encoder\.layers\.\d+\.(self_attn|mlp)\.\w+",
    choices=("drop_path_rate",),
)
