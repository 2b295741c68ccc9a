"""Pieces shared by the ViT family (``vit.py``, ``dinov2.py``), whose transformers names
agree: the embeddings (class token, positions, registers), attention and encoder modules,
config checks, key-map rule builders and timm / transformers config helpers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from ..errors import CheckpointError
from ._arch import (
    TRAINING_FIELDS,
    Preprocessing,
    check_activation,
    check_sizes,
)
from ._layout import Map, packed
from .blockwise import run_blocks
from .layers import (
    ACTIVATIONS,
    PatchEmbedding,
    checkpointed,
    dense,
    image_hw,
    linear,
    multihead_attention,
    resample_grid_traced,
    resample_positions,
)


def check_common(config) -> None:
    """Checks shared by the ViT and DINOv2 configs; normalises a list image_size."""
    if isinstance(config.image_size, list):
        object.__setattr__(config, "image_size", tuple(config.image_size))
    if isinstance(config.image_size, tuple) and config.image_size[0] == config.image_size[1]:
        object.__setattr__(config, "image_size", int(config.image_size[0]))
    check_sizes(config)
    check_activation(config, ACTIVATIONS)
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(
            f"hidden_size {config.hidden_size} is not a multiple of num_attention_heads "
            f"{config.num_attention_heads}."
        )
    h, w = image_hw(config.image_size)
    if h % config.patch_size or w % config.patch_size:
        raise ValueError(
            f"image_size {config.image_size} is not a multiple of patch_size {config.patch_size}."
        )


class PatchEmbeddings(eqx.Module):
    """transformers' ``ViTPatchEmbeddings``: a biased ``projection`` conv, stride = size."""

    projection: PatchEmbedding


class ViTEmbeddings(eqx.Module):
    """Class token, patch tokens plus learned positions, then register tokens (DINOv2 with
    registers): ``(*b, C, H, W) -> (*b, 1 + registers + n, d)``.

    ``position_embeddings (1, 1 + n, d)`` cover the class token and a ``grid`` of patches;
    another input grid resamples the patch positions on the fly (``dynamic``, as
    transformers' DINOv2 does on every call) or is an error (ViT: load the model for that
    size with ``from_pretrained(..., image_size=...)``)."""

    cls_token: Float[Array, "1 1 d"]
    patch_embeddings: PatchEmbeddings
    position_embeddings: Float[Array, "1 n d"]
    register_tokens: Float[Array, "1 r d"] | None
    grid: tuple[int, int] = eqx.field(static=True)
    dynamic: bool = eqx.field(static=True)
    antialias: bool = eqx.field(static=True)

    def __init__(
        self,
        config,
        key: PRNGKeyArray,
        *,
        registers: int = 0,
        dynamic: bool = False,
    ):
        ckey, pkey, ekey, rkey = jax.random.split(key, 4)
        d = config.hidden_size
        self.cls_token = 0.02 * jax.random.normal(ckey, (1, 1, d))
        projection = PatchEmbedding(config.num_channels, d, config.patch_size, pkey, use_bias=True)
        self.patch_embeddings = PatchEmbeddings(projection)
        self.position_embeddings = 0.02 * jax.random.normal(ekey, (1, config.num_positions, d))
        self.register_tokens = (
            0.02 * jax.random.normal(rkey, (1, registers, d)) if registers else None
        )
        self.grid = config.grid
        self.dynamic = dynamic
        self.antialias = config.interpolate_antialias

    def positions(self, grid: tuple[int, int]) -> Float[Array, "n d"]:
        """The position embeddings for a ``grid`` of patches (class position first)."""
        pos = self.position_embeddings[0]
        if grid == self.grid:
            return pos
        patches = pos[1:].reshape(*self.grid, pos.shape[-1])
        patches = resample_grid_traced(patches, grid, antialias=self.antialias)
        return jnp.concatenate([pos[:1], patches.reshape(-1, pos.shape[-1])])

    def __call__(self, x: Float[Array, "*b c h w"]) -> Float[Array, "*b t d"]:
        p = self.patch_embeddings.projection.weight.shape[-1]
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        patches = self.patch_embeddings.projection(x)
        lead, d = patches.shape[:-2], patches.shape[-1]
        cls = jnp.broadcast_to(self.cls_token[0].astype(x.dtype), (*lead, 1, d))
        tokens = jnp.concatenate([cls, patches], axis=-2) + self.positions(grid).astype(x.dtype)
        if self.register_tokens is None:
            return tokens
        registers = self.register_tokens[0].astype(x.dtype)
        registers = jnp.broadcast_to(registers, (*lead, *registers.shape))
        return jnp.concatenate([tokens[..., :1, :], registers, tokens[..., 1:, :]], axis=-2)

    def check_input(self, x: Array, name: str) -> None:
        """A clear error for an input this model cannot take."""
        c, p = self.patch_embeddings.projection.weight.shape[1:3]
        ok = x.ndim in (3, 4) and x.shape[-3] == c
        if ok and self.dynamic:
            ok = x.shape[-2] % p == 0 and x.shape[-1] % p == 0 and x.shape[-1] >= p
        elif ok:
            ok = x.shape[-2:] == (self.grid[0] * p, self.grid[1] * p)
        if not ok:
            want = (
                f"(C={c}, H, W) with H and W multiples of the patch size {p}"
                if self.dynamic
                else f"{(c, self.grid[0] * p, self.grid[1] * p)}"
            )
            raise ValueError(
                f"{name} expects a channel-first image of shape {want} or a batch of them, "
                f"got {x.shape}."
                + (
                    ""
                    if self.dynamic
                    else " Resize/crop to the model's image_size, or load it for another "
                    "size with from_pretrained(..., image_size=N or (H, W))."
                )
            )


