"""MLP-Mixer with timm's names (transformers has no Mixer), and its checkpoint
``Architecture``.

``eqxtl.paths(backbone)`` reads ``stem.proj.weight``, ``blocks.3.norm1.weight``,
``blocks.3.mlp_tokens.fc1.weight (tokens_mlp_dim, num_patches)``,
``blocks.3.mlp_channels.fc2.bias``, ``norm.weight``. Features are the mean over the tokens
after the final ``norm`` (timm's ``global_pool="avg"``).

The token-mixing MLP is sized by the number of patches: a Mixer has a fixed input size.
"""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ..errors import CheckpointError, DataError
from ._arch import (
    Alias,
    Architecture,
    Layout,
    Meta,
    Preprocessing,
    Shapes,
    check_activation,
    check_sizes,
    claims_timm,
    count_blocks,
    square_side,
    timm_act,
    timm_meta,
    timm_preprocessing,
    timm_vit_write,
)
from ._layout import CONV_HWIO, KeyMap, Map, flax_dense, flax_norm
from .layers import (
    ACTIVATIONS,
    MLP,
    LayerNorm,
    PatchEmbedding,
    block_rates,
    checkpointed,
    drop_keys,
    drop_path,
    image_hw,
)


@dataclasses.dataclass(frozen=True)
class MixerConfig:
    """MLP-Mixer's shape (vit_jax's names for the MLP widths).

    ``image_size``: an int, or ``(height, width)``; fixed once built (the token-mixing MLP
    has one input per patch). ``hidden_act``: ``"gelu"`` (exact, timm) or
    ``"gelu_pytorch_tanh"`` (the tanh approximation of flax's ``nn.gelu``, vit_jax).
    ``drop_path_rate``: stochastic depth of every block, in ``[0, 1)``: timm's Mixer drops
    each block's two branches with this same rate (no linear rule); active only when the
    forward pass gets a ``key`` (``fit``'s step passes one). A training choice, not read
    from or written to files.
    """

    hidden_size: int = 768
    num_blocks: int = 12
    tokens_mlp_dim: int = 384
    channels_mlp_dim: int = 3072
    num_channels: int = 3
    image_size: int | tuple[int, int] = 224
    patch_size: int = 16
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    drop_path_rate: float = 0.0

    def __post_init__(self):
        check_sizes(self)
        check_activation(self, ACTIVATIONS)
        h, w = image_hw(self.image_size)
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}."
            )
        object.__setattr__(self, "image_size", h if h == w else (h, w))

    @property
    def num_patches(self) -> int:
        h, w = image_hw(self.image_size)
        return (h // self.patch_size) * (w // self.patch_size)


MIXER_B16 = MixerConfig()
"""timm mixer_b16_224 (vit_jax Mixer-B_16)."""
MIXER_L16 = MixerConfig(hidden_size=1024, num_blocks=24, tokens_mlp_dim=512, channels_mlp_dim=4096)
"""timm mixer_l16_224 (vit_jax Mixer-L_16)."""


class Stem(eqx.Module):
    """timm's ``PatchEmbed``: ``proj``, a patch convolution with a bias:
    ``(*b, C, H, W) -> (*b, n, d)``."""

    proj: PatchEmbedding

    def __init__(self, config: MixerConfig, key: PRNGKeyArray):
        self.proj = PatchEmbedding(
            config.num_channels, config.hidden_size, config.patch_size, key, use_bias=True
        )

    def __call__(self, x: Float[Array, "*b c h w"]) -> Float[Array, "*b n d"]:
        return self.proj(x)


class MixerBlock(eqx.Module):
    """``x + mlp_tokens(norm1(x)^T)^T``, then ``x + mlp_channels(norm2(x))``:
    ``(*b, n, d) -> (*b, n, d)``."""

    norm1: LayerNorm
    mlp_tokens: MLP
    norm2: LayerNorm
    mlp_channels: MLP

    def __init__(self, config: MixerConfig, key: PRNGKeyArray):
        tkey, ckey = jax.random.split(key)
        d, eps, act = config.hidden_size, config.layer_norm_eps, config.hidden_act
        self.norm1 = LayerNorm(d, eps)
        self.mlp_tokens = MLP(config.num_patches, config.tokens_mlp_dim, act, tkey)
        self.norm2 = LayerNorm(d, eps)
        self.mlp_channels = MLP(d, config.channels_mlp_dim, act, ckey)

    def __call__(
        self,
        x: Float[Array, "*b n d"],
        *,
        key: PRNGKeyArray | None = None,
        drop_rate: float | None = None,
    ) -> Float[Array, "*b n d"]:
        """``drop_rate`` (with ``key``): drop path on both residual branches."""
        _, (k1, k2) = drop_keys(key, 0, drop_rate)
        # token mixing: one GEMM over (batch * channels) rows of patches
        y = self.mlp_tokens(jnp.swapaxes(self.norm1(x), -1, -2))
        x = x + drop_path(jnp.swapaxes(y, -1, -2), drop_rate, k1, example_dims=2)
        return x + drop_path(self.mlp_channels(self.norm2(x)), drop_rate, k2, example_dims=2)


def _run_block(block: MixerBlock, h: Array, key=None, rate=None) -> Array:
    return block(h, key=key, drop_rate=rate)


def uniform_rates(rate: float, n: int) -> list[float]:
    """timm's Mixer schedule: every block at ``rate``."""
    return [rate] * n


class MLPMixer(eqx.Module):
    """MLP-Mixer: one image ``(3, H, W)`` (or a batch ``(B, 3, H, W)``, ``batch_native``)
    -> features ``(hidden,)``, the token mean after ``norm``.

    ``remat`` (static; ``eqxtl.with_remat``): each block under ``eqx.filter_checkpoint``.
    """

    batch_native = True  # a class attribute, not a field

    stem: Stem
    blocks: list[MixerBlock]
    norm: LayerNorm
    config: MixerConfig = eqx.field(static=True)
    preprocessing: Preprocessing | None = eqx.field(static=True, default=None)
    """The checkpoint's own preprocessing when its files state one."""
    remat: bool = eqx.field(static=True, default=False)

    def __init__(self, config: MixerConfig, *, key: PRNGKeyArray):
        skey, bkey = jax.random.split(key)
        self.stem = Stem(config, skey)
        self.blocks = [MixerBlock(config, k) for k in jax.random.split(bkey, config.num_blocks)]
        self.norm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.config = config

    def tokens(
        self, x: Float[Array, "*b c h w"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*b n d"]:
        """timm's ``forward_features``: every token after the final ``norm``. ``key``: drop
        path (``config.drop_path_rate``), if any."""
        c = self.config
        want = (c.num_channels, *image_hw(c.image_size))
        if x.ndim not in (3, 4) or x.shape[-3:] != want:
            raise DataError(
                f"MLPMixer expects a channel-first image of shape {want} or a batch of them "
                f"(B, *{want}), got {x.shape}. A Mixer's token-mixing MLP is sized by the "
                "patch count: resize the images to its image_size."
            )
        h = self.stem(x)
        run = checkpointed(_run_block, self.remat)
        n = len(self.blocks)
        rates = block_rates(c.drop_path_rate, n, key, schedule=uniform_rates)
        if rates is None:
            for block in self.blocks:
                h = run(block, h)
        else:
            for block, k, rate in zip(self.blocks, jax.random.split(key, n), rates, strict=True):
                h = run(block, h, k, rate)
        return self.norm(h)

    def __call__(
        self,
        x: Float[Array, "*b c h w"],
        state: eqx.nn.State,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, "*b d"], eqx.nn.State]:
        """``(features (*b, hidden), state)``; ``state`` passes through (no BatchNorm).
        ``key``: drop path (``config.drop_path_rate``), if any."""
        return jnp.mean(self.tokens(x, key=key), axis=-2), state


# --------------------------------------------------------------------------------------
# Checkpoint architecture: timm, vit_jax (.npz) layouts
# --------------------------------------------------------------------------------------

PREPROCESSING = Preprocessing(
    resize=256, crop=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic"
)
"""timm's ``mixer_b16_224.goog_*`` ``pretrained_cfg``: bicubic, crop_pct 0.875, mean = std
= 0.5."""

# ---- timm: the canonical names.
_TIMM_KEYS = KeyMap(
    (
        Map("stem.proj", "stem.proj"),
        Map("blocks", "blocks"),
        Map("norm", "norm"),
        Map("head.weight", "head.weight"),
        Map("head.bias", "head.bias"),
    )
)

# ---- vit_jax `.npz`: flax kernels; the token-mixing kernels are (patches, tokens_mlp_dim).
_BLOCK = "MixerBlock_{i}/"
_VIT_JAX_KEYS = KeyMap(
    (
        Map("stem/kernel", "stem.proj.weight", CONV_HWIO),
        Map("stem/bias", "stem.proj.bias"),
        *flax_norm(_BLOCK + "LayerNorm_0", "blocks.{i}.norm1"),
        *flax_dense(_BLOCK + "token_mixing/Dense_0", "blocks.{i}.mlp_tokens.fc1"),
        *flax_dense(_BLOCK + "token_mixing/Dense_1", "blocks.{i}.mlp_tokens.fc2"),
        *flax_norm(_BLOCK + "LayerNorm_1", "blocks.{i}.norm2"),
        *flax_dense(_BLOCK + "channel_mixing/Dense_0", "blocks.{i}.mlp_channels.fc1"),
        *flax_dense(_BLOCK + "channel_mixing/Dense_1", "blocks.{i}.mlp_channels.fc2"),
        *flax_norm("pre_head_layer_norm", "norm"),
        *flax_dense("head", "head"),
    )
)


def _build(config: MixerConfig, key: PRNGKeyArray) -> MLPMixer:
    return MLPMixer(config, key=key)


def _infer_config(shapes: Shapes) -> MixerConfig:
    """Config from canonical shapes alone (a square patch grid; the activation from the
    layout)."""
    try:
        hidden, channels, patch, _ = shapes["stem.proj.weight"]
        tokens_dim, patches = shapes["blocks.0.mlp_tokens.fc1.weight"]
        channels_dim = shapes["blocks.0.mlp_channels.fc1.weight"][0]
    except KeyError as e:
        msg = f"Cannot infer a Mixer config: no {e.args[0]!r} in the checkpoint."
        raise CheckpointError(msg) from None
    return MixerConfig(
        hidden_size=hidden,
        num_blocks=count_blocks(shapes, "blocks."),
        tokens_mlp_dim=tokens_dim,
        channels_mlp_dim=channels_dim,
        num_channels=channels,
        image_size=square_side(patches) * patch,
        patch_size=patch,
    )


def _timm_config(meta: Meta, shapes: Shapes) -> MixerConfig | None:
    """The shapes, with ``model_args``' ``img_size`` (non-square sizes) and ``act_layer``
    (timm builds nn.GELU, exact, unless it names ``gelu_tanh``)."""
    cfg = timm_meta(meta)
    if cfg is None:
        return None
    args = cfg.get("model_args") or {}
    size = args.get("img_size") or (cfg.get("pretrained_cfg") or {}).get("input_size", [0])[1:]
    config = _infer_config(shapes)
    if size:
        config = dataclasses.replace(config, image_size=tuple(image_hw(size)))
    return dataclasses.replace(config, hidden_act=timm_act(args))


def _timm_write(config: MixerConfig, extra: dict) -> dict[str, dict]:
    size = {512: "s", 768: "b", 1024: "l"}.get(config.hidden_size, "b")
    args = {
        "embed_dim": config.hidden_size,
        "num_blocks": config.num_blocks,
        "patch_size": config.patch_size,
        "mlp_ratio": [
            config.tokens_mlp_dim / config.hidden_size,
            config.channels_mlp_dim / config.hidden_size,
        ],
    }
    name = f"mixer_{size}{config.patch_size}_{image_hw(config.image_size)[0]}"
    return timm_vit_write(
        name, config, extra, args, global_pool="avg", fixed_input_size=True, classifier="head"
    )


def _alias(config: MixerConfig, tag: str) -> Alias:
    return Alias(config, f"timm/{tag}")


MIXER = Architecture(
    name="mixer",
    config_cls=MixerConfig,
    build=_build,
    layouts=(
        Layout(
            "timm",
            _TIMM_KEYS,
            signature=(r"stem\.proj\.weight", r"blocks\.0\.mlp_tokens\.fc1\.weight"),
            claims=claims_timm(r"mixer_\w+"),
            read_config=_timm_config,
            write_config=_timm_write,
            preprocessing=timm_preprocessing,
            defaults={"hidden_act": "gelu"},
        ),
        Layout(
            "vit_jax",
            _VIT_JAX_KEYS,
            signature=(r"MixerBlock_0/token_mixing/Dense_0/kernel",),
            # flax's nn.gelu is the tanh approximation
            defaults={"hidden_act": "gelu_pytorch_tanh"},
            files=(),
            config_files=(),
        ),
    ),
    infer_config=_infer_config,
    feature_dim=lambda config: config.hidden_size,
    preprocessing=lambda config: PREPROCESSING.at_size(image_hw(config.image_size)[0]),
    blocks=r"blocks\.\d+",
    norm_types=(LayerNorm,),
    linear_types=(eqx.nn.Linear, PatchEmbedding),
    aliases={
        tag: _alias(config, tag)
        for tag, config in (
            ("mixer_b16_224.goog_in21k_ft_in1k", MIXER_B16),
            ("mixer_b16_224.goog_in21k", MIXER_B16),
            ("mixer_l16_224.goog_in21k_ft_in1k", MIXER_L16),
            ("mixer_l16_224.goog_in21k", MIXER_L16),
        )
    },
    choices=("drop_path_rate",),
    supports_remat=True,
)
"""No ``resize``: a Mixer's input size is fixed."""
