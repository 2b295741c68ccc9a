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
from jaxtyping import Array, Float, PRNGKeyArray

from ..remat import checkpointed
from ._arch import Architecture, Shapes
from .layers import dense as _dense  # plain or LoRA-adapted linears, merged-rows GEMMs

Activation = Literal["quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh"]
_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh")


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


def _linear(in_features: int, out_features: int, key: PRNGKeyArray, use_bias: bool = True):
    return eqx.nn.Linear(in_features, out_features, use_bias=use_bias, key=key)


class LayerNorm(eqx.Module):
    """LayerNorm over the last axis ``(..., d) -> (..., d)``, computed in float32."""

    weight: Float[Array, " d"]
    bias: Float[Array, " d"]
    eps: float = eqx.field(static=True)

    def __init__(self, dim: int, eps: float):
        self.weight = jnp.ones((dim,))
        self.bias = jnp.zeros((dim,))
        self.eps = eps

    def __call__(self, x: Float[Array, "*n d"]) -> Float[Array, "*n d"]:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight + self.bias).astype(x.dtype)


class PatchEmbedding(eqx.Module):
    """Non-overlapping patches -> tokens: ``(*b, C, H, W) -> (*b, H/p * W/p, hidden)``.

    Same weights as torch's ``Conv2d(C, hidden, p, stride=p, bias=False)``, computed as one
    matmul of the patches against the flattened kernel.
    """

    weight: Float[Array, "hidden c p p"]

    def __init__(self, channels: int, hidden: int, patch: int, key: PRNGKeyArray):
        bound = 1.0 / math.sqrt(channels * patch * patch)
        shape = (hidden, channels, patch, patch)
        self.weight = jax.random.uniform(key, shape, minval=-bound, maxval=bound)

    def __call__(self, x: Float[Array, "*b c h w"]) -> Float[Array, "*b n hidden"]:
        hidden, c, p, _ = self.weight.shape
        *lead, _, h, w = x.shape
        gh, gw = h // p, w // p
        patches = x.reshape(*lead, c, gh, p, gw, p)
        patches = jnp.moveaxis(patches, (-5, -3, -1), (-3, -2, -1))  # (*b, gh, gw, c, p, p)
        patches = patches.reshape(-1, c * p * p)
        y = patches @ self.weight.reshape(hidden, -1).astype(x.dtype).T  # one 2-D GEMM
        return y.reshape(*lead, gh * gw, hidden)


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
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "*b tq d"]:
        """Attend from ``queries`` (default: every token of ``x``) to all tokens of ``x``.
        ``key``: dropout of LoRA adapters, if any."""
        queries = x if queries is None else queries
        d, heads = x.shape[-1], self.num_heads
        qk, kk, vk, ok = _split(key, 4)

        def split(y):  # (*b, t, d) -> (*b, t, heads, d / heads)
            return y.reshape(*y.shape[:-1], heads, d // heads)

        q = split(_dense(self.q_proj, queries, key=qk))
        k = split(_dense(self.k_proj, x, key=kk))
        v = split(_dense(self.v_proj, x, key=vk))
        o = jax.nn.dot_product_attention(q, k, v)  # softmax in float32
        return _dense(self.out_proj, o.reshape(queries.shape), key=ok)


def _split(key: PRNGKeyArray | None, n: int) -> list:
    return [None] * n if key is None else list(jax.random.split(key, n))


def _activation(name: str, x: Array) -> Array:
    if name == "quick_gelu":
        # transformers' QuickGELUActivation: x * sigmoid(1.702 x) (openai CLIP).
        return x * jax.nn.sigmoid(1.702 * x)
    # jax.nn.gelu defaults to the tanh approximation; transformers' "gelu" is exact (erf).
    return jax.nn.gelu(x, approximate=name != "gelu")


class MLP(eqx.Module):
    """``fc2(act(fc1(x)))``: ``(*b, t, d) -> (*b, t, d)``."""

    fc1: eqx.nn.Linear
    fc2: eqx.nn.Linear
    activation: str = eqx.field(static=True)

    def __init__(self, dim: int, hidden: int, activation: str, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        self.fc1 = _linear(dim, hidden, k1)
        self.fc2 = _linear(hidden, dim, k2)
        self.activation = activation

    def __call__(
        self, x: Float[Array, "*b t d"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*b t d"]:
        k1, k2 = _split(key, 2)
        return _dense(self.fc2, _activation(self.activation, _dense(self.fc1, x, key=k1)), key=k2)


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
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "*b tq d"]:
        """All tokens ``(*b, t, d)``, or with ``first_only`` just the class token's
        ``(*b, 1, d)`` (the other tokens only feed it through keys and values). ``key``:
        dropout of LoRA adapters, if any."""
        akey, mkey = _split(key, 2)
        h = self.layer_norm1(x)
        if first_only:
            x = x[..., :1, :] + self.self_attn(h, h[..., :1, :], key=akey)
        else:
            x = x + self.self_attn(h, key=akey)
        return x + self.mlp(self.layer_norm2(x), key=mkey)


class Encoder(eqx.Module):
    """``num_hidden_layers`` blocks, applied in order (a Python list: ``encoder.layers.N``).

    ``remat`` (static, off by default; set it with ``eqxtl.with_remat``): run each block
    under ``eqx.filter_checkpoint``, so that the backward pass recomputes a block's
    activations from its input instead of keeping them."""

    layers: list[EncoderLayer]
    remat: bool = eqx.field(static=True, default=False)

    def __init__(self, config: CLIPVisionConfig, key: PRNGKeyArray):
        keys = jax.random.split(key, config.num_hidden_layers)
        self.layers = [EncoderLayer(config, k) for k in keys]


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
                f"(B, *{want}), got {x.shape} (resize/crop to the checkpoint's image_size; "
                "position-embedding interpolation is not supported)."
            )
        return self.pre_layrnorm(self.embeddings(x))

    def hidden_states(self, x: Float[Array, "*b c h w"]) -> Float[Array, "*b t d"]:
        """transformers' ``last_hidden_state``: every token after the last block (class
        token first), before ``post_layernorm``. ``t = 1 + (image_size / patch_size)**2``."""
        h = self._embed(x)
        run = checkpointed(_run_layer, self.encoder.remat)
        for layer in self.encoder.layers:
            h = run(layer, h)
        return h

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
        h = self._embed(x)
        layers = self.encoder.layers
        keys = _split(key, len(layers))
        run = checkpointed(_run_layer, self.encoder.remat)
        for layer, k in zip(layers[:-1], keys, strict=False):
            h = run(layer, h, k)
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
# Checkpoint architecture
# --------------------------------------------------------------------------------------

_VISION = "vision_model."
_HEAD = "classifier."


def _build(config: CLIPVisionConfig, key: PRNGKeyArray) -> CLIPVision:
    return CLIPVision(config, key=key)


def _detect(shapes: Shapes) -> bool:
    return any(k.endswith("patch_embedding.weight") for k in shapes) and any(
        k.endswith("class_embedding") for k in shapes
    )


def _canonical_name(key: str) -> str | None:
    # `clip.` prefixes CLIPSeg files (CLIPSegForImageSegmentation.clip); `vision_model.`
    # prefixes CLIPModel, CLIPVisionModelWithProjection, CLIPForImageClassification and every
    # transformers-4 vision file. transformers-5 CLIPVisionModel files have no prefix.
    name = key.removeprefix("clip.")
    if (
        name.endswith("position_ids")  # non-persistent buffer, saved by old versions
        or name == "logit_scale"
        or name.startswith(("text_model.", "text_projection."))
    ):
        return None
    if name.startswith(_HEAD):
        # eqxtl's own saved heads. A transformers CLIPForImageClassification head loads too,
        # but it was trained on the mean of the patch tokens, not on the pooled class token.
        return "head." + name[len(_HEAD) :]
    return name.removeprefix(_VISION)


def _count_layers(shapes: Shapes) -> int:
    indices = {int(k.split(".")[2]) for k in shapes if k.startswith("encoder.layers.")}
    return max(indices) + 1 if indices else 0


def _infer_config(shapes: Shapes) -> CLIPVisionConfig:
    """Config from canonical shapes alone.

    Not in the weights, so by convention: ``num_attention_heads = hidden_size // 64`` (every
    openai CLIP ViT: B/32, B/16 -> 12, L/14 -> 16); ``hidden_act="quick_gelu"`` and
    ``layer_norm_eps=1e-5`` (openai CLIP). Pass an explicit config otherwise.
    """
    try:
        hidden = shapes["embeddings.class_embedding"][0]
        _, channels, patch, _ = shapes["embeddings.patch_embedding.weight"]
        positions = shapes["embeddings.position_embedding.weight"][0]
        intermediate = shapes["encoder.layers.0.mlp.fc1.weight"][0]
    except KeyError as e:
        msg = f"Cannot infer a CLIP vision config: no {e.args[0]!r} in the checkpoint."
        raise ValueError(msg) from None
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1:
        raise ValueError(f"{positions - 1} patch positions do not form a square grid.")
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
            raise ValueError(f"CLIP needs a square {name}, got {value}.")
        value = value[0]
    return int(value)


def _config_from_hf(hf: Mapping[str, Any]) -> CLIPVisionConfig:
    """From a ``clip_vision_model`` config.json, or a ``clip`` one (its ``vision_config``).

    Missing fields take transformers' ``CLIPVisionConfig`` defaults (= ViT-B/32), as
    transformers does. transformers always writes ``projection_dim`` (default 512), even for
    a CLIPVisionModel without projection: ``reconcile`` settles it from the weights.
    """
    model_type = hf.get("model_type")
    if model_type == "clip":
        vision = hf.get("vision_config") or hf.get("vision_config_dict") or {}
        projection_dim = hf.get("projection_dim", 512)
    elif model_type == "clip_vision_model":
        vision, projection_dim = hf, hf.get("projection_dim", 512)
    else:
        raise ValueError(f"Not a CLIP config.json: model_type {model_type!r}.")
    d = CLIPVisionConfig()
    return CLIPVisionConfig(
        hidden_size=vision.get("hidden_size", d.hidden_size),
        intermediate_size=vision.get("intermediate_size", d.intermediate_size),
        num_hidden_layers=vision.get("num_hidden_layers", d.num_hidden_layers),
        num_attention_heads=vision.get("num_attention_heads", d.num_attention_heads),
        num_channels=vision.get("num_channels", d.num_channels),
        image_size=_square(vision.get("image_size", d.image_size), "image_size"),
        patch_size=_square(vision.get("patch_size", d.patch_size), "patch_size"),
        hidden_act=vision.get("hidden_act", d.hidden_act),
        layer_norm_eps=vision.get("layer_norm_eps", d.layer_norm_eps),
        projection_dim=projection_dim,
    )


def _reconcile(config: CLIPVisionConfig, shapes: Shapes) -> CLIPVisionConfig:
    """``projection_dim`` from the weights: ``None`` without ``visual_projection.weight``."""
    projection = shapes.get("visual_projection.weight")
    return dataclasses.replace(config, projection_dim=None if projection is None else projection[0])


def _config_to_hf(config: CLIPVisionConfig, num_labels: int | None) -> dict:
    # num_labels is ignored: transformers' CLIPForImageClassification pools differently (mean
    # of the patch tokens, no post_layernorm) and takes a full CLIPConfig, so it is no
    # vision-only equivalent of Classifier(CLIPVision). A head is saved as `classifier.*`,
    # which transformers reports as unexpected and skips.
    del num_labels
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
    return out


def _hf_name(canonical: str, with_head: bool) -> str:
    # One layout for every config: what transformers 5 writes for
    # CLIPVisionModelWithProjection (`vision_model.*` + `visual_projection.weight`), also the
    # transformers-4 layout. transformers 5 CLIPVisionModel reads it through its
    # PrefixChange(prefix_to_remove="vision_model") conversion (conversion_mapping.py),
    # with no missing or unexpected keys (checked with 5.23).
    del with_head
    if canonical.startswith("head."):
        return _HEAD + canonical[len("head.") :]
    if canonical == "visual_projection.weight":
        return canonical
    return _VISION + canonical


def _feature_dim(config: CLIPVisionConfig) -> int:
    return config.hidden_size


CLIP_VISION = Architecture(
    name="clip_vision",
    model_types=("clip_vision_model", "clip"),
    config_cls=CLIPVisionConfig,
    build=_build,
    detect=_detect,
    canonical_name=_canonical_name,
    infer_config=_infer_config,
    config_from_hf=_config_from_hf,
    config_to_hf=_config_to_hf,
    hf_name=_hf_name,
    feature_dim=_feature_dim,
    reconcile=_reconcile,
)
