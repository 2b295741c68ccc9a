"""ResNet v1.5 with transformers' names, and its checkpoint ``Architecture``.

Field names equal the transformers ``ResNetModel`` names without a model prefix, so
``eqxtl.paths(backbone)`` reads ``embedder.embedder.convolution.weight``,
``encoder.stages.1.layers.0.shortcut.normalization.bias``,
``encoder.stages.1.layers.0.layer.1.convolution.weight`` ... and the BatchNorm statistics
(in ``state``) ``....normalization.running_mean`` / ``running_var``.

v1.5 (microsoft/resnet-*, torchvision): a bottleneck block downsamples in its 3x3
convolution, not in the first 1x1 (``downsample_in_bottleneck=True`` gives v1). Blocks use
identity shortcuts where channels and stride are kept, a 1x1 convolution + BatchNorm
otherwise.

Checkpoints load from transformers ``ResNetModel`` files (no prefix),
``ResNetForImageClassification`` files (``resnet.`` prefix, ``classifier.1`` head) and
torchvision/timm files (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``,
``fc``).

One image per call, channel-first ``(C, H, W)``; batch with ``jax.vmap`` (axis name
``"batch"`` for BatchNorm in training mode, see ``eqxtl.batched``). Activations are
channels-last inside (one transpose at the input).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from ..errors import CheckpointError
from ._arch import (
    TRAINING_FIELDS,
    Alias,
    Architecture,
    Layout,
    Meta,
    Preprocessing,
    Shapes,
    check_sizes,
    claims_timm,
    claims_transformers,
    timm_meta,
    timm_preprocessing,
    timm_write,
    transformers_meta,
    transformers_write,
)
from ._layout import Drop, KeyMap, Map
from .layers import (
    CNN_ACTIVATIONS,
    BatchNorm,
    Conv2d,
    activate_after_batchnorm,
    block_rates,
    checkpointed,
    drop_path,
    max_pool,
)
from .layers.schedule import stored_if_forward_only

LayerType = Literal["basic", "bottleneck"]

_REDUCTION = 4
"""Bottleneck width = ``hidden_size // 4`` (fixed in transformers and torchvision)."""


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    """The fields of transformers' ``ResNetConfig`` (same names, same defaults = ResNet-50)."""

    num_channels: int = 3
    embedding_size: int = 64
    hidden_sizes: tuple[int, ...] = (256, 512, 1024, 2048)
    depths: tuple[int, ...] = (3, 4, 6, 3)
    layer_type: LayerType = "bottleneck"
    hidden_act: str = "relu"
    """Activation of the stem and after each residual addition. As in transformers, the
    activations inside a block are always ReLU."""
    downsample_in_first_stage: bool = False
    """Stride 2 in the first block of the first stage (off for every microsoft/resnet-*)."""
    downsample_in_bottleneck: bool = False
    """Stride on the bottleneck's first 1x1 (ResNet v1) instead of its 3x3 (v1.5)."""
    drop_path_rate: float = 0.0
    """Stochastic depth of the last block, in [0, 1): timm's rule, block ``i`` of all ``n``
    at ``rate * i / (n - 1)``, on the residual branch; only with a ``key`` (``fit``'s step
    passes one). A training choice, not read from or written to files."""

    def __post_init__(self):
        # Lists (from JSON) become tuples: the config is a static, hashable field.
        object.__setattr__(self, "hidden_sizes", tuple(int(h) for h in self.hidden_sizes))
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        check_sizes(self)
        if self.layer_type not in ("basic", "bottleneck"):
            raise ValueError(f"layer_type {self.layer_type!r} is not 'basic' or 'bottleneck'.")
        if self.hidden_act not in CNN_ACTIVATIONS:
            raise ValueError(
                f"hidden_act {self.hidden_act!r} is not supported; "
                f"one of {sorted(CNN_ACTIVATIONS)}."
            )
        if not self.depths or len(self.depths) != len(self.hidden_sizes):
            raise ValueError(
                f"depths {self.depths} and hidden_sizes {self.hidden_sizes} must be non-empty "
                "and of the same length (one entry per stage)."
            )
        if min(self.depths) < 1:
            raise ValueError(f"Every stage needs at least one block, got depths {self.depths}.")
        if self.layer_type == "bottleneck":
            bad = [h for h in self.hidden_sizes if h < _REDUCTION]
            if bad:
                raise ValueError(f"Bottleneck hidden_sizes must be >= {_REDUCTION}, got {bad}.")


