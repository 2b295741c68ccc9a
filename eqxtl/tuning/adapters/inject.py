"""Adding adapters: the layers ``lora`` can adapt, ``lora`` itself and ``lora_spec``."""

from __future__ import annotations

import difflib
import math
import numbers
import re
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import PRNGKeyArray

from ..._util.pytree_paths import closest, keypath_to_str
from ...errors import AdapterError, RuleError
from ...models.heads import Classifier
from ...models.layers import LoRAConv2d, LoRALinear
from ...models.layers.low_rank import (
    ADAPTED_TYPES,
    ADAPTERS,
    adaptable,
    adapted_layers,
    layers_of,
)
from ...models.layers.quantized import as_float
from ...models.registry import ARCHITECTURES, architecture_of
from ..filters import Rule, _compile, _describe, trainable

ADAPTER_RULE = r"(.*\.)?lora_(a|b|magnitude)"
"""The filter rule that matches every adapter leaf (``lora_a``, ``lora_b``,
``lora_magnitude``)."""
_LAYERS = (*ADAPTERS, *ADAPTED_TYPES)


def all_layers(model: Any) -> list[tuple[str, Any]]:
    """``(module path, layer)`` for every linear/conv layer (plain or adapted) of ``model``."""
    return layers_of(model, _LAYERS)


def leaf(module: str, name: str) -> str:
    return f"{module}.{name}" if module else name


def _fan(layer: Any) -> tuple[int, int]:
    """``(fan_in, out)``: the shape of the matrix a layer applies (conv: ``in * kh * kw``)."""
    return math.prod(layer.weight.shape[1:]), layer.weight.shape[0]


def replace_layers(model: Any, new: dict[str, Any]) -> Any:
    """``model`` with the layers at the module paths in ``new`` replaced."""
    is_layer = lambda x: isinstance(x, _LAYERS)  # noqa: E731
    return jtu.tree_map_with_path(
        lambda kp, node: new.get(keypath_to_str(kp), node) if is_layer(node) else node,
        model,
        is_leaf=is_layer,
    )


def _select(model: Any, rules: list[Rule]) -> list[tuple[str, Any]]:
    """The plain layers matched by any rule (a rule matches a layer when it matches the
    layer's ``weight`` path, as a filter rule would). A rule that matches no linear or
    ungrouped convolution layer is a ``RuleError``."""
    layers = all_layers(model)
    candidates = [p for p, layer in layers if adaptable(layer)]
    chosen: dict[str, Any] = {}
    for rule in rules:
        pred = _compile(model, rule)
        hits = [(p, layer) for p, layer in layers if pred(leaf(p, "weight"), layer.weight)]
        done = [p for p, layer in hits if isinstance(layer, ADAPTED_TYPES)]
        if done:
            raise AdapterError(
                f"Rule {_describe(rule)} matches layers that already have adapters: "
                f"{done[:5]}. Merge them first (eqxtl.merge_lora) or leave them out."
            )
        good = [(p, layer) for p, layer in hits if adaptable(layer)]
        if not good:
            hint = _hint(rule, candidates) if isinstance(rule, str) else []
            near = f" Closest adaptable layers: {hint}." if hint else ""
            raise RuleError(
                f"Rule {_describe(rule)} matches no linear or (ungrouped) convolution layer "
                f"of {type(model).__name__}.{near} List them with eqxtl.adapter_targets(model)."
            )
        chosen.update(good)
    return [(p, layer) for p, layer in layers if p in chosen]


def _hint(rule: str, candidates: list[str]) -> list[str]:
    """Adaptable layers whose name looks like the rule's (``.*\\.q_prj`` -> ``q_proj``
    layers), else whose path does."""
    last = re.sub(r"[^\w.]", "", rule.replace("\\.", ".")).strip(".").rsplit(".", 1)[-1]
    by_name: dict[str, str] = {}
    for path in candidates:
        by_name.setdefault(path.rsplit(".", 1)[-1], path)
    names = difflib.get_close_matches(last, by_name, n=3, cutoff=0.5) if last else []
    return [by_name[n] for n in names] or closest(rule, candidates)


