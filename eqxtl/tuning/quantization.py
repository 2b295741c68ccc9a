"""Frozen weights stored small: ``quantize(model, spec, dtype)``.

Only what ``spec`` freezes is stored small, so the training step is the usual one: the
trainable half stays float32 (gradients and optimizer state too), the frozen half costs a
quarter (int8), an eighth (NF4) or half (bfloat16) of its float32 bytes. The quantized
weights are ``eqxtl.models.layers.quantized.Int8Weight`` / ``NF4Weight`` modules.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu

from .._util.pytree_paths import keypath_to_str
from ..errors import EqxtlError
from ..models.layers.low_rank import int8_layers
from ..models.layers.quantized import int8_weight, is_quantized, nf4_weight
from .adapters.inject import replace_layers
from .filters import check_spec, refuse_quantized

_DTYPES = ("int8", "nf4", "bfloat16")


def _dtype_name(dtype: Any) -> str:
    try:
        name = "nf4" if dtype == "nf4" else jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in _DTYPES:
        raise EqxtlError(
            f"quantize: dtype must be 'int8' (frozen linear and convolution weights, one scale "
            f"per output channel), 'nf4' (frozen linear weights, 4-bit NormalFloat) or "
            f"'bfloat16' (every frozen floating-point leaf), got {dtype!r}."
        )
    return name


def _frozen_paths(model: Any, spec: Any) -> dict[str, bool]:
    """``{leaf path: trains}`` for every leaf of ``model`` (``spec`` may be a prefix)."""
    full = jtu.tree_map(lambda on, sub: jtu.tree_map(lambda _: bool(on), sub), spec, model)
    return {keypath_to_str(kp): on for kp, on in jtu.tree_flatten_with_path(full)[0]}


def _dtypes(model: Any) -> list[Any]:
    return [x.dtype for x in jtu.tree_leaves(model) if eqx.is_array(x)]


def _bfloat16(model: Any, spec: Any) -> Any:
    """``model`` with every floating-point array that ``spec`` freezes in bfloat16, but
    scalars: rounding CLIP's temperature would rescale every logit, and save two bytes."""
    full = jtu.tree_map(lambda on, sub: jtu.tree_map(lambda _: bool(on), sub), spec, model)

    def cast(leaf, on):
        floating = eqx.is_array(leaf) and jnp.issubdtype(leaf.dtype, jnp.floating)
        return leaf.astype(jnp.bfloat16) if floating and leaf.ndim and not on else leaf

    def visit(node, node_spec):  # an int8 weight keeps its float32 scale
        return node if is_quantized(node) else jtu.tree_map(cast, node, node_spec)

    small = jtu.tree_map(visit, model, full, is_leaf=is_quantized)
    if _dtypes(small) == _dtypes(model):
        raise EqxtlError(
            f"quantize: spec freezes no float32 leaf of {type(model).__name__} (already "
            "stored small, or everything trains): nothing to store as bfloat16."
        )
    return small


