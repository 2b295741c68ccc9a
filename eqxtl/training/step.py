"""The train step: differentiate only what trains, update it, put the model back together.

``make_step(loss_fn, optimizer, spec)`` returns
``step(model, state, opt_state, batch, key) -> (model, state, opt_state, metrics)``,
compiled once with ``eqx.filter_jit``. Inside, ``eqx.partition(model, spec)`` splits the
model; ``eqx.filter_value_and_grad`` sees only the trainable half, so XLA never builds the
backward pass below the lowest trainable leaf; the frozen half is passed through untouched
(not donated, not copied), the trainable half and the optimizer state are donated and
updated in place (when they are big enough for the saved copy to matter).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from .._util.checks import count
from .._util.finite import all_finite
from .._util.heap import trim_heap
from .._util.pytree_paths import first_difference
from .._util.sizes import is_leaf_value, nbytes
from ..errors import EqxtlError, OptimizerMismatchError, TrainingError
from ..models.batching import batched
from ..models.blockwise import recording_scans
from ..models.layers import BatchNorm
from ..tuning.filters import check_spec, low_precision_message, low_precision_paths
from .packed import Packed, StepForm, unpack
from .parallel import batch_axes, shard_batch, shardings_of
from .tasks import Classification, Task, loss_and_metrics

LossFn = Callable[[Any, eqx.nn.State, dict, jax.Array], tuple[jax.Array, tuple[Any, dict]]]
"""``loss_fn(model, state, batch, key) -> (loss, (state, metrics))``."""


def _is_bn(x: Any) -> bool:
    return isinstance(x, BatchNorm)


BN_MODES = ("auto", "frozen", "train")


def batchnorm_modes(model: Any, spec: Any, *, bn: str = "auto") -> Any:
    """``model`` with each BatchNorm's mode set, independently of what trains:

    - ``bn="auto"``: a BatchNorm normalises with batch statistics (and updates its running
      ones) iff its ``weight`` trains in ``spec``; frozen ones use their loaded statistics;
    - ``bn="frozen"``: every BatchNorm uses its loaded statistics, even where its scale and
      shift train (Keras's advice for fine-tuning after unfreezing);
    - ``bn="train"``: every BatchNorm trains its statistics (fastai's ``train_bn``).
    """
    bn = _bn_mode(bn)
    flat, treedef = jtu.tree_flatten(model, is_leaf=_is_bn)
    try:
        spec_nodes = treedef.flatten_up_to(spec)
    except (ValueError, TypeError):
        check_spec(model, spec)
        raise
    out = []
    for node, node_spec in zip(flat, spec_nodes, strict=True):
        if _is_bn(node):
            trains = bn == "train" or (bn == "auto" and bool(node_spec.weight))
            node = eqx.tree_at(lambda b: b.inference, node, not trains)
        out.append(node)
    return jtu.tree_unflatten(treedef, out)


def _bn_mode(bn: str) -> str:
    if bn not in BN_MODES:
        raise EqxtlError(f"bn must be one of {BN_MODES}, got {bn!r}.")
    return bn


def task_loss(task: Task | None = None, *, compute_dtype=None, features: bool = False) -> LossFn:
    """Loss for ``make_step`` from a ``task`` (``eqxtl.tasks``; default
    ``Classification()``, softmax cross-entropy): the task's loss of the model's outputs on
    batches ``{"image": (B, C, H, W), "label", "mask": (B,) optional}``. Label smoothing:
    ``task_loss(Classification(label_smoothing=0.1))``. The metrics are sums
    (``loss_sum``, ``correct``, ``count``) that add up exactly over batches of any fill.

    A task with ``mix_batch(images, labels, mask, key) -> (images, targets(K))``
    (``Mixup``) mixes each batch first, with part of ``key`` (so only in training: the eval
    step passes none).

    ``features=True``: batches of cached backbone features ``{"features": (B, D), ...}``
    through ``model.logits`` (the head, after the projection and normalisation a zero-shot
    head asks for) only (see ``extract_features``).

    ``compute_dtype=jnp.bfloat16``: mixed precision. The images are cast, and every eqxtl
    layer runs its matmuls and convolutions in its input's dtype (casting the float32 master
    weights on the fly, so gradients and optimizer state stay float32), while LayerNorm,
    BatchNorm, softmax, the head and the loss run in float32.
    """
    task = Classification() if task is None else task
    mix = getattr(task, "mix_batch", None)
    if mix is not None and features:
        raise EqxtlError(
            f"{type(task).__name__} mixes images: it cannot train on cached features "
            "(fit does not cache them with it)."
        )

    def loss_fn(model, state, batch, key):
        labels = batch["label"]
        if features:
            outputs = model.logits(batch["features"])  # the head (and projection) only
        else:
            x = batch["image"]
            targets = None
            if mix is not None and key is not None:  # training (evaluation has no key)
                key, mix_key = jax.random.split(key)
                x, targets = mix(x, labels, batch.get("mask"), mix_key)
            if compute_dtype is not None:
                x = x.astype(compute_dtype)
            keys = None if key is None else jax.random.split(key, x.shape[0])
            outputs, state = batched(model)(x, state, keys)
            if targets is not None:
                labels = targets(outputs.shape[-1])
        loss, metrics = loss_and_metrics(task, outputs, labels, batch.get("mask"))
        return loss, (state, metrics)

    return loss_fn


def _updated(optimizer: optax.GradientTransformation, grads, opt_state, trainable):
    """``(new trainable leaves, new optimizer state)``: one optimizer update."""
    updates, new_opt_state = optimizer.update(grads, opt_state, trainable)
    return eqx.apply_updates(trainable, updates), new_opt_state


def _update(optimizer, grads, opt_state, trainable, finite):
    """One optimizer update, or, when ``finite`` (a traced bool; ``None``: always update) is
    false, the trainable leaves and optimizer state as they came in."""
    if finite is None:
        return _updated(optimizer, grads, opt_state, trainable)
    # A conditional, not a select per leaf: selecting on ``finite`` (a reduction over every
    # gradient) let XLA copy each gradient's producers into the selects and the update, and
    # the compiled step grew ~10x (tests/test_lora_step_hlo.py).
    return jax.lax.cond(
        finite,
        functools.partial(_updated, optimizer),
        lambda grads, opt_state, trainable: (trainable, opt_state),
        grads,
        opt_state,
        trainable,
    )


def _all_finite(loss, grads) -> jax.Array:
    """Whether ``loss`` and every gradient are finite (a traced bool)."""
    # Last leaf first: XLA's scheduler computes the gradients in the order this chain reads
    # them. First leaf first (a CNN's stem) ran the backward pass down to the input before any
    # other weight gradient, keeping every activation alive until then (benchmarks/README.md,
    # "The order of the gradients").
    return all_finite([loss, *reversed(jax.tree.leaves(grads))])


def _traced_step(loss_fn, optimizer, spec, bn, mesh, accumulate, skip_nonfinite) -> Callable:
    """``_step(passthrough, trainable, opt_state) -> (trainable, state or None, opt_state,
    metrics)``: the function ``make_step`` compiles. ``passthrough``: ``(frozen, state,
    batch, key, layout[, shardings])``; with a ``layout`` (``training.packed``), ``trainable``
    and ``opt_state`` are in step form."""

    def grads_of(trainable, frozen, state, batch, key):
        def loss_of(trainable, state, batch, key):
            model = eqx.combine(trainable, frozen)
            if mesh is not None:
                model = _gathered(model, mesh)
            model = batchnorm_modes(model, spec, bn=bn)
            return loss_fn(model, state, batch, key)

        if accumulate == 1:
            value_and_grad = eqx.filter_value_and_grad(loss_of, has_aux=True)
            (loss, (new_state, metrics)), grads = value_and_grad(trainable, state, batch, key)
            return loss, new_state, metrics, grads
        return _accumulated(loss_of, accumulate, trainable, state, batch, key, mesh)

    def _step(passthrough, trainable, opt_state):
        # layout: packed storage (training.packed), or None; shardings: with a mesh only
        frozen, state, batch, key, layout, *shardings = passthrough
        shardings = shardings[0] if shardings else None
        updating = optimizer if layout is None else layout.transformation
        _check_opt_state(updating, trainable, opt_state)  # at trace time only
        state_leaves = jax.tree.leaves(state)  # before BatchNorm's state.set invalidates it
        tree = trainable if layout is None else layout.unpack(trainable)  # split views
        half = low_precision_paths(tree)  # at trace time only; a hand-made spec gets here too
        if half:
            raise TrainingError(low_precision_message("make_step", half))
        loss, new_state, metrics, grads = grads_of(tree, frozen, state, batch, key)
        if layout is not None:
            grads = layout.pack(grads)
        finite = _all_finite(loss, grads)
        # With every BatchNorm frozen the state passes through untouched: returning it would
        # cost one copy per array (~100 small ops for ResNet-50, ~5% of a head-only step).
        new_leaves = jax.tree.leaves(new_state)
        unchanged = len(state_leaves) == len(new_leaves) and all(
            a is b for a, b in zip(state_leaves, new_leaves, strict=True)
        )
        new_trainable, new_opt_state = _update(
            updating, grads, opt_state, trainable, finite if skip_nonfinite else None
        )
        if skip_nonfinite and not unchanged:
            leaves, treedef = jtu.tree_flatten(new_state)
            kept = [jnp.where(finite, a, b) for a, b in zip(leaves, state_leaves, strict=True)]
            new_state = jtu.tree_unflatten(treedef, kept)
        if shardings is not None:  # out shardings = in shardings (no drift between steps)
            new_trainable, new_state, new_opt_state = _constrain(
                (new_trainable, new_state, new_opt_state), shardings
            )
        metrics = {"loss": loss, **metrics, "nonfinite": 1.0 - finite.astype(jnp.float32)}
        return new_trainable, None if unchanged else new_state, new_opt_state, metrics

    return _step


def make_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    spec: Any,
    *,
    bn: str = "auto",
    donate: bool | None = None,
    mesh=None,
    accumulate: int = 1,
    skip_nonfinite: bool = True,
) -> Callable:
    """A compiled train step that differentiates only the leaves ``spec`` marks ``True``.

    ``step(model, state, opt_state, batch, key) -> (model, state, opt_state, metrics)``.
    ``opt_state`` must come from ``optimizer.init(eqx.filter(model, spec))``. ``bn`` sets
    the BatchNorm modes (``batchnorm_modes``: ``"auto"``, ``"frozen"``, ``"train"``). With
    ``donate`` the trainable leaves and the optimizer state passed in are consumed (updated
    in place): keep using the returned ones. The
    default, ``None``, donates when they hold at least 64 MiB, where the saved copy matters;
    for a small head donation saves nothing and costs ~3% of a CPU step. The BatchNorm state
    is never donated (it is small); when no BatchNorm trains it is returned as passed in.

    Non-finite steps: ``metrics["nonfinite"]`` is 1.0 when the loss or any gradient is NaN
    or infinite. With ``skip_nonfinite`` (the default) such a step changes nothing: the
    model, BatchNorm state and optimizer state come back as they went in (a select inside the
    compiled step; no host sync). ``fit`` counts these steps and stops (``TrainingError``).

    With a ``mesh`` (``eqxtl.make_mesh``), each batch is split over its ``"data"`` and
    ``"fsdp"`` axes together; place the model, state and optimizer state on it once with
    ``eqxtl.shard``. Each step returns them with the shardings they came in with (FSDP:
    parameters and optimizer state stay split; XLA gathers each parameter where it is used
    and reduce-scatters its gradient).

    ``accumulate=k``: gradient accumulation. The batch is cut into ``k`` micro-batches of
    ``B / k`` examples (example ``i`` goes to micro-batch ``i % k``, so that with a mesh each
    micro-batch is still spread over every device), run one after the other under
    ``lax.scan``, and their gradients are averaged (weighted by their ``metrics["count"]``
    when the loss reports one, so that padded examples count as in one step) before one
    optimizer update: the same update as one step on the whole batch, with the activation
    memory of one micro-batch. BatchNorm layers that train see each micro-batch on its own:
    their batch statistics (and running averages, updated ``k`` times) are per micro-batch,
    as in PyTorch with gradient accumulation. The batch size must be a multiple of ``k``.

    Step form (what ``fit`` runs): ``packed = step.pack(model, opt_state)``, then
    ``packed, state, metrics = step.packed(packed, state, batch, key)`` per step, and
    ``model, opt_state = step.unpack(packed)`` where the model is needed. Runs of two or more
    interchangeable trained blocks stay stacked between steps and the optimizer runs once
    per row, vectorised (``eqxtl.training.packed``): the same updates, and, where the blocks
    scan, a compiled step that does not grow with depth. Where that would change what the
    optimizer computes (a global-norm clip, per-block learning rates), with a ``mesh``, or
    with no such run, the packed form holds the model as it is (``packed.reason`` says why)
    and steps as ``step``; so does it from the first ``step.packed`` call on batches where
    the blocks run unrolled (``with_scan``'s size rule), where every row would be copied
    out of its stack. ``step.pack`` consumes what it stacks when the step would donate.
    """
    bn = _bn_mode(bn)
    accumulate = count(accumulate, "make_step(accumulate=...)", TrainingError)
    _step = _traced_step(loss_fn, optimizer, spec, bn, mesh, accumulate, skip_nonfinite)

    options = _step_compiler_options()
    _release_compiler_memory()
    donating = eqx.filter_jit(_step, donate="all-except-first", compiler_options=options)
    plain = eqx.filter_jit(_step, compiler_options=options)

    def arguments(model, state, opt_state, batch, key):
        if isinstance(model, Packed):  # step form: its own optimizer state
            parts, opt_state = (model.params, model.frozen, model.layout), model.opt_state
        else:
            parts = (*_partitioned(model, spec), None)
        return _arguments(mesh, accumulate, donate, parts, state, opt_state, batch, key)

    def step(model, state, opt_state, batch, key=None):
        if isinstance(model, Packed):
            raise EqxtlError(
                "step(model, ...) takes the model itself; a model in step form (from "
                "step.pack) steps with step.packed(packed, state, batch, key)."
            )
        donates, frozen, args = arguments(model, state, opt_state, batch, key)
        trainable, new_state, opt_state, metrics = (donating if donates else plain)(*args)
        state = state if new_state is None else new_state
        return eqx.combine(trainable, frozen), state, opt_state, metrics

    def packed_step(carry: Packed, state, batch, key=None):
        if not isinstance(carry, Packed):
            raise EqxtlError(
                f"step.packed takes a model in step form, made by step.pack(model, "
                f"opt_state), got {type(carry).__name__}: step the model itself with "
                "step(model, state, opt_state, batch, key)."
            )
        _check_accumulate(batch, accumulate)  # before the carry may be unstacked
        carry = form.for_batch(carry, state, batch)
        donates, _, args = arguments(carry, state, None, batch, key)
        params, new_state, opt_state, metrics = (donating if donates else plain)(*args)
        state = state if new_state is None else new_state
        return Packed(params, carry.frozen, opt_state, carry.layout, carry.reason), state, metrics

    def consumes(trainable, opt_state) -> bool:  # as the step donates
        return donate if donate is not None else nbytes(trainable, opt_state) >= DONATE_MIN_BYTES

    scans = functools.partial(_blocks_scan, loss_fn, spec, bn, accumulate)
    form = StepForm(optimizer, spec, mesh=mesh, consumes=consumes, scans=scans)

    def pack_model(model, opt_state) -> Packed:
        trainable, frozen = _partitioned(model, spec)
        _check_opt_state(optimizer, trainable, opt_state)
        return form.pack(trainable, frozen, opt_state)

    def lower(model, state, opt_state, batch, key=None) -> jax.stages.Lowered:
        """The step lowered for these arguments, as ``step`` would compile it (same
        donation); leaves may be ``jax.ShapeDtypeStruct``: nothing is allocated or run.
        With arrays only, compiling it compiles the step's first call too. ``model`` may be
        in step form (``step.pack``; ``opt_state`` is then ignored): ``step.packed``'s
        (blocks unstacked where they would run unrolled on this batch; ``model`` is kept)."""
        if isinstance(model, Packed) and model.layout is not None:
            # from shapes: unstacking arrays here would hold a second copy of the model
            run = functools.partial(form.for_batch, probe=True)
            as_run = eqx.filter_eval_shape(run, model, state, batch)
            model = model if as_run.layout is not None else as_run
        donates, _, args = arguments(model, state, opt_state, batch, key)
        if all(eqx.is_array(x) for x in jax.tree.leaves(args) if is_leaf_value(x)):
            # real arrays: the step's own jit, so that compiling this lowering is the
            # compilation the first call would make (cached: not done twice)
            return (donating if donates else plain).lower(*args).lowered
        return _lowered(_step, options, donates, *args)

    # exposed for tests and benchmarks (tracing counts, cost analysis); `lower` and `spec`
    # for memory_report
    step.compiled = plain if donate is False else donating
    step.lower = lower
    step.spec = spec
    step.pack = pack_model
    step.packed = packed_step
    step.unpack = unpack
    return step


def _blocks_scan(loss_fn, spec, bn, accumulate, carry: Packed, state, batch) -> bool:
    """Whether a run of ``carry``'s blocks scans in the step on ``batch`` (its micro-batches
    with ``accumulate``): the forward pass traced abstractly, with each run's scan decision
    recorded (``blockwise.recording_scans``)."""
    batch = jax.tree.map(lambda v: v[: v.shape[0] // accumulate] if v.ndim else v, batch)

    def forward(params, frozen, state, batch):
        model = eqx.combine(carry.layout.unpack(params), frozen)
        return loss_fn(batchnorm_modes(model, spec, bn=bn), state, batch, jax.random.key(0))[0]

    with recording_scans() as runs:
        eqx.filter_eval_shape(forward, carry.params, carry.frozen, state, batch)
    # nothing recorded: the forward pass ran no blocks in Python (a cached jit of the
    # user's own), so nothing says they unroll
    return not runs or any(runs)


def _partitioned(model, spec) -> tuple[Any, Any]:
    """``eqx.partition(model, spec)``, with a ``RuleError`` where the spec does not fit."""
    try:
        return eqx.partition(model, spec)
    except (ValueError, TypeError):
        check_spec(model, spec)  # a RuleError that says so, if that is the cause
        raise


def _arguments(mesh, accumulate, donate, parts, state, opt_state, batch, key):
    """``(donates, frozen, (passthrough, trainable, opt_state))``: what the compiled step
    takes; ``parts``: ``(trainable, frozen, layout)`` (``layout``: ``training.packed``'s, or
    ``None``)."""
    trainable, frozen, layout = parts
    shardings = None
    if mesh is not None:
        batch = shard_batch(batch, mesh)
    _check_accumulate(batch, accumulate)  # the global batch, across processes too
    if mesh is not None:
        shardings = _Static(shardings_of((trainable, state, opt_state)))
    donates = donate
    if donates is None:
        donates = nbytes(trainable, opt_state) >= DONATE_MIN_BYTES
    passthrough = (frozen, state, batch, key, layout)
    passthrough += () if shardings is None else (shardings,)
    return donates, frozen, (passthrough, trainable, opt_state)


def _lowered(step_fn, options, donates, passthrough, trainable, opt_state):
    """``step_fn`` lowered as ``eqx.filter_jit(step_fn, donate="all-except-first")`` (or
    without donation) lowers it, with ``jax.ShapeDtypeStruct`` leaves taken as arguments
    (``filter_jit`` would take them for static values)."""
    dynamic, static = eqx.partition((passthrough, (trainable, opt_state)), is_leaf_value)

    def run(passthrough, donated):
        (passthrough, (trainable, opt_state)) = eqx.combine((passthrough, donated), static)
        return eqx.filter(step_fn(passthrough, trainable, opt_state), eqx.is_array)

    jitted = jax.jit(run, donate_argnums=(1,) if donates else (), compiler_options=options)
    return jitted.lower(*dynamic)


class _Static:
    """A tree of shardings handed to the compiled step as one static (hashable) value."""

    def __init__(self, tree):
        self.tree = tree
        self._key = tuple(jax.tree.leaves(tree)), jax.tree.structure(tree)

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, _Static) and self._key == other._key


def _constrain(tree, shardings: _Static):
    """``tree`` (trainable, state, optimizer state; ``None`` for an unchanged state) held
    to the shardings its inputs had."""
    out = []
    for part, where in zip(tree, shardings.tree, strict=True):
        if part is None:
            out.append(None)
            continue
        leaves, treedef = jax.tree.flatten(part)
        specs = jax.tree.leaves(where)
        if len(specs) != len(leaves):  # a state whose structure the step changed
            out.append(part)
            continue
        fixed = [
            jax.lax.with_sharding_constraint(x, s) if isinstance(s, NamedSharding) else x
            for x, s in zip(leaves, specs, strict=True)
        ]
        out.append(jax.tree.unflatten(treedef, fixed))
    return tuple(out)


def _gathered(model, mesh):
    """``model`` with every array replicated where the forward pass uses it: FSDP gathers
    each parameter before its layer, and the transpose reduce-scatters its gradient. Left to
    itself, XLA's sharding propagation pushes a parameter's ``"fsdp"`` split into the
    activations (a hidden axis split 8 ways), then must undo it for the batch split ("SPMD
    involuntary full rematerialization": a replicated copy of the activation)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(
        lambda x: jax.lax.with_sharding_constraint(x, replicated) if eqx.is_array(x) else x,
        model,
    )


def _check_accumulate(batch: dict, k: int) -> None:
    if k == 1:
        return
    for name, x in batch.items():
        size = np.shape(x)[0]
        if size % k:
            raise TrainingError(
                f"make_step(accumulate={k}) cannot cut a batch of {size} examples "
                f"(batch[{name!r}]) into {k} equal micro-batches: use a batch size that "
                f"is a multiple of {k}, or an accumulate that divides {size}."
            )


def _accumulated(loss_of, k: int, trainable, state, batch, key, mesh):
    """``(loss, state, metrics, grads)`` of the whole batch from ``k`` micro-batches under
    ``lax.scan``: metric sums added, loss and gradients averaged with the weights
    ``count_i / sum(count)`` (``1 / k`` without a ``count`` metric)."""

    def cut(x):  # example i -> micro-batch i % k: each one spread over every device
        x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
        if mesh is not None:
            spec = PartitionSpec(None, batch_axes(mesh))
            x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
        return x

    micro = jax.tree.map(cut, batch)
    value_and_grad = eqx.filter_value_and_grad(loss_of, has_aux=True)

    def body(carry, xs):
        state, sums, loss_sum, grad_sum = carry
        i, mb = xs
        mkey = None if key is None else jax.random.fold_in(key, i)
        (loss, (state, metrics)), grads = value_and_grad(trainable, state, mb, mkey)
        weight = metrics["count"] if "count" in metrics else jnp.float32(1.0)
        grad_sum = jax.tree.map(lambda a, g: a + weight * g, grad_sum, grads)
        sums = jax.tree.map(jnp.add, sums, metrics)
        return (state, sums, loss_sum + weight * loss, grad_sum), None

    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(lambda mb: loss_of(trainable, state, mb, key)[1][1], first)
    sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    params = eqx.filter(trainable, eqx.is_inexact_array)
    grads = jax.tree.map(jnp.zeros_like, params)  # what trains is float32 at least
    init = (state, sums, jnp.zeros((), jnp.float32), grads)
    (state, sums, loss_sum, grad_sum), _ = jax.lax.scan(body, init, (jnp.arange(k), micro))
    total = jnp.maximum(sums["count"] if "count" in sums else jnp.float32(k), 1.0)
    grads = jax.tree.map(lambda g: g / total, grad_sum)
    return loss_sum / total, state, sums, grads


def _check_opt_state(optimizer, trainable, opt_state) -> None:
    """``OptimizerMismatchError`` unless ``opt_state`` has the structure, shapes and dtypes
    ``optimizer.init(trainable)`` gives (an opt_state from another model or spec would fail
    deep inside optax otherwise)."""
    expected = jax.eval_shape(optimizer.init, trainable)
    got_leaves, got_def = jax.tree.flatten(opt_state)
    want_leaves, want_def = jax.tree.flatten(expected)
    where = None
    if got_def != want_def:
        where = first_difference(opt_state, expected)
    else:
        for i, (g, w) in enumerate(zip(got_leaves, want_leaves, strict=True)):
            if jnp.shape(g) != w.shape or jnp.result_type(g) != w.dtype:
                where = (
                    f"leaf {i} is {jnp.result_type(g)}{list(jnp.shape(g))}, "
                    f"{w.dtype}{list(w.shape)} expected"
                )
                break
    if where is not None:
        raise OptimizerMismatchError(
            f"The optimizer state does not fit this model's trainable leaves ({where}): it "
            "comes from another model, spec or optimizer. Make it with "
            "optimizer.init(eqx.filter(model, spec)) for the model and spec you train "
            "(again after changing either)."
        )


_CPU_STEP_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


@functools.cache
def _step_compiler_options() -> dict | None:
    """XLA options for the train step on the CPU: the memory-optimised scheduler. Reverse
    mode leaves XLA free to compute what the backward pass needs early (the shifted views
    behind ``Conv2d``'s kernel gradients); the default scheduler keeps them alive from the
    forward pass on: ResNet-50's full step (batch 32) peaks at 7.1 GB with it, 6.0 GB
    without, at the same speed (CLIP-B/32: unchanged; ``benchmarks/README.md``). ``None``
    off the CPU, or where this jaxlib has no such option."""
    if jax.default_backend() != "cpu":
        return None
    try:
        jax.jit(lambda x: x + 1, compiler_options=_CPU_STEP_OPTIONS).lower(1.0).compile()
    except Exception:  # an older or newer jaxlib without this option: its default
        return None
    return dict(_CPU_STEP_OPTIONS)


_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_TRIM_AFTER_S = 1.0


@functools.cache
def _release_compiler_memory() -> None:
    """On the CPU with glibc: after each XLA compilation longer than a second, hand the
    memory the compiler freed back to the system (``_util.heap.trim_heap``).

    Why: XLA:CPU compiles a train step with several threads, each on its own malloc arena;
    what they free stays in the process, fragmented, and the step's temporaries (one block
    of ``memory_report(...).temp`` bytes, too big for the arenas: a fresh ``mmap``) come on
    top of it. Trimming lowered the peak RSS of ResNet-50's full step (batch 32) by 1.0 GB,
    CLIP-B/32's by 0.38 GB (``docs/guides/memory.md``). It costs milliseconds, once per
    compilation; results do not change."""
    if jax.default_backend() != "cpu":
        return

    def listener(event: str, duration: float, **_) -> None:
        if event == _BACKEND_COMPILE_EVENT and duration >= _TRIM_AFTER_S:
            trim_heap()

    jax.monitoring.register_event_duration_secs_listener(listener)


DONATE_MIN_BYTES = 64 * 2**20
"""``make_step(donate=None)`` donates from this many bytes of trainable leaves + optimizer
state on."""


def make_eval_step(loss_fn: LossFn | None = None, *, mesh=None) -> Callable:
    """Compiled ``eval_step(model, state, batch) -> metrics`` (the loss function's metric
    sums) in inference mode (blocks unrolled: nothing is differentiated, see
    ``eqxtl.with_scan``). With a ``mesh`` (``eqxtl.make_mesh``), each batch is split over
    its ``"data"`` and ``"fsdp"`` axes; the model must be on it (``eqxtl.shard``)."""
    loss_fn = loss_fn or task_loss()

    @eqx.filter_jit
    def _eval_step(model, state, batch):
        model = eqx.nn.inference_mode(model, True)
        _, (_, metrics) = loss_fn(model, state, batch, None)
        return metrics

    def eval_step(model, state, batch):
        return _eval_step(model, state, batch if mesh is None else shard_batch(batch, mesh))

    return eval_step