def adapter_targets(model: Any) -> list[str]:
    """Module paths of every layer ``lora`` can adapt (linear layers and ungrouped,
    undilated convolutions; depthwise convolutions are left as they are)."""
    return [p for p, layer in all_layers(model) if adaptable(layer)]


def adapter(layer, a, b, magnitude, *, alpha: float, rslora: bool, dropout: float):
    """The adapted version of a plain ``layer`` with the given adapter arrays."""
    common = dict(
        weight=layer.weight,
        bias=layer.bias,
        lora_a=a,
        lora_b=b,
        lora_magnitude=magnitude,
        alpha=float(alpha),
        rslora=bool(rslora),
        dropout=float(dropout),
    )
    if isinstance(layer, eqx.nn.Linear):
        return LoRALinear(
            **common,
            in_features=layer.in_features,
            out_features=layer.out_features,
            use_bias=layer.use_bias,
        )
    return LoRAConv2d(
        **common,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        groups=layer.groups,
    )


def _keyed(model: Any, path: str) -> bool:
    """Whether the layer at ``path`` is called with a key (so its adapter can drop out):
    it matches its backbone's ``Architecture.keyed_layers``."""
    backbone, prefix = model, ""
    if isinstance(model, Classifier):
        backbone, prefix = model.backbone, "backbone."
    try:
        pattern = architecture_of(backbone).keyed_layers
    except TypeError:  # not an eqxtl backbone
        return False
    return (
        bool(pattern)
        and path.startswith(prefix)
        and bool(re.fullmatch(pattern, path[len(prefix) :]))
    )


def check_rank(rank: Any, what: str = "rank") -> int:
    """``rank`` as an ``int``: any integer (NumPy's too) >= 1; bools and floats refused."""
    if isinstance(rank, (bool, np.bool_)) or not isinstance(rank, numbers.Integral) or rank < 1:
        raise AdapterError(f"{what} must be a positive integer (e.g. 8), got {rank!r}.")
    return int(rank)


def check_alpha(alpha: Any, what: str = "alpha") -> float:
    """``alpha`` as a ``float``: a finite number > 0 (the update's scale)."""
    ok = isinstance(alpha, numbers.Real) and not isinstance(alpha, (bool, np.bool_))
    if not ok or not math.isfinite(alpha) or alpha <= 0:
        raise AdapterError(
            f"{what} must be a finite number > 0 (the update is scaled by alpha / rank; "
            f"default alpha = rank), got {alpha!r}."
        )
    return float(alpha)


