"""What a model is trained to do: a task turns model outputs and labels into a loss and metrics.

A task is three pure functions of ``outputs (B, K)`` (float32) and the batch's ``label``:

- ``per_example(outputs, labels) -> (B,)``: the loss of each example;
- ``sums(outputs, labels, weights) -> dict``: metric numerators that add up over batches
  (the loop adds ``loss_sum`` and ``count`` itself);
- ``summarise(sums) -> dict``: the readable metrics (``loss``, ``accuracy``, ``mae``...).

``activation`` maps outputs to predictions (``predict``). ``Classification`` is the default of
``fit``; ``MultiLabel`` (sigmoid binary cross-entropy, multi-hot labels ``(B, K)``) and
``Regression`` (mean squared error, targets ``(B,)`` or ``(B, K)``) are the other built-ins.
Write your own by subclassing ``Task``. The built-ins check the labels' shape (and
``Classification`` their integer dtype) when the step is traced: integer labels ``(B,)``
given to ``MultiLabel`` are a ``DataError``, not a broadcast along the class axis.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float

from .._util.checks import real
from ..errors import DataError


def _labels_like(task: str, outputs, labels, want: str) -> None:
    """``DataError`` unless ``labels`` has the shape ``want`` describes (shapes are static:
    this runs once, when the step is traced, before any training)."""
    if outputs.ndim != 2:
        raise DataError(
            f"{task} takes model outputs of shape (B, K), got {tuple(outputs.shape)}: the "
            "model must return one row of K outputs per example."
        )
    b, k = outputs.shape
    shapes = {"(B,)": (b,), "(B, K)": (b, k), "(B,) or (B, K)": (b,) if k == 1 else (b, k)}
    ok = labels.shape == shapes[want] or (want == "(B,) or (B, K)" and labels.shape == (b, k))
    if not ok:
        raise DataError(
            f"{task} needs labels of shape {want} = {shapes[want]} for outputs of shape "
            f"{(b, k)} (B examples, K outputs), got labels of shape {tuple(labels.shape)} "
            f"({labels.dtype})." + _LABEL_HINTS[task]
        )


_LABEL_HINTS = {
    "Classification": " Classification takes one integer class index per example (soft "
    "targets (B, K) come from eqxtl.Mixup).",
    "MultiLabel": " MultiLabel takes multi-hot rows, one 0/1 per class (e.g. "
    "jax.nn.one_hot(labels, K) for one class each; for integer class indices use "
    "Classification).",
    "Regression": " Regression takes one target per output: (B,) only when the model has "
    "one output (K = 1).",
}


@dataclasses.dataclass(frozen=True)
class Task:
    """Base class: subclasses define ``per_example``, ``sums``, ``summarise``, ``metrics``."""

    metrics: tuple[str, ...] = dataclasses.field(default=("loss",), init=False)
    """Names of the metrics ``summarise`` returns (``fit`` prefixes them ``train_``/``test_``)."""

    def per_example(self, outputs: Float[Array, "b k"], labels: Array) -> Float[Array, " b"]:
        """The loss of each example ``(b,)``: what a ``Task`` subclass must define."""
        raise NotImplementedError(
            f"{type(self).__name__} defines no per_example(outputs, labels) -> (batch,) loss: "
            "a Task subclass must (see eqxtl.Classification for an example)."
        )

    def sums(self, outputs: Float[Array, "b k"], labels: Array, weights: Array) -> dict:
        return {}

    def summarise(self, sums: dict) -> dict:
        return {"loss": sums["loss_sum"] / max(sums["count"], 1.0)}

    def activation(self, outputs: Float[Array, "b k"]) -> Float[Array, "b k"]:
        return outputs


def loss_and_metrics(
    task: Task, outputs: Float[Array, "b k"], labels: Array, mask: Array | None = None
) -> tuple[Float[Array, ""], dict]:
    """Masked mean loss of ``task`` over a batch, and its metric sums (``loss_sum``,
    ``count`` and the task's own), which add up exactly over batches of different fill."""
    outputs = outputs.astype(jnp.float32)
    weights = (jnp.ones(outputs.shape[:1], bool) if mask is None else mask).astype(jnp.float32)
    per_example = task.per_example(outputs, labels)
    # where, not multiply: a masked padding example with a non-finite loss must not poison it
    loss_sum = jnp.sum(jnp.where(weights > 0, per_example, 0.0))
    n = jnp.sum(weights)
    sums = {"loss_sum": loss_sum, "count": n, **task.sums(outputs, labels, weights)}
    return loss_sum / jnp.maximum(n, 1.0), sums


@dataclasses.dataclass(frozen=True)
class Classification(Task):
    """Softmax cross-entropy over integer labels ``(B,)``, with optional label smoothing.
    Metrics: ``loss``, ``accuracy``."""

    label_smoothing: float = 0.0
    metrics: tuple[str, ...] = dataclasses.field(default=("loss", "accuracy"), init=False)

    def __post_init__(self):
        real(
            self.label_smoothing,
            "Classification(label_smoothing=...)",
            DataError,
            low=0,
            high=1,
            high_open=True,
        )

    _soft_targets = False
    """Whether float ``(B, K)`` labels are soft targets, used as given (``Mixup``'s mixed
    and already smoothed ones); plain ``Classification`` refuses them (multi-hot rows of
    multi-label data would train silently as a wrong distribution)."""

    def _is_soft(self, labels) -> bool:
        return (
            self._soft_targets and labels.ndim == 2 and jnp.issubdtype(labels.dtype, jnp.floating)
        )

    def per_example(self, outputs, labels):
        if self._is_soft(labels):
            _labels_like("Classification", outputs, labels, "(B, K)")
            return optax.softmax_cross_entropy(outputs, labels)
        _labels_like("Classification", outputs, labels, "(B,)")
        if not jnp.issubdtype(labels.dtype, jnp.integer):
            raise DataError(
                f"Classification needs integer class indices (B,), got {labels.dtype} labels"
                ": float labels would be cast silently. For one target per example use "
                "Regression; for soft or multi-hot targets MultiLabel."
            )
        targets = jax.nn.one_hot(labels, outputs.shape[-1])
        if self.label_smoothing:
            targets = optax.smooth_labels(targets, self.label_smoothing)
        return optax.softmax_cross_entropy(outputs, targets)

    def sums(self, outputs, labels, weights):
        if self._is_soft(labels):
            labels = jnp.argmax(labels, -1)
        return {"correct": jnp.sum((jnp.argmax(outputs, -1) == labels) * weights)}

    def summarise(self, sums):
        n = max(sums["count"], 1.0)
        return {"loss": sums["loss_sum"] / n, "accuracy": sums["correct"] / n}

    def activation(self, outputs):
        return jax.nn.softmax(outputs, axis=-1)


@dataclasses.dataclass(frozen=True)
class MultiLabel(Task):
    """Independent sigmoid binary cross-entropy per class over multi-hot labels ``(B, K)``.
    Metrics: ``loss`` (mean over classes), ``accuracy`` (fraction of the ``B * K`` yes/no
    decisions at ``threshold`` that are right)."""

    threshold: float = 0.5
    metrics: tuple[str, ...] = dataclasses.field(default=("loss", "accuracy"), init=False)

    def __post_init__(self):
        real(self.threshold, "MultiLabel(threshold=...)", DataError, low=0, high=1)

    def per_example(self, outputs, labels):
        _labels_like("MultiLabel", outputs, labels, "(B, K)")
        return jnp.mean(optax.sigmoid_binary_cross_entropy(outputs, labels), axis=-1)

    def sums(self, outputs, labels, weights):
        right = (jax.nn.sigmoid(outputs) > self.threshold) == (labels > 0.5)
        return {"correct": jnp.sum(jnp.mean(right, axis=-1) * weights)}

    def summarise(self, sums):
        n = max(sums["count"], 1.0)
        return {"loss": sums["loss_sum"] / n, "accuracy": sums["correct"] / n}

    def activation(self, outputs):
        return jax.nn.sigmoid(outputs)


@dataclasses.dataclass(frozen=True)
class Regression(Task):
    """Mean squared error against float targets ``(B,)`` (one output) or ``(B, K)``.
    Metrics: ``loss`` (MSE), ``mae``."""

    metrics: tuple[str, ...] = dataclasses.field(default=("loss", "mae"), init=False)

    def _error(self, outputs, labels):
        _labels_like("Regression", outputs, labels, "(B,) or (B, K)")
        labels = labels.astype(jnp.float32)
        return outputs - (labels[:, None] if labels.ndim == 1 else labels)

    def per_example(self, outputs, labels):
        return jnp.mean(jnp.square(self._error(outputs, labels)), axis=-1)

    def sums(self, outputs, labels, weights):
        return {"abs_sum": jnp.sum(jnp.mean(jnp.abs(self._error(outputs, labels)), -1) * weights)}

    def summarise(self, sums):
        n = max(sums["count"], 1.0)
        return {"loss": sums["loss_sum"] / n, "mae": sums["abs_sum"] / n}
