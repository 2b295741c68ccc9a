"""Dotted leaf paths of any pytree: ``"backbone.encoder.layers.3.mlp.fc1.weight"``.

Paths are the single vocabulary of eqxtl: checkpoint keys, filter rules, optimizer groups
and error messages all speak in them. Equinox field names give the segments, list/tuple
indices give numbers, dict keys give themselves. The ``init`` segment of an
``eqx.nn.StateIndex`` is dropped, so a BatchNorm's running mean is ``...bn.running_mean``
exactly as in a PyTorch state dict.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
from collections.abc import Iterable
from typing import Any

import equinox as eqx
import jax
import jax.tree_util as jtu


def _segment(key: Any) -> str:
    if isinstance(key, jtu.GetAttrKey):
        return key.name
    if isinstance(key, jtu.SequenceKey):
        return str(key.idx)
    if isinstance(key, jtu.DictKey):
        return str(key.key)
    if isinstance(key, jtu.FlattenedIndexKey):
        return str(key.key)
    return str(key).strip(".[]'\"")


def keypath_to_str(keypath: Iterable[Any]) -> str:
    """A JAX key path as a dotted string, with StateIndex ``init`` segments removed."""
    parts = [_segment(k) for k in keypath]
    return ".".join(p for p in parts if p != "init" and p != "")


def _is_array(x: Any) -> bool:
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def leaves_with_paths(tree: Any, *, is_leaf=None) -> list[tuple[str, Any]]:
    """Every array leaf of ``tree`` (arrays or ``ShapeDtypeStruct``) with its dotted path."""
    flat, _ = jtu.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(keypath_to_str(kp), leaf) for kp, leaf in flat if _is_array(leaf)]


def paths(tree: Any) -> list[str]:
    """The dotted paths of every array leaf of ``tree``, in flattening order.

    ```python
    eqxtl.paths(model)[:2]
    # ['backbone.embeddings.class_embedding', 'backbone.embeddings.patch_embedding.weight']
    ```
    """
    return [p for p, _ in leaves_with_paths(tree)]


def map_with_path(fn, tree: Any, *rest: Any, is_leaf=None) -> Any:
    """``jax.tree.map`` whose function also receives the dotted path as first argument."""
    return jtu.tree_map_with_path(
        lambda kp, *xs: fn(keypath_to_str(kp), *xs), tree, *rest, is_leaf=is_leaf
    )


def closest(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """The real paths (or path prefixes) that look most like ``name``, for error messages."""
    candidates = list(candidates)
    prefixes = set()
    for c in candidates:
        parts = c.split(".")
        for i in range(1, len(parts) + 1):
            prefixes.add(".".join(parts[:i]))
    return difflib.get_close_matches(name, sorted(prefixes), n=n, cutoff=0.4)


def first_difference(a: Any, b: Any) -> str:
    """Where two pytrees stop having the same structure, in words (for error messages):
    the first leaf path that differs, or, when every path agrees, that a static field (a
    layer size, an activation) does."""
    pa = [keypath_to_str(kp) for kp, _ in jtu.tree_flatten_with_path(a)[0]]
    pb = [keypath_to_str(kp) for kp, _ in jtu.tree_flatten_with_path(b)[0]]
    for i, (x, y) in enumerate(itertools.zip_longest(pa, pb)):
        if x != y:
            return (
                f"leaf {i} is {x!r} in one and {y!r} in the other "
                f"({len(pa)} leaves against {len(pb)})"
            )
    static = static_difference(a, b)
    if static is None:
        return f"the same {len(pa)} leaf paths, but a static field (a layer size, say) differs"
    where, x, y = static
    return (
        f"the same {len(pa)} leaf paths, but the static field {where} is {x!r} in one and "
        f"{y!r} in the other"
    )


def static_difference(a: Any, b: Any, path: str = "") -> tuple[str, Any, Any] | None:
    """The first static field of an Equinox module (or a node's type) where two pytrees
    differ, as ``(dotted path, value in a, value in b)``; ``None`` if none is found."""
    nodes = (eqx.Module, list, tuple, dict)
    if not (isinstance(a, nodes) or isinstance(b, nodes)):
        return None  # two leaves (a spec's bool against an array, say)
    if type(a) is not type(b):
        return path or "(the root)", type(a).__name__, type(b).__name__
    if isinstance(a, eqx.Module):
        pairs = [
            (f.name, getattr(a, f.name, None), getattr(b, f.name, None), f.metadata.get("static"))
            for f in dataclasses.fields(a)
        ]
    elif isinstance(a, (list, tuple)) and len(a) == len(b):
        pairs = [(str(i), x, y, False) for i, (x, y) in enumerate(zip(a, b, strict=True))]
    elif isinstance(a, dict) and a.keys() == b.keys():
        pairs = [(str(k), a[k], b[k], False) for k in a]
    else:
        return None
    for name, x, y, is_static in pairs:
        where = f"{path}.{name}" if path else name
        if is_static and not _same(x, y):
            return where, x, y
        found = None if is_static else static_difference(x, y, where)
        if found is not None:
            return found
    return None


def _same(x: Any, y: Any) -> bool:
    try:
        return bool(x == y)
    except Exception:  # e.g. an array's ambiguous truth value
        return x is y
