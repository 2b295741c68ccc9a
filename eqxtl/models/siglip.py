"""SigLIP's vision tower with transformers' names, and its checkpoint ``Architecture``.

Field names equal the transformers ``SiglipVisionModel`` names without the
``vision_model.`` prefix: ``embeddings.patch_embedding.{weight,bias}``,
``embeddings.position_embedding.weight (N, D)``, ``encoder.layers.3.self_attn.q_proj.weight``,
``post_layernorm.weight``, ``head.probe`` ... The blocks are CLIP's (same names, same
pre-LN structure); there is no class token and no pre-norm. Features are the output of the
multihead attention-pooling (MAP) ``head`` (transformers' ``pooler_output``).

One exception to transformers' names: the MAP head's attention is torch's
``nn.MultiheadAttention`` there, with q/k/v packed in ``head.attention.in_proj_weight``;
here it is split into ``head.attention.{q,k,v}_proj`` like every other attention layer
(the transformers layout packs and unpacks it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from ..errors import CheckpointError, DataError
from ._arch import (
    TRAINING_FIELDS,
    Alias,
    Architecture,
    Layout,
    Meta,
    Preprocessing,
    Shapes,
    check_activation,
    check_sizes,
    claims_timm,
    claims_transformers,
    count_blocks,
    square_side,
    timm_act,
    timm_meta,
    timm_preprocessing,
    timm_vit_write,
    transformers_head_reads,
    transformers_meta,
    transformers_write,
)
from ._layout import (
    CONV_HWIO,
    Drop,
    KeyMap,
    Map,
    flax_attention,
    flax_dense,
    flax_norm,
    packed,
    squeeze,
)
from .clip import TIMM_BLOCKS, Attention, Encoder
from .layers import (
    ACTIVATIONS,
    MLP,
    LayerNorm,
    PatchEmbedding,
    block_rates,
    image_hw,
    resample_positions,
)


@dataclasses.dataclass(frozen=True)
class SiglipVisionConfig:
    """The fields of transformers' ``SiglipVisionConfig`` that shape the vision tower.

    ``image_size``: an int, or ``(height, width)``. As transformers' "valid" patch
    convolution, pixels past the last whole patch are dropped (so400m: 384 // 14 = 27).
    ``drop_path_rate``: stochastic depth of the encoder's last block (timm's linear rule;
    a training choice, not read from or written to files), in ``[0, 1)``; active only when
    the forward pass gets a ``key`` (``fit``'s step passes one).
    """

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int | tuple[int, int] = 224
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    drop_path_rate: float = 0.0

    def __post_init__(self):
        check_sizes(self)
        check_activation(self, ACTIVATIONS)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}."
            )
        h, w = image_hw(self.image_size)
        if h < self.patch_size or w < self.patch_size:
            raise ValueError(f"image_size {self.image_size} is below patch_size {self.patch_size}.")
        # one spelling per size: an int when square, else an (h, w) tuple
        object.__setattr__(self, "image_size", h if h == w else (h, w))

    @property
    def grid(self) -> tuple[int, int]:
        """Patches along height and width."""
        h, w = image_hw(self.image_size)
        return h // self.patch_size, w // self.patch_size


SIGLIP_B16 = SiglipVisionConfig()
"""google/siglip-base-patch16-224."""
SIGLIP_L16 = SiglipVisionConfig(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16
)
"""google/siglip-large-patch16-* (at 224: pass image_size)."""
SIGLIP_SO400M = SiglipVisionConfig(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    image_size=384,
    patch_size=14,
)
"""google/siglip-so400m-patch14-384."""


class Embeddings(eqx.Module):
    """Patch tokens plus learned positions, no class token: ``(*b, C, H, W) -> (*b, n, d)``."""

    patch_embedding: PatchEmbedding
    position_embedding: eqx.nn.Embedding

    def __init__(self, config: SiglipVisionConfig, key: PRNGKeyArray):
        pkey, ekey = jax.random.split(key)
        d = config.hidden_size
        self.patch_embedding = PatchEmbedding(
            config.num_channels, d, config.patch_size, pkey, use_bias=True
        )
        self.position_embedding = eqx.nn.Embedding(math.prod(config.grid), d, key=ekey)

    def __call__(self, x: Float[Array, "*b c h w"]) -> Float[Array, "*b n d"]:
        p = self.patch_embedding.weight.shape[-1]
        x = x[..., : x.shape[-2] // p * p, : x.shape[-1] // p * p]  # whole patches only
        return self.patch_embedding(x) + self.position_embedding.weight.astype(x.dtype)


class AttentionPoolingHead(eqx.Module):
    """Multihead attention pooling (big_vision's ``MAPHead``, transformers'
    ``SiglipMultiheadAttentionPoolingHead``): a learned ``probe`` query attends to every
    token, then ``h + mlp(layernorm(h))``: ``(*b, n, d) -> (*b, d)``."""

    probe: Float[Array, "1 1 d"]
    attention: Attention
    layernorm: LayerNorm
    mlp: MLP

    def __init__(self, config: SiglipVisionConfig, key: PRNGKeyArray):
        pkey, akey, mkey = jax.random.split(key, 3)
        d = config.hidden_size
        self.probe = jax.random.normal(pkey, (1, 1, d)) * d**-0.5
        self.attention = Attention(d, config.num_attention_heads, akey)
        self.layernorm = LayerNorm(d, config.layer_norm_eps)
        self.mlp = MLP(d, config.intermediate_size, config.hidden_act, mkey)

    def __call__(self, x: Float[Array, "*b n d"]) -> Float[Array, "*b d"]:
        probe = jnp.broadcast_to(self.probe[0].astype(x.dtype), (*x.shape[:-2], 1, x.shape[-1]))
        h = self.attention(x, probe)
        h = h + self.mlp(self.layernorm(h))
        return h[..., 0, :]


class SiglipVision(eqx.Module):
    """SigLIP's vision tower: one image ``(3, H, W)`` (or a batch ``(B, 3, H, W)``,
    ``batch_native``) -> pooled features ``(hidden,)`` (transformers' ``pooler_output``)."""

    batch_native = True  # a class attribute, not a field

    embeddings: Embeddings
    encoder: Encoder
    post_layernorm: LayerNorm
    head: AttentionPoolingHead
    config: SiglipVisionConfig = eqx.field(static=True)
    preprocessing: Preprocessing | None = eqx.field(static=True, default=None)
    """The checkpoint's own preprocessing when its files state one."""

    def __init__(self, config: SiglipVisionConfig, *, key: PRNGKeyArray):
        ekey, nkey, hkey = jax.random.split(key, 3)
        self.embeddings = Embeddings(config, ekey)
        # CLIP's blocks; its Encoder reads the fields both configs share (hidden_size,
        # intermediate_size, num_hidden_layers, num_attention_heads, hidden_act, eps).
        self.encoder = Encoder(config, nkey)  # type: ignore[arg-type]
        self.post_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.head = AttentionPoolingHead(config, hkey)
        self.config = config

    def hidden_states(self, x: Float[Array, "*b c h w"]) -> Float[Array, "*b n d"]:
        """transformers' ``last_hidden_state`` (timm's ``forward_features``): every patch
        token after ``post_layernorm``, ``n = (H / patch) * (W / patch)``."""
        return self._tokens(x, None)

    def _tokens(self, x: Float[Array, "*b c h w"], key: PRNGKeyArray | None) -> Array:
        c = self.config
        want = (c.num_channels, *image_hw(c.image_size))
        if x.ndim not in (3, 4) or x.shape[-3:] != want:
            raise DataError(
                f"SiglipVision expects a channel-first image of shape {want} or a batch of "
                f"them (B, *{want}), got {x.shape}: resize to the model's image_size, or load "
                "it for another size with from_pretrained(..., image_size=N)."
            )
        layers = self.encoder.layers
        rates = block_rates(c.drop_path_rate, len(layers), key)
        keys = None if rates is None else list(jax.random.split(key, len(layers)))
        return self.post_layernorm(self.encoder.run(layers, self.embeddings(x), keys, rates))

    def __call__(
        self,
        x: Float[Array, "*b c h w"],
        state: eqx.nn.State,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, "*b d"], eqx.nn.State]:
        """``(features (*b, hidden), state)``; ``state`` passes through (no BatchNorm).
        ``key``: drop path (``config.drop_path_rate``), if any."""
        return self.head(self._tokens(x, key)), state