class ViTSelfAttention(eqx.Module):
    """The ``query`` / ``key`` / ``value`` projections and ``num_heads``."""

    query: eqx.nn.Linear
    key: eqx.nn.Linear
    value: eqx.nn.Linear
    num_heads: int = eqx.field(static=True)


class ViTSelfOutput(eqx.Module):
    dense: eqx.nn.Linear


class ViTAttention(eqx.Module):
    """Multi-head self-attention, transformers' layout (``attention.{query,key,value}``,
    ``output.dense``): ``(*b, t, d) -> (*b, tq, d)``."""

    attention: ViTSelfAttention
    output: ViTSelfOutput

    def __init__(self, dim: int, heads: int, qkv_bias: bool, key: PRNGKeyArray):
        qkey, kkey, vkey, okey = jax.random.split(key, 4)
        self.attention = ViTSelfAttention(
            linear(dim, dim, qkey, qkv_bias),
            linear(dim, dim, kkey, qkv_bias),
            linear(dim, dim, vkey, qkv_bias),
            heads,
        )
        self.output = ViTSelfOutput(linear(dim, dim, okey))

    def __call__(
        self, x: Float[Array, "*b t d"], queries: Float[Array, "*b tq d"] | None = None
    ) -> Float[Array, "*b tq d"]:
        """Attend from ``queries`` (default: every token of ``x``) to all tokens of ``x``."""
        a = self.attention
        queries = x if queries is None else queries
        q, k, v = dense(a.query, queries), dense(a.key, x), dense(a.value, x)
        return dense(self.output.dense, multihead_attention(q, k, v, a.num_heads))


class ViTEncoder(eqx.Module):
    """The blocks, applied in order (a Python list: ``encoder.layer.N``).

    ``remat`` (static, off by default; set it with ``eqxtl.with_remat``): run each block
    under ``eqx.filter_checkpoint``, so that the backward pass recomputes a block's
    activations from its input instead of keeping them. ``scan`` (static; ``None``, the
    default, and ``True`` scan, ``False`` unrolls: ``eqxtl.with_scan``): runs of
    interchangeable blocks under ``jax.lax.scan``."""

    layer: list
    remat: bool = eqx.field(static=True, default=False)
    scan: bool | None = eqx.field(static=True, default=None)

    def __call__(
        self,
        h: Float[Array, "*b t d"],
        *,
        class_only: bool = False,
        key: PRNGKeyArray | None = None,
        rates: list[float] | None = None,
    ) -> Array:
        """Every block; with ``class_only`` the last computes the class token alone
        ``(*b, 1, d)`` (the other tokens only feed it through keys and values). ``rates``
        (one per block, with a ``key``): drop path (``block_rates``)."""
        n = len(self.layer)
        keys = None if rates is None else list(jax.random.split(key, n))
        if not (class_only and self.layer):
            return run_blocks(
                _run_layer, self.layer, h, keys, rates=rates, scan=self.scan, remat=self.remat
            )
        head = (None, None) if keys is None else (keys[:-1], rates[:-1])
        h = run_blocks(
            _run_layer, self.layer[:-1], h, head[0], rates=head[1], scan=self.scan, remat=self.remat
        )
        last = () if keys is None else (keys[-1], rates[-1])
        return checkpointed(_run_class_only, self.remat)(self.layer[-1], h, *last)