RESNET18 = ResNetConfig(hidden_sizes=(64, 128, 256, 512), depths=(2, 2, 2, 2), layer_type="basic")
"""microsoft/resnet-18."""
RESNET34 = ResNetConfig(hidden_sizes=(64, 128, 256, 512), depths=(3, 4, 6, 3), layer_type="basic")
"""microsoft/resnet-34."""
RESNET50 = ResNetConfig()
"""microsoft/resnet-50."""
RESNET101 = ResNetConfig(depths=(3, 4, 23, 3))
"""microsoft/resnet-101."""
RESNET152 = ResNetConfig(depths=(3, 8, 36, 3))
"""microsoft/resnet-152."""


# --------------------------------------------------------------------------- modules


@dataclasses.dataclass(frozen=True)
class _ConvSpec:
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    activation: str | None


@dataclasses.dataclass(frozen=True)
class _BlockSpec:
    in_channels: int
    out_channels: int
    stride: int
    convs: tuple[_ConvSpec, ...]

    @property
    def has_shortcut(self) -> bool:
        return self.in_channels != self.out_channels or self.stride != 1


def _block_spec(config: ResNetConfig, cin: int, cout: int, stride: int) -> _BlockSpec:
    """One residual block as transformers builds it (``ResNetBasicLayer`` /
    ``ResNetBottleNeckLayer``): the convolutions inside always use ReLU, the last none."""
    if config.layer_type == "basic":
        convs = (_ConvSpec(cin, cout, 3, stride, "relu"), _ConvSpec(cout, cout, 3, 1, None))
    else:
        mid = cout // _REDUCTION
        first, middle = (stride, 1) if config.downsample_in_bottleneck else (1, stride)
        convs = (
            _ConvSpec(cin, mid, 1, first, "relu"),
            _ConvSpec(mid, mid, 3, middle, "relu"),
            _ConvSpec(mid, cout, 1, 1, None),
        )
    return _BlockSpec(cin, cout, stride, convs)


def _stage_specs(config: ResNetConfig) -> list[list[_BlockSpec]]:
    stages, cin = [], config.embedding_size
    for s, (cout, depth) in enumerate(zip(config.hidden_sizes, config.depths, strict=True)):
        stride = 2 if s > 0 or config.downsample_in_first_stage else 1
        blocks = [_block_spec(config, cin, cout, stride)]
        blocks += [_block_spec(config, cout, cout, 1) for _ in range(depth - 1)]
        stages.append(blocks)
        cin = cout
    return stages


class ConvLayer(eqx.Module):
    """``act(bn(conv(x)))`` with torch's symmetric padding ``kernel // 2``, no conv bias:
    ``(H, W, C_in) -> (H', W', C_out)`` (transformers' ``ResNetConvLayer``)."""

    convolution: Conv2d
    normalization: BatchNorm
    activation: str | None = eqx.field(static=True)

    def __init__(self, spec: _ConvSpec, *, key: PRNGKeyArray):
        self.convolution = Conv2d(
            spec.in_channels,
            spec.out_channels,
            spec.kernel,
            stride=spec.stride,
            padding=spec.kernel // 2,
            use_bias=False,
            key=key,
        )
        self.normalization = BatchNorm(spec.out_channels)
        self.activation = spec.activation

    def __call__(
        self, x: Float[Array, "h w c"], state: eqx.nn.State
    ) -> tuple[Float[Array, "h2 w2 o"], eqx.nn.State]:
        x, state = self.normalization(self.convolution(x), state)
        if self.activation is not None:
            x = activate_after_batchnorm(self.activation, x, self.normalization.inference)
        return x, state


class ShortCut(eqx.Module):
    """Projection shortcut ``bn(conv1x1(x))`` with the block's stride."""

    convolution: Conv2d
    normalization: BatchNorm

    def __init__(self, in_channels: int, out_channels: int, stride: int, *, key: PRNGKeyArray):
        self.convolution = Conv2d(
            in_channels, out_channels, 1, stride=stride, use_bias=False, key=key
        )
        self.normalization = BatchNorm(out_channels)

    def __call__(
        self, x: Float[Array, "h w c"], state: eqx.nn.State
    ) -> tuple[Float[Array, "h2 w2 o"], eqx.nn.State]:
        return self.normalization(self.convolution(x), state)