# --------------------------------------------------------------------------------------
# Checkpoint architecture: transformers, timm, big_vision (.npz) layouts
# --------------------------------------------------------------------------------------

PREPROCESSING = Preprocessing(
    resize=224,
    crop=224,
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    interpolation="bicubic",
    squash=True,
)
"""``SiglipImageProcessor``: bicubic resize of both sides to 224 (no crop), /255, mean =
std = 0.5."""

_LAYER = "encoder.layers.{i}"

# ---- transformers: the canonical names, under `vision_model.` (SiglipModel, what eqxtl
# writes) or bare (SiglipVisionModel). torch's MultiheadAttention in the MAP head packs q, k, v.


def _transformers_rules(prefix: str) -> tuple[Map, ...]:
    save = prefix == "vision_model."
    return (
        *[Map(prefix + top, top, save=save) for top in ("embeddings", "encoder", "post_layernorm")],
        *[
            Map(f"{prefix}head.{part}", f"head.{part}", save=save)
            for part in ("probe", "attention.out_proj", "layernorm", "mlp")
        ],
        *[
            dataclasses.replace(
                packed(f"{prefix}head.attention.in_proj_{kind}", f"head.attention.*_proj.{kind}"),
                save=save,
            )
            for kind in ("weight", "bias")
        ],
    )


