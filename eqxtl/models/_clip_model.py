"""CLIP's vision transformer as modules: ``CLIPVisionConfig``, the blocks (shared with the
text tower and SigLIP) and ``CLIPVision``; ``clip.py`` holds its checkpoint ``Architecture``.

Field names equal the transformers ``CLIPVisionModel`` names without a model prefix, so
``eqxtl.paths(backbone)`` reads ``embeddings.patch_embedding.weight``,
``encoder.layers.3.self_attn.q_proj.weight``, ``pre_layrnorm.weight`` (the typo is in the
weights), ``visual_projection.weight`` ...

One image ``(3, H, W)`` or a batch ``(B, 3, H, W)`` per call (``batch_native``). Matmuls run
in the input's dtype (weights are cast to it); LayerNorm and softmax run in float32.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ._arch import (
    Preprocessing,
    check_activation,
    check_sizes,
)
from .blockwise import run_blocks
from .layers import (
    ACTIVATIONS,
    MLP,
    LayerNorm,
    PatchEmbedding,
    block_rates,
    checkpointed,
    drop_keys,
    drop_path,
    multihead_attention,
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
    ``drop_path_rate``: stochastic depth of the last block (timm's linear rule over the
    blocks; a training choice, not read from or written to files), in ``[0, 1)``; active
    only when the forward pass gets a ``key`` (``fit``'s step passes one).
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
    drop_path_rate: float = 0.0

    def __post_init__(self):
        check_sizes(self)
        check_activation(self, _ACTIVATIONS)
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
CLIP_VIT_L14_336 = dataclasses.replace(CLIP_VIT_L14, image_size=336)
"""openai/clip-vit-large-patch14-336."""


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
        drop_rate: float | Array | None = None,
    ) -> Float[Array, "*b tq d"]:
        """All tokens ``(*b, t, d)``, or with ``first_only`` just the class token's
        ``(*b, 1, d)`` (the other tokens only feed it through keys and values). ``causal``:
        each token attends to itself and the tokens before it (CLIP's text tower). ``key``:
        dropout of LoRA adapters, if any, and with ``drop_rate`` drop path on both residual
        branches."""
        (akey, mkey), (d1, d2) = drop_keys(key, 2, drop_rate)
        h = self.layer_norm1(x)
        if first_only:
            y, x = self.self_attn(h, h[..., :1, :], key=akey), x[..., :1, :]
        else:
            y = self.self_attn(h, causal=causal, key=akey)
        x = x + drop_path(y, drop_rate, d1, example_dims=2)
        return x + drop_path(self.mlp(self.layer_norm2(x), key=mkey), drop_rate, d2, example_dims=2)


class Encoder(eqx.Module):
    """``num_hidden_layers`` blocks, applied in order (a Python list: ``encoder.layers.N``).

    ``remat`` (static, off by default; set it with ``eqxtl.with_remat``): run each block
    under ``eqx.filter_checkpoint``, so that the backward pass recomputes a block's
    activations from its input instead of keeping them. ``scan`` (static; ``None``, the
    default, and ``True`` scan, ``False`` unrolls: ``eqxtl.with_scan``): run runs of
    interchangeable blocks under ``jax.lax.scan`` (one compiled block instead of one per
    layer)."""

    layers: list[EncoderLayer]
    remat: bool = eqx.field(static=True, default=False)
    scan: bool | None = eqx.field(static=True, default=None)

    def __init__(self, config: CLIPVisionConfig, key: PRNGKeyArray):
        keys = jax.random.split(key, config.num_hidden_layers)
        self.layers = [EncoderLayer(config, k) for k in keys]

    def __call__(self, h: Float[Array, "*b t d"]) -> Float[Array, "*b t d"]:
        """Every block in order: ``(*b, t, d) -> (*b, t, d)``."""
        return self.run(self.layers, h)

    def run(
        self, layers: list[EncoderLayer], h: Float[Array, "*b t d"], keys=None, rates=None
    ) -> Float[Array, "*b t d"]:
        """``h`` through ``layers`` (some of ``self.layers``; ``keys``: one per layer, for
        LoRA dropout; ``rates``: one per layer, for drop path), as the flags say."""
        return run_blocks(
            _run_layer, layers, h, keys, rates=rates, scan=self.scan, remat=self.remat
        )


def _run_layer(layer: EncoderLayer, h: Array, key=None, rate=None) -> Array:
    return layer(h, key=key, drop_rate=rate)


def _run_last_layer(layer: EncoderLayer, h: Array, key=None, rate=None) -> Array:
    return layer(h, first_only=True, key=key, drop_rate=rate)


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
        ``key`` drives the dropout of LoRA adapters (``eqxtl.lora``), if any, and drop path
        (``config.drop_path_rate``); CLIP itself has no dropout."""
        layers = self.encoder.layers
        keys = split_key(key, len(layers))
        rates = block_rates(self.config.drop_path_rate, len(layers), key) or [None] * len(layers)
        h = self.encoder.run(layers[:-1], self._embed(x), keys[:-1], rates[:-1])
        if layers:
            # Only the class token is pooled: the last block computes queries, MLP and
            # residual for it alone (what the full block gives that token; ~6% faster).
            last = checkpointed(_run_last_layer, self.encoder.remat)
            h = last(layers[-1], h, keys[-1], rates[-1])
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
