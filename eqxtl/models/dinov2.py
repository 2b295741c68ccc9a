"""DINOv2 (with and without registers) with transformers' names, and its ``Architecture``.

Field names equal the transformers ``Dinov2Model`` / ``Dinov2WithRegistersModel`` names
without a model prefix: ``embeddings.cls_token``, ``embeddings.register_tokens``,
``encoder.layer.3.attention.attention.query.weight``, ``encoder.layer.3.layer_scale1.lambda1``,
``encoder.layer.3.mlp.fc1.weight``, ``layernorm.weight`` ... The embeddings and attention are
ViT's (``_vit_common.py``). Checkpoints load from transformers and timm (``vit_*_patch14_dinov2``,
``vit_*_patch14_reg4_dinov2``).

The giant models' SwiGLU MLP (``use_swiglu_ffn``) has transformers 5's module names,
``mlp.gate_proj`` / ``mlp.up_proj`` / ``mlp.down_proj``; transformers' files
(``mlp.weights_in`` / ``mlp.weights_out``) and timm (``vit_giant_patch14_dinov2``: ``mlp.fc1``
/ ``mlp.fc2``) pack the gate over the up projection in one tensor.

Like transformers' model, any input whose sides are multiples of the patch size works: the
position embeddings are resampled on the fly for another grid (``from_pretrained(...,
image_size=N)`` resamples them once instead).
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
    timm_meta,
    timm_preprocessing,
    timm_vit_write,
    transformers_meta,
    transformers_write,
)
from ._layout import Drop, KeyMap, Map, Op, packed
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
    MLP,
    LayerNorm,
    PatchEmbedding,
    SwiGLU,
    block_rates,
    drop_keys,
    drop_path,
    image_hw,
)

Pooling = Literal["cls", "cls+mean"]


@dataclasses.dataclass(frozen=True)
class Dinov2Config:
    """The fields of transformers' ``Dinov2Config`` / ``Dinov2WithRegistersConfig`` that
    shape the model, plus:

    - `pooling`: the features: ``"cls"`` (the final-norm class token, transformers'
      ``pooler_output``) or ``"cls+mean"`` (``concat(class token, mean of the patch
      tokens)``, both after the final norm: DINOv2's linear-probe feature, what
      ``Dinov2ForImageClassification``'s classifier takes), ``2 * hidden_size`` wide.
    - `interpolate_antialias`: the bicubic filter for another input size: transformers'
      ``Dinov2Model`` resamples without antialias, ``Dinov2WithRegistersModel`` and timm
      with it.
    - `drop_path_rate`: stochastic depth, as ``ViTConfig``'s (timm's linear rule; the
      ``drop_path_rate`` of a transformers config file is not read: a training choice).

    ``use_swiglu_ffn`` (the giant models): the MLP is ``SwiGLU`` (its ``hidden_act`` unused:
    SiLU, as transformers), two thirds of ``hidden_size * mlp_ratio`` wide rounded up to a
    multiple of 8 (``intermediate_size``).
    """

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    mlp_ratio: float = 4.0
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    image_size: int | tuple[int, int] = 518
    patch_size: int = 14
    num_channels: int = 3
    qkv_bias: bool = True
    layerscale_value: float = 1.0
    use_swiglu_ffn: bool = False
    num_register_tokens: int = 0
    pooling: Pooling = "cls"
    interpolate_antialias: bool = False
    drop_path_rate: float = 0.0

    def __post_init__(self):
        check_common(self)
        if self.pooling not in ("cls", "cls+mean"):
            raise ValueError(f"pooling must be 'cls' or 'cls+mean', got {self.pooling!r}.")

    @property
    def intermediate_size(self) -> int:
        """The MLP's hidden width (of each of the SwiGLU's gate and up projections)."""
        if self.use_swiglu_ffn:
            return _swiglu_width(self.hidden_size, self.mlp_ratio)
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def grid(self) -> tuple[int, int]:
        h, w = image_hw(self.image_size)
        return h // self.patch_size, w // self.patch_size

    @property
    def num_positions(self) -> int:
        gh, gw = self.grid
        return gh * gw + 1


def _swiglu_width(hidden: int, mlp_ratio: float) -> int:
    width = int(hidden * mlp_ratio)  # transformers' Dinov2SwiGLUFFN, to the letter
    return (int(width * 2 / 3) + 7) // 8 * 8


def _sized(hidden: int, layers: int, heads: int, registers: int = 0) -> Dinov2Config:
    return Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_register_tokens=registers,
        interpolate_antialias=registers > 0,
    )


DINOV2_S14 = _sized(384, 12, 6)
"""facebook/dinov2-small."""
DINOV2_B14 = _sized(768, 12, 12)
"""facebook/dinov2-base."""
DINOV2_L14 = _sized(1024, 24, 16)
"""facebook/dinov2-large."""
DINOV2_G14 = dataclasses.replace(_sized(1536, 40, 24), use_swiglu_ffn=True)
"""facebook/dinov2-giant: SwiGLU MLP 4096 wide, 1.14 B parameters."""


class Dinov2LayerScale(eqx.Module):
    """Per-channel scale ``x * lambda1``."""

    lambda1: Float[Array, " d"]

    def __call__(self, x: Float[Array, "*b d"]) -> Float[Array, "*b d"]:
        return x * self.lambda1.astype(x.dtype)


class Dinov2Layer(eqx.Module):
    """Pre-LN block with layer scale: ``x + ls1(attention(norm1(x)))``, then
    ``x + ls2(mlp(norm2(x)))``."""

    norm1: LayerNorm
    attention: ViTAttention
    layer_scale1: Dinov2LayerScale
    norm2: LayerNorm
    mlp: MLP | SwiGLU
    layer_scale2: Dinov2LayerScale

    def __init__(self, config: Dinov2Config, key: PRNGKeyArray):
        akey, mkey = jax.random.split(key)
        d, eps = config.hidden_size, config.layer_norm_eps
        self.norm1 = LayerNorm(d, eps)
        self.attention = ViTAttention(d, config.num_attention_heads, config.qkv_bias, akey)
        self.layer_scale1 = Dinov2LayerScale(jnp.full((d,), config.layerscale_value, jnp.float32))
        self.norm2 = LayerNorm(d, eps)
        if config.use_swiglu_ffn:
            self.mlp = SwiGLU(d, config.intermediate_size, mkey)
        else:
            self.mlp = MLP(d, config.intermediate_size, config.hidden_act, mkey)
        self.layer_scale2 = Dinov2LayerScale(jnp.full((d,), config.layerscale_value, jnp.float32))

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
        h = self.norm1(x)
        if first_only:
            y, x = self.attention(h, h[..., :1, :]), x[..., :1, :]
        else:
            y = self.attention(h)
        x = x + drop_path(self.layer_scale1(y), drop_rate, k1, example_dims=2)
        y = self.layer_scale2(self.mlp(self.norm2(x)))
        return x + drop_path(y, drop_rate, k2, example_dims=2)


class Dinov2(eqx.Module):
    """DINOv2: one image ``(3, H, W)`` (or a batch; ``H``, ``W`` multiples of the patch
    size) -> features: the final-norm class token ``(hidden,)`` (transformers'
    ``pooler_output``), or with ``config.pooling == "cls+mean"`` that and the mean of the
    patch tokens ``(2 * hidden,)``.

    ``batch_native``: a batch ``(B, 3, H, W)`` runs every matrix product over ``B * tokens``
    rows.
    """

    batch_native = True  # a class attribute, not a field

    embeddings: ViTEmbeddings
    encoder: ViTEncoder
    layernorm: LayerNorm
    config: Dinov2Config = eqx.field(static=True)
    preprocessing: Preprocessing | None = eqx.field(static=True, default=None)

    def __init__(self, config: Dinov2Config, *, key: PRNGKeyArray):
        ekey, nkey = jax.random.split(key)
        self.embeddings = ViTEmbeddings(
            config, ekey, registers=config.num_register_tokens, dynamic=True
        )
        keys = jax.random.split(nkey, config.num_hidden_layers)
        self.encoder = ViTEncoder([Dinov2Layer(config, k) for k in keys])
        self.layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.config = config

    def hidden_states(self, x: Float[Array, "*b c h w"]) -> Float[Array, "*b t d"]:
        """transformers' ``last_hidden_state`` (= timm's ``forward_features``): every token
        after the final ``layernorm``: class, registers, patches."""
        self.embeddings.check_input(x, "Dinov2")
        return self.layernorm(self.encoder(self.embeddings(x)))

    def __call__(
        self,
        x: Float[Array, "*b c h w"],
        state: eqx.nn.State,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, "*b f"], eqx.nn.State]:
        """``(features, state)``; ``state`` passes through (no BatchNorm). ``key``: drop
        path (``config.drop_path_rate``), if any."""
        self.embeddings.check_input(x, "Dinov2")
        h = self.embeddings(x)
        rates = block_rates(self.config.drop_path_rate, len(self.encoder.layer), key)
        if self.config.pooling == "cls":
            h = self.encoder(h, class_only=True, key=key, rates=rates)
            return self.layernorm(h[..., 0, :]), state
        h = self.layernorm(self.encoder(h, key=key, rates=rates))
        patches = h[..., 1 + self.config.num_register_tokens :, :]
        mean = jnp.mean(patches.astype(jnp.float32), axis=-2).astype(h.dtype)
        return jnp.concatenate([h[..., 0, :], mean], axis=-1), state


# --------------------------------------------------------------------------------------
# Checkpoint architecture: transformers and timm layouts
# --------------------------------------------------------------------------------------

PREPROCESSING = Preprocessing(
    resize=256,
    crop=224,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    interpolation="bicubic",
)
"""facebook/dinov2-*: ``BitImageProcessor``, bicubic shortest side 256, center crop 224,
ImageNet mean / std."""

_LAYER = "encoder.layer.{i}"

# ---- transformers: `Dinov2Model` / `Dinov2WithRegistersModel` bare; the classification
# models under `dinov2.` / `dinov2_with_registers.` + classifier. The mask token (used only
# for masked-image pretraining) is not loaded; a save writes a zero one.
_TOP = ("embeddings", "encoder", "layernorm")
_PREFIXES = r"(dinov2\.|dinov2_with_registers\.)?"
_SAVES: dict[str, bool | str] = {"dinov2.": "head", "dinov2_with_registers.": False, "": "backbone"}
_MLP, _WB = _LAYER + ".mlp", ("weight", "bias")


def _swiglu_file_rules(prefix: str) -> tuple[Map, ...]:
    """transformers' files name the SwiGLU MLP as its 4.x module did: ``weights_in`` packs
    ``gate_proj`` over ``up_proj``, ``weights_out`` is ``down_proj`` (its 5.x loader splits
    them the same way)."""
    save = _SAVES[prefix]
    names = ("gate", "up")
    pack = [packed(f"{prefix}{_MLP}.weights_in.{p}", f"{_MLP}.*_proj.{p}", names) for p in _WB]
    return (
        *[dataclasses.replace(rule, save=save) for rule in pack],
        Map(f"{prefix}{_MLP}.weights_out", f"{_MLP}.down_proj", save=save),
    )


_TRANSFORMERS_KEYS = KeyMap(
    (
        Drop(_PREFIXES + r"embeddings\.mask_token"),
        *[
            rule
            for prefix in _SAVES
            for rule in (
                *runtime_attention_rules(prefix + _LAYER, _LAYER),
                *_swiglu_file_rules(prefix),
            )
        ],
        *[Map("dinov2." + top, top, save="head") for top in _TOP],
        *[Map("dinov2_with_registers." + top, top, save=False) for top in _TOP],
        *[Map(top, top, save="backbone") for top in _TOP],
        Map("classifier", "head"),
    ),
    constants=lambda saved: {
        key.replace("cls_token", "mask_token"): np.zeros(value.shape[-1:], value.dtype)[None]
        for key, value in saved.items()
        if key.endswith("embeddings.cls_token")
    },
)


def _class_position(x: np.ndarray) -> list[np.ndarray]:
    """timm's no_embed_class layout (register models): ``pos_embed (1, N, D)`` covers the
    patches only (its converter folded the class position into ``cls_token``) -> a zero
    class position in front. A square token count (``N = side**2``) says which layout it
    is; ``_timm_check`` makes sure it agrees with the register tokens."""
    n = x.shape[1]
    if square_grid_or_none(n) is None:
        return [x]
    return [np.concatenate([np.zeros_like(x[:, :1]), x], axis=1)]


def square_grid_or_none(n: int) -> int | None:
    side = int(np.sqrt(n))
    return side if side * side == n and n > 0 else None


_POS_EMBED = Op(
    "class_position",
    1,
    _class_position,
    lambda xs: xs[0],  # the register save folds it back in `_timm_fold`
    lambda s: [(s[0], s[1] + 1, s[2]) if square_grid_or_none(s[1]) is not None else tuple(s)],
)


def _timm_fold(saved: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Back to timm's no_embed_class layout when there are registers: the class position
    added to ``cls_token``, ``pos_embed`` the patches' only."""
    if "reg_token" not in saved:
        return {}
    pos = saved["pos_embed"]
    return {"cls_token": saved["cls_token"] + pos[:, :1], "pos_embed": pos[:, 1:]}


