"""CLIP vision transformer (ViT) with transformers' names, and its checkpoint ``Architecture``.

Field names equal the transformers ``CLIPVisionModel`` names without a model prefix, so
``eqxtl.paths(backbone)`` reads ``embeddings.patch_embedding.weight``,
``encoder.layers.3.self_attn.q_proj.weight``, ``pre_layrnorm.weight`` (the typo is in the
weights), ``visual_projection.weight`` ...

One image per call, channel-first ``(3, H, W)``; batch with ``jax.vmap``. Matmuls run in the
input's dtype (weights are cast to it); LayerNorm and softmax run in float32.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from ..errors import CheckpointError
from ._arch import (
    INTERPOLATIONS,
    Alias,
    Architecture,
    Layout,
    Meta,
    Preprocessing,
    Shapes,
    claims_timm,
    timm_meta,
    timm_preprocessing,
)
from ._layout import TRANSPOSE, Drop, KeyMap, Map, packed, squeeze
from .blockwise import run_blocks
from .layers import (
    ACTIVATIONS,
    MLP,
    LayerNorm,
    PatchEmbedding,
    checkpointed,
    multihead_attention,
    resample_grid,
    split_key,
)
from .layers import dense as _dense
from .layers import linear as _linear

Activation = Literal["quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh"]
_ACTIVATIONS = ACTIVATIONS[:4]


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """The fields of transformers' ``CLIPVisionConfig`` that shape the vision tower.

    ``projection_dim=None``: no ``visual_projection`` (a plain ``CLIPVisionModel``).
    """

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: Activation = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = 512

    def __post_init__(self):
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not one of {_ACTIVATIONS}.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}."
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}."
            )

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


CLIP_VIT_B32 = CLIPVisionConfig()
"""openai/clip-vit-base-patch32."""
CLIP_VIT_B16 = CLIPVisionConfig(patch_size=16)
"""openai/clip-vit-base-patch16."""
CLIP_VIT_L14 = CLIPVisionConfig(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    patch_size=14,
    projection_dim=768,
)
"""openai/clip-vit-large-patch14."""


class Embeddings(eqx.Module):
    """Patch tokens, a class token in front, plus learned positions:
    ``(*b, C, H, W) -> (*b, 1+n, d)``."""

    class_embedding: Float[Array, " d"]
    patch_embedding: PatchEmbedding
    position_embedding: eqx.nn.Embedding

    def __init__(self, config: CLIPVisionConfig, key: PRNGKeyArray):
        ckey, pkey, ekey = jax.random.split(key, 3)
        d = config.hidden_size
        self.class_embedding = jax.random.normal(ckey, (d,)) * d**-0.5
        self.patch_embedding = PatchEmbedding(config.num_channels, d, config.patch_size, pkey)
        self.position_embedding = eqx.nn.Embedding(config.num_positions, d, key=ekey)

    def __call__(self, x: Float[Array, "*b c h w"]) -> Float[Array, "*b t d"]:
        patches = self.patch_embedding(x)
        cls = jnp.broadcast_to(
            self.class_embedding.astype(x.dtype), (*patches.shape[:-2], 1, patches.shape[-1])
        )
        tokens = jnp.concatenate([cls, patches], axis=-2)
        return tokens + self.position_embedding.weight.astype(x.dtype)


class Attention(eqx.Module):
    """Multi-head self-attention with biased q/k/v/out projections:
    ``(*b, t, d) -> (*b, tq, d)``."""

    q_proj: eqx.nn.Linear
    k_proj: eqx.nn.Linear
    v_proj: eqx.nn.Linear
    out_proj: eqx.nn.Linear
    num_heads: int = eqx.field(static=True)

    def __init__(self, dim: int, num_heads: int, key: PRNGKeyArray):
        qkey, kkey, vkey, okey = jax.random.split(key, 4)
        self.q_proj = _linear(dim, dim, qkey)
        self.k_proj = _linear(dim, dim, kkey)
        self.v_proj = _linear(dim, dim, vkey)
        self.out_proj = _linear(dim, dim, okey)
        self.num_heads = num_heads

    def __call__(
        self,
        x: Float[Array, "*b t d"],
        queries: Float[Array, "*b tq d"] | None = None,
        *,
        causal: bool = False,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "*b tq d"]:
        """Attend from ``queries`` (default: every token of ``x``) to all tokens of ``x``, or
        with ``causal`` (self-attention only) to each token's predecessors and itself.
        ``key``: dropout of LoRA adapters (``eqxtl.lora``), if any."""
        queries = x if queries is None else queries
        keys = split_key(key, 4)
        q, k, v = (
            _dense(p, y, key=kk)
            for p, y, kk in zip(
                (self.q_proj, self.k_proj, self.v_proj), (queries, x, x), keys, strict=False
            )
        )
        o = multihead_attention(q, k, v, self.num_heads, causal=causal)
        return _dense(self.out_proj, o, key=keys[3])


class EncoderLayer(eqx.Module):
    """Pre-LN block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    self_attn: Attention
    layer_norm1: LayerNorm
    mlp: MLP
    layer_norm2: LayerNorm

    def __init__(self, config: CLIPVisionConfig, key: PRNGKeyArray):
        akey, mkey = jax.random.split(key)
        d, eps = config.hidden_size, config.layer_norm_eps
        self.self_attn = Attention(d, config.num_attention_heads, akey)
        self.layer_norm1 = LayerNorm(d, eps)
        self.mlp = MLP(d, config.intermediate_size, config.hidden_act, mkey)
        self.layer_norm2 = LayerNorm(d, eps)

    def __call__(
        self,
        x: Float[Array, "*b t d"],
        *,
        first_only: bool = False,
        causal: bool = False,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "*b tq d"]:
        """All tokens ``(*b, t, d)``, or with ``first_only`` just the class token's
        ``(*b, 1, d)`` (the other tokens only feed it through keys and values). ``causal``:
        each token attends to itself and the tokens before it (CLIP's text tower). ``key``:
        dropout of LoRA adapters, if any."""
        akey, mkey = split_key(key, 2)
        h = self.layer_norm1(x)
        if first_only:
            x = x[..., :1, :] + self.self_attn(h, h[..., :1, :], key=akey)
        else:
            x = x + self.self_attn(h, causal=causal, key=akey)
        return x + self.mlp(self.layer_norm2(x), key=mkey)