_TRANSFORMERS_KEYS = KeyMap(
    (
        Drop(r"(vision_model\.)?embeddings\.position_ids"),
        Drop(r"logit_scale|logit_bias|text_model\..*"),
        *_transformers_rules("vision_model."),
        *_transformers_rules(""),
        # eqxtl's own saved heads (a transformers SiglipForImageClassification head, trained
        # on the mean of the tokens, is refused: the layout's foreign_head)
        Map("classifier.weight", "head.weight"),
        Map("classifier.bias", "head.bias"),
    )
)

# ---- timm `vit_*_siglip_*`: `(1, N, D)` positions, packed q/k/v in the blocks (CLIP's timm
# block names), the MAP head as `attn_pool` with q alone and k/v packed.
_TIMM_KEYS = KeyMap(
    (
        Map("pos_embed", "embeddings.position_embedding.weight", squeeze(1)),
        Map("patch_embed.proj", "embeddings.patch_embedding"),
        *TIMM_BLOCKS,
        Map("norm", "post_layernorm"),
        Map("attn_pool.latent", "head.probe"),
        Map("attn_pool.q", "head.attention.q_proj"),
        packed("attn_pool.kv.weight", "head.attention.*_proj.weight", "kv"),
        packed("attn_pool.kv.bias", "head.attention.*_proj.bias", "kv"),
        Map("attn_pool.proj", "head.attention.out_proj"),
        Map("attn_pool.norm", "head.layernorm"),
        Map("attn_pool.mlp", "head.mlp"),
        Map("head.weight", "head.weight"),
        Map("head.bias", "head.bias"),
    )
)

# ---- big_vision `.npz`: the image tower under `params/img/`, flax kernels; the text tower
# (`params/txt/*`) and the loss's temperature / bias (`params/t`, `params/b`) are dropped.
_IMG = "params/img/"


def _flax_names(path: str) -> dict[str, str]:
    """flax attention's ``query`` / ``key`` / ``value`` / ``out`` -> our projections."""
    names = {"query": "q_proj", "key": "k_proj", "value": "v_proj", "out": "out_proj"}
    return {flax: f"{path}.{ours}" for flax, ours in names.items()}


_BLOCK = _IMG + "Transformer/encoderblock_{i}/"
_BIG_VISION_KEYS = KeyMap(
    (
        Drop(r"params/txt/.*|params/t|params/b"),
        Map(_IMG + "embedding/kernel", "embeddings.patch_embedding.weight", CONV_HWIO),
        Map(_IMG + "embedding/bias", "embeddings.patch_embedding.bias"),
        Map(_IMG + "pos_embedding", "embeddings.position_embedding.weight", squeeze(1)),
        *flax_norm(_BLOCK + "LayerNorm_0", f"{_LAYER}.layer_norm1"),
        *flax_attention(
            _BLOCK + "MultiHeadDotProductAttention_0",
            _flax_names(f"{_LAYER}.self_attn"),
        ),
        *flax_norm(_BLOCK + "LayerNorm_1", f"{_LAYER}.layer_norm2"),
        *flax_dense(_BLOCK + "MlpBlock_0/Dense_0", f"{_LAYER}.mlp.fc1"),
        *flax_dense(_BLOCK + "MlpBlock_0/Dense_1", f"{_LAYER}.mlp.fc2"),
        *flax_norm(_IMG + "Transformer/encoder_norm", "post_layernorm"),
        Map(_IMG + "MAPHead_0/probe", "head.probe"),
        *flax_attention(
            _IMG + "MAPHead_0/MultiHeadDotProductAttention_0",
            _flax_names("head.attention"),
        ),
        *flax_norm(_IMG + "MAPHead_0/LayerNorm_0", "head.layernorm"),
        *flax_dense(_IMG + "MAPHead_0/MlpBlock_0/Dense_0", "head.mlp.fc1"),
        *flax_dense(_IMG + "MAPHead_0/MlpBlock_0/Dense_1", "head.mlp.fc2"),
    )
)