_TIMM_SWIGLU = (  # SwiGLUPacked: act(fc1's first half) * its second half
    packed("blocks.{i}.mlp.fc1.weight", _MLP + ".*_proj.weight", ("gate", "up")),
    packed("blocks.{i}.mlp.fc1.bias", _MLP + ".*_proj.bias", ("gate", "up")),
    Map("blocks.{i}.mlp.fc2", _MLP + ".down_proj"),
)
_TIMM_RULES = (
    Map("cls_token", "embeddings.cls_token"),
    Map("reg_token", "embeddings.register_tokens"),
    Map("pos_embed", "embeddings.position_embeddings", _POS_EMBED),
    Map("patch_embed.proj", "embeddings.patch_embeddings.projection"),
    *timm_block_rules(
        _LAYER,
        {
            "norm1": "norm1",
            "norm2": "norm2",
            "ls1.gamma": "layer_scale1.lambda1",
            "ls2.gamma": "layer_scale2.lambda1",
            "mlp.fc1": "mlp.fc1",
            "mlp.fc2": "mlp.fc2",
        },
    ),
    Map("norm", "layernorm"),
    Map("head", "head"),
)
# timm names both MLPs `mlp.fc1` / `mlp.fc2`: the plain one is read unless `_timm_variant`
# sees the packed SwiGLU; both are saved
_TIMM_KEYS = KeyMap((*_TIMM_RULES, *_TIMM_SWIGLU), constants=_timm_fold)
_TIMM_SWIGLU_KEYS = KeyMap((*_TIMM_SWIGLU, *_TIMM_RULES), constants=_timm_fold)