class ResidualBlock(eqx.Module):
    """Basic (two 3x3) or bottleneck (1x1, 3x3, 1x1) block:
    ``act(layer(x) + shortcut(x))``; ``shortcut`` is ``None`` for the identity."""

    shortcut: ShortCut | None
    layer: list[ConvLayer]
    activation: str = eqx.field(static=True)

    def __init__(self, spec: _BlockSpec, activation: str, *, key: PRNGKeyArray):
        skey, *ckeys = jax.random.split(key, 1 + len(spec.convs))
        self.shortcut = (
            ShortCut(spec.in_channels, spec.out_channels, spec.stride, key=skey)
            if spec.has_shortcut
            else None
        )
        self.layer = [ConvLayer(c, key=k) for c, k in zip(spec.convs, ckeys, strict=True)]
        self.activation = activation

    def __call__(
        self, x: Float[Array, "*n h w c"], state: eqx.nn.State, key=None, drop_rate=None
    ) -> tuple[Float[Array, "*n h2 w2 o"], eqx.nn.State]:
        """``drop_rate`` (with ``key``): drop path on the residual branch, before the add."""
        h = x
        for conv in self.layer:
            h, state = conv(h, state)
        if self.shortcut is not None:
            x, state = self.shortcut(x, state)
        h = drop_path(h, drop_rate, key, example_dims=3)
        last = [self.layer[-1]] + ([self.shortcut] if self.shortcut is not None else [])
        frozen = all(m.normalization.inference for m in last)
        return activate_after_batchnorm(self.activation, h + x, frozen), state


class Stage(eqx.Module):
    """Blocks of one resolution, in order (``layers.N``)."""

    layers: list[ResidualBlock]

    def __init__(self, specs: list[_BlockSpec], activation: str, *, key: PRNGKeyArray):
        keys = jax.random.split(key, len(specs))
        self.layers = [
            ResidualBlock(s, activation, key=k) for s, k in zip(specs, keys, strict=True)
        ]


class Encoder(eqx.Module):
    """The stages in order (``stages.S``).

    ``remat`` (static, off by default; set it with ``eqxtl.with_remat``): run each residual
    block under ``eqx.filter_checkpoint``, so that the backward pass recomputes a block's
    activations from its input instead of keeping them."""

    stages: list[Stage]
    remat: bool = eqx.field(static=True, default=False)

    def __init__(self, config: ResNetConfig, *, key: PRNGKeyArray):
        specs = _stage_specs(config)
        keys = jax.random.split(key, len(specs))
        self.stages = [Stage(s, config.hidden_act, key=k) for s, k in zip(specs, keys, strict=True)]


class Embeddings(eqx.Module):
    """Stem: 7x7/2 convolution + BatchNorm + activation, then 3x3/2 max pooling (padding 1,
    padded with -inf like torch): ``(H, W, C) -> (H/4, W/4, embedding_size)``."""

    embedder: ConvLayer

    def __init__(self, config: ResNetConfig, *, key: PRNGKeyArray):
        spec = _ConvSpec(config.num_channels, config.embedding_size, 7, 2, config.hidden_act)
        self.embedder = ConvLayer(spec, key=key)

    def __call__(
        self, x: Float[Array, "*n h w c"], state: eqx.nn.State
    ) -> tuple[Float[Array, "*n h2 w2 e"], eqx.nn.State]:
        x, state = self.embedder(x, state)
        return max_pool(x, kernel=3, stride=2, padding=1), state