class Encoder(eqx.Module):
    """``num_hidden_layers`` blocks, applied in order (a Python list: ``encoder.layers.N``).

    ``remat`` (static, off by default; set it with ``eqxtl.with_remat``): run each block
    under ``eqx.filter_checkpoint``, so that the backward pass recomputes a block's
    activations from its input instead of keeping them. ``scan`` (static, off by default;
    ``eqxtl.with_scan``): run runs of interchangeable blocks under ``jax.lax.scan`` (one
    compiled block instead of one per layer; ``eqxtl.scan``)."""

    layers: list[EncoderLayer]
    remat: bool = eqx.field(static=True, default=False)
    scan: bool = eqx.field(static=True, default=False)

    def __init__(self, config: CLIPVisionConfig, key: PRNGKeyArray):
        keys = jax.random.split(key, config.num_hidden_layers)
        self.layers = [EncoderLayer(config, k) for k in keys]

    def __call__(self, h: Float[Array, "*b t d"]) -> Float[Array, "*b t d"]:
        """Every block in order: ``(*b, t, d) -> (*b, t, d)``."""
        return self.run(self.layers, h)

    def run(
        self, layers: list[EncoderLayer], h: Float[Array, "*b t d"], keys=None
    ) -> Float[Array, "*b t d"]:
        """``h`` through ``layers`` (some of ``self.layers``; ``keys``: one per layer, for
        LoRA dropout), as the flags say."""
        return run_blocks(_run_layer, layers, h, keys, scan=self.scan, remat=self.remat)


def _run_layer(layer: EncoderLayer, h: Array, key: PRNGKeyArray | None = None) -> Array:
    return layer(h, key=key)