def _timm_variant(tensors: Mapping[str, Any]) -> KeyMap | None:
    """The SwiGLU key map when ``mlp.fc1`` is twice as wide as ``mlp.fc2``'s input."""
    fc1, fc2 = "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight"
    if fc1 not in tensors or fc2 not in tensors:
        return None
    shape = getattr(tensors, "shape", None)
    shape = shape if callable(shape) else (lambda key: np.shape(tensors[key]))
    return _TIMM_SWIGLU_KEYS if shape(fc1)[0] == 2 * shape(fc2)[-1] else None


def _timm_check(tensors) -> None:
    if "pos_embed" not in tensors:
        return
    n = np.shape(tensors["pos_embed"])[1]
    registers = "reg_token" in tensors
    if (square_grid_or_none(n) is not None) != registers:
        raise CheckpointError(
            f"timm DINOv2 pos_embed with {n} positions {'with' if registers else 'without'} "
            "register tokens: eqxtl reads square patch grids, with the class position "
            "folded into cls_token exactly when there are registers (timm's no_embed_class)."
        )


def _build(config: Dinov2Config, key: PRNGKeyArray) -> Dinov2:
    return Dinov2(config, key=key)


def _infer_config(shapes: Shapes) -> Dinov2Config:
    """Config from canonical shapes alone: ``num_attention_heads = hidden_size // 64``
    (dinov2-small 6, base 12, large 16, giant 24), a square image, antialiased resizing with
    registers (as transformers)."""
    swiglu = "encoder.layer.0.mlp.gate_proj.weight" in shapes
    try:
        hidden = shapes["embeddings.cls_token"][-1]
        _, channels, patch, _ = shapes["embeddings.patch_embeddings.projection.weight"]
        positions = shapes["embeddings.position_embeddings"][1]
        mlp = "gate_proj" if swiglu else "fc1"
        intermediate = shapes[f"encoder.layer.0.mlp.{mlp}.weight"][0]
    except KeyError as e:
        raise CheckpointError(
            f"Cannot infer a DINOv2 config: no {e.args[0]!r} in the checkpoint."
        ) from None
    registers = shapes.get("embeddings.register_tokens", (1, 0))[1]
    return Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=count_blocks(shapes, "encoder.layer."),
        num_attention_heads=max(1, hidden // 64),
        use_swiglu_ffn=swiglu,
        mlp_ratio=_swiglu_ratio(intermediate, hidden) if swiglu else intermediate / hidden,
        image_size=square_side(positions - 1) * patch,
        patch_size=patch,
        num_channels=channels,
        qkv_bias="encoder.layer.0.attention.attention.query.bias" in shapes,
        num_register_tokens=registers,
        interpolate_antialias=registers > 0,
    )


