"""Path rules -> filter specs: which leaves train, which stay frozen.

A filter spec is a pytree of bools shaped like the model (``True`` = trains), ready for
``eqx.partition(model, spec)``. Rules are matched against dotted leaf paths
(``eqxtl.paths``) in order, first match wins:

- a string: a full-match regex on the path; a module path such as ``"head"`` or
  ``"backbone.encoder.layers.11"`` also matches everything under it;
- a type (``eqx.nn.LayerNorm``, ``eqxtl.BatchNorm``...): every parameter of every module of
  that type, or of each architecture's own layer of the same kind and name
  (``eqx.nn.LayerNorm`` matches CLIP's float32 ``LayerNorm`` too);
- a callable ``(path, leaf) -> bool``;
- a pair ``(rule, value)``: ``value`` says whether the leaves it matches train.

Only floating-point arrays can ever train; BatchNorm running statistics live in the state,
never in the model, so they never train either.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from .._util.pytree_paths import (
    closest,
    first_difference,
    keypath_to_str,
    leaves_with_paths,
    map_with_path,
    static_difference,
)
from ..errors import RuleError
from ..models.layers.quantized import is_quantized

Rule = str | type | Callable[[str, Any], bool] | tuple[Any, bool]


def _trainable_leaf(leaf: Any) -> bool:
    # ShapeDtypeStruct: specs of shape-only models (eqx.filter_eval_shape), for memory_report
    is_array = eqx.is_array(leaf) or isinstance(leaf, jax.ShapeDtypeStruct)
    return is_array and jnp.issubdtype(leaf.dtype, jnp.inexact)


def _int8(leaf: Any) -> bool:
    return eqx.is_array(leaf) and leaf.dtype == jnp.int8


def _layer_kinds() -> tuple[type, ...]:
    from ..models.registry import ARCHITECTURES

    return tuple(t for a in ARCHITECTURES.values() for t in (*a.norm_types, *a.linear_types))


def _of_kind(node: Any, cls: type) -> bool:
    """``node`` is a ``cls``, or an architecture's own layer of the same kind (same class
    name: ``eqx.nn.LayerNorm`` also means CLIP's float32 ``LayerNorm``, ``eqx.nn.BatchNorm``
    eqxtl's ``BatchNorm``, ``eqx.nn.Conv2d`` eqxtl's ``Conv2d``)."""
    if isinstance(node, cls):
        return True
    kinds = _layer_kinds()
    return isinstance(node, kinds) and any(
        isinstance(node, k) and k.__name__ == cls.__name__ for k in kinds
    )


def _module_prefixes(model: Any, cls: type) -> list[str]:
    flat = jtu.tree_flatten_with_path(model, is_leaf=lambda x: _of_kind(x, cls))[0]
    return [keypath_to_str(kp) for kp, node in flat if _of_kind(node, cls)]


def _under(path: str, prefix: str) -> bool:
    return prefix == "" or path == prefix or path.startswith(prefix + ".")


def _compile(model: Any, rule: Any) -> Callable[[str, Any], bool]:
    """One rule -> a predicate on (path, leaf)."""
    if isinstance(rule, str):
        try:
            pattern = re.compile(rule)
        except re.error as e:
            raise RuleError(f"Rule {rule!r} is not a valid regex: {e}") from None
        return lambda path, leaf: bool(
            pattern.fullmatch(path)
            or any(pattern.fullmatch(path[:i]) for i, c in enumerate(path) if c == ".")
        )
    if isinstance(rule, type):
        prefixes = _module_prefixes(model, rule)
        return lambda path, leaf: any(_under(path, p) for p in prefixes)
    if callable(rule):
        return lambda path, leaf: bool(rule(path, leaf))
    raise RuleError(
        f"Rule {rule!r} is not a regex string, a module type, a (path, leaf) predicate or a "
        "(rule, bool) pair."
    )


def _describe(rule: Any) -> str:
    if isinstance(rule, type):
        return rule.__name__
    if isinstance(rule, str):
        return repr(rule)
    return getattr(rule, "__name__", repr(rule))


def rule_matcher(
    model: Any, rules: list[Any], *, strict: bool = False, what: str = "Rule"
) -> Callable[[str, Any], int | None]:
    """Compile ``rules``; return ``(path, leaf) -> index of the first matching rule``.

    Raises ``RuleError`` naming the closest real paths when a rule matches no array leaf.
    A rule that matches only leaves an earlier rule already claims (first match wins)
    changes nothing: a warning, or a ``RuleError`` with ``strict=True``. ``what`` names a
    rule in messages (``"Group"`` for ``param_groups``).
    """
    predicates = [_compile(model, r) for r in rules]
    leaves = leaves_with_paths(model)
    hits = [[i for i, pred in enumerate(predicates) if pred(path, leaf)] for path, leaf in leaves]
    for i, rule in enumerate(rules):
        if not any(i in h for h in hits):
            hint = closest(rule, [p for p, _ in leaves]) if isinstance(rule, str) else []
            near = f" Closest real paths: {hint}." if hint else ""
            raise RuleError(
                f"{what} {_describe(rule)} matches no parameter of {type(model).__name__}."
                f"{near} List them with eqxtl.paths(model)."
            )
    first = {path: h[0] for (path, _), h in zip(leaves, hits, strict=True) if h}
    for i, rule in enumerate(rules):
        claimed_by = {h[0] for h in hits if i in h}
        catch_all = all(i in h for h in hits)  # a default for the rest is never a mistake
        if i not in claimed_by and not catch_all:
            earlier = ", ".join(f"{j} ({_describe(rules[j])})" for j in sorted(claimed_by))
            message = (
                f"{what} {i} ({_describe(rule)}) matches only parameters that an earlier rule "
                f"already claims (rule {earlier}); the first match wins, so it changes "
                "nothing. Put the more specific rule first, or drop this one."
            )
            if strict:
                raise RuleError(message)
            warnings.warn(message, stacklevel=3)

    def first_match(path: str, leaf: Any) -> int | None:
        if path in first:
            return first[path]
        for i, pred in enumerate(predicates):
            if pred(path, leaf):
                return i
        return None

    return first_match


def _spec(model: Any, rules: tuple[Rule, ...], default: bool, strict: bool) -> Any:
    pairs = [r if isinstance(r, tuple) else (r, not default) for r in rules]
    for pair in pairs:
        if len(pair) != 2 or not isinstance(pair[1], bool):
            raise RuleError(f"Rule pair {pair!r} must be (rule, True|False).")
    match = rule_matcher(model, [r for r, _ in pairs], strict=strict)

    def decide(path: str, leaf: Any) -> bool:
        if not _trainable_leaf(leaf):
            return False
        i = match(path, leaf)
        return default if i is None else pairs[i][1]

    spec = map_with_path(decide, model)
    what = "eqxtl.trainable" if not default else "eqxtl.frozen"
    refuse_untrainable(model, spec, what)
    return spec


def refuse_quantized(model: Any, spec: Any, what: str) -> None:
    """``RuleError`` naming the weights stored quantized (``eqxtl.quantize``) that ``spec``
    (a filter spec for ``model``, or a prefix of one) trains: a quantized weight is frozen."""
    flat = jtu.tree_flatten_with_path(model, is_leaf=is_quantized)
    quantized = [(keypath_to_str(kp), i) for i, (kp, x) in enumerate(flat[0]) if is_quantized(x)]
    if not quantized:
        return
    full = jtu.tree_map(lambda on, sub: jtu.tree_map(lambda _: bool(on), sub), spec, model)
    nodes = flat[1].flatten_up_to(full)
    trains = [path for path, i in quantized if any(jax.tree.leaves(nodes[i]))]
    if trains:
        raise RuleError(
            f"{what}: the spec trains {len(trains)} weight(s) stored quantized (int8 or NF4) "
            "by eqxtl.quantize, "
            f"e.g. {trains[:3]}; a quantized weight is frozen and cannot train. Leave these "
            "layers out of the trainable rules, or choose what trains first and quantize "
            "after: eqxtl.quantize(model, spec) stores only the leaves spec freezes."
        )


def low_precision_paths(trainable_half: Any) -> list[str]:
    """Paths of the floating-point leaves of ``trainable_half`` (``None`` where frozen)
    stored in fewer than 32 bits (bfloat16, float16)."""
    return [
        path
        for path, leaf in leaves_with_paths(trainable_half)
        if jnp.issubdtype(leaf.dtype, jnp.floating) and jnp.finfo(leaf.dtype).bits < 32
    ]


def low_precision_message(what: str, paths: list[str]) -> str:
    """The error for training leaves stored in bfloat16/float16 (``low_precision_paths``)."""
    return (
        f"{what}: the spec trains {len(paths)} leaf(s) stored in bfloat16 or float16, e.g. "
        f"{paths[:3]}. An update smaller than 1/256 of a weight rounds away in bfloat16, so "
        "most optimizer steps would change nothing. Keep what trains in float32: load with "
        "dtype=jnp.float32 (eqxtl.from_pretrained), or choose the spec first and store "
        "only what it freezes small (eqxtl.quantize(model, spec, 'bfloat16')). For "
        "bfloat16 compute, train with compute_dtype=jnp.bfloat16 (eqxtl.Runtime, "
        "eqxtl.task_loss)."
    )


def refuse_untrainable(model: Any, spec: Any, what: str) -> None:
    """``RuleError`` naming the leaves ``spec`` trains that cannot train: stored quantized
    (``refuse_quantized``), or in bfloat16/float16 (their small updates would round away)."""
    refuse_quantized(model, spec, what)
    paths = low_precision_paths(eqx.filter(model, spec))
    if paths:
        raise RuleError(low_precision_message(what, paths))


def trainable(model: Any, *rules: Rule, strict: bool = False) -> Any:
    """Filter spec in which exactly the leaves matched by ``rules`` train.

    A rule that matches nothing is a ``RuleError``; one that matches only leaves an earlier
    rule claims is a warning (``strict=True``: a ``RuleError``).

    >>> spec = eqxtl.trainable(model, "head", r"backbone\\.encoder\\.layers\\.1[01]")
    """
    return _spec(model, rules, default=False, strict=strict)


def frozen(model: Any, *rules: Rule, strict: bool = False) -> Any:
    """Complement of ``trainable``: everything trains except the leaves matched by ``rules``.

    >>> spec = eqxtl.frozen(model, "backbone.embeddings", eqx.nn.LayerNorm)
    """
    return _spec(model, rules, default=True, strict=strict)


def everything(model: Any) -> Any:
    """Filter spec in which every floating-point leaf trains (full fine-tuning)."""
    spec = jax.tree.map(_trainable_leaf, model)
    refuse_untrainable(model, spec, "eqxtl.everything")
    return spec


def check_spec(model: Any, spec: Any) -> None:
    """Raise ``RuleError`` unless ``spec`` is a filter spec for ``model``'s structure (one
    built from another model, another head size or another architecture is not)."""
    try:
        jtu.tree_structure(spec).flatten_up_to(model)
    except (ValueError, TypeError):
        flag = _changed_flag(spec, model)
        if flag is not None:
            function, where, in_spec, in_model = flag
            same_call = (  # a flag's default (None) cannot be set back by the function
                ""
                if in_model is None
                else f"make the same call on the spec, "
                f"spec = eqxtl.{function}(spec, {in_model!r}), or "
            )
            raise RuleError(
                f"This filter spec and the model differ in how their blocks run "
                f"({where} is {in_spec!r} in the spec, {in_model!r} in the model): "
                f"eqxtl.{function} changed one of them after the spec was built. To train "
                f"the model as it is, {same_call}build the spec again from it."
            ) from None
        raise RuleError(
            f"This filter spec was not built for this {type(model).__name__}: "
            f"{first_difference(spec, model)}. Build the spec from the model you train, "
            "e.g. eqxtl.trainable(model, ...) or eqxtl.param_groups(model, ...), after any "
            "change to it (a new head, LoRA, eqxtl.quantize, another checkpoint)."
        ) from None
    wrong = [x for x in jtu.tree_leaves(spec) if not isinstance(x, (bool, np.bool_))]
    wrong = [x for x in wrong if not callable(x)]
    if wrong:
        raise RuleError(
            f"A filter spec holds True / False (or eqx filter functions), not "
            f"{wrong[0]!r} ({type(wrong[0]).__name__}). Build it from rules, e.g. "
            f"eqxtl.trainable(model, {wrong[0] if isinstance(wrong[0], str) else 'head'!r}) "
            "for the leaves a rule matches, or pass "
            "False for a model in which nothing trains."
        )


def _changed_flag(spec: Any, model: Any) -> tuple[str, str, Any, Any] | None:
    """``(function, path, in spec, in model)`` when the first static difference between
    ``spec`` and ``model`` is a flag that ``with_scan`` / ``with_remat`` sets."""
    found = static_difference(spec, model)
    if found is None:
        return None
    where, in_spec, in_model = found
    function = {"scan": "with_scan", "remat": "with_remat"}.get(where.rsplit(".", 1)[-1])
    return None if function is None else (function, where, in_spec, in_model)


def require_trainable(model: Any, spec: Any) -> int:
    """The number of scalar parameters ``spec`` trains; ``RuleError`` when it is zero (or
    when ``spec`` does not fit ``model``): training would change nothing."""
    check_spec(model, spec)
    n = count(model, spec)
    if n == 0:
        raise RuleError(
            f"Nothing trains: the filter spec marks no floating-point parameter of "
            f"{type(model).__name__} as trainable. Choose what trains, e.g. "
            'eqxtl.trainable(model, "head") or eqxtl.param_groups(model, [("head", '
            'optax.adam(1e-3)), (".*", None)]); eqxtl.summary(model, spec) shows the split.'
        )
    return n


def count(model: Any, spec: Any | None = None) -> int:
    """Number of scalar parameters of ``model`` (those marked ``True`` in ``spec``); a
    quantized weight counts as the weights it stands for."""
    if spec is None:
        nodes = jax.tree.leaves(model, is_leaf=is_quantized)
        return sum(_size(x) for x in nodes if is_quantized(x) or _trainable_leaf(x) or _int8(x))
    return sum(size for _, size, on in _zip_spec(model, spec) if on)


def _size(node: Any) -> int:
    """The parameters an array or a quantized weight holds (its logical shape)."""
    return math.prod(node.shape) if is_quantized(node) else node.size


def _zip_spec(model: Any, spec: Any) -> list[tuple[str, int, bool]]:
    """``(path, parameters, spec value)`` for every array leaf and every quantized weight
    (one entry each, its logical size, never trained); the spec must match the model."""
    flat, treedef = jtu.tree_flatten_with_path(model, is_leaf=is_quantized)
    try:
        spec_parts = treedef.flatten_up_to(spec)
    except (ValueError, TypeError):
        check_spec(model, spec)
        raise
    return [
        (keypath_to_str(kp), _size(node), any(jax.tree.leaves(on)))
        for (kp, node), on in zip(flat, spec_parts, strict=True)
        if eqx.is_array(node) or is_quantized(node)
    ]


def _rows(entries: list[tuple[str, int, int, bool]], depth: int) -> list[tuple]:
    """Collapse paths into the coarsest module prefixes whose leaves agree on training."""
    groups: dict[str, list] = {}
    for entry in entries:
        parts = entry[0].split(".")
        groups.setdefault(".".join(parts[: depth + 1]), []).append(entry)
    rows = []
    for prefix, members in groups.items():
        flags = {m[3] for m in members}
        if len(flags) == 1 or all(len(m[0].split(".")) <= depth + 1 for m in members):
            rows.append((prefix, len(members), sum(m[2] for m in members), flags.pop()))
        else:
            rows += _rows(members, depth + 1)
    return rows


def _merge_ranges(rows: list[tuple]) -> list[tuple]:
    """``layers.0 .. layers.9`` with equal status -> one ``layers.0-9`` row."""
    out: list[list] = []
    for name, leaves, params, on in rows:
        m = re.fullmatch(r"(.*)\.(\d+)", name)
        if out and m:
            prev = re.fullmatch(r"(.*)\.(\d+)(?:-(\d+))?", out[-1][0])
            last = prev and int(prev.group(3) or prev.group(2))
            if (
                prev
                and prev.group(1) == m.group(1)
                and out[-1][3] == on
                and last + 1 == int(m.group(2))
            ):
                out[-1] = [
                    f"{m.group(1)}.{prev.group(2)}-{m.group(2)}",
                    out[-1][1] + leaves,
                    out[-1][2] + params,
                    on,
                ]
                continue
        out.append([name, leaves, params, on])
    return [tuple(r) for r in out]


_ADAPTER_LEAF = re.compile(r"(^|\.)lora_(a|b|magnitude)$")


def _adapter_rows(entries: list[tuple[str, int, int, bool]]) -> list[tuple]:
    """LoRA/DoRA leaves (``eqxtl.lora``) as their own rows, one per adapted layer pattern:
    ``backbone.encoder.layers.*.self_attn.q_proj.lora_*``."""
    groups: dict[tuple[str, bool], list[int]] = {}
    for path, _, params, on in entries:
        module = re.sub(r"\.\d+(?=\.)", ".*", _ADAPTER_LEAF.sub("", path))
        group = groups.setdefault((_leaf_name(module) + "lora_*", on), [0, 0])
        group[0] += 1
        group[1] += params
    return [(name, leaves, params, on) for (name, on), (leaves, params) in groups.items()]


def _leaf_name(module: str) -> str:
    return f"{module}." if module else ""


def summary(model: Any, spec: Any, *, print_it: bool = True) -> str:
    """Table of what trains: module groups, leaf counts, parameter counts, share of total.
    LoRA/DoRA adapters get rows of their own (``...q_proj.lora_*``)."""
    entries = [(path, 1, size, on) for path, size, on in _zip_spec(model, spec)]
    total = sum(e[2] for e in entries) or 1
    adapters = [e for e in entries if _ADAPTER_LEAF.search(e[0])]
    rows = _merge_ranges(_rows([e for e in entries if e not in adapters], 0))
    rows += _adapter_rows(adapters)
    width = max([len(r[0]) for r in rows] + [6])
    lines = [f"{'module':<{width}}  {'trains':>6}  {'leaves':>6}  {'params':>12}  {'share':>6}"]
    for name, leaves, params, on in rows:
        flag = "yes" if on else "no"
        lines.append(
            f"{name:<{width}}  {flag:>6}  {leaves:>6}  {params:>12,}  {params / total:>6.1%}"
        )
    n_train = sum(e[2] for e in entries if e[3])
    lines.append(f"trainable: {n_train:,} of {total:,} parameters ({n_train / total:.1%})")
    text = "\n".join(lines)
    if print_it:
        print(text)
    return text
