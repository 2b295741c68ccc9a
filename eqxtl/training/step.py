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
import optax

from .._util.pytree_paths import first_difference
from ..errors import EqxtlError, OptimizerMismatchError
from ..models.batching import batched
from ..models.layers import BatchNorm
from ..tuning.filters import check_spec
from .parallel import shard_batch
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


def make_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    spec: Any,
    *,
    bn: str = "auto",
    donate: bool | None = None,
    mesh=None,
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

    With a ``mesh`` (``eqxtl.data_mesh()``), each batch is split over its devices (data
    parallel); pass the model, state and optimizer state through ``eqxtl.replicate`` once.
    """
    bn = _bn_mode(bn)

    def _step(passthrough, trainable, opt_state):
        frozen, state, batch, key = passthrough
        _check_opt_state(optimizer, trainable, opt_state)  # at trace time only
        state_leaves = jax.tree.leaves(state)  # before BatchNorm's state.set invalidates it

        def loss_of(trainable):
            model = batchnorm_modes(eqx.combine(trainable, frozen), spec, bn=bn)
            return loss_fn(model, state, batch, key)

        (loss, (new_state, metrics)), grads = eqx.filter_value_and_grad(loss_of, has_aux=True)(
            trainable
        )
        updates, new_opt_state = optimizer.update(grads, opt_state, trainable)
        new_trainable = eqx.apply_updates(trainable, updates)
        finite = jnp.isfinite(loss)
        for g in jax.tree.leaves(grads):
            finite = finite & jnp.all(jnp.isfinite(g))
        # With every BatchNorm frozen the state passes through untouched: returning it would
        # cost one copy per array (~100 small ops for ResNet-50, ~5% of a head-only step).
        new_leaves = jax.tree.leaves(new_state)
        unchanged = len(state_leaves) == len(new_leaves) and all(
            a is b for a, b in zip(state_leaves, new_leaves, strict=True)
        )
        if skip_nonfinite:
            keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
            new_trainable = jtu.tree_map(keep, new_trainable, trainable)
            new_opt_state = jtu.tree_map(keep, new_opt_state, opt_state)
            if not unchanged:
                leaves, treedef = jtu.tree_flatten(new_state)
                kept = [keep(a, b) for a, b in zip(leaves, state_leaves, strict=True)]
                new_state = jtu.tree_unflatten(treedef, kept)
        metrics = {"loss": loss, **metrics, "nonfinite": 1.0 - finite.astype(jnp.float32)}
        return new_trainable, None if unchanged else new_state, new_opt_state, metrics

    options = _step_compiler_options()
    donating = eqx.filter_jit(_step, donate="all-except-first", compiler_options=options)
    plain = eqx.filter_jit(_step, compiler_options=options)

    def step(model, state, opt_state, batch, key=None):
        if mesh is not None:
            batch = shard_batch(batch, mesh)
        try:
            trainable, frozen = eqx.partition(model, spec)
        except (ValueError, TypeError):
            check_spec(model, spec)  # a RuleError that says so, if that is the cause
            raise
        donates = donate
        if donates is None:
            donates = _nbytes(trainable, opt_state) >= DONATE_MIN_BYTES
        trainable, new_state, opt_state, metrics = (donating if donates else plain)(
            (frozen, state, batch, key), trainable, opt_state
        )
        state = state if new_state is None else new_state
        return eqx.combine(trainable, frozen), state, opt_state, metrics

    # exposed for tests and benchmarks (tracing counts, cost analysis)
    step.compiled = plain if donate is False else donating
    return step


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


DONATE_MIN_BYTES = 64 * 2**20
"""``make_step(donate=None)`` donates from this many bytes of trainable leaves + optimizer
state on."""


def _nbytes(*trees: Any) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(eqx.filter(trees, eqx.is_array)))


def make_eval_step(loss_fn: LossFn | None = None, *, mesh=None) -> Callable:
    """Compiled ``eval_step(model, state, batch) -> metrics`` (the loss function's metric
    sums) in inference mode (with a ``mesh``, each batch is split over its devices)."""
    loss_fn = loss_fn or task_loss()

    @eqx.filter_jit
    def _eval_step(model, state, batch):
        model = eqx.nn.inference_mode(model, True)
        _, (_, metrics) = loss_fn(model, state, batch, None)
        return metrics

    def eval_step(model, state, batch):
        return _eval_step(model, state, batch if mesh is None else shard_batch(batch, mesh))

    return eval_step