def _swiglu_ratio(width: int, hidden: int) -> float:
    """The ``mlp_ratio`` whose SwiGLU is ``width`` wide (1.5 width / hidden: dinov2-giant's 4)."""
    ratio = 1.5 * width / hidden
    if _swiglu_width(hidden, ratio) != width:
        raise CheckpointError(
            f"A SwiGLU MLP {width} wide (hidden size {hidden}) is not one transformers' "
            "Dinov2Config builds (two thirds of hidden_size * mlp_ratio, rounded up to a "
            "multiple of 8); pass config= for it."
        )
    return ratio


def _reconcile(config: Dinov2Config, shapes: Shapes) -> Dinov2Config:
    """The register count from the weights."""
    registers = shapes.get("embeddings.register_tokens", (1, 0))[1]
    return dataclasses.replace(config, num_register_tokens=registers)


_HF_TYPES = ("dinov2", "dinov2_with_registers")


def _transformers_config(meta: Meta, shapes: Shapes) -> Dinov2Config | None:
    hf = transformers_meta(meta, *_HF_TYPES)
    if hf is None:
        return None
    registers = hf["model_type"] == "dinov2_with_registers"
    values = hf_fields(Dinov2Config, hf, ("pooling", "interpolate_antialias"))
    if not registers:
        values["num_register_tokens"] = 0
    elif "num_register_tokens" not in hf:
        values["num_register_tokens"] = 4
    classifier = any("ForImageClassification" in a for a in hf.get("architectures") or ())
    return Dinov2Config(
        **values,
        pooling="cls+mean" if classifier else "cls",
        interpolate_antialias=registers,
    )


