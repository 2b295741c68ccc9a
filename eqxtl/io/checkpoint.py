"""Tensors <-> modules: fill a shape-only skeleton by name, with one strict key report.

The loader never allocates random weights: the skeleton comes from ``eqx.filter_eval_shape``
(every array is a ``jax.ShapeDtypeStruct``) and each leaf is replaced by the checkpoint
tensor of the same dotted path.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from .._util.pytree_paths import keypath_to_str
from ..errors import CheckpointError, EqxtlError
from ..models._arch import Architecture
from ..models._layout import strip_wrappers
from ..models.layers import set_inference
from ..models.layers.low_rank import int8_layers
from ..models.layers.quantized import (
    Int8Weight,
    NF4Weight,
    int8_weight,
    is_quantized,
    nf4_weight,
)


def _group(names: Iterable[str]) -> list[str]:
    """Collapse ``layers.0.x``, ``layers.1.x``... into ``layers.*.x  (2 keys)``."""
    groups: dict[str, list[str]] = defaultdict(list)
    for n in names:
        groups[re.sub(r"\.\d+(?=\.|$)", ".*", n)].append(n)
    out = []
    for pattern, members in sorted(groups.items()):
        out.append(members[0] if len(members) == 1 else f"{pattern}  ({len(members)} keys)")
    return out


def _is_bfloat16(value) -> bool:
    return np.asarray(value).dtype == jnp.bfloat16


def _report(missing, unexpected, misshaped, source: str, hint: str = "") -> str:
    lines = [f"Checkpoint {source} does not fit the model:"]
    if missing:
        lines.append(f"  missing from the checkpoint ({len(missing)}):")
        lines += [f"    {g}" for g in _group(missing)]
    if unexpected:
        lines.append(f"  unexpected in the checkpoint ({len(unexpected)}):")
        lines += [f"    {g}" for g in _group(unexpected)]
    if misshaped:
        lines.append(f"  wrong shape ({len(misshaped)}):")
        lines += [
            f"    {name}: checkpoint {_fmt(got)}, model expects {_fmt(want)}"
            for name, got, want in misshaped
        ]
    lines.append(
        "Pass ignore=[regex, ...] to from_pretrained to leave keys out (e.g. a classifier "
        "head), or check that the config matches the weights." + (f" {hint}" if hint else "")
    )
    return "\n".join(lines)


def _fmt(x) -> str:
    return x if isinstance(x, str) else str(tuple(x))


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(re.fullmatch(p, name) or re.fullmatch(p + r"\..*", name) for p in patterns)


def canonical_names(
    arch: Architecture, keys: Iterable[str], ignore: Iterable[str] = (), source: str = ""
) -> dict[str, str]:
    """``{canonical name: checkpoint key}`` for the keys of one checkpoint of ``arch`` (in
    whichever of its layouts fits best; packed keys appear once per part). Known buffers
    and foreign towers are dropped; keys matching an ``ignore`` regex (tested on the
    original and the canonical name, or a module prefix of either) are left out."""
    renamed = strip_wrappers(list(keys))
    found = arch.plan(renamed)
    if found is None:
        raise CheckpointError(f"{source or 'checkpoint'} is not a {arch.name} checkpoint.")
    ignore = tuple(ignore)
    return {
        name: renamed[r.key]
        for name, r in found[1].recipes.items()
        if not (_matches(r.key, ignore) or _matches(name, ignore))
    }


def canonicalize(
    arch: Architecture, tensors: Mapping[str, np.ndarray], ignore: Iterable[str] = ()
) -> dict[str, np.ndarray]:
    """Checkpoint tensors (any layout the architecture reads) by canonical name, with the
    layout's tensor surgery applied."""
    renamed = strip_wrappers(list(tensors))
    found = arch.plan(renamed)
    if found is None:
        raise CheckpointError(f"Not a {arch.name} checkpoint.")
    source = {k: tensors[orig] for k, orig in renamed.items()}
    ignore = tuple(ignore)
    return {
        name: r.read(source)
        for name, r in found[1].recipes.items()
        if not (_matches(r.key, ignore) or _matches(name, ignore))
    }


def skeleton(arch: Architecture, config) -> eqx.Module:
    """The backbone with ``ShapeDtypeStruct`` leaves: its structure, no memory."""
    return eqx.filter_eval_shape(arch.build, config, jax.random.key(0))


def array_shapes(model_skeleton) -> dict[str, jax.ShapeDtypeStruct]:
    """``{canonical name: ShapeDtypeStruct}`` of every floating-point tensor a skeleton
    holds (parameters and BatchNorm statistics): what a checkpoint must provide."""
    flat = jax.tree_util.tree_flatten_with_path(model_skeleton)[0]
    return {
        keypath_to_str(kp): leaf
        for kp, leaf in flat
        if isinstance(leaf, jax.ShapeDtypeStruct) and jnp.issubdtype(leaf.dtype, jnp.floating)
    }