class ResNet(eqx.Module):
    """ResNet backbone: one image ``(C, H, W) -> (features (hidden_sizes[-1],), state)``.

    ``features`` is the global mean of the last stage's output: transformers'
    ``pooler_output`` flattened (the input of ``ResNetForImageClassification``'s
    classifier). ``x`` is normalised as the checkpoint expects (ImageNet mean/std for
    microsoft/resnet-* and torchvision weights).

    Built and loaded in inference mode (BatchNorm uses its running statistics). With
    ``eqx.nn.inference_mode(model, False)`` BatchNorm uses batch statistics over the vmapped
    axis ``"batch"`` and updates the running ones in ``state`` like torch's ``train()``.

    It also takes a batch ``(B, C, H, W) -> (B, d)`` directly (``batch_native``, what
    ``eqxtl.batched`` uses; BatchNorm then reduces over the batch axis itself): the same
    values, and kernel gradients become plain GEMMs over ``B * H * W`` rows.
    """

    batch_native = True  # a class attribute, not a field

    embedder: Embeddings
    encoder: Encoder
    config: ResNetConfig = eqx.field(static=True)
    preprocessing: Preprocessing | None = eqx.field(static=True, default=None)
    """The checkpoint's own preprocessing when its files state one."""

    def __init__(self, config: ResNetConfig, *, key: PRNGKeyArray):
        ekey, nkey = jax.random.split(key)
        self.embedder = Embeddings(config, key=ekey)
        self.encoder = Encoder(config, key=nkey)
        self.config = config

    def feature_map(
        self, x: Float[Array, "*n c h w"], state: eqx.nn.State, key: PRNGKeyArray | None = None
    ) -> tuple[Float[Array, "*n h2 w2 d"], eqx.nn.State]:
        """The last stage's output, channels-last ``(*n, H/32, W/32, hidden_sizes[-1])``
        (transformers' ``last_hidden_state`` is its channel-first transpose). ``key``: drop
        path (``config.drop_path_rate``), if any."""
        if x.ndim not in (3, 4) or x.shape[-3] != self.config.num_channels:
            raise ValueError(
                f"ResNet expects a channel-first image ({self.config.num_channels}, H, W) or a "
                f"batch of them (B, {self.config.num_channels}, H, W), got shape {x.shape}."
            )
        h = jnp.moveaxis(x, -3, -1)
        h, state = self.embedder(h, state)
        run = checkpointed(ResidualBlock.__call__, self.encoder.remat)
        blocks = [block for stage in self.encoder.stages for block in stage.layers]
        rates = block_rates(self.config.drop_path_rate, len(blocks), key)
        if rates is None:
            keys, rates = [None] * len(blocks), [None] * len(blocks)
        else:
            keys = list(jax.random.split(key, len(blocks)))
        for block, k, rate in zip(blocks, keys, rates, strict=True):
            h = stored_if_forward_only(h, block)
            h, state = run(block, h, state, k, rate)
        return h, state

    def __call__(
        self,
        x: Float[Array, "*n c h w"],
        state: eqx.nn.State,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, "*n d"], eqx.nn.State]:
        """``(features (*n, hidden_sizes[-1]), state)``; ``key``: drop path, if any."""
        h, state = self.feature_map(x, state, key)
        return jnp.mean(h, axis=(-3, -2)), state


# --------------------------------------------------------------------------------------
# Checkpoint architecture
# --------------------------------------------------------------------------------------

PREPROCESSING = Preprocessing(
    resize=256,
    crop=224,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    interpolation="bicubic",
)
"""ImageNet eval crop as transformers does it for ``microsoft/resnet-*``
(``ConvNextImageProcessor``, crop_pct 0.875, resample 3): bicubic shortest side
256 = int(224 / 0.875), center crop 224, ImageNet mean/std."""

_BN_BUFFER = Drop(r".*\.num_batches_tracked")

# ---- transformers: the canonical names. ResNetModel files have no prefix;
# ResNetForImageClassification files prefix `resnet.` and hold the head as `classifier.1`.
_TRANSFORMERS_KEYS = KeyMap(
    (
        _BN_BUFFER,
        Map("resnet.embedder", "embedder", save="head"),
        Map("resnet.encoder", "encoder", save="head"),
        Map("embedder", "embedder", save="backbone"),
        Map("encoder", "encoder", save="backbone"),
        Map("classifier.1", "head"),
    ),
    constants=lambda saved: _bn_counters(saved),
)

