"""The fine-tuning loop: ``fit``, ``evaluate``, ``predict``.

``fit`` is a short loop over parts you can swap: a **task** (loss and metrics,
``eqxtl.tasks``), **callbacks** (``eqxtl.callbacks``) and **phases** (``Phase``: what
trains, with which optimizer, for how long). Each phase compiles one train step and one
eval step, streams fixed-shape batches (the last partial batch is padded and masked, so it
never recompiles), and trains on cached backbone features when nothing in the backbone
trains. The run folder (``eqxtl.runs``) holds ``last`` and ``best`` checkpoints, the history
and a lock; a resume continues from ``last`` to exactly the weights an uninterrupted run
would have reached (the data order, the augmentation and the step keys are pure functions of
``(seed, epoch, step)``), in the right phase.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
from jax.sharding import Mesh

from ..data.features import FeatureLoader, backbone_frozen, extract_features
from ..data.images import Augment
from ..data.loader import Loader, ProcessShard
from ..data.sources import check_labels, check_same_classes
from ..errors import DataError, EqxtlError, TrainingError
from ..models._arch import Preprocessing
from ..models.batching import batched
from ..models.heads import Classifier
from ..models.registry import preprocessing_for
from .callbacks import improved, metric_mode
from .parallel import auto_mesh, check_same_length, host, local, replicate
from .runs import RunDir, signature
from .step import _bn_mode, make_eval_step, make_step, task_loss
from .tasks import Classification, Task


@dataclasses.dataclass
class FitResult:
    """What ``fit`` returns: the trained model and everything needed to continue."""

    model: Any
    state: eqx.nn.State
    opt_state: Any
    history: list[dict]
    step: int
    out_dir: Path | None
    stopped: str | None = None
    """Why a callback stopped the run early (``None``: it ran to the end)."""
    class_names: list[str] | None = None
    """The training data's class names (also in the checkpoints' ``config.json``)."""
    preprocessing: Preprocessing | None = None
    """The training preprocessing (also in the checkpoints' ``config.json``)."""

    @property
    def final(self) -> dict:
        """The last evaluation record (``test_accuracy``, ``test_loss``, ...)."""
        evals = [h for h in self.history if any(k.startswith("test_") for k in h)]
        return evals[-1] if evals else (self.history[-1] if self.history else {})


@dataclasses.dataclass(frozen=True)
class Phase:
    """One stage of a run: train the leaves ``spec`` marks with ``optimizer`` for ``epochs``
    (or ``steps``). ``bn`` and ``cache_features`` default to ``fit``'s.

    The Keras / fastai two-phase recipe (``eqxtl.two_phases``): the head alone on cached
    features, then everything with a small learning rate and BatchNorm frozen.
    """

    spec: Any
    optimizer: optax.GradientTransformation
    epochs: int | None = None
    steps: int | None = None
    bn: str | None = None
    cache_features: bool | str | os.PathLike | None = None
    name: str | None = None


def two_phases(
    model,
    *,
    head_epochs: int = 1,
    epochs: int = 1,
    head_lr: float = 1e-3,
    lr: float = 1e-5,
    head: str = "head",
) -> list[Phase]:
    """Keras's "freeze, train the head, unfreeze, fine-tune with a low rate" (fastai's
    ``fine_tune``) as two ``Phase``s: ``head`` alone with Adam at ``head_lr`` for
    ``head_epochs`` (on cached features), then every leaf with Adam at ``lr`` for
    ``epochs``, BatchNorm in inference mode throughout (``bn="frozen"``)."""
    from ..tuning.filters import everything, trainable

    return [
        Phase(trainable(model, head), optax.adam(head_lr), epochs=head_epochs, name="head"),
        Phase(everything(model), optax.adam(lr), epochs=epochs, bn="frozen", name="fine-tune"),
    ]


def warmup_cosine(peak_lr: float, total_steps: int, warmup_steps: int = 0, end_lr=0.0):
    """Linear warmup from 0 to ``peak_lr`` over ``warmup_steps``, then cosine to ``end_lr``."""
    return optax.warmup_cosine_decay_schedule(
        0.0, peak_lr, max(warmup_steps, 0), max(total_steps, warmup_steps + 1), end_lr
    )


# ---------------------------------------------------------------- metrics on device

_GUARD0 = {"nonfinite": 0.0, "first_bad": -1, "last_loss": float("nan")}


@jax.jit
def _accumulate(acc: dict, guard: dict, metrics: dict, step) -> tuple[dict, dict]:
    """Add a step's metric sums (a non-finite step adds nothing) and track non-finite steps:
    their count, the first one and the last finite loss before it. Stays on the device."""
    bad = metrics["nonfinite"] > 0
    acc = {k: acc[k] + jnp.where(bad, 0.0, metrics[k]) for k in acc}
    before_first = guard["first_bad"] < 0
    guard = {
        "nonfinite": guard["nonfinite"] + metrics["nonfinite"],
        "first_bad": jnp.where(bad & before_first, step, guard["first_bad"]),
        "last_loss": jnp.where(~bad & before_first, metrics["loss"], guard["last_loss"]),
    }
    return acc, guard


def _zero_sums(metrics: dict) -> dict:
    return {k: jnp.zeros((), jnp.float32) for k in metrics if k not in ("loss", "nonfinite")}


def _summarise(task: Task, acc: dict | None, prefix: str) -> dict:
    if acc is None:
        return {}
    acc = {k: float(v) for k, v in host(acc).items()}
    if acc.get("count", 0.0) == 0.0:
        return {}
    return {f"{prefix}_{k}": float(v) for k, v in task.summarise(acc).items()}


def _eval_sums(eval_step, model, state, loader) -> dict | None:
    acc = None
    for batch in loader.epoch(0):
        metrics = eval_step(model, state, batch)
        acc = metrics if acc is None else jax.tree.map(jnp.add, acc, metrics)
    return acc


# ---------------------------------------------------------------- evaluate / predict


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
) -> dict:
    """The task's metrics of ``model`` on every example of ``data`` (a source or a Loader).

    Returns, for classification (the default task), ``{"loss", "accuracy", "count"}``. No
    example is dropped: the last batch is padded and masked.
    """
    task = task or Classification()
    loader = _loader(
        data, model, preprocessing, batch_size, shuffle=False, seed=0, num_workers=num_workers
    )
    eval_step = eval_step or make_eval_step(task_loss(task))
    acc = host(_eval_sums(eval_step, model, state, loader))
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
) -> np.ndarray | list[str]:
    """Predictions for a list (or ``(N, H, W, 3)`` array) of uint8 ``(H, W, 3)`` images:
    class probabilities ``(N, num_classes)`` (the task's ``activation`` of the outputs:
    sigmoid for ``MultiLabel``, the raw outputs for ``Regression``).

    ``labels=True``: the names of the most likely classes, a list of ``N`` strings (from
    ``class_names``, or the model's own when it was loaded from a fine-tuned folder).
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
    task = task or Classification()
    preprocessing = preprocessing or preprocessing_for(model)
    model = eqx.nn.inference_mode(model, True)
    forward = eqx.filter_jit(lambda m, s, x: task.activation(batched(m)(x, s)[0]))
    out = []
    for start in range(0, len(images), batch_size):
        chunk = [
            preprocess(np.asarray(im), preprocessing) for im in images[start : start + batch_size]
        ]
        x = np.stack(chunk + [chunk[0]] * (batch_size - len(chunk)))  # fixed shape
        out.append(np.asarray(forward(model, state, x))[: len(chunk)])
    probs = np.concatenate(out) if out else np.zeros((0, model.num_classes), np.float32)
    if labels:
        return [class_names[i] for i in np.argmax(probs, axis=-1)]
    return probs


def _loader(
    data, model, preprocessing, batch_size, *, shuffle, seed, augment=None, num_workers=None
):
    if isinstance(data, Loader) or (hasattr(data, "epoch") and hasattr(data, "__len__")):
        return data  # a Loader, or any batch source with epoch(e, start_step) and len
    preprocessing = preprocessing or preprocessing_for(model)
    kwargs = {} if num_workers is None else {"num_workers": num_workers}
    return Loader(
        data, preprocessing, batch_size, shuffle=shuffle, seed=seed, augment=augment, **kwargs
    )


# ---------------------------------------------------------------- the run


class Run:
    """The live state of a ``fit`` call, as callbacks see it."""

    def __init__(self, *, total_steps: int, steps_per_epoch: int, out_dir: Path | None):
        self.step = 0
        self.phase = 0
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.out_dir = out_dir
        self.model = self.state = self.opt_state = None
        self.history: list[dict] = []
        self.step_losses: list[dict] = []  # {"step", "phase", "loss"} of every step so far
        self.stopped: str | None = None
        self._lr_scale: float | None = None

    @property
    def epoch(self) -> float:
        return self.step / self.steps_per_epoch

    def stop(self, reason: str = "stopped by a callback") -> None:
        """End the run after the current evaluation (its checkpoints are written)."""
        self.stopped = reason

    @property
    def lr_scale(self) -> float:
        """A factor on every update (1.0 at the start); only with a callback that declares
        ``scales_lr = True``."""
        if self._lr_scale is None:
            raise TrainingError(
                "run.lr_scale needs a callback that declares scales_lr = True (fit then "
                "adds the scale to the optimizer)."
            )
        return self._lr_scale

    @lr_scale.setter
    def lr_scale(self, value: float) -> None:
        self.lr_scale  # noqa: B018  (raises without a scaling callback)
        self._lr_scale = float(value)
        inner, scale_state = self.opt_state
        hyper = dict(scale_state.hyperparams)
        old = hyper["step_size"]
        hyper["step_size"] = jax.device_put(jnp.asarray(value, old.dtype), old.sharding)
        self.opt_state = (inner, scale_state._replace(hyperparams=hyper))


def _with_scale(optimizer):
    return optax.chain(optimizer, optax.inject_hyperparams(optax.scale)(step_size=1.0))


def _call(callbacks, hook: str, *args) -> None:
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if fn is not None:
            fn(*args)


def _steps_of(phase: Phase, steps_per_epoch: int) -> int:
    if phase.steps is not None:
        return int(phase.steps)
    return int(phase.epochs if phase.epochs is not None else 1) * steps_per_epoch


def _trains_something(model, spec) -> bool:
    flat, treedef = jtu.tree_flatten(model)
    try:
        on = treedef.flatten_up_to(spec)
    except (ValueError, TypeError):
        raise TrainingError(
            "The spec does not have the model's structure: build it from this model "
            "(eqxtl.trainable(model, ...))."
        ) from None
    return any(
        bool(o) and eqx.is_inexact_array(x) and x.size for x, o in zip(flat, on, strict=True)
    )


def _union(specs: list) -> Any:
    return jax.tree.map(lambda *xs: any(bool(x) for x in xs), *specs)


def _class_names(loader, num_classes: int) -> list[str] | None:
    names = getattr(getattr(loader, "source", loader), "class_names", None)
    return list(names) if names is not None and len(names) == num_classes else None


def _default_best(task: Task, has_test: bool) -> str:
    if has_test:
        return "test_accuracy" if "accuracy" in task.metrics else "test_loss"
    return "train_loss"


def fit(
    model,
    state: eqx.nn.State,
    optimizer: optax.GradientTransformation | None = None,
    spec=None,
    train_data=None,
    *,
    test_data=None,
    phases: Sequence[Phase] | None = None,
    task: Task | None = None,
    epochs: int = 1,
    steps: int | None = None,
    batch_size: int = 32,
    eval_every: int | None = None,
    label_smoothing: float = 0.0,
    augment: Augment | None = None,
    preprocessing: Preprocessing | None = None,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    resume: bool = True,
    checkpoint_every: int | None = None,
    best: str = "auto",
    best_mode: str = "auto",
    bn: str = "auto",
    train_bn: bool = False,
    callbacks: Sequence[Any] = (),
    callback: Callable[[int, dict], None] | None = None,
    max_nonfinite: int = 0,
    progress: bool = True,
    num_workers: int | None = None,
    cache_features: bool | str | os.PathLike = True,
    compute_dtype=None,
    mesh: Mesh | None | str = "auto",
) -> FitResult:
    """Fine-tune ``model`` (a ``Classifier``): only the leaves ``spec`` marks train.

    **Arguments:**

    - `optimizer`, `spec`: e.g. from ``eqxtl.param_groups`` (or any optax transformation
      and a filter spec); the optimizer sees the trainable partition only. Or `phases`.
    - `train_data`, `test_data`: sources (``TFDSSource``, ``ImageFolder``, ``ArraySource``)
      or ``Loader``s; preprocessing defaults to the checkpoint's (``preprocessing_for``).
    - `phases`: a list of ``Phase(spec, optimizer, epochs=..., bn=...)`` run one after the
      other (e.g. ``eqxtl.two_phases(model)``) instead of one `optimizer`/`spec`; one
      compile per phase, one continuous history (records carry ``phase``).
    - `task`: loss and metrics (``eqxtl.tasks``); default ``Classification(label_smoothing)``.
    - `epochs` or `steps`: how long (``steps`` wins when given).
    - `eval_every`: evaluate on ``test_data`` every N steps (and at the end of each phase).
    - `out_dir`: the run folder (``eqxtl.runs``): ``last/`` and ``best/`` checkpoints
      (``save_pretrained`` layout plus the training state), ``history.json`` (+ ``.jsonl``,
      ``.png``), ``run.json``; locked while the run uses it. With ``resume`` (the default) a
      run continues from ``last`` after checking that the stored configuration (model
      shapes, spec, optimizer state, seed, batch size, data length, phases) is this one's
      (``TrainingError`` naming the differences otherwise); ``resume=False`` starts over
      and deletes the folder's previous checkpoints.
    - `best`, `best_mode`: the metric (``"test_accuracy"``, ``"test_loss"``, ``"train_loss"``,
      any ``test_``/``train_`` metric of the task) whose best value ``best/`` keeps;
      ``"min"``/``"max"``/``"auto"`` (min for losses and errors).
    - `bn`: BatchNorm mode, independent of what trains: ``"auto"`` (a BatchNorm trains its
      statistics iff its weights train), ``"frozen"`` (loaded statistics always; Keras's
      advice after unfreezing), ``"train"`` (every BatchNorm; ``train_bn=True``).
    - `callbacks`: objects with ``on_step`` / ``on_eval`` / ``on_phase_begin`` /
      ``on_fit_end`` (``eqxtl.callbacks``: ``EarlyStopping``, ``ReduceLROnPlateau``,
      ``LRSchedule``, ``Lambda``).
    - `callback(step, metrics)`: called after each step with the step's metrics (host
      values, so it syncs: keep it for tests and logging).
    - `max_nonfinite`: a step whose loss or gradient is NaN/inf changes nothing (it is
      skipped inside the compiled step); after more than ``max_nonfinite`` such steps ``fit``
      raises ``TrainingError`` naming the first one and the last finite loss. The check
      runs where the loop already waits for the device (progress refresh every 10 steps,
      callbacks, evaluation, checkpoints, the end), so a few more steps may be skipped
      before it fires. A model with non-finite weights is never written.
    - `cache_features`: when nothing in the backbone trains (and there is no augmentation
      and BatchNorm is not ``"train"``), run the backbone once over the data
      (``extract_features``) and train the head on the cached features: the same result,
      epochs after the first cost only the head. ``True``: in memory; a directory: on disk,
      reused across runs; ``False``: always run the backbone.
    - `compute_dtype`: e.g. ``jnp.bfloat16`` for mixed precision (see ``task_loss``);
      weights and optimizer state stay float32.
    - `mesh`: data parallelism (``eqxtl.data_mesh``); ``"auto"`` uses every local device
      when there is more than one (the batch size must then be a multiple of their count),
      ``None`` one device.

    The returned model is the model passed in, trained (its static fields unchanged); the
    checkpoints written to `out_dir` also record the training class names and preprocessing
    (``FitResult.class_names`` / ``.preprocessing``), so ``from_pretrained(out_dir/"best")``
    reloads the whole ``Classifier``.
    """
    bn = _bn_mode(bn, train_bn)
    task = task or Classification(label_smoothing)
    if phases is None:
        if optimizer is None or spec is None:
            raise TrainingError("fit needs an optimizer and a spec, or phases=[Phase(...)].")
        phases = [Phase(spec, optimizer, epochs=epochs, steps=steps)]
    elif optimizer is not None or spec is not None:
        raise TrainingError("Pass either optimizer and spec, or phases, not both.")
    phases = [
        dataclasses.replace(
            p,
            bn=_bn_mode(p.bn or bn),
            cache_features=cache_features if p.cache_features is None else p.cache_features,
        )
        for p in phases
    ]
    if train_data is None:
        raise TrainingError("fit needs train_data.")
    for i, p in enumerate(phases):
        if not _trains_something(model, p.spec):
            where = f"Phase {i}" + (f" ({p.name})" if p.name else "") if len(phases) > 1 else ""
            raise TrainingError(
                f"{where or 'The spec'} trains nothing: no floating-point leaf is marked "
                "True. Check the rules (eqxtl.summary(model, spec) shows what trains)."
            )
    out_dir = Path(out_dir) if out_dir is not None else None
    train = _loader(
        train_data,
        model,
        preprocessing,
        batch_size,
        shuffle=True,
        seed=seed,
        augment=augment,
        num_workers=num_workers,
    )
    test = None
    if test_data is not None:
        test = _loader(
            test_data,
            model,
            preprocessing,
            batch_size,
            shuffle=False,
            seed=seed,
            num_workers=num_workers,
        )

    def with_info(m):  # recorded in checkpoints; predict(labels=True) uses them
        if not isinstance(m, Classifier):
            return m
        names = _class_names(train, m.num_classes)
        return m.with_training_info(names, getattr(train, "preprocessing", None))

    if isinstance(task, Classification) and isinstance(model, Classifier):
        for data in (train, test):  # labels in range, same classes: before any training
            if isinstance(data, Loader):
                check_labels(data, model.num_classes)
        if isinstance(train, Loader) and isinstance(test, Loader):
            check_same_classes(train, test)
    processes = jax.process_count()
    if processes > 1:  # each process reads its part of every global batch
        check_same_length(
            train_data=len(getattr(train, "source", train)),
            test_data=-1 if test is None else len(getattr(test, "source", test)),
        )
        train, test = (ProcessShard(x) if isinstance(x, Loader) else x for x in (train, test))
    steps_per_epoch = len(train)
    if steps_per_epoch == 0:
        raise DataError("The training data is empty.")
    lengths = [_steps_of(p, steps_per_epoch) for p in phases]
    bounds = np.cumsum([0, *lengths])  # phase i runs steps bounds[i] .. bounds[i+1]
    total = int(bounds[-1])
    best = _default_best(task, test is not None) if best == "auto" else best
    best_mode = metric_mode(best, best_mode)
    known = [f"train_{m}" for m in task.metrics]
    known += [f"test_{m}" for m in task.metrics] if test is not None else []
    if best not in known:
        raise TrainingError(
            f"best={best!r} is not a metric this run reports; it reports {known}"
            + ("" if test is not None else " (test_* ones need test_data)")
            + "."
        )
    mesh = auto_mesh() if mesh == "auto" else mesh
    scales_lr = any(getattr(cb, "scales_lr", False) for cb in callbacks)
    optimizers = [_with_scale(p.optimizer) if scales_lr else p.optimizer for p in phases]

    def opt_init(i, m):
        return optimizers[i].init(eqx.filter(m, phases[i].spec))

    sig = signature(
        model,
        [
            (p.spec, jax.eval_shape(lambda m, i=i: opt_init(i, m), model))
            for i, p in enumerate(phases)
        ],
        seed=seed,
        batch_size=int(getattr(train, "batch_size", batch_size)),
        train_length=len(getattr(train, "source", train)),
        phase_steps=[int(n) for n in lengths[:-1]],  # the last phase may grow
        task=repr(task),
        bn=[p.bn for p in phases],
    )

    run = Run(total_steps=total, steps_per_epoch=steps_per_epoch, out_dir=out_dir)
    writer = jax.process_index() == 0  # one process writes the run folder
    folder = RunDir(out_dir, is_writer=writer) if out_dir is not None else None
    with folder if folder is not None else contextlib.nullcontext():
        meta, opt_state = None, None
        if folder is not None:
            if writer:
                folder.recover()
            folder.check_signature(sig, resume=resume)
            if not resume and writer:
                folder.reset()
            _barrier("eqxtl-fit-start")  # the others read the folder once it is consistent
            if resume and folder.has_checkpoint():

                def like(meta):
                    return model, state, opt_init(_phase_at(bounds, meta["step"]), model)

                found = folder.load(like)
                if found is not None:
                    (model, state, opt_state), meta, _ = found
            _barrier("eqxtl-fit-loaded")
            if writer:
                folder.write_signature(sig)
                run.step_losses = folder.read_steps(meta["step"] if meta else 0)
                folder.write_history(
                    meta["history"] if meta else [], steps=run.step_losses, restart=True
                )
            else:
                folder = None  # process 0 writes
        if meta is None:
            # The step may donate what trains: work on a copy so that the caller's model
            # stays usable (e.g. for a second fit from the same pretrained weights).
            trainable, frozen = eqx.partition(model, _union([p.spec for p in phases]))
            model = eqx.combine(jtu.tree_map(jnp.copy, trainable), frozen)
        else:
            run.step, run.history, run.stopped = meta["step"], list(meta["history"]), None
            run.stopped = meta.get("stopped")
            for cb, cb_state in zip(callbacks, meta.get("callbacks", []), strict=False):
                if cb_state is not None and hasattr(cb, "load_state_dict"):
                    cb.load_state_dict(cb_state)
        loop = _Loop(
            run=run,
            task=task,
            train=train,
            test=test,
            folder=folder,
            callbacks=list(callbacks),
            callback=callback,
            best=best,
            best_mode=best_mode,
            best_value=meta.get("best") if meta else None,
            seed=seed,
            eval_every=eval_every,
            checkpoint_every=checkpoint_every,
            max_nonfinite=max_nonfinite,
            with_info=with_info,
            compute_dtype=compute_dtype,
            mesh=mesh,
            batch_size=batch_size,
            progress=progress,
            scales_lr=scales_lr,
        )
        run.model, run.state, run.opt_state = model, state, opt_state
        loop.bar = _progress(total, run.step, progress)
        try:
            for i, phase in enumerate(phases):
                if run.step >= bounds[i + 1] or run.stopped:
                    continue
                resumed_here = meta is not None and _phase_at(bounds, meta["step"]) == i
                loop.phase(i, phase, optimizers[i], int(bounds[i + 1]), resumed_here)
        finally:
            if loop.bar is not None:
                loop.bar.close()
        _call(callbacks, "on_fit_end", run)
    names = _class_names(train, getattr(run.model, "num_classes", -1))
    return FitResult(
        run.model,
        run.state,
        run.opt_state,
        run.history,
        run.step,
        out_dir,
        run.stopped,
        names,
        getattr(train, "preprocessing", None),
    )


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _phase_at(bounds, step: int) -> int:
    """The phase that step ``step`` (steps done so far) continues in."""
    return int(min(np.searchsorted(bounds, step, side="right") - 1, len(bounds) - 2))


@dataclasses.dataclass
class _Loop:
    """The loop of one ``fit`` call, one phase at a time."""

    run: Run
    task: Task
    train: Any
    test: Any
    folder: RunDir | None
    callbacks: list
    callback: Callable | None
    best: str
    best_mode: str
    best_value: float | None
    seed: int
    eval_every: int | None
    checkpoint_every: int | None
    max_nonfinite: int
    compute_dtype: Any
    mesh: Mesh | None
    batch_size: int
    progress: bool
    scales_lr: bool
    with_info: Callable
    bar: Any = None
    guard: dict | None = None
    pending: list = dataclasses.field(default_factory=list)

    def phase(self, i: int, phase: Phase, optimizer, end: int, resumed: bool) -> None:
        run = self.run
        run.phase = i
        model, state = run.model, run.state
        train, test = self.train, self.test
        features = _can_cache(model, phase.spec, train, phase.bn, phase.cache_features)
        if features:
            cache_dir = None if phase.cache_features is True else phase.cache_features
            train, test = (
                None
                if loader is None
                else FeatureLoader(
                    extract_features(
                        model,
                        state,
                        loader,
                        cache_dir=cache_dir,
                        batch_size=self.batch_size,
                        progress=self.progress,
                    ),
                    loader,
                )
                for loader in (train, test)
            )
        loss = task_loss(self.task, compute_dtype=self.compute_dtype, features=features)
        step_fn = make_step(loss, optimizer, phase.spec, bn=phase.bn, mesh=self.mesh)
        eval_step = make_eval_step(loss, mesh=self.mesh)
        opt_state = run.opt_state if resumed else optimizer.init(eqx.filter(model, phase.spec))
        if self.mesh is not None:
            model, state, opt_state = replicate((model, state, opt_state), self.mesh)
        run.model, run.state, run.opt_state = model, state, opt_state
        if self.scales_lr:
            run._lr_scale = float(opt_state[1].hyperparams["step_size"])
        _call(self.callbacks, "on_phase_begin", run)
        if self.guard is None:
            self.guard = {k: jnp.asarray(v) for k, v in _GUARD0.items()}
            self.guard["first_bad"] = self.guard["first_bad"].astype(jnp.int32)

        base_key = jax.random.key(self.seed)
        per_step = self.callback is not None or any(
            getattr(cb, "on_step", None) is not None for cb in self.callbacks
        )
        acc, since, images = None, time.perf_counter(), 0
        steps_per_epoch = run.steps_per_epoch
        while run.step < end:
            epoch, start = divmod(run.step, steps_per_epoch)
            for batch in train.epoch(epoch, start_step=start):
                key = jax.random.fold_in(base_key, run.step)
                opt_state = run.opt_state
                model, state, opt_state, metrics = step_fn(model, state, opt_state, batch, key)
                if acc is None:
                    acc = _zero_sums(metrics)
                run.step += 1
                acc, self.guard = _accumulate(acc, self.guard, metrics, run.step)
                self.pending.append((run.step, metrics["loss"]))
                run.model, run.state, run.opt_state = model, state, opt_state
                images += int(np.sum(batch["mask"])) if "mask" in batch else self.batch_size
                if per_step:
                    values = host(metrics)
                    self.check()
                    if self.callback is not None:
                        self.callback(run.step, values)
                    _call(self.callbacks, "on_step", run, values)
                if self.bar is not None:
                    if run.step % 10 == 0 or run.step == end:
                        self.check()
                        self.bar.set_postfix(self._postfix(acc, images, since), refresh=False)
                    self.bar.update(1)
                if (self.eval_every and run.step % self.eval_every == 0) or run.step == end:
                    record = self.evaluate(acc, images, since, eval_step, test)
                    if self.bar is not None:
                        self.bar.set_postfix(self._postfix(acc, images, since, record))
                    acc, since, images = None, time.perf_counter(), 0
                    if run.stopped:
                        return
                elif self.checkpoint_every and run.step % self.checkpoint_every == 0:
                    if self.folder is not None:
                        self.check()
                        self.save(("last",))
                if run.step >= end:
                    break

    def flush_losses(self) -> None:
        """Fetch the per-step losses gathered since the last flush (the loop calls this
        where it waits for the device anyway) into ``run.step_losses`` and the run folder."""
        if not self.pending:
            return
        values = host([loss for _, loss in self.pending])
        new = [
            {"step": s, "phase": self.run.phase, "loss": float(v)}
            for (s, _), v in zip(self.pending, values, strict=True)
        ]
        self.pending = []
        self.run.step_losses.extend(new)
        if self.folder is not None:
            self.folder.append_steps(new)

    def check(self) -> None:
        """Raise ``TrainingError`` when more non-finite steps happened than allowed."""
        self.flush_losses()
        guard = host(self.guard)
        if float(guard["nonfinite"]) <= self.max_nonfinite:
            return
        if self.folder is not None:
            self.folder.write_history(self.run.history, steps=self.run.step_losses)
        n, first = int(guard["nonfinite"]), int(guard["first_bad"])
        last = float(guard["last_loss"])
        raise TrainingError(
            f"Training diverged: the loss or a gradient was NaN or infinite at step {first} "
            f"({n} non-finite step{'s' if n > 1 else ''} so far, each skipped; the last finite "
            f"loss was {last:.6g}). The model keeps the weights from before them; no "
            "checkpoint holds non-finite weights. Lower the learning rate, check the data for "
            "NaN, or allow some skipped steps with max_nonfinite=N."
        )

    def evaluate(self, acc, images, since, eval_step, test) -> dict:
        run = self.run
        self.check()
        record: dict = {"step": run.step, "epoch": run.epoch, "phase": run.phase}
        record.update(_summarise(self.task, acc, "train"))
        record["images_per_sec"] = images / max(time.perf_counter() - since, 1e-9)
        nonfinite = int(host(self.guard["nonfinite"]))
        if nonfinite:
            record["nonfinite_steps"] = nonfinite
        if test is not None:
            sums = _eval_sums(eval_step, run.model, run.state, test)
            record.update(_summarise(self.task, sums, "test"))
        run.history.append(record)
        _call(self.callbacks, "on_eval", run, record)
        value = record.get(self.best)
        is_best = improved(value, self.best_value, self.best_mode)
        if is_best:
            self.best_value = value
        if self.folder is not None:
            self.save(("last", "best") if is_best else ("last",))
            self.folder.write_history(run.history, [record], steps=run.step_losses)
        return record

    def save(self, links) -> None:
        run = self.run
        meta = {
            "step": run.step,
            "phase": run.phase,
            "history": run.history,
            "best": self.best_value,
            "best_metric": self.best,
            "seed": self.seed,
            "stopped": run.stopped,
            "callbacks": [
                cb.state_dict() if hasattr(cb, "state_dict") else None for cb in self.callbacks
            ],
        }
        tree = local((run.model, run.state, run.opt_state))  # this process's replica
        self.folder.save(links, *tree, meta, self.with_info)

    def _postfix(self, acc, images, since, record=None) -> dict:
        out = {}
        summary = _summarise(self.task, acc, "train")
        for k, short in (("train_loss", "loss"), ("train_accuracy", "acc")):
            if k in summary:
                out[short] = f"{summary[k]:.3f}"
        out["img/s"] = f"{images / max(time.perf_counter() - since, 1e-9):.1f}"
        if record and self.best in record:
            out[self.best] = f"{record[self.best]:.3f}"
        return out


def _can_cache(model, spec, train, bn, cache_features) -> bool:
    return (
        cache_features is not False
        and bn != "train"
        and isinstance(train, Loader)
        and train.augment is None
        and isinstance(model, Classifier)
        and backbone_frozen(model, spec)
    )


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