def _run_layer(layer, h: Array, key=None, rate=None) -> Array:
    return layer(h, key=key, drop_rate=rate)


def _run_class_only(layer, h: Array, key=None, rate=None) -> Array:
    return layer(h, first_only=True, key=key, drop_rate=rate)


def runtime_attention_rules(theirs: str, ours: str) -> tuple[Map, ...]:
    """Read-only rules for transformers 5's in-memory attention names (``q_proj`` ...
    ``o_proj``, what ``model.state_dict()`` holds; its files keep the hub names) under the
    layer paths ``theirs`` -> ``ours``."""
    names = {"q_proj": "attention.query", "k_proj": "attention.key", "v_proj": "attention.value"}
    names["o_proj"] = "output.dense"
    return tuple(
        Map(f"{theirs}.attention.{t}", f"{ours}.attention.{o}", save=False)
        for t, o in names.items()
    )


def timm_block_rules(layer: str, names: Mapping[str, str]) -> tuple[Map, ...]:
    """timm ``blocks.{i}`` rules onto a transformers-named ``layer`` (``names``: timm
    sub-module -> ours, besides the packed ``attn.qkv`` and ``attn.proj``)."""
    qkv = ("query", "key", "value")
    return (
        packed("blocks.{i}.attn.qkv.weight", f"{layer}.attention.attention.*.weight", qkv),
        packed("blocks.{i}.attn.qkv.bias", f"{layer}.attention.attention.*.bias", qkv),
        Map("blocks.{i}.attn.proj", f"{layer}.attention.output.dense"),
        *[Map(f"blocks.{{i}}.{theirs}", f"{layer}.{ours}") for theirs, ours in names.items()],
    )


def _patch(value: Any) -> int:
    h, w = image_hw(value, "patch_size")
    if h != w:
        raise CheckpointError(f"eqxtl reads square patches only, got patch_size {value}.")
    return h


def hf_fields(cls: type, hf: Mapping[str, Any], skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields of config class ``cls`` a transformers ``config.json`` dict states (its
    defaults otherwise; ``TRAINING_FIELDS`` and ``skip`` left out), ``image_size`` /
    ``patch_size`` normalised."""
    default = cls()
    skip = (*skip, *TRAINING_FIELDS)
    names = [f.name for f in dataclasses.fields(cls) if f.name not in skip]
    values = {k: hf.get(k, getattr(default, k)) for k in names}
    values["patch_size"] = _patch(values["patch_size"])
    if isinstance(values["image_size"], list):
        values["image_size"] = tuple(values["image_size"])
    return values


def timm_model_args(cfg: Mapping[str, Any], unsupported: Mapping[str, Any]) -> dict[str, Any]:
    """``model_args`` of a timm ``config.json``; ``CheckpointError`` for the ``unsupported``
    values (``{arg: value eqxtl does not build}``) and pooling other than the class token."""
    args = dict(cfg.get("model_args") or {})
    bad = {k: args[k] for k, v in unsupported.items() if k in args and args[k] == v}
    if args.get("global_pool", "token") not in ("token", None):
        bad["global_pool"] = args["global_pool"]
    if bad:
        raise CheckpointError(
            f"timm {cfg['architecture']} has model_args eqxtl does not build: {bad}."
        )
    return args


def timm_size_name(hidden: int) -> str:
    return {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge"}.get(hidden, "base")


def resize_positions(config, tensors: Mapping[str, np.ndarray], image_size: Any):
    """ViT / DINOv2 at another input size (an int or ``(H, W)``): the patch grid of the
    position embeddings resampled bicubically (``config.interpolate_antialias``: timm's
    antialiased filter, else transformers'), the class position kept."""
    try:
        h, w = image_hw(image_size)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    p = config.patch_size
    if h % p or w % p or h < p or w < p:
        raise CheckpointError(f"image_size {image_size} is not a multiple of the patch size {p}.")
    name = "embeddings.position_embeddings"
    pos = np.asarray(tensors[name])[0]
    new = resample_positions(
        pos, 1, config.grid, (h // p, w // p), antialias=config.interpolate_antialias
    )
    size = h if h == w else (h, w)
    return dataclasses.replace(config, image_size=size), {name: new[None]}


def square_preprocessing(default: Preprocessing, image_size: Any) -> Preprocessing:
    """``default`` at the model's input size (the height for a non-square size, whose
    pipeline must resize to ``(H, W)`` itself)."""
    return default.at_size(image_hw(image_size)[0])
