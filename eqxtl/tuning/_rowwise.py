"""Running an optax update once per row, vectorised over rows of stacked blocks.

The groundwork for storing interchangeable blocks stacked (one ``(rows, ...)`` array per
kind of weight; benchmarks/README.md, "Stored stacked"). An optimizer built by the user sees the
per-row tree (one leaf per weight of each block, as today). Giving it the stacked leaves
instead would change what per-leaf transforms compute: an ``ndim``-based weight-decay mask
would decay the stacked biases, LAMB's trust ratio and Adafactor's factored moments would
span every row. So the stacked rows are never shown to the optimizer as one leaf: its
``update`` runs on one row, ``jax.vmap``-ed over the rows, which is exact when the update is

1. *separable*: each row leaf's update, and the optimizer state it owns, depend only on its
   own gradient, parameter and state, and on global state (Adam's step count) that depends
   on no parameter (``optax.clip_by_global_norm`` and ``optax.MultiSteps`` are not: they
   read every gradient);
2. *the same for every row*: in a run of interchangeable rows, position ``k``'s computation
   (primitives, their parameters, literals, constants, shapes) is identical in every row
   (per-layer learning rates, e.g. layer-wise decay, are not).

``rowwise_refusal`` checks both on the jaxpr of ``optimizer.update`` traced on the per-row
tree (abstractly: nothing is allocated); ``Vectorised`` gives the packed ``init`` and
``update``. Variables read by a nested computation (``jit``, ``cond``, ``scan``) count as
read by all of its outputs: the check may refuse an exact case, never accept a wrong one.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.extend import core as jcore

from .._util import heap
from ..errors import OptimizerMismatchError

Rows = Sequence[Sequence[int]]
"""A segment: ``rows[r][k]`` is the flat index (in ``jax.tree.leaves(params)``) of position
``k`` of row ``r``; positions are interchangeable across rows (same shape and dtype)."""


@dataclasses.dataclass(frozen=True)
class _Traced:
    """``optimizer.update`` traced on the per-row tree, with what each output reads.

    Inputs are numbered: gradients ``[0, n_params)``, state ``[n_params, n_params +
    n_state)``, parameters after; outputs: updates ``[0, n_params)``, then the new state.
    """

    jaxpr: Any
    n_params: int
    n_state: int
    reads: list[frozenset[int]]  # per output: the inputs it depends on
    init_reads: list[frozenset[int]]  # per state leaf of ``init``: the parameters it reads
    owner: dict[int, int | None]  # state slot -> the parameter owning it (None: global)
    consts: tuple = ()  # ``_value`` of each of ``jaxpr.constvars``, computed once

    def param_of_input(self, i: int) -> int | None:
        if i < self.n_params:
            return i
        if i >= self.n_params + self.n_state:
            return i - self.n_params - self.n_state
        return None

    def owned(self, leaf: int) -> list[int]:
        return [j for j, o in self.owner.items() if o == leaf]


def _reads(jaxpr) -> list[frozenset[int]]:
    """For each output of ``jaxpr``: the indices of the inputs it depends on."""
    deps: dict[Any, frozenset[int]] = {v: frozenset([i]) for i, v in enumerate(jaxpr.invars)}

    def of(v) -> frozenset[int]:
        return frozenset() if isinstance(v, jcore.Literal) else deps.get(v, frozenset())

    for eqn in jaxpr.eqns:
        read = frozenset().union(*(of(v) for v in eqn.invars))
        for out in eqn.outvars:
            deps[out] = read
    return [of(v) for v in jaxpr.outvars]


def _trace(optimizer: optax.GradientTransformation, params: Any) -> _Traced:
    state = jax.eval_shape(optimizer.init, params)
    closed = jax.make_jaxpr(optimizer.update)(params, state, params)
    jaxpr = closed.jaxpr
    n_params, n_state = len(jax.tree.leaves(params)), len(jax.tree.leaves(state))
    reads = _reads(jaxpr)
    init_reads = _reads(jax.make_jaxpr(optimizer.init)(params).jaxpr)
    consts = tuple(_value(c) for c in closed.consts)
    traced = _Traced(jaxpr, n_params, n_state, reads, init_reads, {}, consts)
    for j in range(n_state):
        leaves = {traced.param_of_input(i) for i in reads[n_params + j]} - {None}
        traced.owner[j] = min(leaves) if len(leaves) == 1 else (None if not leaves else -1)
    return traced


def _separable(t: _Traced) -> str | None:
    """Why the update is not separable per parameter leaf, or ``None``."""
    for j, o in t.owner.items():
        if o == -1:
            return f"its state leaf {j} reads several parameters' gradients"
    for j, o in t.owner.items():
        for i in t.reads[t.n_params + j]:
            other = t.owner.get(i - t.n_params)
            if t.n_params <= i < t.n_params + t.n_state and other not in (None, o):
                return f"its state leaf {j} reads another parameter's state"
    for j, read in enumerate(t.init_reads):
        if read - ({t.owner[j]} if t.owner[j] is not None else set()):
            return f"its initial state leaf {j} reads another parameter"
    for leaf in range(t.n_params):
        own = {t.n_params + j for j, o in t.owner.items() if o in (leaf, None)}
        allowed = {leaf, t.n_params + t.n_state + leaf} | own
        if t.reads[leaf] - allowed:
            return f"the update of leaf {leaf} reads other leaves (e.g. a global norm)"
    return None


def _slice_eqns(jaxpr, outs: Sequence[int]) -> list[Any]:
    """The equations that the outputs ``outs`` depend on, in program order."""
    producer = {o: n for n, eqn in enumerate(jaxpr.eqns) for o in eqn.outvars}
    todo = [jaxpr.outvars[i] for i in outs]
    seen: set[int] = set()
    while todo:
        v = todo.pop()
        n = None if isinstance(v, jcore.Literal) else producer.get(v)
        if n is None or n in seen:
            continue
        seen.add(n)
        todo.extend(jaxpr.eqns[n].invars)
    return [jaxpr.eqns[n] for n in sorted(seen)]


def _value(x: Any) -> tuple:
    """A constant by its exact value (dtype, shape, bytes)."""
    a = np.asarray(x)
    return a.dtype.str, a.shape, a.tobytes()


def _param_form(p: Any) -> Any:
    """An equation parameter as printed, with the values of the constants that a nested
    computation holds (a nested ``jax.jit`` keeps the arrays it closes over in its
    ``ClosedJaxpr``, whose printed form does not show them)."""
    if isinstance(p, jcore.ClosedJaxpr):
        return tuple(_value(c) for c in p.consts), _param_form(p.jaxpr)
    if isinstance(p, jcore.Jaxpr):
        return str(p), tuple(_param_form(q) for eqn in p.eqns for q in eqn.params.values())
    if isinstance(p, (tuple, list)):
        return tuple(_param_form(q) for q in p)
    return str(p)


def _form(t: _Traced, leaf: int) -> tuple:
    """A canonical form of what computes ``leaf``'s update and owned state: its equations
    with variables renamed in order of appearance, inputs named by role."""
    own = t.owned(leaf)
    # constants by value, as literals: a rate per block held as a jax scalar is a constant
    names: dict[Any, Any] = {
        v: ("const", c) for v, c in zip(t.jaxpr.constvars, t.consts, strict=True)
    }
    for i, v in enumerate(t.jaxpr.invars):
        slot = i - t.n_params
        if t.param_of_input(i) == leaf:
            names[v] = ("grad",) if i < t.n_params else ("param",)
        elif 0 <= slot < t.n_state:
            names[v] = ("state", own.index(slot)) if slot in own else ("global", slot)
        else:
            names[v] = ("other", i)
    counter = itertools.count()

    def name(v) -> Any:
        if isinstance(v, jcore.Literal):  # by value: repr follows numpy's print options
            return ("literal", _value(v.val), str(v.aval))
        if v not in names:
            names[v] = ("var", next(counter), str(v.aval))
        return names[v]

    outs = [leaf] + [t.n_params + j for j in own]
    form = [
        (
            eqn.primitive.name,
            tuple(sorted((k, _param_form(p)) for k, p in eqn.params.items())),
            tuple(name(v) for v in eqn.invars),
            tuple(name(v) for v in eqn.outvars),
        )
        for eqn in _slice_eqns(t.jaxpr, outs)
    ]
    return tuple(form), tuple(name(t.jaxpr.outvars[i]) for i in outs)


def rowwise_refusal(
    optimizer: optax.GradientTransformation, params: Any, segments: Sequence[Rows]
) -> str | None:
    """``None`` when ``optimizer`` on the per-row tree ``params`` (arrays or
    ``jax.ShapeDtypeStruct``) computes exactly what ``Vectorised`` computes for these
    ``segments``; otherwise why not, in words."""
    return _refusal(_trace(optimizer, params), segments)


def _refusal(t: _Traced, segments: Sequence[Rows]) -> str | None:
    reason = _separable(t)
    if reason is not None:
        return reason
    for s, rows in enumerate(segments):
        for k in range(len(rows[0])):
            if len({_form(t, row[k]) for row in rows}) > 1:
                return f"segment {s}, position {k}: the rows' updates differ (per-row settings)"
    return None


def _filled(values: dict[int, Any], like: Sequence[Any], treedef) -> Any:
    """A tree of ``treedef`` with ``values[i]`` as leaf ``i`` and zeros shaped like
    ``like[i]`` elsewhere."""
    # What a call does not compute gets zeros: by separability nothing it keeps reads them,
    # and XLA removes their dead updates.
    full = [values[i] if i in values else jnp.zeros(x.shape, x.dtype) for i, x in enumerate(like)]
    return jax.tree.unflatten(treedef, full)


class Vectorised:
    """``optimizer`` over packed trees, run once per row and ``jax.vmap``-ed over each
    segment's rows. Raises ``OptimizerMismatchError`` where ``rowwise_refusal(optimizer,
    params, segments)`` gives a reason.

    A packed tree is ``(stacks, rest)``: ``stacks[s][k]`` is the ``(rows, ...)`` stack of
    position ``k`` over segment ``s``'s rows, ``rest`` the other leaves in order.
    ``init(packed_params)`` and ``update(packed_grads, state, packed_params) ->
    (packed_updates, state)`` are optax's; ``pack`` / ``unpack`` convert trees with
    ``params``' structure.
    """

    def __init__(
        self, optimizer: optax.GradientTransformation, params: Any, segments: Sequence[Rows]
    ):
        self.optimizer = optimizer
        self.segments = [[list(row) for row in rows] for rows in segments]
        self._t = _trace(optimizer, params)
        reason = _refusal(self._t, self.segments)
        if reason is not None:
            raise OptimizerMismatchError(
                f"This optimizer cannot run once per row over stacked blocks: {reason}."
            )
        self._leaves, self._treedef = jax.tree.flatten(params)
        state = jax.eval_shape(optimizer.init, params)
        self._state_leaves, self._state_def = jax.tree.flatten(state)
        in_rows = {i for rows in self.segments for row in rows for i in row}
        self._rest = [i for i in range(len(self._leaves)) if i not in in_rows]
        self._rest_slots = [j for j, o in self._t.owner.items() if o is None or o in self._rest]
        # compiled, so that the zeros standing in for what a call does not compute are
        # removed, never allocated (run eagerly, they would take a whole model's memory)
        self._init = jax.jit(self._init_eager)
        self._update = jax.jit(self._update_eager)
        self.transformation = optax.GradientTransformation(self.init, self.update)
        self._param_columns = [
            [[row[k] for row in rows] for k in range(len(rows[0]))] for rows in self.segments
        ]
        self._state_columns = [self._owned_columns(rows) for rows in self.segments]

    def _tree(self, values: dict[int, Any]) -> Any:
        return _filled(values, self._leaves, self._treedef)

    def _state(self, values: dict[int, Any]) -> Any:
        return _filled(values, self._state_leaves, self._state_def)

    def _run(self, leaves: Sequence[int], g, slots: dict[int, Any], p, rest_state):
        """The updates of ``leaves`` and their new owned state, one call of the optimizer."""
        state = dict(zip(self._rest_slots, rest_state, strict=True)) | slots
        updates, new = self.optimizer.update(
            self._tree(dict(zip(leaves, g, strict=True))),
            self._state(state),
            self._tree(dict(zip(leaves, p, strict=True))),
        )
        return jax.tree.leaves(updates), jax.tree.leaves(new)

    def init(self, packed) -> Any:
        return self._init(packed)

    def update(self, grads, state, packed) -> tuple[Any, Any]:
        return self._update(grads, state, packed)

    def _init_eager(self, packed) -> Any:
        stacks, rest_params = packed
        per_segment = []
        for rows, stack in zip(self.segments, stacks, strict=True):
            owned = [self._t.owned(i) for i in rows[0]]

            def row_init(p, first=rows[0], owned=owned):
                new = jax.tree.leaves(
                    self.optimizer.init(self._tree(dict(zip(first, p, strict=True))))
                )
                return [[new[j] for j in js] for js in owned]

            per_segment.append(jax.vmap(row_init)(stack))
        new = jax.tree.leaves(
            self.optimizer.init(self._tree(dict(zip(self._rest, rest_params, strict=True))))
        )
        return per_segment, [new[j] for j in self._rest_slots]

    def _update_eager(self, grads, state, packed) -> tuple[Any, Any]:
        (g_stacks, g_rest), (s_stacks, rest_state), (p_stacks, p_rest) = grads, state, packed
        u_stacks, new_stacks = [], []
        for rows, g, s, p in zip(self.segments, g_stacks, s_stacks, p_stacks, strict=True):
            owned = [self._t.owned(i) for i in rows[0]]

            def row_update(g, s, p, rest_state, first=rows[0], owned=owned):
                slots = {j: s[k][m] for k, js in enumerate(owned) for m, j in enumerate(js)}
                updates, new = self._run(first, g, slots, p, rest_state)
                return [updates[i] for i in first], [[new[j] for j in js] for js in owned]

            u, new = jax.vmap(row_update, in_axes=(0, 0, 0, None))(g, s, p, rest_state)
            u_stacks.append(u)
            new_stacks.append(new)
        updates, new = self._run(self._rest, g_rest, {}, p_rest, rest_state)
        u_rest = [updates[i] for i in self._rest]
        return (u_stacks, u_rest), (new_stacks, [new[j] for j in self._rest_slots])

    def _owned_columns(self, rows: Rows) -> list[list[list[int]]]:
        """Per position, per owned slot: the flat state indices of ``rows``."""
        owned = [[self._t.owned(i) for i in row] for row in rows]
        return [
            [[o[k][m] for o in owned] for m in range(len(owned[0][k]))] for k in range(len(rows[0]))
        ]

    def pack(self, tree: Any, *, consume: bool = False) -> Any:
        """The packed form of a tree with ``params``' structure. ``consume``: each row is
        deleted once stacked (the tree's arrays must be the caller's to delete)."""
        flat = jax.tree.leaves(tree)
        consume = consume and _owned(flat)
        stacks = [[_stacked(flat, c, consume) for c in seg] for seg in self._param_columns]
        return stacks, [flat[i] for i in self._rest]

    def unpack(self, packed: Any, *, consume: bool = False) -> Any:
        """The tree with ``params``' structure that ``packed`` holds (``consume``: each
        stack deleted once split)."""
        stacks, rest_values = packed
        flat: dict[int, Any] = dict(zip(self._rest, rest_values, strict=True))
        for seg, stack in zip(self._param_columns, stacks, strict=True):
            for column, part in zip(seg, stack, strict=True):
                flat.update(zip(column, _unstacked(part, len(column), consume), strict=True))
        return jax.tree.unflatten(self._treedef, [flat[i] for i in range(len(self._leaves))])

    def pack_state(self, state: Any, *, consume: bool = False) -> Any:
        """The packed optimizer state (``init``'s form) of ``optimizer.init(params)``'s
        form ``state`` (``consume``: as ``pack``)."""
        flat = jax.tree.leaves(state)
        consume = consume and _owned(flat)
        per_segment = [
            [[_stacked(flat, c, consume) for c in slots] for slots in seg]
            for seg in self._state_columns
        ]
        return per_segment, [flat[j] for j in self._rest_slots]

    def unpack_state(self, packed_state: Any, *, consume: bool = False) -> Any:
        """``optimizer.init(params)``'s form of the packed optimizer state."""
        per_segment, rest_state = packed_state
        flat: dict[int, Any] = dict(zip(self._rest_slots, rest_state, strict=True))
        for seg, segment in zip(self._state_columns, per_segment, strict=True):
            for slots, stacks in zip(seg, segment, strict=True):
                for column, part in zip(slots, stacks, strict=True):
                    flat.update(zip(column, _unstacked(part, len(column), consume), strict=True))
        leaves = [flat[j] for j in range(len(self._state_leaves))]
        return jax.tree.unflatten(self._state_def, leaves)


def _owned(flat: Sequence[Any]) -> bool:
    """Whether every array of ``flat`` appears once (a tied weight must not be deleted while
    another leaf still holds it; then nothing is)."""
    ids = [id(x) for x in flat if isinstance(x, jax.Array)]
    return len(ids) == len(set(ids))


def _stacked(flat: Sequence[Any], column: Sequence[int], consume: bool) -> jax.Array:
    """``flat[column]`` stacked; with ``consume``, each row deleted once copied."""
    stack = jnp.stack([flat[i] for i in column])
    if consume:
        # the rows are freed only once the stack is written: waiting for it keeps one
        # stack in flight, not every stack of the model allocated before any row is freed
        if not isinstance(stack, jax.core.Tracer):
            stack.block_until_ready()
        for i in column:
            if isinstance(flat[i], jax.Array) and not isinstance(flat[i], jax.core.Tracer):
                heap.freed(flat[i].nbytes)
                flat[i].delete()
    return stack


def _unstacked(stack: jax.Array, n: int, consume: bool) -> list[jax.Array]:
    """The ``n`` rows of ``stack``; with ``consume``, the stack deleted once split."""
    rows = _rows_of(stack, n)
    if consume and not isinstance(stack, jax.core.Tracer):
        jax.block_until_ready(rows)  # as in _stacked: one stack in flight
        heap.freed(stack.nbytes)
        stack.delete()
    return rows


def _rows_of(stack: jax.Array, n: int) -> list[jax.Array]:
    """The ``n`` rows of ``stack`` (``(n, ...)``)."""
    return [part.reshape(stack.shape[1:]) for part in jax.lax.split(stack, [1] * n, axis=0)]