def quantize(model: Any, spec: Any, dtype: Any = "int8") -> Any:
    """``model`` with the leaves that ``spec`` freezes stored small.

    - `spec`: the filter spec you train with (``True`` = trains; ``eqxtl.lora_spec``,
      ``eqxtl.trainable``, ``eqxtl.param_groups``' first output), or ``False`` to store
      everything small (inference). A quantized weight is a module where the array was: build
      the spec (and optimizer) you train with again from the quantized model, with the
      same rules.
    - `dtype`: ``"int8"``: every frozen weight of a linear or ungrouped convolution layer
      (plain or LoRA-adapted) as int8 with one float32 scale per output channel
      (``max |W[o]| / 127``; each element within ``scale / 2`` of the original), other
      leaves as they are. Grouped (depthwise) convolutions stay float: with a few weights
      per output channel their scales save little (13 bytes instead of 36 for a 3x3
      kernel), and their small kernels, many of which nearly sum to zero, carry most of the
      error (a pretrained MBConv network's features: 10.6% relative error with them, 7.5%
      without; docs/guides/small-frozen-weights.md). The layers multiply by the int8
      values and scale their output, converting one layer's weight at a time (the float
      weight is never kept).
      ``"nf4"``: every frozen weight of a linear layer (plain or LoRA-adapted) as QLoRA's
      4-bit NormalFloat, one float32 absmax per block of 64 weights (``NF4Weight``: half
      a byte per weight plus 4 bytes per 64); convolutions stay float. The layers decode one
      layer's weight at a time, in the forward and again in the backward pass.
      ``"bfloat16"``: every frozen floating-point leaf in bfloat16, but scalars (CLIP's
      temperature), which stay float32.

    A quantized linear weight also multiplies as ``W @ x`` (what ``eqx.nn.Linear`` calls),
    so a module of your own that calls its linear layers directly works unchanged.
    Layers compute in their input's dtype as always: float32 by default, bfloat16 with
    ``compute_dtype=jnp.bfloat16`` (``eqxtl.Runtime``, ``task_loss``).

    A weight that ``spec`` trains is never stored small; a spec (or a later
    ``eqxtl.trainable`` / ``param_groups``) that trains a quantized weight, or a leaf stored
    in bfloat16 (whose small updates would round away), is a ``RuleError`` naming it.
    A frozen weight the scheme cannot hold (no element, NaN or infinity) is an
    ``EqxtlError`` naming it. ``save_pretrained`` writes quantized weights
    dequantized (float32, the usual layout); ``from_pretrained`` reads them back as
    float32: quantize again.
    ``merge_lora`` on an int8 base gives float32 merged weights; on a bfloat16 base,
    bfloat16 ones (rounded: keep the adapted model where exact outputs matter). Adapters
    that ``eqxtl.lora`` adds to a base stored small are float32.

    >>> model = eqxtl.lora(model, r".*\\.(q_proj|v_proj)", rank=8, key=key)
    >>> spec = eqxtl.lora_spec(model, "head")
    >>> model = eqxtl.quantize(model, spec, "int8")
    >>> spec = eqxtl.lora_spec(model, "head")  # the same split, for the quantized model
    """
    check_spec(model, spec)
    name = _dtype_name(dtype)
    refuse_quantized(model, spec, "eqxtl.quantize")
    trains = _frozen_paths(model, spec)
    if name == "bfloat16":
        return _bfloat16(model, spec)
    new, convolutions = {}, 0
    encode, scheme, kinds = {
        "int8": (int8_weight, "one scale per output channel", "linear or convolution"),
        "nf4": (nf4_weight, "4-bit NormalFloat, one absmax per 64 weights", "linear"),
    }[name]
    for path, layer in int8_layers(model):  # depthwise convolutions stay float
        w = layer.weight
        weight_path = f"{path}.weight" if path else "weight"
        if is_quantized(w) or not jnp.issubdtype(w.dtype, jnp.floating) or trains[weight_path]:
            continue
        if name == "nf4" and w.ndim != 2:  # convolutions: QLoRA quantizes linear layers
            convolutions += 1
            continue
        q, why = encode(w)
        if q is None:
            raise EqxtlError(
                f"quantize: cannot store {weight_path} as {name} ({scheme}): {why}. Keep it "
                "in float (mark it trainable in spec, or use dtype='bfloat16')."
            )
        new[path] = eqx.tree_at(lambda m: m.weight, layer, q)
    if not new and convolutions:
        raise EqxtlError(
            f"quantize: nf4 stores linear layers only (as QLoRA), and the {convolutions} "
            f"frozen weights of {type(model).__name__} it could take are convolutions: "
            "use dtype='int8' (one scale per output channel) for them."
        )
    if not new:
        raise EqxtlError(
            f"quantize: spec freezes no float {kinds} weight of {type(model).__name__} "
            f"(already quantized, or everything trains): nothing to store as {name}."
        )
    return replace_layers(model, new)
