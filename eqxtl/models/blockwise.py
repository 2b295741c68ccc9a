"""How a backbone runs its repeated blocks: rematerialised (``with_remat``) and/or under
``jax.lax.scan`` (``with_scan``).

**Rematerialisation.** Opt-in rematerialisation (gradient checkpointing) for full fine-tuning.

Backbones whose blocks can be recomputed (``Architecture.supports_remat``) carry a static
``remat`` flag on the module that runs them (e.g. CLIP's or ResNet's ``encoder``). With it
set, each block runs under ``eqx.filter_checkpoint``: the backward pass keeps only the
blocks' inputs and recomputes everything inside a block from them, trading one extra
forward pass for activation memory. Values and gradients do not change.

    model = eqxtl.with_remat(model)          # a Classifier or a bare backbone
    model = eqxtl.with_remat(model, False)   # back to storing every activation

The flag is static: it is not a weight, is not saved (``save_pretrained`` writes the same
files), and changing it recompiles the train step.

On the CPU, ``make_step`` compiles with XLA's memory-minimising scheduler: the default
(concurrency-optimised) one computes the recomputation early and keeps it alive, which
undoes the saving.

**Scan.** The transformer families run their repeated blocks under ``jax.lax.scan`` by
default: XLA compiles one block instead of one per layer, and the step keeps less memory.

    model = eqxtl.with_scan(model, False)   # one unrolled copy per block
    model = eqxtl.with_scan(model)          # scanned again (and warned if nothing can be)

The model keeps its blocks as a Python list (``encoder.layers.N``): its pytree, paths,
filter specs, optimizer groups (``last_blocks``, layer-wise decay), ``state_dict`` and
``save_pretrained`` files are exactly those of the unscanned model. Only the forward pass
changes: inside the traced function, each run of consecutive interchangeable blocks is
stacked along a new leading axis (one ``(n, ...)`` array per weight) and run by one
``jax.lax.scan``, and the backward pass is a scan too.

The scan body saves, for the backward pass, only the outputs of the products with weights
and the attention's merged heads (``layers.transformer.ATTENTION_OUTPUT``); everything else
(normalisation, activation functions, the attention's scores and softmax) is recomputed
from them, as XLA does with the unrolled blocks. Saving
every residual JAX names instead writes each into an ``(n, ...)`` array the unrolled program
never materialises: more memory and a slower step (benchmarks/README.md). Values do not
change; gradients agree to float rounding.

Per-block data of the forward pass travel with the stacked weights: the keys, and drop
path's rates (``drop_path_rate``; timm's rule gives every block its own), so blocks whose
rates differ still share one compiled body.

Blocks that are not interchangeable run as they are, unscanned: the results never change.
Blocks are interchangeable when they have the same structure, shapes and dtypes and, at
trace time, every weight is traced the same way: a weight that is differentiated (it
trains) and one that is not (frozen) are never stacked together. A run that nothing
differentiates (frozen blocks with nothing trained below them) runs unrolled: a forward
pass alone saves nothing for a backward pass, and the scan would only copy the stacked
weights. A ``last_blocks(model, 2)`` spec therefore runs the frozen blocks unrolled, forward
only, and the two trained blocks on their own, and XLA builds no backward pass below them,
as unscanned; so do a head-only spec and ``make_eval_step``. When the
scan was asked for (``with_scan(model)``) and no two neighbours are interchangeable, a
warning says so; the default stays quiet.

Called as ``step(model, ...)``, a step stacks (copies) the blocks' weights inside every
call and slices their gradients back out: at small batches, where the weights outweigh the
activations, unrolled blocks are then faster and need less memory. So by default (the flag
``None``) a run scans only when its carry (the ``(batch, tokens, width)`` stream) holds at
least ``SCAN_MIN_CARRY_PER_WEIGHT`` of one block's weight bytes, and runs unrolled below:
at 224², CLIP-B/32 (50 tokens) scans from batch 24, ViT-B/16 from batch 6, DINOv2-S/14 from
batch 3 (benchmarks/README.md, "Scan or unroll by size"). ``with_scan(model)`` scans at any
size; ``with_scan(model, False)`` never does.

``fit`` keeps the trained blocks stored stacked between steps instead
(``eqxtl.training.packed``: ``step.pack`` / ``step.packed``), the optimizer run once per
row and vectorised; where the blocks scan, XLA then folds the stacking away, and the
compiled step no longer grows with depth. The same rule decides there whether they scan.

The flag is static, like ``with_remat``'s: it is not saved, and changing it recompiles.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp

from .._util.sizes import nbytes
from .layers import checkpointed, with_static_flag
from .layers.schedule import differentiated, stored_gradient
from .layers.transformer import ATTENTION_OUTPUT

T = TypeVar("T")
B = TypeVar("B")
H = TypeVar("H")

# Below this, scanning was slower and bigger than unrolling (CLIP-B/32 at batch 2-16, L/14
# at batch 2); above it, it saves memory for a few percent of time (benchmarks/README.md).
SCAN_MIN_CARRY_PER_WEIGHT = 0.125
SCAN_FIELD = "scan"
REMAT_FIELD = "remat"
_SCAN_SAVES = jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    jax.checkpoint_policies.save_only_these_names(ATTENTION_OUTPUT),
)


def with_scan(model: T, enabled: bool = True) -> T:
    """A copy of ``model`` (any pytree) whose repeated blocks run unrolled
    (``enabled=False``) or under ``jax.lax.scan`` (the models' default; set explicitly, a
    warning says when no two neighbouring blocks can share a scan) in every module that
    supports it; the arrays are shared, not copied.

    Raises ``EqxtlError`` if nothing in ``model`` supports it (see
    ``Architecture.supports_scan``), so that the option never silently does nothing.
    """
    return with_static_flag(model, SCAN_FIELD, enabled, "scanning blocks", _supporting("scan"))


def with_remat(model: T, enabled: bool = True) -> T:
    """A copy of ``model`` (any pytree) with rematerialisation switched on (or off) in every
    module that supports it; the arrays are shared, not copied.

    Raises ``EqxtlError`` (a ``ValueError``) if nothing in ``model`` supports it (see
    ``Architecture.supports_remat``), so that a memory-saving option never silently does
    nothing.
    """
    return with_static_flag(model, REMAT_FIELD, enabled, "rematerialisation", _supporting("remat"))


def _supporting(option: str) -> str:
    """The architectures that support ``option`` (``"remat"`` / ``"scan"``), for messages."""
    from .registry import ARCHITECTURES  # the registry imports every family, which import us

    names = [a.name for a in ARCHITECTURES.values() if getattr(a, f"supports_{option}")]
    return ", ".join(names) + " backbones"


def _signature(block: Any) -> tuple:
    """What two blocks must share to be stacked: the tree structure (static fields
    included), every array's shape and dtype and the trace it belongs to (so that trained
    and frozen weights are never stacked together), and the non-array leaves."""
    leaves, treedef = jax.tree.flatten(block)
    parts = []
    for leaf in leaves:
        if eqx.is_array(leaf):
            trace = getattr(leaf, "_trace", None) if isinstance(leaf, jax.core.Tracer) else None
            parts.append(("array", leaf.shape, leaf.dtype, type(leaf), id(trace)))
        else:
            parts.append(("other", leaf))
    return treedef, tuple(parts)


_recorded: list[bool] | None = None


@contextlib.contextmanager
def recording_scans():
    """``with recording_scans() as runs:`` each run of two or more blocks traced inside
    appends whether it would scan once differentiated (``with_scan``'s flag and size rule):
    a forward pass traced abstractly then says what the train step will do."""
    global _recorded
    outer, _recorded = _recorded, []
    try:
        yield _recorded
    finally:
        _recorded = outer


def _worth_scanning(group: Sequence[Any], h: Any, scan: bool | None) -> bool:
    """Whether a run of interchangeable ``group`` blocks on carry ``h`` scans: two or more
    blocks, something differentiated, and (by default) a carry big enough for the saved
    memory to outweigh the stacked copy of the weights."""
    if scan is False or len(group) < 2:
        return False
    # the size test only where it decides (an export's symbolic batch size has no size)
    if _recorded is None and not differentiated((group, h)):
        return False
    big = scan is True or nbytes(h) >= SCAN_MIN_CARRY_PER_WEIGHT * nbytes(group[0])
    if _recorded is not None:
        _recorded.append(big)
    return big and differentiated((group, h))


def _runs(blocks: Sequence[B]) -> list[list[B]]:
    """``blocks`` cut into maximal runs of consecutive interchangeable blocks."""
    runs: list[list[B]] = []
    last = None
    for block in blocks:
        sig = _signature(block)
        if runs and sig == last:
            runs[-1].append(block)
        else:
            runs.append([block])
        last = sig
    return runs


def run_blocks(
    call: Callable[..., H],
    blocks: Sequence[B],
    h: H,
    keys: Sequence[Any] | None = None,
    *,
    rates: Sequence[float] | None = None,
    scan: bool | None = False,
    remat: bool = False,
) -> H:
    """``h = call(block, h)`` for each block in order, or ``h = call(block, h, key)`` with
    one of ``keys`` per block (``None`` entries: no key), or ``h = call(block, h, key,
    rate)`` with one of ``rates`` per block too (drop path; given with keys only).

    ``scan`` (``True``, or ``None``: the default, quiet, and only where the carry is big
    enough; see the module docstring): each run of two or more interchangeable blocks that
    something differentiates is stacked, with its keys and rates, and run by one
    ``jax.lax.scan`` (a rate is then a traced scalar: blocks whose rates differ share the
    body); a block alone runs as is.
    ``remat``: each block's call runs under ``eqx.filter_checkpoint`` (inside the scan body
    when scanned). ``call`` must return an ``h`` of the same shape and dtype (a scan carry).
    """
    keys = [None] * len(blocks) if keys is None else list(keys)[: len(blocks)]
    rates = [None] * len(blocks) if rates is None else list(rates)[: len(blocks)]

    plain = checkpointed(call, remat)

    def apply(block, h, key, rate, run=None):
        run = plain if run is None else run
        if key is None:
            return run(block, h)
        return run(block, h, key) if rate is None else run(block, h, key, rate)

    runs = _runs(blocks)
    if scan is True and len(runs) == len(blocks) > 1:
        warnings.warn(
            f"with_scan: none of these {len(blocks)} consecutive {type(blocks[0]).__name__} "
            "blocks can share a scan with its neighbour (their structures, shapes or dtypes "
            "differ, or trained and frozen blocks alternate), so they run unrolled, as "
            "with with_scan(model, False): the same results, without the shorter compile.",
            stacklevel=2,
        )
    # A scan's body saves what JAX's autodiff names as residuals, each written into an
    # (n, ...) array by the forward loop; unrolled, XLA fuses the cheap elementwise ones
    # into the backward pass instead. Saving only the weight products' outputs and
    # recomputing the rest (softmax, GELU, LayerNorm, attention's scores) does what XLA does
    # unrolled, so the scan is no slower than the unrolled blocks. The attention's output is
    # saved too: recomputing it reran the attention forward (benchmarks/README.md).
    scanned = checkpointed(call, remat, policy=None if remat else _SCAN_SAVES)
    start = 0
    for group in runs:
        group_keys = keys[start : start + len(group)]
        group_rates = rates[start : start + len(group)]
        start += len(group)
        if not _worth_scanning(group, h, scan):
            for block, key, rate in zip(group, group_keys, group_rates, strict=True):
                h = apply(block, stored_gradient(h), key, rate)
            continue
        static = eqx.partition(group[0], eqx.is_array)[1]
        stacked = jax.tree.map(
            lambda *xs: jnp.stack(xs), *[eqx.filter(b, eqx.is_array) for b in group]
        )
        stacked_keys = None if group_keys[0] is None else jnp.stack(group_keys)
        stacked_rates = None if group_rates[0] is None else jnp.asarray(group_rates, jnp.float32)

        def body(carry, xs, static=static):
            weights, key, rate = xs
            return apply(eqx.combine(weights, static), carry, key, rate, scanned), None

        h, _ = jax.lax.scan(body, h, (stacked, stacked_keys, stacked_rates))
    return h