def _build(config: SiglipVisionConfig, key: PRNGKeyArray) -> SiglipVision:
    return SiglipVision(config, key=key)


_HEADS = {768: 12, 1024: 16, 1152: 16}
"""Heads of the published widths (B, L, So400m); others: ``hidden_size // 64``."""


def _infer_config(shapes: Shapes) -> SiglipVisionConfig:
    """Config from canonical shapes alone; the head count by convention (``_HEADS``), the
    activation and eps from the layout. Pass ``num_attention_heads=...`` otherwise."""
    try:
        _, channels, patch, _ = shapes["embeddings.patch_embedding.weight"]
        positions, hidden = shapes["embeddings.position_embedding.weight"]
        intermediate = shapes["encoder.layers.0.mlp.fc1.weight"][0]
    except KeyError as e:
        msg = f"Cannot infer a SigLIP vision config: no {e.args[0]!r} in the checkpoint."
        raise CheckpointError(msg) from None
    return SiglipVisionConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=count_blocks(shapes, "encoder.layers."),
        num_attention_heads=_HEADS.get(hidden, max(1, hidden // 64)),
        num_channels=channels,
        image_size=square_side(positions) * patch,
        patch_size=patch,
    )


def _transformers_config(meta: Meta, shapes: Shapes) -> SiglipVisionConfig | None:
    """From a ``siglip_vision_model`` config.json, or a ``siglip`` one (its
    ``vision_config``); missing fields take transformers' defaults, as transformers does."""
    hf = transformers_meta(meta, "siglip", "siglip_vision_model")
    if hf is None:
        return None
    vision = (hf.get("vision_config") or {}) if hf["model_type"] == "siglip" else hf
    if vision.get("vision_use_head") is False:
        raise CheckpointError(
            "This SigLIP vision config has vision_use_head=false (no attention-pooling head): "
            "eqxtl's SigLIP backbone pools with the MAP head."
        )
    d = SiglipVisionConfig()
    values = {
        f.name: vision.get(f.name, getattr(d, f.name))
        for f in dataclasses.fields(d)
        if f.name not in TRAINING_FIELDS
    }
    if isinstance(values["image_size"], list):
        values["image_size"] = tuple(values["image_size"])
    return SiglipVisionConfig(**values)


def _transformers_write(config: SiglipVisionConfig, extra: dict) -> dict[str, dict]:
    # num_labels is not written: transformers' SiglipForImageClassification pools the mean
    # of the patch tokens, not the MAP output (see the `classifier` rule).
    return transformers_write(
        "siglip_vision_model",
        "SiglipVisionModel",
        config,
        extra,
        num_labels=False,
        vision_use_head=True,
    )


def _timm_config(meta: Meta, shapes: Shapes) -> SiglipVisionConfig | None:
    """The shapes, with ``model_args``' ``num_heads``, ``img_size`` and ``act_layer`` (timm
    builds exact GELU for SigLIP unless it names ``gelu_tanh``)."""
    cfg = timm_meta(meta)
    if cfg is None:
        return None
    args = cfg.get("model_args") or {}
    pool = args.get("global_pool", cfg.get("global_pool", "map"))
    if pool != "map" or "_gap_" in cfg["architecture"]:
        raise CheckpointError(
            f"timm {cfg['architecture']} pools with {pool!r}: eqxtl's SigLIP backbone pools "
            "with the attention-pooling (map) head."
        )
    config = _infer_config(shapes)
    if "num_heads" in args:
        config = dataclasses.replace(config, num_attention_heads=int(args["num_heads"]))
    if "img_size" in args:
        config = dataclasses.replace(config, image_size=image_hw(args["img_size"]))
    return dataclasses.replace(config, hidden_act=timm_act(args))


def _timm_write(config: SiglipVisionConfig, extra: dict) -> dict[str, dict]:
    size = {768: "base", 1024: "large", 1152: "so400m"}.get(config.hidden_size, "base")
    args = {
        "embed_dim": config.hidden_size,
        "depth": config.num_hidden_layers,
        "num_heads": config.num_attention_heads,
        "mlp_ratio": config.intermediate_size / config.hidden_size,
        "patch_size": config.patch_size,
        "class_token": False,
    }
    name = f"vit_{size}_patch{config.patch_size}_siglip_{image_hw(config.image_size)[0]}"
    return timm_vit_write(name, config, extra, args, global_pool="map")


def _resize(
    config: SiglipVisionConfig, tensors: Mapping[str, np.ndarray], image_size: Any
) -> tuple[SiglipVisionConfig, dict[str, np.ndarray]]:
    """SigLIP at another input size (an int or ``(h, w)``): the position embeddings'
    patch grid resampled bicubically, as transformers' ``interpolate_pos_encoding``."""
    h, w = image_hw(image_size)
    p = config.patch_size
    if h < p or w < p:
        raise CheckpointError(f"image_size {image_size} is below the patch size {p}.")
    name = "embeddings.position_embedding.weight"
    pos = resample_positions(tensors[name], 0, config.grid, (h // p, w // p))
    return dataclasses.replace(config, image_size=(h, w)), {name: pos}


def _preprocessing(config: SiglipVisionConfig) -> Preprocessing:
    # Preprocessing describes square crops: a non-square model gets its height.
    return PREPROCESSING.at_size(image_hw(config.image_size)[0])


def _alias(size: int, config: SiglipVisionConfig = SIGLIP_B16, name: str = "base-patch16"):
    return Alias(dataclasses.replace(config, image_size=size), f"google/siglip-{name}-{size}")


SIGLIP_VISION = Architecture(
    name="siglip_vision",
    adapter_prefix="vision_model.",  # transformers 5.25 flattened the vision-only class
    config_cls=SiglipVisionConfig,
    build=_build,
    layouts=(
        Layout(
            "transformers",
            _TRANSFORMERS_KEYS,
            signature=(r"(vision_model\.)?head\.probe",),
            claims=claims_transformers("siglip", "siglip_vision_model"),
            read_config=_transformers_config,
            write_config=_transformers_write,
            defaults={"hidden_act": "gelu_pytorch_tanh"},
            foreign_head=transformers_head_reads(
                ("SiglipForImageClassification",),
                "the mean of the tokens (eqxtl's SigLIP features are the attention-pooling "
                "head's output)",
            ),
        ),
        Layout(
            "timm",
            _TIMM_KEYS,
            signature=(r"attn_pool\.latent", r"blocks\.0\.attn\.qkv\.weight"),
            claims=claims_timm(r"vit_\w+_siglip_\w+"),
            read_config=_timm_config,
            write_config=_timm_write,
            preprocessing=timm_preprocessing,
            defaults={"hidden_act": "gelu"},  # timm builds nn.GELU unless told gelu_tanh
        ),
        Layout(
            "big_vision",
            _BIG_VISION_KEYS,
            signature=(r"params/img/MAPHead_0/probe",),
            # flax's nn.gelu is the tanh approximation
            defaults={"hidden_act": "gelu_pytorch_tanh"},
            files=(),
            config_files=(),
        ),
    ),
    infer_config=_infer_config,
    feature_dim=lambda config: config.hidden_size,
    preprocessing=_preprocessing,
    blocks=r"encoder\.layers\.\d+",
    norm_types=(LayerNorm,),
    linear_types=(eqx.nn.Linear, PatchEmbedding),
    aliases={
        **{f"siglip-base-patch16-{s}": _alias(s) for s in (224, 256, 384, 512)},
        **{f"siglip-large-patch16-{s}": _alias(s, SIGLIP_L16, "large-patch16") for s in (256, 384)},
        "siglip-so400m-patch14-384": Alias(SIGLIP_SO400M, "google/siglip-so400m-patch14-384"),
        "siglip-so400m-patch14-224": _alias(224, SIGLIP_SO400M, "so400m-patch14"),
    },
    resize=_resize,
    choices=("drop_path_rate",),
    supports_remat=True,
    supports_scan=True,
)
