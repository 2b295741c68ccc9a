"""``evaluate`` and ``predict``: a model's metrics on every example of some data, and its
predictions for images; the metric sums both ``fit`` and ``evaluate`` add up."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._util.checks import count
from ..data.loader import BatchSource, Loader, SourceBatches
from ..data.sources import check_labels
from ..errors import DataError, EqxtlError
from ..models._arch import Preprocessing
from ..models.batching import batched
from ..models.heads import Classifier
from ..models.registry import preprocessing_for
from .parallel import host, on_mesh, shard_batch
from .step import make_eval_step, task_loss
from .tasks import Classification, Task


def summarise(task: Task, acc: dict | None, prefix: str) -> dict:
    """``{prefix_metric: value}`` from metric sums on the device (``{}``: none counted)."""
    if acc is None:
        return {}
    acc = {k: float(v) for k, v in host(acc).items()}
    if acc.get("count", 0.0) == 0.0:
        return {}
    return {f"{prefix}_{k}": float(v) for k, v in task.summarise(acc).items()}


def eval_sums(eval_step, model, state, loader) -> dict | None:
    """The metric sums of ``eval_step`` over one pass of ``loader`` (on the device)."""
    acc = None
    for batch in loader.epoch(0):
        metrics = eval_step(model, state, batch)
        acc = metrics if acc is None else jax.tree.map(jnp.add, acc, metrics)
    return acc


def evaluate(
    model,
    state,
    data,
    *,
    task: Task | None = None,
    batch_size: int = 32,
    preprocessing: Preprocessing | None = None,
    eval_step: Callable | None = None,
    num_workers: int | None = None,
    mesh=None,
) -> dict:
    """The task's metrics of ``model`` on every example of ``data`` (a source or a Loader).

    Returns, for classification (the default task), ``{"loss", "accuracy", "count"}``. No
    example is dropped: the last batch is padded and masked (a Loader that augments or
    drops the last batch is refused, as is ``preprocessing`` with a Loader). A classifier
    whose class names are the data's in another order is refused.

    ``mesh`` (``eqxtl.make_mesh``): each batch is split over its devices (the batch size
    must be a multiple of their number); arrays of ``model`` and ``state`` not yet on it are
    placed as ``eqxtl.shard`` does by default.
    """
    batch_size = count(batch_size, "evaluate(batch_size=...)", DataError)
    task = task or Classification()
    if preprocessing is not None and isinstance(data, BatchSource):
        raise DataError(
            "evaluate(preprocessing=...) applies to a source, but data is a batch source "
            f"({type(data).__name__}) with its own: pass the source, or leave preprocessing out."
        )
    loader = batches_of(data, model, preprocessing, batch_size, num_workers=num_workers)
    check_every_example(loader, "evaluate(data=...)")
    if isinstance(task, Classification):
        check_model_classes(model, loader, "evaluate(data=...)")
    if mesh is not None:
        model, state = on_mesh((model, state), mesh)
    eval_step = eval_step or make_eval_step(task_loss(task), mesh=mesh)
    acc = host(eval_sums(eval_step, model, state, loader))
    out = {k: float(v) for k, v in task.summarise({k: float(v) for k, v in acc.items()}).items()}
    return {**out, "count": int(acc["count"])}


def predict(
    model,
    state,
    images: Sequence[np.ndarray] | np.ndarray,
    *,
    task: Task | None = None,
    labels: bool = False,
    class_names: Sequence[str] | None = None,
    preprocessing=None,
    batch_size: int = 32,
    mesh=None,
) -> np.ndarray | list[str]:
    """Predictions for a list (or ``(N, H, W, 3)`` array) of uint8 ``(H, W, 3)`` images:
    class probabilities ``(N, num_classes)`` (the task's ``activation`` of the outputs:
    sigmoid for ``MultiLabel``, the raw outputs for ``Regression``).

    ``labels=True``: the names of the most likely classes, a list of ``N`` strings (from
    ``class_names``, or the model's own when it was loaded from a fine-tuned folder).

    ``mesh`` (``eqxtl.make_mesh``, one process): each batch is split over its devices (the
    batch size must be a multiple of their number), the model placed as in ``evaluate``.
    """
    from ..data.images import preprocess

    if not isinstance(model, Classifier):
        raise EqxtlError(
            f"predict needs a model with a head (eqxtl.Classifier), got a bare "
            f"{type(model).__name__}, whose outputs are features, not class scores. Wrap it "
            "(eqxtl.Classifier(backbone, num_classes, key=...)) and train the head, or load "
            "a fine-tuned folder / a checkpoint with its head (from_pretrained(..., "
            "keep_head=True))."
        )
    if isinstance(images, np.ndarray) and images.ndim == 3 and images.shape[-1] in (3, 4):
        raise DataError(
            f"predict got one array of shape {images.shape}: that reads as {images.shape[0]} "
            "grayscale images, but looks like a single (H, W, 3) image. Pass a list "
            "[image] or a batch image[None] (N, H, W, 3)."
        )
    if labels:
        class_names = list(class_names or getattr(model, "class_names", None) or [])
        if len(class_names) != model.num_classes:
            raise EqxtlError(
                f"labels=True needs {model.num_classes} class names; "
                f"{'got ' + str(len(class_names)) if class_names else 'the model has none'}. "
                "Pass class_names=..., or train with a source that has class_names."
            )
    batch_size = count(batch_size, "predict(batch_size=...)", DataError)
    task = task or Classification()
    preprocessing = preprocessing or preprocessing_for(model)
    model = eqx.nn.inference_mode(model, True)
    forward = eqx.filter_jit(lambda m, s, x: task.activation(batched(m)(x, s)[0]))
    if mesh is not None:
        model, state = on_mesh((model, state), mesh)
    out = []
    for start in range(0, len(images), batch_size):
        # PIL images as they are: as_rgb applies EXIF orientation, palettes and 16 bits
        chunk = [preprocess(im, preprocessing) for im in images[start : start + batch_size]]
        x = np.stack(chunk + [chunk[0]] * (batch_size - len(chunk)))  # fixed shape
        if mesh is not None:
            x = shard_batch({"x": x}, mesh)["x"]
        out.append(np.asarray(forward(model, state, x))[: len(chunk)])
    probs = np.concatenate(out) if out else np.zeros((0, model.num_classes), np.float32)
    if labels:
        return [class_names[i] for i in np.argmax(probs, axis=-1)]
    return probs


def check_every_example(batches, what: str) -> None:
    """``DataError`` for a batch source that would not score every example as it is: one
    that augments, or drops the last partial batch (a ``Loader`` built for training)."""
    if getattr(batches, "augment", None) is not None or getattr(batches, "drop_last", False):
        raise DataError(
            f"{what}: this {type(batches).__name__} augments or drops the last partial batch "
            "(augment=, drop_last=), so an evaluation would score transformed or fewer "
            "examples: give the source, or a Loader without them."
        )


def check_model_classes(model, data, what: str) -> None:
    """``DataError`` unless ``data``'s labels can mean ``model``'s classes (a
    ``Classifier``; ``data`` a ``SourceBatches``, else nothing to check): labels within
    its head, and no class names that are the model's own in another order (label ``i``
    would be scored against another class's row)."""
    if not isinstance(model, Classifier) or not isinstance(data, SourceBatches):
        return
    check_labels(data, model.num_classes)
    names = list(getattr(data.source, "class_names", None) or [])
    if len(names) != model.num_classes:  # fewer: labels are checked as they are read
        return
    try:
        model.with_training_info(class_names=names)
    except ValueError as e:
        raise DataError(f"{what}: {e}") from None


def batches_of(
    data, model, preprocessing=None, batch_size=32, *, shuffle=False, seed=0, num_workers=None
) -> BatchSource:
    """``data`` itself when it is a ``BatchSource`` (``Loader``, ``GrainLoader``, ...),
    otherwise a ``Loader`` over it (a source) with ``model``'s checkpoint preprocessing."""
    if isinstance(data, BatchSource):
        return data
    if not (hasattr(type(data), "__getitem__") and hasattr(type(data), "__len__")):
        raise DataError(
            f"Expected a source (ArraySource, ImageFolder, TFDSSource, ...) or a batch source "
            f"(eqxtl.Loader, eqxtl.GrainLoader, ...), got {type(data).__name__}."
        )
    preprocessing = preprocessing or preprocessing_for(model)
    kwargs = {} if num_workers is None else {"num_workers": num_workers}
    return Loader(data, preprocessing, batch_size, shuffle=shuffle, seed=seed, **kwargs)
