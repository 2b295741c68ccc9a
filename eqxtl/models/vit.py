"""Vision Transformer (ViT) with transformers' names, and its checkpoint ``Architecture``.

Field names equal the transformers ``ViTModel`` names without a model prefix, so
``eqxtl.paths(backbone)`` reads ``embeddings.cls_token``,
``embeddings.patch_embeddings.projection.weight``,
``encoder.layer.3.attention.attention.query.weight``, ``layernorm.weight``,
``pooler.dense.weight`` ... Checkpoints load from transformers (``ViTModel``,
``ViTForImageClassification``), timm (``vit_*_patch*_*.augreg*``) and Google's vit_jax
``.npz`` files (``ViT-B_16.npz``).

The embeddings, attention and encoder are shared with DINOv2 (``_vit_common.py``), whose
transformers names are the same for them.

One image ``(3, H, W)`` or a batch ``(B, 3, H, W)`` per call (``batch_native``). Matmuls run in
the input's dtype (weights are cast to it); LayerNorm and softmax run in float32.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ..errors import CheckpointError
from ._arch import (
    Alias,
    Architecture,
    Layout,
    Meta,
    Preprocessing,
    Shapes,
    claims_timm,
    claims_transformers,
    count_blocks,
    square_side,
    timm_act,
    timm_meta,
    timm_preprocessing,
    timm_vit_write,
    transformers_meta,
    transformers_write,
)
from ._layout import CONV_HWIO, TRANSPOSE, Drop, KeyMap, Map, merged_heads
from ._vit_common import (
    ViTAttention,
    ViTEmbeddings,
    ViTEncoder,
    check_common,
    hf_fields,
    resize_positions,
    runtime_attention_rules,
    square_preprocessing,
    timm_block_rules,
    timm_model_args,
    timm_size_name,
)
from .layers import (
    ACTIVATIONS,
    LayerNorm,
    PatchEmbedding,
    activation,
    block_rates,
    dense,
    drop_keys,
    drop_path,
    image_hw,
    linear,
)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """The fields of transformers' ``ViTConfig`` that shape the model, plus:

    - `add_pooling_layer`: whether the checkpoint has transformers' ``ViTPooler`` (the
      pre-logits ``dense`` + ``tanh`` of the in21k checkpoints); its output is then the
      features. ``ViTForImageClassification`` and timm checkpoints have none.
    - `interpolate_antialias`: how ``resize`` resamples the position embeddings:
      ``False`` as transformers' ``interpolate_pos_encoding``, ``True`` as timm's
      ``resample_abs_pos_embed``.
    - `drop_path_rate`: stochastic depth of the last block (timm's ``drop_path_rate``),
      in ``[0, 1)``; block ``i`` of ``n`` drops its branches with ``rate * i / (n - 1)``.
      Active only when the forward pass gets a ``key`` (``fit``'s step passes one), so
      evaluation is unchanged. A training choice: not read from or written to files.

    ``image_size`` is an int or ``(height, width)``; ``patch_size`` an int.
    """

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    image_size: int | tuple[int, int] = 224
    patch_size: int = 16
    num_channels: int = 3
    qkv_bias: bool = True
    add_pooling_layer: bool = True
    pooler_output_size: int | None = None
    pooler_act: str = "tanh"
    interpolate_antialias: bool = False
    drop_path_rate: float = 0.0

    def __post_init__(self):
        check_common(self)
        if self.pooler_act not in ("tanh", *ACTIVATIONS):
            raise ValueError(f"pooler_act {self.pooler_act!r} is not 'tanh' or in {ACTIVATIONS}.")

    @property
    def grid(self) -> tuple[int, int]:
        """``(rows, columns)`` of patches."""
        h, w = image_hw(self.image_size)
        return h // self.patch_size, w // self.patch_size

    @property
    def num_positions(self) -> int:
        gh, gw = self.grid
        return gh * gw + 1


VIT_B16 = ViTConfig()
"""google/vit-base-patch16-224-in21k (with the pre-logits pooler)."""
VIT_B16_FT = ViTConfig(add_pooling_layer=False)
"""google/vit-base-patch16-224 (ViTForImageClassification: no pooler)."""
VIT_B16_TIMM = ViTConfig(layer_norm_eps=1e-6, add_pooling_layer=False, interpolate_antialias=True)
"""timm vit_base_patch16_224.augreg*."""
VIT_S16_TIMM = dataclasses.replace(
    VIT_B16_TIMM, hidden_size=384, intermediate_size=1536, num_attention_heads=6
)
"""timm vit_small_patch16_224.augreg*."""
VIT_L16 = ViTConfig(
    hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
)
"""google/vit-large-patch16-224-in21k (with the pooler)."""
VIT_L16_TIMM = dataclasses.replace(
    VIT_L16, layer_norm_eps=1e-6, add_pooling_layer=False, interpolate_antialias=True
)
"""timm vit_large_patch16_224.augreg*."""
VIT_H14 = ViTConfig(
    hidden_size=1280,
    num_hidden_layers=32,
    num_attention_heads=16,
    intermediate_size=5120,
    patch_size=14,
)
"""google/vit-huge-patch14-224-in21k (with the pooler)."""


# --------------------------------------------------------------------------------------
# Modules (shared with DINOv2)
# --------------------------------------------------------------------------------------


class ViTIntermediate(eqx.Module):
    dense: eqx.nn.Linear


class ViTOutput(eqx.Module):
    dense: eqx.nn.Linear


class ViTLayer(eqx.Module):
    """Pre-LN block: ``x + attention(layernorm_before(x))``, then
    ``x + output(act(intermediate(layernorm_after(x))))``."""

    attention: ViTAttention
    intermediate: ViTIntermediate
    output: ViTOutput
    layernorm_before: LayerNorm
    layernorm_after: LayerNorm
    hidden_act: str = eqx.field(static=True)

    def __init__(self, config: ViTConfig, key: PRNGKeyArray):
        akey, ikey, okey = jax.random.split(key, 3)
        d, eps = config.hidden_size, config.layer_norm_eps
        self.attention = ViTAttention(d, config.num_attention_heads, config.qkv_bias, akey)
        self.intermediate = ViTIntermediate(linear(d, config.intermediate_size, ikey))
        self.output = ViTOutput(linear(config.intermediate_size, d, okey))
        self.layernorm_before = LayerNorm(d, eps)
        self.layernorm_after = LayerNorm(d, eps)
        self.hidden_act = config.hidden_act

    def __call__(
        self,
        x: Float[Array, "*b t d"],
        *,
        first_only: bool = False,
        key: PRNGKeyArray | None = None,
        drop_rate: float | Array | None = None,
    ) -> Float[Array, "*b tq d"]:
        """All tokens, or with ``first_only`` just the class token's ``(*b, 1, d)``.
        ``drop_rate`` (with ``key``): drop path on both residual branches."""
        _, (k1, k2) = drop_keys(key, 0, drop_rate)
        h = self.layernorm_before(x)
        if first_only:
            y, x = self.attention(h, h[..., :1, :]), x[..., :1, :]
        else:
            y = self.attention(h)
        x = x + drop_path(y, drop_rate, k1, example_dims=2)
        h = activation(self.hidden_act, dense(self.intermediate.dense, self.layernorm_after(x)))
        return x + drop_path(dense(self.output.dense, h), drop_rate, k2, example_dims=2)


class ViTPooler(eqx.Module):
    """transformers' ``ViTPooler``: ``act(dense(class token))`` (the pre-logits layer)."""

    dense: eqx.nn.Linear
    act: str = eqx.field(static=True)

    def __call__(self, cls: Float[Array, "*b d"]) -> Float[Array, "*b p"]:
        y = dense(self.dense, cls)
        return jnp.tanh(y) if self.act == "tanh" else activation(self.act, y)


class ViT(eqx.Module):
    """ViT: one image ``(3, H, W)`` (or a batch) -> pooled features ``(hidden,)``.

    ``features``: transformers' ``pooler_output`` when the checkpoint has a pooler (the
    pre-logits ``dense`` + ``tanh``), else the final-``layernorm`` class token (timm's
    ``pre_logits``, what ``ViTForImageClassification``'s classifier takes).

    It also takes a batch ``(B, 3, H, W) -> (B, hidden)`` directly (``batch_native``): the
    same values, every matrix product over ``B * tokens`` rows.
    """

    batch_native = True  # a class attribute, not a field

    embeddings: ViTEmbeddings
    encoder: ViTEncoder
    layernorm: LayerNorm
    pooler: ViTPooler | None
    config: ViTConfig = eqx.field(static=True)
    preprocessing: Preprocessing | None = eqx.field(static=True, default=None)
    """The checkpoint's own preprocessing when its files state one (``preprocessing_for``
    falls back to the architecture's default)."""

    def __init__(self, config: ViTConfig, *, key: PRNGKeyArray):
        ekey, nkey, pkey = jax.random.split(key, 3)
        d = config.hidden_size
        self.embeddings = ViTEmbeddings(config, ekey)
        keys = jax.random.split(nkey, config.num_hidden_layers)
        self.encoder = ViTEncoder([ViTLayer(config, k) for k in keys])
        self.layernorm = LayerNorm(d, config.layer_norm_eps)
        out = config.pooler_output_size or d
        self.pooler = (
            ViTPooler(linear(d, out, pkey), config.pooler_act) if config.add_pooling_layer else None
        )
        self.config = config

    def hidden_states(self, x: Float[Array, "*b c h w"]) -> Float[Array, "*b t d"]:
        """transformers' ``last_hidden_state`` (= timm's ``forward_features``): every token
        after the final ``layernorm``, class token first. ``t = 1 + patches``."""
        self.embeddings.check_input(x, "ViT")
        return self.layernorm(self.encoder(self.embeddings(x)))

    def __call__(
        self,
        x: Float[Array, "*b c h w"],
        state: eqx.nn.State,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, "*b d"], eqx.nn.State]:
        """``(features (*b, hidden or pooler size), state)``; ``state`` passes through.
        ``key``: drop path (``config.drop_path_rate``), if any."""
        self.embeddings.check_input(x, "ViT")
        rates = block_rates(self.config.drop_path_rate, len(self.encoder.layer), key)
        h = self.encoder(self.embeddings(x), class_only=True, key=key, rates=rates)
        cls = self.layernorm(h[..., 0, :])
        return (cls if self.pooler is None else self.pooler(cls)), state


# --------------------------------------------------------------------------------------
# Checkpoint architecture: transformers, timm and vit_jax (.npz) layouts
# --------------------------------------------------------------------------------------

PREPROCESSING = Preprocessing(resize=224, crop=224, interpolation="bilinear")
"""google/vit-base-patch16-224(-in21k): ``ViTImageProcessor``, bilinear 224, mean=std=0.5."""

_LAYER = "encoder.layer.{i}"
_QKV = tuple(f"{_LAYER}.attention.attention.{p}" for p in ("query", "key", "value"))

# ---- transformers: `ViTModel` bare; `ViTForImageClassification` under `vit.` + classifier.
_TOP = ("embeddings", "encoder", "layernorm", "pooler")


# transformers 5 `ViTModel.state_dict()`: `layers.{i}` with q/k/v/o_proj and mlp.fc1/fc2.
_RUNTIME = tuple(
    rule
    for prefix in ("vit.", "")
    for rule in (
        *runtime_attention_rules(prefix + "layers.{i}", _LAYER),
        Map(prefix + "layers.{i}.mlp.fc1", f"{_LAYER}.intermediate.dense", save=False),
        Map(prefix + "layers.{i}.mlp.fc2", f"{_LAYER}.output.dense", save=False),
        Map(prefix + "layers.{i}", _LAYER, save=False),
    )
)
_TRANSFORMERS_KEYS = KeyMap(
    (
        Drop(r"(vit\.)?embeddings\.mask_token"),
        *_RUNTIME,
        *[Map("vit." + top, top, save="head") for top in _TOP],
        *[Map(top, top, save="backbone") for top in _TOP],
        Map("classifier", "head"),
    )
)


# ---- timm `vit_*_patch*_*`: packed qkv, `(1, 1, D)` class token and `(1, 1+N, D)` positions
# (transformers' shapes), patch projection with a bias.
_TIMM_KEYS = KeyMap(
    (
        Map("cls_token", "embeddings.cls_token"),
        Map("pos_embed", "embeddings.position_embeddings"),
        Map("patch_embed.proj", "embeddings.patch_embeddings.projection"),
        *timm_block_rules(
            _LAYER,
            {
                "norm1": "layernorm_before",
                "norm2": "layernorm_after",
                "mlp.fc1": "intermediate.dense",
                "mlp.fc2": "output.dense",
            },
        ),
        Map("norm", "layernorm"),
        Map("head", "head"),
    )
)


# ---- vit_jax `.npz` (`ViT-B_16.npz`, augreg `.npz`): flax kernels, "/"-joined names. Read
# only: eqxtl writes safetensors.
def _npz_rules() -> tuple[Map, ...]:
    block = "Transformer/encoderblock_{i}/"
    attn = block + "MultiHeadDotProductAttention_1/"
    rules = [
        Map("cls", "embeddings.cls_token"),
        Map("Transformer/posembed_input/pos_embedding", "embeddings.position_embeddings"),
        Map("embedding/kernel", "embeddings.patch_embeddings.projection.weight", CONV_HWIO),
        Map("embedding/bias", "embeddings.patch_embeddings.projection.bias"),
        Map("Transformer/encoder_norm/scale", "layernorm.weight"),
        Map("Transformer/encoder_norm/bias", "layernorm.bias"),
        Map("pre_logits/kernel", "pooler.dense.weight", TRANSPOSE),
        Map("pre_logits/bias", "pooler.dense.bias"),
        Map("head/kernel", "head.weight", TRANSPOSE),
        Map("head/bias", "head.bias"),
        Map(attn + "out/kernel", f"{_LAYER}.attention.output.dense.weight", merged_heads("out")),
        Map(attn + "out/bias", f"{_LAYER}.attention.output.dense.bias"),
    ]
    for theirs, ours in zip(("query", "key", "value"), _QKV, strict=True):
        rules.append(Map(attn + theirs + "/kernel", ours + ".weight", merged_heads("in")))
        rules.append(Map(attn + theirs + "/bias", ours + ".bias", merged_heads("bias")))
    for theirs, ours in (("LayerNorm_0", "layernorm_before"), ("LayerNorm_2", "layernorm_after")):
        rules.append(Map(block + theirs + "/scale", f"{_LAYER}.{ours}.weight"))
        rules.append(Map(block + theirs + "/bias", f"{_LAYER}.{ours}.bias"))
    for theirs, ours in (("Dense_0", "intermediate"), ("Dense_1", "output")):
        rules.append(
            Map(block + f"MlpBlock_3/{theirs}/kernel", f"{_LAYER}.{ours}.dense.weight", TRANSPOSE)
        )
        rules.append(Map(block + f"MlpBlock_3/{theirs}/bias", f"{_LAYER}.{ours}.dense.bias"))
    return tuple(dataclasses.replace(r, save=False) for r in rules)


_NPZ_KEYS = KeyMap(_npz_rules())


def _build(config: ViTConfig, key: PRNGKeyArray) -> ViT:
    return ViT(config, key=key)


def _infer_config(shapes: Shapes) -> ViTConfig:
    """Config from canonical shapes alone.

    Not in the weights, so by convention: ``num_attention_heads = hidden_size // 64``
    (every published ViT: Ti 3, S 6, B 12, L 16, H 16); a square image;
    ``hidden_act`` and ``layer_norm_eps`` from the layout. Pass ``config=`` or the field
    (``num_attention_heads=...``) otherwise.
    """
    try:
        hidden = shapes["embeddings.cls_token"][-1]
        _, channels, patch, _ = shapes["embeddings.patch_embeddings.projection.weight"]
        positions = shapes["embeddings.position_embeddings"][1]
        intermediate = shapes["encoder.layer.0.intermediate.dense.weight"][0]
    except KeyError as e:
        raise CheckpointError(
            f"Cannot infer a ViT config: no {e.args[0]!r} in the checkpoint."
        ) from None
    pooler = shapes.get("pooler.dense.weight")
    return ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=count_blocks(shapes, "encoder.layer."),
        num_attention_heads=max(1, hidden // 64),
        intermediate_size=intermediate,
        image_size=square_side(positions - 1) * patch,
        patch_size=patch,
        num_channels=channels,
        qkv_bias="encoder.layer.0.attention.attention.query.bias" in shapes,
        add_pooling_layer=pooler is not None,
        pooler_output_size=None if pooler is None or pooler[0] == hidden else pooler[0],
    )


def _reconcile(config: ViTConfig, shapes: Shapes) -> ViTConfig:
    """Whether there is a pooler (and its size), from the weights."""
    pooler = shapes.get("pooler.dense.weight")
    return dataclasses.replace(
        config,
        add_pooling_layer=pooler is not None,
        pooler_output_size=None if pooler is None or pooler[0] == config.hidden_size else pooler[0],
    )


def _transformers_config(meta: Meta, shapes: Shapes) -> ViTConfig | None:
    hf = transformers_meta(meta, "vit")
    if hf is None:
        return None
    skip = ("add_pooling_layer", "interpolate_antialias")
    return ViTConfig(**hf_fields(ViTConfig, hf, skip))


def _transformers_write(config: ViTConfig, extra: dict) -> dict[str, dict]:
    head = extra["num_labels"] is not None and not config.add_pooling_layer
    return transformers_write(
        "vit",
        "ViTForImageClassification" if head else "ViTModel",
        config,
        extra,
        skip=("add_pooling_layer", "interpolate_antialias"),
    )


# timm ViT architectures eqxtl builds: plain class-token ViTs (not CLIP / DINOv2 / SigLIP
# towers, which have their own eqxtl architectures).
_TIMM_VIT = r"vit_(tiny|small|base|medium|large|huge|giant)_patch\d+_\d+"
_TIMM_UNSUPPORTED = {
    "class_token": False,
    "no_embed_class": True,
    "pre_norm": True,
    "fc_norm": True,
    "qk_norm": True,
    "dynamic_img_size": True,
}


def _timm_config(meta: Meta, shapes: Shapes) -> ViTConfig | None:
    """From timm's ``model_args`` where present, else the shapes; timm's ViT uses exact GELU
    and LayerNorm eps 1e-6."""
    cfg = timm_meta(meta)
    if cfg is None:
        return None
    args = timm_model_args(cfg, _TIMM_UNSUPPORTED)
    if args.get("init_values"):
        raise CheckpointError(
            f"timm {cfg['architecture']} has layer scale (init_values): eqxtl builds it as "
            "DINOv2 only."
        )
    if args.get("act_layer", "gelu") not in ("gelu", "gelu_tanh", "gelu_new"):
        raise CheckpointError(f"timm act_layer {args['act_layer']!r}: eqxtl builds gelu/gelu_tanh.")
    act = timm_act(args)
    config = dataclasses.replace(
        _infer_config(shapes),
        hidden_act=act,
        layer_norm_eps=1e-6,
        interpolate_antialias=True,
    )
    if "num_heads" in args:
        config = dataclasses.replace(config, num_attention_heads=int(args["num_heads"]))
    if "img_size" in args:
        config = dataclasses.replace(config, image_size=_timm_image_size(args["img_size"]))
    return config


def _timm_image_size(value: Any) -> int | tuple[int, int]:
    h, w = image_hw(value)
    return h if h == w else (h, w)


def _timm_write(config: ViTConfig, extra: dict) -> dict[str, dict]:
    h, _ = image_hw(config.image_size)
    name = f"vit_{timm_size_name(config.hidden_size)}_patch{config.patch_size}_{h}"
    args = {
        "embed_dim": config.hidden_size,
        "depth": config.num_hidden_layers,
        "num_heads": config.num_attention_heads,
        "mlp_ratio": config.intermediate_size / config.hidden_size,
        "patch_size": config.patch_size,
        "qkv_bias": config.qkv_bias,
    }
    return timm_vit_write(name, config, extra, args, global_pool="token")


VIT = Architecture(
    name="vit",
    config_cls=ViTConfig,
    build=_build,
    layouts=(
        Layout(
            "transformers",
            _TRANSFORMERS_KEYS,
            signature=(r"(vit\.)?embeddings\.patch_embeddings\.projection\.weight",),
            claims=claims_transformers("vit"),
            read_config=_transformers_config,
            write_config=_transformers_write,
        ),
        Layout(
            "timm",
            _TIMM_KEYS,
            signature=(r"cls_token", r"patch_embed\.proj\.bias", r"blocks\.0\.attn\.qkv\.weight"),
            claims=claims_timm(_TIMM_VIT),
            read_config=_timm_config,
            write_config=_timm_write,
            preprocessing=timm_preprocessing,
            defaults={"layer_norm_eps": 1e-6, "interpolate_antialias": True},
        ),
        Layout(
            "vit_jax",
            _NPZ_KEYS,
            signature=(r"cls", r"Transformer/encoderblock_0/MultiHeadDotProductAttention_1/.*"),
            # flax's nn.gelu is the tanh approximation; pass hidden_act="gelu" for weights
            # trained with exact GELU.
            defaults={
                "hidden_act": "gelu_pytorch_tanh",
                "layer_norm_eps": 1e-6,
                "interpolate_antialias": True,
            },
            weights_file="model.npz",
            files=(),
            config_files=(),
        ),
    ),
    infer_config=_infer_config,
    feature_dim=lambda config: (
        (config.pooler_output_size or config.hidden_size)
        if config.add_pooling_layer
        else config.hidden_size
    ),
    preprocessing=lambda config: square_preprocessing(PREPROCESSING, config.image_size),
    blocks=r"encoder\.layer\.\d+",
    norm_types=(LayerNorm,),
    linear_types=(eqx.nn.Linear, PatchEmbedding),
    aliases={
        "vit-base-patch16-224-in21k": Alias(VIT_B16, "google/vit-base-patch16-224-in21k"),
        "vit-base-patch16-224": Alias(VIT_B16_FT, "google/vit-base-patch16-224"),
        "vit-large-patch16-224-in21k": Alias(VIT_L16, "google/vit-large-patch16-224-in21k"),
        "vit-large-patch16-224": Alias(
            dataclasses.replace(VIT_L16, add_pooling_layer=False), "google/vit-large-patch16-224"
        ),
        "vit-huge-patch14-224-in21k": Alias(VIT_H14, "google/vit-huge-patch14-224-in21k"),
        **{
            f"vit_{size}_patch16_224.{tag}": Alias(
                config, f"timm/vit_{size}_patch16_224.{tag}", filenames=("model.safetensors",)
            )
            for size, config in (
                ("base", VIT_B16_TIMM),
                ("small", VIT_S16_TIMM),
                ("large", VIT_L16_TIMM),
            )
            for tag in ("augreg2_in21k_ft_in1k", "augreg_in21k_ft_in1k", "augreg_in21k")
            if not (size != "base" and tag == "augreg2_in21k_ft_in1k")
        },
    },
    reconcile=_reconcile,
    choices=("interpolate_antialias", "drop_path_rate"),
    resize=resize_positions,
    supports_remat=True,
    supports_scan=True,
)