# ---- torchvision and timm: `conv1, bn1, layer{1..4}.I.{conv,bn}{1,2,3},
# layer{1..4}.0.downsample.{0,1}, fc`.
_BLOCK = "encoder.stages.{s-1}.layers.{b}"
_TORCHVISION_KEYS = KeyMap(
    (
        _BN_BUFFER,
        Map("conv1", "embedder.embedder.convolution"),
        Map("bn1", "embedder.embedder.normalization"),
        Map("layer{s}.{b}.conv{i}", _BLOCK + ".layer.{i-1}.convolution"),
        Map("layer{s}.{b}.bn{i}", _BLOCK + ".layer.{i-1}.normalization"),
        Map("layer{s}.{b}.downsample.0", _BLOCK + ".shortcut.convolution"),
        Map("layer{s}.{b}.downsample.1", _BLOCK + ".shortcut.normalization"),
        Map("fc", "head"),
    ),
    constants=lambda saved: _bn_counters(saved),
)


def _bn_counters(saved) -> dict[str, np.ndarray]:
    """PyTorch BatchNorm's ``num_batches_tracked`` buffer: unused by eqxtl, written so that
    torch loaders find every key they expect."""
    return {
        k.removesuffix("running_mean") + "num_batches_tracked": np.zeros((), np.int64)
        for k in saved
        if k.endswith(".running_mean")
    }


def _build(config: ResNetConfig, key: PRNGKeyArray) -> ResNet:
    return ResNet(config, key=key)