def fill(
    model_skeleton,
    tensors: Mapping[str, np.ndarray],
    *,
    source: str = "",
    allow_missing: Iterable[str] = (),
    init_missing=None,
    dtype=None,
    unexplained: Iterable[str] = (),
    hint: str = "",
    quantize: str | None = None,
):
    """Replace every array leaf of ``model_skeleton`` by the tensor of the same path.

    Floating-point tensors keep their stored dtype (float16 / bfloat16 files load as such)
    unless ``dtype`` is given. ``quantize="int8"``: the weights of linear and ungrouped
    convolution layers become ``Int8Weight``s one by one as they are read (what
    ``eqxtl.quantize(model, False, "int8")`` gives, without the float model ever being
    whole); ``quantize="nf4"``: the weights of linear layers become ``NF4Weight``s (as
    ``eqxtl.quantize(model, False, "nf4")``); ``tensors`` may compute its values on demand.

    Raises one ``CheckpointError`` listing every missing, unexpected (including the
    checkpoint keys in ``unexplained``, which no rule of the layout maps), misshaped and
    non-floating key; ``hint`` ends the message.
    Leaves matching ``allow_missing`` may be absent: they are taken from ``init_missing``
    (a real, initialised model of the same structure). Returns ``(model, state)`` in
    inference mode, with BatchNorm statistics moved into ``state``.
    """
    allow_missing = tuple(allow_missing)
    quantized_names = _quantized_names(model_skeleton, quantize)
    flat, treedef = jtu.tree_flatten_with_path(model_skeleton)
    init_leaves = jtu.tree_leaves(init_missing) if init_missing is not None else None
    used, missing, misshaped, leaves = set(), [], [], []
    for i, (kp, leaf) in enumerate(flat):
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            leaves.append(leaf)
            continue
        name = keypath_to_str(kp)
        if name not in tensors:
            if _matches(name, allow_missing) and init_leaves is not None:
                leaves.append(init_leaves[i])
            else:
                missing.append(name)
                leaves.append(leaf)
            continue
        used.add(name)
        value = tensors[name]
        if tuple(value.shape) != tuple(leaf.shape):
            misshaped.append((name, value.shape, leaf.shape))
            leaves.append(leaf)
            continue
        if not np.issubdtype(np.asarray(value).dtype, np.floating) and not _is_bfloat16(value):
            misshaped.append((name, f"dtype {np.asarray(value).dtype}", f"dtype {leaf.dtype}"))
            leaves.append(leaf)
            continue
        if name in quantized_names:  # from the file's values: not rounded to dtype first
            value = _quantized(jnp.asarray(value), name, source, quantize)
        else:
            value = jnp.asarray(value, dtype=dtype)
        leaves.append(value)
    unexpected = sorted(set(tensors) - used) + sorted(unexplained)
    if missing or unexpected or misshaped:
        raise CheckpointError(_report(missing, unexpected, misshaped, source, hint))
    model = jtu.tree_unflatten(treedef, leaves)
    model, state = eqx.nn.make_with_state(lambda: model)()
    return set_inference(model, True), state


_ENCODERS = {"int8": int8_weight, "nf4": nf4_weight}


def _quantized_names(model_skeleton, quantize: str | None) -> frozenset[str]:
    """The weight names ``fill(quantize=...)`` stores quantized (none without ``quantize``):
    int8, those of linear and ungrouped convolution layers; NF4, those of linear layers."""
    if quantize is None:
        return frozenset()
    if quantize not in _ENCODERS:
        raise EqxtlError(
            f"quantize must be None, 'int8' (linear and convolution weights as int8, one "
            f"scale per output channel) or 'nf4' (linear weights as 4-bit NormalFloat, one "
            f"absmax per 64 weights), got {quantize!r}; for bfloat16 weights pass "
            "dtype=jnp.bfloat16."
        )
    layers = int8_layers(model_skeleton)
    if quantize == "nf4":
        layers = [(path, layer) for path, layer in layers if len(layer.weight.shape) == 2]
    return frozenset(f"{path}.weight" if path else "weight" for path, _ in layers)


def _quantized(value: jax.Array, name: str, source: str, quantize: str) -> Int8Weight | NF4Weight:
    q, why = _ENCODERS[quantize](value)
    if q is None:
        raise CheckpointError(
            f"{source}: cannot store {name} as {quantize}: {why}. Load it without quantize= "
            "(and check the file)."
        )
    return q


def state_dict(model, state: eqx.nn.State | None = None) -> dict[str, jax.Array]:
    """Every parameter and BatchNorm statistic of ``model`` by canonical path.

    The inverse of ``fill``: ``fill(skeleton, state_dict(model, state))`` rebuilds both.
    A weight stored quantized (int8 or NF4, ``eqxtl.quantize``) comes out dequantized,
    float32 under its float weight's name (the layout PyTorch libraries read; quantize
    again after loading).
    """
    out = {}
    is_index = lambda x: isinstance(x, eqx.nn.StateIndex)  # noqa: E731
    is_node = lambda x: is_index(x) or is_quantized(x)  # noqa: E731
    for kp, leaf in jtu.tree_flatten_with_path(model, is_leaf=is_node)[0]:
        name = keypath_to_str(kp)
        if is_quantized(leaf):
            out[name] = leaf.dequantize()
        elif is_index(leaf):
            if state is None:
                raise ValueError(f"{name} is a state entry: pass the model's state too.")
            out[name] = state.get(leaf)
        elif eqx.is_array(leaf):
            out[name] = leaf
    return out
