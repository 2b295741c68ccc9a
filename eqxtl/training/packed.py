"""Trained blocks kept stacked between steps: the storage behind ``fit``'s train step.

A backbone keeps its repeated blocks as a Python list (``encoder.layers.N``): paths, specs,
optimizer groups and saved files are per block. Inside a step, ``run_blocks`` stacks each
run of interchangeable blocks to scan it, and the gradients come back per block; the
optimizer then runs once per block and weight. Everything that is per block there (the
stacking, the slicing of the gradients, the optimizer's kernels) makes the compiled step
grow with depth.

``Packed`` holds a model's trainable leaves as ``fit`` keeps them between steps instead:
each run of two or more interchangeable trained blocks (same structure, shapes, dtypes and
spec) of a module that scans its blocks is stored as one ``(rows, ...)`` array per weight,
with the optimizer state alike. The step splits the stacks into per-block views
(``lax.split``), runs the model as it is, and stacks the gradients again. Where the blocks
scan (``with_scan``'s rule: a big enough carry, or ``with_scan(model)``), XLA folds the
split and the stacking with the scan's own, so the compiled step holds no per-block copy
and does not grow with depth; where they run unrolled, each block reads its slice of the
stack. The optimizer runs once per row, ``jax.vmap``-ed over the rows
(``tuning._rowwise.Vectorised``): exactly what it computes per block, or the step is not
packed (a global-norm clip, per-block learning rates, a mesh, no such run: ``reason``
says why) and runs as ``make_step``'s plain step.

``pack`` / ``unpack`` convert a model and its optimizer state (``optimizer.init`` of the
trainable partition, as always) to and from this form; ``fit`` converts only where it
hands the model out (callbacks, evaluations, checkpoints, the end).

Blocks are scanned or unrolled as in ``step(model, ...)``: at small batches, where
``with_scan``'s rule unrolls, scanning stored stacks was still slower than unrolled blocks
(each iteration slices its weights out of the stack; benchmarks/README.md, "fit's step
form").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from .._util.heap import trim_heap
from ..errors import OptimizerMismatchError
from ..models.blockwise import SCAN_FIELD
from ..models.layers.static import has_field
from ..tuning._rowwise import Rows, Vectorised


def _block_signature(block: Any) -> tuple | None:
    """What two trained blocks must share to be stacked (``None``: not stackable)."""
    leaves, treedef = jax.tree.flatten(block)
    if not leaves or not all(eqx.is_inexact_array(x) for x in leaves):
        return None
    return treedef, tuple((x.shape, x.dtype) for x in leaves)


def _runs_of(blocks: list, start: int) -> tuple[list[Rows], int]:
    """The runs of two or more consecutive stackable ``blocks`` (their flat leaf indices,
    counted from ``start``) and the number of leaves the blocks hold."""
    runs: list[list[list[int]]] = []
    last, pos = None, start
    for block in blocks:
        n = len(jax.tree.leaves(block))
        sig = _block_signature(block)
        row = list(range(pos, pos + n))
        if sig is not None and sig == last:
            runs[-1].append(row)
        else:
            runs.append([row])
        last, pos = sig, pos + n
    return [r for r in runs if len(r) >= 2], pos - start


def find_segments(trainable: Any) -> list[Rows]:
    """The stackable runs of ``trainable`` (``eqx.filter(model, spec)``): the blocks of
    modules that scan them (a ``scan`` flag not ``False``), as rows of flat leaf indices."""
    segments: list[Rows] = []

    def walk(node: Any, start: int) -> int:
        if node is None:
            return 0
        children, _ = jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)
        if len(children) == 1 and children[0] is node:  # a leaf
            return 1
        owns = has_field(node, SCAN_FIELD) and getattr(node, SCAN_FIELD) is not False
        pos = start
        for child in children:
            if owns and _is_blocks(child):
                runs, n = _runs_of(list(child), pos)
                segments.extend(runs)
                pos += n
            else:
                pos += walk(child, pos)
        return pos - start

    walk(trainable, 0)
    return segments


def _is_blocks(x: Any) -> bool:
    return (
        isinstance(x, (list, tuple)) and len(x) >= 2 and all(isinstance(b, eqx.Module) for b in x)
    )


class Packed(eqx.Module):
    """A model and its optimizer state in ``fit``'s step form (see the module docstring):
    ``params`` (packed trainable leaves, or the trainable partition when ``layout`` is
    ``None``), ``frozen`` (the rest of the model), ``opt_state`` (packed alike)."""

    params: Any
    frozen: Any
    opt_state: Any
    layout: Vectorised | None = eqx.field(static=True)
    reason: str | None = eqx.field(static=True)


def layout_for(optimizer, trainable: Any, *, mesh=None) -> tuple[Vectorised | None, str | None]:
    """``(layout, None)`` for packing ``trainable``'s blocks (the vectorised optimizer over
    its segments; static, hashed by identity, in the compiled step), or ``(None, why not)``."""
    if mesh is not None:
        return None, "a mesh: the leaves keep their own shardings"
    if not all(eqx.is_inexact_array(x) for x in jax.tree.leaves(trainable)):
        return None, "a trainable leaf that is not a floating-point array"
    segments = find_segments(trainable)
    if not segments:
        return None, "no run of two or more interchangeable trained blocks that scan"
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trainable)
    try:
        return Vectorised(optimizer, shapes, segments), None
    except OptimizerMismatchError as err:
        return None, str(err)


def pack(
    layout: Vectorised | None, reason: str | None, trainable, frozen, opt_state, *, consume: bool
) -> Packed:
    """The trainable partition and its optimizer state in step form with ``layout`` (from
    ``layout_for``; ``None``: as they are, with the ``reason``). ``consume``: each array
    moved into a stack is deleted once copied (the step would donate them: peak memory then
    holds one stack more than the model, not a second model)."""
    if layout is None:
        return Packed(trainable, frozen, opt_state, None, reason)
    params = layout.pack(trainable, consume=consume)
    state = layout.pack_state(opt_state, consume=consume)
    if consume:  # the rows' memory, freed, would stay in the process under what comes next
        trim_heap()
    return Packed(params, frozen, state, layout, None)


def unpack(packed: Packed, *, consume: bool = False) -> tuple[Any, Any]:
    """``(model, opt_state)`` of ``packed``, in their own (per-block) forms. ``consume``:
    each stack is deleted once split (``packed`` is then spent)."""
    layout = packed.layout
    if layout is None:
        return eqx.combine(packed.params, packed.frozen), packed.opt_state
    trainable = layout.unpack(packed.params, consume=consume)
    opt_state = layout.unpack_state(packed.opt_state, consume=consume)
    if consume:
        trim_heap()
    return eqx.combine(trainable, packed.frozen), opt_state


UNROLLED = (
    "the blocks run unrolled at this batch size (with_scan's size rule): each would be "
    "copied out of its stack, and its gradient back in"
)


class StepForm:
    """What ``make_step``'s step form keeps between calls: one layout per trainable
    structure (a new layout would recompile the step), and which layouts a batch showed to
    run unrolled (those are packed as the model is).

    **Arguments:** ``consumes(trainable, opt_state)``: whether packing may delete what it
    stacks (the step would donate it); ``scans(carry, state, batch)``: whether a run of the
    packed blocks scans on such batches."""

    def __init__(self, optimizer, spec, *, mesh, consumes: Callable, scans: Callable):
        self.optimizer, self.spec, self.mesh = optimizer, spec, mesh
        self._consumes, self._scans = consumes, scans
        self._layouts: dict = {}
        self._unrolled: set[int] = set()
        self._checked: dict = {}

    def pack(self, trainable, frozen, opt_state) -> Packed:
        """``trainable`` and ``opt_state`` in step form (checked by the caller)."""
        shapes = jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), trainable)
        key = jax.tree.structure(trainable), tuple(jax.tree.leaves(shapes))
        if key not in self._layouts:
            self._layouts[key] = layout_for(self.optimizer, trainable, mesh=self.mesh)
        layout, reason = self._layouts[key]
        if id(layout) in self._unrolled:
            layout, reason = None, UNROLLED
        consume = self._consumes(trainable, opt_state)
        return pack(layout, reason, trainable, frozen, opt_state, consume=consume)

    def for_batch(self, carry: Packed, state, batch: dict, *, probe: bool = False) -> Packed:
        """``carry``, unstacked if its blocks run unrolled on batches like ``batch``: the
        step would copy every row out of its stack, and every gradient back in (more
        memory, a slower step and compile); later ``pack`` calls for its layout then pack
        as the model is. ``probe`` (``step.lower``): ``carry`` stays whole and nothing is
        remembered for later packs."""
        if carry.layout is None:
            return carry
        leaves = jax.tree_util.tree_leaves_with_path(batch)
        if not all(hasattr(x, "shape") and hasattr(x, "dtype") for _, x in leaves):
            return carry  # a batch of the user's own kinds: stacked, as the step form was
        shapes = tuple((str(kp), tuple(x.shape), str(x.dtype)) for kp, x in leaves)
        key = id(carry.layout), shapes
        if key not in self._checked:
            self._checked[key] = self._scans(carry, state, batch)
        if self._checked[key]:
            return carry
        if not probe:
            self._unrolled.add(id(carry.layout))
        consume = not probe and self._consumes(carry.params, carry.opt_state)
        model, opt_state = unpack(carry, consume=consume)
        trainable, frozen = eqx.partition(model, self.spec)
        return pack(None, UNROLLED, trainable, frozen, opt_state, consume=False)
