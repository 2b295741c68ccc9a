"""Folding adapters into the weights (``merge_lora``) and taking them out (``unmerge_lora``)."""

from __future__ import annotations

import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from ...errors import AdapterError
from ...models.layers import Conv2d, LoRALinear
from ...models.layers.low_rank import (
    ADAPTED_TYPES,
    dora_scale,
)
from ...models.layers.quantized import as_float, is_quantized
from .inject import all_layers, replace_layers, require_adapters


def _plain(layer, weight, bias):
    """A plain ``eqx.nn.Linear`` / ``Conv2d`` with ``layer``'s configuration."""
    if isinstance(layer, LoRALinear):
        template = eqx.filter_eval_shape(
            eqx.nn.Linear,
            layer.in_features,
            layer.out_features,
            use_bias=layer.use_bias,
            key=jax.random.key(0),
        )
    else:
        out, cin, kernel, _ = layer.weight.shape
        template = eqx.filter_eval_shape(
            Conv2d,
            cin * layer.groups,
            out,
            kernel,
            stride=layer.stride[0],
            padding=layer.padding,
            dilation=layer.dilation[0],
            groups=layer.groups,
            use_bias=layer.bias is not None,
            key=jax.random.key(0),
        )
    if bias is None:
        return eqx.tree_at(lambda m: m.weight, template, weight)
    return eqx.tree_at(lambda m: (m.weight, m.bias), template, (weight, bias))


def _per_channel(g, weight):
    return g.reshape(-1, *(1,) * (weight.ndim - 1))


@eqx.filter_jit  # one compilation for all layers, not one per weight shape
def _merged_weights(layers: list) -> list:
    out = []
    for layer in layers:
        w = as_float(layer.weight, jnp.float32) + layer.delta().astype(jnp.float32)
        if layer.lora_magnitude is not None:
            w = _per_channel(dora_scale(layer), w) * w
        out.append(w.astype(layer.weight.dtype))
    return out


@eqx.filter_jit
def _unmerged_weights(layers: list, merged: list) -> list:
    out = []
    for layer, w_merged in zip(layers, merged, strict=True):
        w = w_merged.astype(jnp.float32)
        if layer.lora_magnitude is not None:
            w = w / _per_channel(dora_scale(layer), w)
        out.append((w - layer.delta().astype(jnp.float32)).astype(w_merged.dtype))
    return out


def merge_lora(model: Any) -> Any:
    """The plain model with every adapter folded into its weights: ``W + s B A`` (DoRA:
    ``m * (W + s B A) / ||W + s B A||`` per output channel). Same outputs as the adapted
    model (up to float rounding); ``save_pretrained`` writes it like any plain model.

    Refuses a model without adapters (merging twice). An adapted layer whose base is stored
    quantized (int8 or NF4, ``eqxtl.quantize``) is dequantized: its merged weight is
    float32, the dequantized base plus ``s B A`` (the base's quantization error included);
    quantize again to store it small."""
    layers = require_adapters(model, "merge")
    weights = _merged_weights([layer for _, layer in layers])
    new = {p: _plain(layer, w, layer.bias) for (p, layer), w in zip(layers, weights, strict=True)}
    return replace_layers(model, new)


def unmerge_lora(merged: Any, adapted: Any) -> Any:
    """Take the adapters of ``adapted`` back out of ``merged`` (= ``merge_lora(adapted)``,
    possibly trained further): the adapted model again, with base weights
    ``W_merged - s B A`` (DoRA: ``W_merged * ||W + s B A|| / m - s B A``, the norm from
    ``adapted``) and every other leaf from ``merged``.

    A merged model holds no adapters (it is a plain model, the point of merging), so the
    adapters come from ``adapted``; the base weights it returns equal the original ones up
    to float rounding. A base stored quantized in ``adapted`` (int8, NF4) comes back as
    float32 (``merge_lora`` dequantized it): ``eqxtl.quantize`` it again to store it small."""
    adapters = dict(require_adapters(adapted, "take adapters from"))
    plain = dict(all_layers(merged))
    still = [p for p, layer in plain.items() if isinstance(layer, ADAPTED_TYPES)]
    if still:
        raise AdapterError(
            f"unmerge_lora: the first argument still has adapters ({still[:3]}); pass the "
            "merged (plain) model first, then the adapted one."
        )
    wrong = [
        p
        for p, layer in adapters.items()
        if p not in plain or plain[p].weight.shape != layer.weight.shape
    ]
    if wrong:
        raise AdapterError(
            f"unmerge_lora: {len(wrong)} adapted layers have no plain layer of the same shape "
            f"in the merged model, e.g. {wrong[:3]}: it was not merged from this model."
        )
    stored = [p for p in adapters if is_quantized(plain[p].weight)]
    if stored:
        raise AdapterError(
            f"unmerge_lora: the merged model stores {len(stored)} of these weights quantized "
            f"(eqxtl.quantize after merging), e.g. {stored[0]}.weight: the adapters cannot be "
            "taken back out of rounded weights. Pass the float merged model (merge_lora's "
            "output before quantize)."
        )
    weights = _unmerged_weights(list(adapters.values()), [plain[p].weight for p in adapters])
    new = {
        p: dataclasses.replace(layer, weight=w, bias=plain[p].bias)
        for (p, layer), w in zip(adapters.items(), weights, strict=True)
    }
    return replace_layers(merged, new)