def expected_shapes(config: ResNetConfig) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape of every backbone tensor (parameters and BatchNorm
    statistics) for ``config``, without building anything."""
    out: dict[str, tuple[int, ...]] = {}

    def conv_bn(name: str, o: int, i: int, k: int):
        out[f"{name}.convolution.weight"] = (o, i, k, k)
        for p in ("weight", "bias", "running_mean", "running_var"):
            out[f"{name}.normalization.{p}"] = (o,)

    conv_bn("embedder.embedder", config.embedding_size, config.num_channels, 7)
    for s, stage in enumerate(_stage_specs(config)):
        for b, block in enumerate(stage):
            prefix = f"encoder.stages.{s}.layers.{b}"
            if block.has_shortcut:
                conv_bn(f"{prefix}.shortcut", block.out_channels, block.in_channels, 1)
            for i, c in enumerate(block.convs):
                conv_bn(f"{prefix}.layer.{i}", c.out_channels, c.in_channels, c.kernel)
    return out


_STAGE_LAYER = re.compile(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.")


def _infer_config(shapes: Shapes) -> ResNetConfig:
    """Config from canonical shapes alone (``head.*`` ignored).

    Basic vs bottleneck from whether blocks have a third convolution; depths by counting
    blocks; widths from the convolutions. Not in the weights: ``hidden_act`` (ReLU) and the
    stride placement (v1.5 assumed; ``downsample_in_first_stage`` only shows when the first
    block's shortcut exists without a change of width).
    """
    shapes = {k: tuple(v) for k, v in shapes.items() if not k.startswith("head.")}
    stem = shapes.get("embedder.embedder.convolution.weight")
    if stem is None:
        raise CheckpointError(
            "Not a ResNet checkpoint: no embedder.embedder.convolution.weight (conv1.weight)."
        )
    blocks: dict[int, set[int]] = {}
    for k in shapes:
        m = _STAGE_LAYER.match(k)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if not blocks or sorted(blocks) != list(range(len(blocks))):
        raise CheckpointError(f"ResNet checkpoint with stages {sorted(blocks)}: expected 0..N-1.")
    depths = tuple(max(blocks[s]) + 1 for s in range(len(blocks)))
    bottleneck = "encoder.stages.0.layers.0.layer.2.convolution.weight" in shapes
    last = 2 if bottleneck else 1
    try:
        hidden = tuple(
            shapes[f"encoder.stages.{s}.layers.0.layer.{last}.convolution.weight"][0]
            for s in range(len(depths))
        )
    except KeyError as e:
        raise CheckpointError(f"Cannot infer a ResNet config: no {e.args[0]!r}.") from None
    embedding, channels = stem[0], stem[1]
    first_shortcut = "encoder.stages.0.layers.0.shortcut.convolution.weight" in shapes
    config = ResNetConfig(
        num_channels=channels,
        embedding_size=embedding,
        hidden_sizes=hidden,
        depths=depths,
        layer_type="bottleneck" if bottleneck else "basic",
        downsample_in_first_stage=first_shortcut and embedding == hidden[0],
    )
    want = expected_shapes(config)
    if want != shapes:
        missing = sorted(set(want) - set(shapes))[:5]
        unexpected = sorted(set(shapes) - set(want))[:5]
        wrong = [k for k in sorted(set(want) & set(shapes)) if want[k] != shapes[k]][:5]
        raise CheckpointError(
            f"Cannot infer a ResNet config from these shapes: the closest, {config}, "
            f"differs (missing {missing}, unexpected {unexpected}, wrong shape {wrong}); "
            "pass config= explicitly."
        )
    return config


def _transformers_config(meta: Meta, shapes: Shapes) -> ResNetConfig | None:
    """From a transformers ``config.json`` (``model_type`` ``"resnet"``); missing fields take
    transformers' defaults (ResNet-50)."""
    hf = transformers_meta(meta, "resnet")
    if hf is None:
        return None
    fields = {f.name for f in dataclasses.fields(ResNetConfig)} - set(TRAINING_FIELDS)
    return ResNetConfig(**{k: v for k, v in hf.items() if k in fields})


def _transformers_write(config: ResNetConfig, extra: dict) -> dict[str, dict]:
    """transformers ``config.json``: ``ResNetModel``, or with ``num_labels``
    ``ResNetForImageClassification``."""
    num_labels = extra["num_labels"]
    labels = {}
    if num_labels is not None:
        labels["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
        labels["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
    return transformers_write(
        "resnet",
        "ResNetModel" if num_labels is None else "ResNetForImageClassification",
        config,
        extra,
        num_labels=False,  # transformers reads the count from id2label
        **labels,
    )


_DEPTHS = {
    ((2, 2, 2, 2), "basic"): 18,
    ((3, 4, 6, 3), "basic"): 34,
    ((3, 4, 6, 3), "bottleneck"): 50,
    ((3, 4, 23, 3), "bottleneck"): 101,
    ((3, 8, 36, 3), "bottleneck"): 152,
}


def _timm_config(meta: Meta, shapes: Shapes) -> ResNetConfig | None:
    """timm's plain ``resnetN`` is v1.5 with ReLU, as torchvision's: the shapes say the rest."""
    return None if timm_meta(meta) is None else _infer_config(shapes)


def _timm_write(config: ResNetConfig, extra: dict) -> dict[str, dict]:
    depth = _DEPTHS.get((config.depths, config.layer_type))
    expansion = _REDUCTION if config.layer_type == "bottleneck" else 1
    return timm_write(
        f"resnet{depth}" if depth else "resnet50",
        extra,
        {"layers": list(config.depths), "channels": [h // expansion for h in config.hidden_sizes]},
        num_features=config.hidden_sizes[-1],
        global_pool="avg",
    )


def _feature_dim(config: ResNetConfig) -> int:
    return config.hidden_sizes[-1]


_SIGNATURE_TV = (r"conv1\.weight", r"layer1\.0\.conv1\.weight")

RESNET = Architecture(
    name="resnet",
    config_cls=ResNetConfig,
    build=_build,
    layouts=(
        Layout(
            "transformers",
            _TRANSFORMERS_KEYS,
            signature=(r"(resnet\.)?embedder\.embedder\.convolution\.weight",),
            claims=claims_transformers("resnet"),
            read_config=_transformers_config,
            write_config=_transformers_write,
        ),
        Layout(
            "torchvision",
            _TORCHVISION_KEYS,
            signature=_SIGNATURE_TV,
            files=("model.pth",),
            config_files=(),
        ),
        Layout(
            "timm",
            _TORCHVISION_KEYS,
            signature=_SIGNATURE_TV,
            claims=claims_timm(r"resnet\d+"),
            read_config=_timm_config,
            write_config=_timm_write,
            preprocessing=timm_preprocessing,
        ),
    ),
    infer_config=_infer_config,
    feature_dim=_feature_dim,
    preprocessing=lambda config: PREPROCESSING,
    blocks=r"encoder\.stages\.\d+\.layers\.\d+",
    norm_types=(BatchNorm,),
    linear_types=(Conv2d,),
    aliases={
        f"resnet{depth}": Alias(globals()[f"RESNET{depth}"], f"microsoft/resnet-{depth}")
        for depth in (18, 34, 50, 101, 152)
    },
    choices=("drop_path_rate",),
    supports_remat=True,
)