def _transformers_write(config: Dinov2Config, extra: dict) -> dict[str, dict]:
    registers = config.num_register_tokens > 0
    name = "Dinov2WithRegisters" if registers else "Dinov2"
    head = extra["num_labels"] is not None and config.pooling == "cls+mean"
    skip = ("pooling", "interpolate_antialias") + (() if registers else ("num_register_tokens",))
    ratio = config.mlp_ratio
    return transformers_write(
        "dinov2_with_registers" if registers else "dinov2",
        f"{name}ForImageClassification" if head else f"{name}Model",
        config,
        extra,
        skip=skip,
        # transformers' config validates an int
        mlp_ratio=int(ratio) if float(ratio).is_integer() else ratio,
    )


_TIMM_DINOV2 = r"vit_\w+_patch\d+_(reg\d+_)?dinov2"


def _timm_config(meta: Meta, shapes: Shapes) -> Dinov2Config | None:
    cfg = timm_meta(meta)
    if cfg is None:
        return None
    args = timm_model_args(cfg, {"class_token": False, "pre_norm": True, "fc_norm": True})
    config = dataclasses.replace(_infer_config(shapes), interpolate_antialias=True)
    if "num_heads" in args:
        config = dataclasses.replace(config, num_attention_heads=int(args["num_heads"]))
    if "img_size" in args:
        h, w = image_hw(args["img_size"])
        config = dataclasses.replace(config, image_size=h if h == w else (h, w))
    return config


