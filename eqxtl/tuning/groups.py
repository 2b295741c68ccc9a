"""Per-group optimizers over the trainable partition only.

``param_groups(model, [(rule, transform_or_None), ...])`` returns ``(spec, optimizer)``.
The optimizer is an ``optax.partition`` (multi_transform) that is initialised and updated on
``eqx.partition(model, spec)[0]``: frozen leaves are ``None`` there, so they hold no
optimizer state and no transform (weight decay included) ever sees them.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.tree_util as jtu
import optax

from .._util.checks import count, real
from .._util.pytree_paths import keypath_to_str, leaves_with_paths, map_with_path
from ..errors import OptimizerMismatchError
from ..models.registry import backbones_in
from .filters import (
    Rule,
    RuleError,
    _trainable_leaf,
    refuse_untrainable,
    rule_matcher,
)

FROZEN = "frozen"


def _checked(tx: optax.GradientTransformation, treedef, n_params: int):
    """``tx`` that refuses parameters whose structure is not the one it was built for."""

    def check(params, what):
        got = jax.tree.structure(params)
        if got != treedef:
            raise OptimizerMismatchError(
                f"This optimizer was built by eqxtl.param_groups for a model with "
                f"{n_params} trainable leaves, but {what} has {got.num_leaves} leaves of a "
                "different structure. Build the optimizer from this model (and its filter "
                "spec), and pass eqx.partition(model, spec)[0]."
            )

    def init(params):
        check(params, "init() got parameters that")
        return tx.init(params)

    def update(updates, state, params=None):
        check(updates, "update() got gradients that")
        return tx.update(updates, state, params)

    return optax.GradientTransformation(init, update)


def param_groups(
    model: Any,
    groups: Sequence[tuple[Rule, optax.GradientTransformation | None]],
    *,
    strict: bool = False,
    clip_global_norm: float | None = None,
) -> tuple[Any, optax.GradientTransformation]:
    """``(spec, optimizer)`` from ordered ``(rule, transform)`` pairs; first match wins.

    ``None`` as transform freezes what the rule matches. Every floating-point leaf must be
    covered by some rule: end with ``(".*", None)`` to freeze the rest, or with
    ``(".*", tx)`` to train it. A group whose rule matches only leaves that an earlier
    group claims trains nothing: a warning, or a ``RuleError`` with ``strict=True``.

    ``clip_global_norm=1.0``: gradient clipping by global norm (timm's ``--clip-grad``,
    big_vision's ``grad_clip_norm``): ``optax.clip_by_global_norm`` over the gradients of
    every trainable leaf together (frozen leaves have none), before the groups' transforms.

    >>> spec, opt = eqxtl.param_groups(model, [
    ...     ("head", optax.adam(1e-3)),
    ...     ("backbone.encoder.layers.1[01]", optax.adam(1e-5)),
    ...     (".*", None),
    ... ])
    >>> opt_state = opt.init(eqx.partition(model, spec)[0])
    """
    if clip_global_norm is not None:
        clip_global_norm = real(
            clip_global_norm,
            "param_groups(clip_global_norm=...) (or None)",
            RuleError,
            low=0,
            low_open=True,
        )
    rules = [rule for rule, _ in groups]
    transforms = [tx for _, tx in groups]
    for rule, tx in groups:
        if tx is not None and not isinstance(tx, optax.GradientTransformation):
            raise RuleError(
                f"Group {rule!r}: expected an optax transformation or None, got {tx!r}."
            )
    match = rule_matcher(model, rules, strict=strict, what="Group")
    uncovered = []

    def label(path: str, leaf: Any):
        if not _trainable_leaf(leaf):
            return FROZEN
        i = match(path, leaf)
        if i is None:
            uncovered.append(path)
            return FROZEN
        return FROZEN if transforms[i] is None else f"group{i}"

    labels = map_with_path(label, model)
    if uncovered:
        shown = ", ".join(uncovered[:5]) + (" ..." if len(uncovered) > 5 else "")
        raise RuleError(
            f"{len(uncovered)} parameter(s) match no group: {shown}. Add a final "
            '(".*", None) group to freeze them or (".*", transform) to train them.'
        )
    spec = jax.tree.map(lambda lab: lab != FROZEN, labels)
    refuse_untrainable(model, spec, "eqxtl.param_groups")
    trainable_labels, _ = eqx.partition(labels, spec)
    used = {lab for lab in jax.tree.leaves(trainable_labels)}
    tx_by_label = {f"group{i}": tx for i, tx in enumerate(transforms) if f"group{i}" in used}
    if not tx_by_label:
        raise RuleError("No group trains anything: every matching transform is None.")
    # A module-shaped label tree is callable (eqx.Module has __call__), and optax would take
    # it for a label *function*: always hand optax a function.
    optimizer = optax.partition(tx_by_label, lambda params: trainable_labels)
    if clip_global_norm is not None:
        optimizer = optax.chain(optax.clip_by_global_norm(clip_global_norm), optimizer)
    treedef = jax.tree.structure(eqx.filter(model, spec))
    return spec, _checked(optimizer, treedef, treedef.num_leaves)


def _block_of(model: Any) -> Callable[[str], str | None]:
    """``block_of(path)``: the block (module path) a leaf path lies in, or None; blocks are
    what each backbone's architecture declares (``Architecture.blocks``)."""
    patterns = [
        re.compile(re.escape(prefix) + f"({arch.blocks})" + r"(?:\.|$)")
        for prefix, _, arch in backbones_in(model)
    ]

    def block_of(path: str) -> str | None:
        for pattern in patterns:
            m = pattern.match(path)
            if m:
                return path[: m.end(1)]
        return None

    return block_of


def blocks(model: Any) -> list[str]:
    """Paths of the model's repeated blocks in forward order, as its architecture declares
    them: transformer layers (``encoder.layers.N``), ResNet blocks
    (``encoder.stages.S.layers.N``), EfficientNet blocks (``_blocks.N``)..."""
    block_of = _block_of(model)
    found: dict[str, None] = {}
    for kp, _ in jtu.tree_flatten_with_path(model)[0]:
        block = block_of(keypath_to_str(kp))
        if block is not None:
            found.setdefault(block)
    if not found:
        raise RuleError(
            f"{type(model).__name__} has no blocks: it holds no eqxtl backbone whose "
            "architecture declares them."
        )
    return list(found)


def last_blocks(model: Any, n: int) -> list[str]:
    """Rules matching the last ``n`` blocks (see ``blocks``), for "train the top n" specs:
    ``eqxtl.trainable(model, "head", *eqxtl.last_blocks(model, 2))``."""
    n = count(n, "last_blocks(model, n)", RuleError)
    found = blocks(model)
    if n > len(found):
        raise RuleError(
            f"last_blocks(model, {n}): {type(model).__name__} has {len(found)} blocks. Ask for "
            f"at most {len(found)}, or train everything with eqxtl.everything(model)."
        )
    return [re.escape(b) for b in found[-n:]]


def layer_depths(model: Any) -> tuple[Callable[[str], int], int]:
    """``(depth_of(path), num_blocks)`` for layer-wise LR decay.

    Depth 0 is the stem (everything before the first block: embeddings, first conv),
    ``1..L`` the blocks in order (see ``blocks``), ``L + 1`` everything after (final
    norms, heads).
    """
    order = {b: i + 1 for i, b in enumerate(blocks(model))}
    block_of = _block_of(model)
    paths = [keypath_to_str(kp) for kp, _ in jtu.tree_flatten_with_path(model)[0]]
    first = next(i for i, p in enumerate(paths) if block_of(p) is not None)
    stem = set(paths[:first])

    def depth_of(path: str) -> int:
        block = block_of(path)
        if block is not None:
            return order[block]
        return 0 if path in stem else len(order) + 1

    return depth_of, len(order)


def layerwise_groups(
    model: Any,
    make_transform: Callable[[float], optax.GradientTransformation],
    base_lr: float,
    decay: float,
    *,
    frozen: Sequence[Rule] = (),
) -> list[tuple[Rule, optax.GradientTransformation | None]]:
    """Groups for ``param_groups`` with layer-wise learning-rate decay (BEiT/ELECTRA style).

    A leaf at depth ``d`` of ``L + 1`` (see ``layer_depths``) gets
    ``base_lr * decay ** (L + 1 - d)``: the head trains at ``base_lr``, each block below
    at ``decay`` times the one above. ``make_transform(lr)`` builds each group's optimizer,
    e.g. ``lambda lr: optax.adamw(lr, weight_decay=0.05)``. ``frozen`` rules come first.

    On a two-tower model (CLIP, SigLIP with ``towers="both"``) the depths count the image
    tower's blocks; the text tower sits at the head's depth, and a warning says so while it
    trains: freeze it (``frozen=["text_model"]``) or give it a group of its own.
    """
    depth_of, n = layer_depths(model)
    frozen_match = rule_matcher(model, list(frozen)) if frozen else lambda path, leaf: None
    by_depth: dict[int, float] = {}
    for kp, leaf in jtu.tree_flatten_with_path(model)[0]:
        path = keypath_to_str(kp)
        if _trainable_leaf(leaf) and frozen_match(path, leaf) is None:
            by_depth.setdefault(depth_of(path), 0)
    _warn_other_towers(model, depth_of, n, frozen_match)
    groups: list[tuple[Rule, Any]] = [(rule, None) for rule in frozen]
    for d in sorted(by_depth):
        lr = base_lr * decay ** (n + 1 - d)
        groups.append((_depth_rule(depth_of, d), make_transform(lr)))
    return groups


_LAYER = re.compile(r"(^|\.)layers?\.\d+\.")


def _warn_other_towers(model, depth_of, n: int, frozen_match) -> None:
    """Warn when trained leaves that sit in numbered layers outside the counted blocks (a
    two-tower CLIP's text tower) fall to the head's depth, and so train at ``base_lr``."""
    others = [
        path
        for path, leaf in leaves_with_paths(model)
        if _trainable_leaf(leaf)
        and depth_of(path) == n + 1
        and _LAYER.search(path)
        and frozen_match(path, leaf) is None
    ]
    if others:
        warnings.warn(
            f"layerwise_groups: {len(others)} trained leaves lie in layers outside the "
            f"{n} blocks the decay counts (e.g. {others[0]}: another tower), so they train "
            "at the head's base_lr. Freeze them (frozen=[...]) or give them a group of their "
            "own before these.",
            stacklevel=3,
        )


def _depth_rule(depth_of: Callable[[str], int], d: int) -> Callable[[str, Any], bool]:
    def at_depth(path: str, leaf: Any) -> bool:
        return depth_of(path) == d

    at_depth.__name__ = f"depth=={d}"
    return at_depth


_NO_DECAY = r"(class_embedding|position_embedding|cls_token|register_tokens)"


def decay_mask(params: Any) -> Any:
    """Bool pytree: ``True`` where weight decay applies.

    Off for biases, every normalisation layer's parameters (any module class named
    ``*Norm``: LayerNorm, BatchNorm, GroupNorm, RMSNorm), embeddings (class and position)
    and any other 0/1-D parameter; on for matrices and convolution kernels. Use as
    ``optax.adamw(lr, weight_decay=wd, mask=eqxtl.decay_mask)``.
    """
    is_norm = lambda x: isinstance(x, eqx.Module) and type(x).__name__.endswith("Norm")  # noqa: E731
    flat = jtu.tree_flatten_with_path(params, is_leaf=is_norm)[0]
    norm_paths = {keypath_to_str(kp) for kp, node in flat if is_norm(node)}

    def decide(path: str, leaf: Any) -> bool:
        if not eqx.is_array(leaf) or leaf.ndim < 2 or re.search(_NO_DECAY, path):
            return False
        return not any(path == n or path.startswith(n + ".") for n in norm_paths)

    return map_with_path(decide, params)