def check_flag(value: Any, what: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise AdapterError(f"{what} must be True or False, got {value!r}.")
    return bool(value)


def check_dropout(model: Any, paths: list[str], dropout: float) -> None:
    ok = isinstance(dropout, numbers.Real) and not isinstance(dropout, (bool, np.bool_))
    if not ok or not 0.0 <= dropout < 1.0:  # NaN fails the comparison too
        raise AdapterError(
            f"dropout must be a number in [0, 1) (the probability of dropping an adapter "
            f"input), got {dropout!r}."
        )
    unkeyed = [p for p in paths if not _keyed(model, p)]
    if dropout > 0 and unkeyed:
        keyed = [a.name for a in ARCHITECTURES.values() if a.keyed_layers]
        raise AdapterError(
            f"dropout={dropout} cannot reach {len(unkeyed)} of the targeted layers (e.g. "
            f"{unkeyed[:3]}): only the layers of {keyed} backbones that their forward pass "
            "calls with a key (Architecture.keyed_layers) receive the training step's key. "
            "Use dropout=0.0 for these targets."
        )


def lora(
    model: Any,
    targets: Rule | Sequence[Rule],
    *,
    rank: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    dora: bool = False,
    rslora: bool = False,
    key: PRNGKeyArray,
) -> Any:
    """``model`` with every linear/convolution layer matched by ``targets`` adapted.

    - `targets`: filter rules (one or a list; regex on paths, module types, predicates),
      matched against each layer's ``weight`` path: ``r".*\\.(q_proj|v_proj)"``,
      ``"head"``, ``eqx.nn.Linear``. Grouped (depthwise) convolutions are skipped.
    - `rank`: ``r``, ``1 <= r <= min(fan_in, out)`` of every matched layer.
    - `alpha`: the update is scaled by ``alpha / r`` (``alpha / sqrt(r)`` with `rslora`);
      default ``alpha = r``.
    - `dropout`: on the adapters' input during training (when the model is called with a
      key; only layers matching ``Architecture.keyed_layers`` are, e.g. CLIP's encoder
      linears).
    - `dora`: DoRA (weight-decomposed LoRA): a trainable magnitude per output channel.

    ``A`` is drawn like PEFT's (uniform, bound ``1 / sqrt(fan_in)``), ``B`` is zero: the
    adapted model's outputs equal the plain model's exactly.

    >>> model = eqxtl.lora(model, r".*\\.(q_proj|v_proj)", rank=8, key=jax.random.key(0))
    >>> spec = eqxtl.lora_spec(model, "head")
    """
    rules = list(targets) if isinstance(targets, (list, tuple)) else [targets]
    if not rules:
        raise RuleError("lora() needs at least one target rule.")
    rank = check_rank(rank)
    alpha = check_alpha(rank if alpha is None else alpha)
    dora, rslora = check_flag(dora, "dora"), check_flag(rslora, "rslora")
    chosen = _select(model, rules)
    too_big = [(p, _fan(layer)) for p, layer in chosen if rank > min(_fan(layer))]
    if too_big:
        raise AdapterError(
            f"rank {rank} exceeds min(fan_in, out) of {len(too_big)} targeted layers, e.g. "
            f"{too_big[:3]} (path, (fan_in, out)): a rank-{rank} update of these is no "
            "low-rank update. Use a smaller rank or other targets."
        )
    check_dropout(model, [p for p, _ in chosen], dropout)
    # One draw for all A's, sliced in numpy: eager per-shape draws compile once per shape.
    sizes = [rank * _fan(layer)[0] for _, layer in chosen]
    flat = np.asarray(jax.random.uniform(key, (sum(sizes),), jnp.float32, -1.0, 1.0))
    offsets = np.cumsum([0, *sizes])
    new = {}
    for (path, layer), start in zip(chosen, offsets, strict=False):
        fan_in, out = _fan(layer)
        w = layer.weight
        a = flat[start : start + rank * fan_in].reshape(rank, *w.shape[1:]) / math.sqrt(fan_in)
        b = np.zeros((out, rank, *(1,) * (w.ndim - 2)))
        # float32 at least, as PEFT's autocast_adapter_dtype: adapters on a base stored in
        # bfloat16 (eqxtl.quantize) train in float32, like those on an int8 base
        dtype = jnp.promote_types(w.dtype, jnp.float32)
        magnitude = None
        if dora:
            w64 = np.asarray(as_float(w, jnp.float32), np.float64).reshape(out, -1)
            magnitude = jnp.asarray(np.sqrt(np.sum(w64 * w64, axis=1)), dtype)
        a, b = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
        new[path] = adapter(layer, a, b, magnitude, alpha=alpha, rslora=rslora, dropout=dropout)
    return replace_layers(model, new)


def lora_spec(model: Any, *also: Rule) -> Any:
    """Filter spec in which the adapters train, plus whatever ``also`` matches.

    >>> spec = eqxtl.lora_spec(model, "head")   # adapters + the new head
    """
    require_adapters(model, "build a LoRA spec for")
    return trainable(model, ADAPTER_RULE, *also)


def require_adapters(model: Any, what: str) -> list[tuple[str, Any]]:
    layers = adapted_layers(model)
    if not layers:
        raise AdapterError(
            f"Cannot {what} {type(model).__name__}: it has no LoRA/DoRA adapters (already "
            "merged, or never adapted? Add them with eqxtl.lora or eqxtl.load_adapter)."
        )
    return layers