def _timm_write(config: Dinov2Config, extra: dict) -> dict[str, dict]:
    registers = config.num_register_tokens
    reg = f"reg{registers}_" if registers else ""
    # timm builds the SwiGLU (SwiGLUPacked, SiLU) in its giant entry point only
    size = "giant" if config.use_swiglu_ffn else timm_size_name(config.hidden_size)
    name = f"vit_{size}_patch{config.patch_size}_{reg}dinov2"
    args: dict[str, Any] = {
        "embed_dim": config.hidden_size,
        "depth": config.num_hidden_layers,
        "num_heads": config.num_attention_heads,
        "mlp_ratio": config.mlp_ratio,
        "patch_size": config.patch_size,
        "qkv_bias": config.qkv_bias,
        "init_values": config.layerscale_value,
    }
    if config.use_swiglu_ffn:  # timm's fc1 is int(embed_dim * mlp_ratio) wide: both halves
        args["mlp_ratio"] = _timm_packed_ratio(2 * config.intermediate_size, config.hidden_size)
        config = dataclasses.replace(config, hidden_act="gelu")  # no act_layer: SiLU stays
    if registers:
        args |= {"reg_tokens": registers, "no_embed_class": True}
    return timm_vit_write(name, config, extra, args, global_pool="token")


def _timm_packed_ratio(width: int, hidden: int) -> float:
    """The smallest float ``r`` with ``int(hidden * r) == width``."""
    ratio = width / hidden
    while int(hidden * ratio) < width:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


_SIZES = (("small", DINOV2_S14), ("base", DINOV2_B14), ("large", DINOV2_L14), ("giant", DINOV2_G14))

DINOV2 = Architecture(
    name="dinov2",
    config_cls=Dinov2Config,
    build=_build,
    layouts=(
        Layout(
            "transformers",
            _TRANSFORMERS_KEYS,
            signature=(_PREFIXES + r"encoder\.layer\.0\.layer_scale1\.lambda1",),
            claims=claims_transformers(*_HF_TYPES),
            read_config=_transformers_config,
            write_config=_transformers_write,
        ),
        Layout(
            "timm",
            _TIMM_KEYS,
            signature=(r"cls_token", r"blocks\.0\.ls1\.gamma", r"blocks\.0\.attn\.qkv\.weight"),
            claims=claims_timm(_TIMM_DINOV2),
            read_config=_timm_config,
            write_config=_timm_write,
            preprocessing=timm_preprocessing,
            defaults={"interpolate_antialias": True},
            check=_timm_check,
            variant=_timm_variant,
        ),
    ),
    infer_config=_infer_config,
    feature_dim=lambda config: config.hidden_size * (2 if config.pooling == "cls+mean" else 1),
    preprocessing=lambda config: (
        PREPROCESSING
        if config.image_size == 518  # the checkpoints' own size; they are used at 224
        else square_preprocessing(PREPROCESSING, config.image_size)
    ),
    blocks=r"encoder\.layer\.\d+",
    norm_types=(LayerNorm,),
    linear_types=(eqx.nn.Linear, PatchEmbedding),
    aliases={
        **{f"dinov2-{size}": Alias(config, f"facebook/dinov2-{size}") for size, config in _SIZES},
        **{
            f"dinov2-with-registers-{size}": Alias(
                dataclasses.replace(config, num_register_tokens=4, interpolate_antialias=True),
                f"facebook/dinov2-with-registers-{size}",
            )
            for size, config in _SIZES
        },
    },
    reconcile=_reconcile,
    choices=("pooling", "interpolate_antialias", "drop_path_rate"),
    resize=resize_positions,
    supports_remat=True,
    supports_scan=True,
)