def _run_last_layer(layer: EncoderLayer, h: Array, key: PRNGKeyArray | None = None) -> Array:
    return layer(h, first_only=True, key=key)


class CLIPVision(eqx.Module):
    """CLIP's vision transformer: one image ``(3, H, W)`` -> pooled features ``(hidden,)``.

    ``features`` equal transformers' ``pooler_output`` (``post_layernorm`` of the class
    token); ``project(features)`` equals ``image_embeds`` of
    ``CLIPVisionModelWithProjection``.

    It also takes a batch ``(B, 3, H, W) -> (B, hidden)`` directly (``batch_native``;
    ``eqxtl.batched`` uses this instead of ``jax.vmap``): the same values, and every matrix
    product sees ``B * tokens`` rows, which makes XLA:CPU's training step ~1.3x faster.
    """

    batch_native = True  # a class attribute, not a field
    keyed_layers = r"encoder\.layers\.\d+\.(self_attn|mlp)\.\w+"
    """Linear layers that receive the call's ``key`` (for LoRA dropout), as a path regex."""

    embeddings: Embeddings
    pre_layrnorm: LayerNorm  # sic: the typo is in transformers' weight names
    encoder: Encoder
    post_layernorm: LayerNorm
    visual_projection: eqx.nn.Linear | None
    config: CLIPVisionConfig = eqx.field(static=True)
    preprocessing: Preprocessing | None = eqx.field(static=True, default=None)
    """The checkpoint's own preprocessing when its files state one (``preprocessing_for``
    falls back to the architecture's default)."""

    def __init__(self, config: CLIPVisionConfig, *, key: PRNGKeyArray):
        ekey, nkey, pkey = jax.random.split(key, 3)
        d, eps = config.hidden_size, config.layer_norm_eps
        self.embeddings = Embeddings(config, ekey)
        self.pre_layrnorm = LayerNorm(d, eps)
        self.encoder = Encoder(config, nkey)
        self.post_layernorm = LayerNorm(d, eps)
        self.visual_projection = (
            None
            if config.projection_dim is None
            else _linear(d, config.projection_dim, pkey, use_bias=False)
        )
        self.config = config

    def _embed(self, x: Float[Array, "*b c h w"]) -> Float[Array, "*b t d"]:
        c = self.config
        want = (c.num_channels, c.image_size, c.image_size)
        if x.ndim not in (3, 4) or x.shape[-3:] != want:
            raise ValueError(
                f"CLIPVision expects a channel-first image of shape {want} or a batch of them "
                f"(B, *{want}), got {x.shape}: resize/crop to the model's image_size, or load "
                "it for another size with from_pretrained(..., image_size=N)."
            )
        return self.pre_layrnorm(self.embeddings(x))

    def hidden_states(self, x: Float[Array, "*b c h w"]) -> Float[Array, "*b t d"]:
        """transformers' ``last_hidden_state``: every token after the last block (class
        token first), before ``post_layernorm``. ``t = 1 + (image_size / patch_size)**2``."""
        return self.encoder(self._embed(x))

    def __call__(
        self,
        x: Float[Array, "*b c h w"],
        state: eqx.nn.State,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, "*b d"], eqx.nn.State]:
        """``(features (*b, hidden), state)``; ``state`` passes through (no BatchNorm).
        ``key`` drives the dropout of LoRA adapters (``eqxtl.lora``), if any; CLIP itself
        has no dropout."""
        layers = self.encoder.layers
        keys = split_key(key, len(layers))
        h = self.encoder.run(layers[:-1], self._embed(x), keys[:-1])
        if layers:
            # Only the class token is pooled: the last block computes queries, MLP and
            # residual for it alone (what the full block gives that token; ~6% faster).
            h = checkpointed(_run_last_layer, self.encoder.remat)(layers[-1], h, keys[-1])
        return self.post_layernorm(h[..., 0, :]), state

    def project(self, features: Float[Array, "*b d"]) -> Float[Array, "*b p"]:
        """``visual_projection(features)``: the image embedding of CLIP's joint space."""
        if self.visual_projection is None:
            raise ValueError(
                "This CLIP backbone has no visual_projection (projection_dim=None): it was "
                "loaded from a CLIPVisionModel checkpoint. Load a CLIPModel or "
                "CLIPVisionModelWithProjection checkpoint to project."
            )
        return _dense(self.visual_projection, features)


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
        # eqxtl's own saved heads. A transformers CLIPForImageClassification head loads too,
        # but it was trained on the mean of the patch tokens, not on the pooled class token.
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

_TIMM_KEYS = KeyMap(
    (
        Map("cls_token", "embeddings.class_embedding", squeeze(2)),
        Map("pos_embed", "embeddings.position_embedding.weight", squeeze(1)),
        Map("patch_embed.proj", "embeddings.patch_embedding"),
        Map("norm_pre", "pre_layrnorm"),
        *TIMM_BLOCKS,
        Map("norm", "post_layernorm"),
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


def _timm_check(tensors) -> None:
    if "head.bias" in tensors and np.any(np.asarray(tensors["head.bias"]) != 0):
        raise CheckpointError(
            "This timm CLIP checkpoint's head has a non-zero bias: it is a classification "
            "head (e.g. an ft_in1k tag), not CLIP's projection, and eqxtl would load it as "
            "the projection. Pass ignore=['head'] to load the tower without it."
        )


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
    hf = meta.get("config.json")
    if hf is None or hf.get("model_type") not in ("clip", "clip_vision_model"):
        return None
    if hf["model_type"] == "clip":
        vision = hf.get("vision_config") or hf.get("vision_config_dict") or {}
    else:
        vision = hf
    d = CLIPVisionConfig()
    fields = {f.name for f in dataclasses.fields(CLIPVisionConfig)} - {"projection_dim"}
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
    out = {
        "model_type": "clip_vision_model",
        "architectures": [
            "CLIPVisionModel" if config.projection_dim is None else "CLIPVisionModelWithProjection"
        ],
        **{
            f.name: getattr(config, f.name)
            for f in dataclasses.fields(config)
            if f.name != "projection_dim"
        },
    }
    if config.projection_dim is not None:
        out["projection_dim"] = config.projection_dim
    return {"config.json": out}


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
    # A name timm registers (the dimensions that differ travel in model_args).
    act = "_quickgelu" if config.hidden_act == "quick_gelu" else ""
    if config.hidden_size == 1024 and config.patch_size == 14:
        name = f"vit_large_patch14_clip{act}_224"
    elif config.hidden_size == 1280 and config.patch_size == 14:
        name = f"vit_huge_patch14_clip{act}_224"
    else:
        name = f"vit_base_patch{16 if config.patch_size == 16 else 32}_clip{act}_224"
    pre: Preprocessing = extra["preprocessing"]
    num_classes = config.projection_dim or 0
    model_args = {
        "embed_dim": config.hidden_size,
        "depth": config.num_hidden_layers,
        "num_heads": config.num_attention_heads,
        "mlp_ratio": config.intermediate_size / config.hidden_size,
        "img_size": [config.image_size, config.image_size],
        "patch_size": config.patch_size,
        "num_classes": num_classes,
        "global_pool": "token",
    }
    return {
        "config.json": {
            "architecture": name,
            "num_classes": num_classes,
            "num_features": config.hidden_size,
            "global_pool": "token",
            "model_args": model_args,
            "pretrained_cfg": {**pre.to_timm(), "num_classes": num_classes},
        }
    }


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
    config_cls=CLIPVisionConfig,
    build=_build,
    layouts=(
        Layout(
            "transformers",
            _TRANSFORMERS_KEYS,
            signature=(r"(clip\.)?(vision_model\.)?embeddings\.class_embedding",),
            claims=lambda meta: (
                (meta.get("config.json") or {}).get("model_type") in ("clip", "clip_vision_model")
            ),
            read_config=_transformers_config,
            write_config=_transformers_write,
            defaults={"hidden_act": "quick_gelu"},
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
            weights_file="open_clip_model.safetensors",
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
            check=_timm_check,
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
    },
    reconcile=_reconcile,
    resize=_resize,
)
