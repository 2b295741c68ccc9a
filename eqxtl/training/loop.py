"""The fine-tuning loop: ``fit``.

``fit`` is a short loop over parts you can swap: a **task** (loss and metrics,
``eqxtl.tasks``), **callbacks** (``eqxtl.callbacks``) and **phases** (``Phase``: what
trains, with which optimizer, for how long). Each phase compiles one train step and one
eval step, streams fixed-shape batches (the last partial batch is padded and masked, so it
never recompiles), and trains on cached backbone features when nothing in the backbone
trains. The data pipeline belongs to the loader (``Loader``, ``GrainLoader``), the run
folder to ``Checkpoint``, the execution options to ``Runtime``. The run folder
(``eqxtl.training.runs``) holds ``last`` and ``best`` checkpoints, the history and a lock; a
resume continues from ``last`` to exactly the weights an uninterrupted run would have
reached (the data order, the augmentation and the step keys are pure functions of
``(seed, epoch, step)``), in the right phase.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax

from .._util.checks import count
from ..data.loader import SourceBatches, for_this_process
from ..data.sources import check_same_classes
from ..errors import DataError, TrainingError
from ..models._arch import Preprocessing
from ..models.heads import Classifier
from .callbacks import EarlyStopping, LRSchedule, ReduceLROnPlateau, metric_mode
from .evaluation import batches_of, check_every_example, check_model_classes
from .options import Checkpoint, Runtime
from .parallel import auto_mesh, check_same_length
from .phases import Phase, check_phases, union
from .runs import HYPER, RunDir, barrier, optimizer_hyperparameters, sigint_at_step_end, signature
from .session import Loop, Run, call_hooks, progress_bar, training_optimizer
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
    resumed_from: int | None = None
    """The step the run resumed from (``None``: it started from the model passed in)."""

    @property
    def final(self) -> dict:
        """The last evaluation record (``test_accuracy``, ``test_loss``, ...)."""
        evals = [h for h in self.history if any(k.startswith("test_") for k in h)]
        return evals[-1] if evals else (self.history[-1] if self.history else {})


DEFAULT_BATCH_SIZE = 32
"""The batch size of the ``Loader`` that ``fit`` builds for a plain source."""


def fit(
    model,
    state: eqx.nn.State,
    optimizer: optax.GradientTransformation | None = None,
    spec=None,
    train_data=None,
    *,
    test_data=None,
    epochs: int = 1,
    phases: Sequence[Phase] | None = None,
    task: Task | None = None,
    callbacks: Sequence[Any] = (),
    checkpoint: Checkpoint | None = None,
    runtime: Runtime | None = None,
) -> FitResult:
    """Fine-tune ``model`` (a ``Classifier``): only the leaves ``spec`` marks train.

    >>> eqxtl.fit(model, state, optimizer, spec, train, test_data=test, epochs=3)

    Twelve arguments, one per concern, Keras / Lightning style: the data pipeline belongs
    to the loader (batch size, augmentation, preprocessing, workers: pass an
    ``eqxtl.Loader(...)`` or ``eqxtl.GrainLoader(...)``), what trains and for how long to
    ``Phase`` (steps, BatchNorm mode), the run folder to ``Checkpoint``, how it runs to
    ``Runtime``.

    **Arguments:**

    - `optimizer`, `spec`: e.g. from ``eqxtl.param_groups`` (or any optax transformation
      and a filter spec); the optimizer sees the trainable partition only. Or `phases`.
    - `train_data`, `test_data`: sources (``TFDSSource``, ``ImageFolder``,
      ``ArraySource``), batched by a ``Loader`` with the checkpoint's preprocessing
      (``preprocessing_for``), 32 examples a batch (the training data shuffled with
      ``runtime.seed``); or batch sources (``eqxtl.data.loader.BatchSource``: ``Loader``,
      ``GrainLoader``, ``ProcessShard``, your own). A test source next to a training
      ``Loader`` takes that Loader's preprocessing; a test batch source must score every
      example as it is (no ``augment``, no ``drop_last``). Labels, and class names in the
      head's order, are checked before any training.
    - `epochs`: how long, with `optimizer` and `spec` (for steps, or a BatchNorm mode:
      ``phases=[Phase(spec, optimizer, steps=..., bn="frozen")]``).
    - `phases`: a list of ``Phase(spec, optimizer, epochs=..., bn=...)`` run one after the
      other (e.g. ``eqxtl.two_phases(model)``: linear probe, then fine-tuning) instead of
      one `optimizer`/`spec`; one compile per phase, one continuous history (records carry
      ``phase``).
    - `task`: loss and metrics (``eqxtl.tasks``); default ``Classification()`` (label
      smoothing: ``Classification(label_smoothing=0.1)``).
    - `callbacks`: objects with ``on_step`` / ``on_eval`` / ``on_phase_begin`` /
      ``on_fit_end`` / ``on_resume`` (``eqxtl.callbacks``: ``EarlyStopping``, ``ReduceLROnPlateau``,
      ``LRSchedule``, ``TensorBoard``, ``Lambda`` for a function of each step; ``EMA``:
      an average of the weights, evaluated and exported).
    - `checkpoint`: ``eqxtl.Checkpoint(out_dir, resume=True, every=None, best="auto",
      mode="auto")``: the run folder, resumed from; ``None``: nothing is written.
    - `runtime`: ``eqxtl.Runtime(seed, eval_every, compute_dtype, mesh, accumulate,
      max_nonfinite, progress, cache_features)``.

    The returned model is the model passed in, trained (its static fields unchanged, so the
    specs and optimizer state built for it still fit); the checkpoints also record the
    training class names and preprocessing (``FitResult.class_names`` / ``.preprocessing``),
    so ``from_pretrained(out_dir/"best")`` reloads the whole ``Classifier``. To save the
    returned model on its own with them:
    ``save_pretrained(result.model.with_training_info(result.class_names,
    result.preprocessing), result.state, path)``.
    """
    task = task or Classification()
    runtime = _option(runtime, Runtime, "runtime") or Runtime()
    checkpoint = _option(checkpoint, Checkpoint, "checkpoint")
    callbacks = list(callbacks)
    phases = _phases(model, optimizer, spec, epochs, phases)
    train, test = _data(model, task, train_data, test_data, runtime.seed)
    steps_per_epoch = len(train)
    bounds = np.cumsum([0, *(p.num_steps(steps_per_epoch) for p in phases)])
    best, best_mode = _best_metric(task, checkpoint, test is not None, callbacks)
    _warn_if_evaluations_are_too_few(callbacks, runtime, len(phases), steps_per_epoch)
    scales_lr = any(getattr(cb, "scales_lr", False) for cb in callbacks)
    optimizers = [training_optimizer(p.optimizer, callbacks, scales_lr) for p in phases]

    def opt_init(i, m):
        return optimizers[i].init(eqx.filter(m, phases[i].spec))

    out_dir = None if checkpoint is None else checkpoint.out_dir
    run = Run(total_steps=int(bounds[-1]), steps_per_epoch=steps_per_epoch, out_dir=out_dir)
    writer = jax.process_index() == 0  # one process writes the run folder
    folder = RunDir(out_dir, is_writer=writer) if out_dir is not None else None
    with folder if folder is not None else contextlib.nullcontext():
        sig = _signature(model, phases, opt_init, train, task, runtime, bounds)
        mesh = auto_mesh() if runtime.mesh == "auto" else runtime.mesh
        meta, folder = _resume(folder, checkpoint, sig, run, bounds, (model, state, opt_init), mesh)
        if meta is not None:
            _say_resumed(out_dir, meta, run, phases, bounds, runtime.progress)
        if meta is None:
            # The step may donate what trains: work on a copy so that the caller's model
            # stays usable (e.g. for a second fit from the same pretrained weights).
            trainable, frozen = eqx.partition(model, union([p.spec for p in phases]))
            run.model = eqx.combine(jtu.tree_map(jnp.copy, trainable), frozen)
            run.state = state
            for cb in callbacks:  # what a reused callback kept from an earlier run
                if hasattr(cb, "reset"):
                    cb.reset()
        else:
            for cb, cb_state in zip(callbacks, meta.get("callbacks", []), strict=False):
                if cb_state is not None and hasattr(cb, "load_state_dict"):
                    cb.load_state_dict(cb_state)
            call_hooks(callbacks, "on_resume", run)
        loop = Loop(
            run=run,
            task=task,
            train=train,
            test=test,
            folder=folder,
            callbacks=callbacks,
            best=best,
            best_mode=best_mode,
            best_value=meta.get("best") if meta else None,
            train_sums=_saved_sums(meta),
            eval_due=bool(meta.get("eval_due")) if meta else False,
            nonfinite_before=int(meta.get("nonfinite_steps", 0)) if meta else 0,
            checkpoint_every=None if checkpoint is None else checkpoint.every,
            runtime=runtime,
            mesh=mesh,
            scales_lr=scales_lr,
            with_info=lambda m: _with_info(m, train),
        )
        _run_phases(loop, phases, optimizers, bounds, meta)
        call_hooks(callbacks, "on_fit_end", run)
    names = _class_names(train, getattr(run.model, "num_classes", -1))
    preprocessing = train.preprocessing if isinstance(train, SourceBatches) else None
    return FitResult(
        run.model,
        run.state,
        run.opt_state,
        run.history,
        run.step,
        out_dir,
        run.stopped,
        names,
        preprocessing,
        None if meta is None else int(meta["step"]),
    )


def _saved_sums(meta) -> dict | None:
    """The train metrics' sums a checkpoint written between evaluations kept."""
    sums = meta.get("train_sums") if meta else None
    return None if sums is None else {k: jnp.float32(v) for k, v in sums.items()}


def _run_phases(loop: Loop, phases, optimizers, bounds, meta) -> None:
    """Each phase from where the run stands; on Ctrl-C, ``last`` is written and
    ``KeyboardInterrupt`` re-raised with one line saying how to resume."""
    run = loop.run
    loop.saved_step = None if meta is None else int(meta["step"])
    loop.bar = progress_bar(int(bounds[-1]), run.step, loop.runtime.progress)
    try:
        with sigint_at_step_end(loop):
            for i, phase in enumerate(phases):
                if loop.interrupt_requested:  # during the previous phase's last evaluation
                    raise KeyboardInterrupt
                resumed_here = meta is not None and _saved_phase(meta, bounds) == i
                # a phase that ended on an evaluation a Ctrl-C stopped runs it on resume
                done = run.step >= bounds[i + 1] and not (resumed_here and loop.eval_due)
                if done or run.stopped:
                    continue
                loop.phase(i, phase, optimizers[i], int(bounds[i + 1]), resumed_here)
            if loop.interrupt_requested:  # during the last evaluation: the run is complete
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        if loop.bar is not None:
            loop.bar.close()
            loop.bar = None
        raise KeyboardInterrupt(loop.interrupted()) from None
    finally:
        if loop.bar is not None:
            loop.bar.close()


def _option(value, kind, name: str):
    if value is not None and not isinstance(value, kind):
        raise TrainingError(
            f"fit({name}=...) takes an eqxtl.{kind.__name__}(...), got {type(value).__name__}"
            + (f": eqxtl.Checkpoint({value!r})." if kind is Checkpoint else ".")
        )
    return value


def _phases(model, optimizer, spec, epochs, phases) -> list[Phase]:
    if phases is None:
        if optimizer is None or spec is None:
            raise TrainingError("fit needs an optimizer and a spec, or phases=[Phase(...)].")
        phases = [Phase(spec, optimizer, epochs=count(epochs, "fit(epochs=...)", TrainingError))]
    elif optimizer is not None or spec is not None:
        raise TrainingError("Pass either optimizer and spec, or phases, not both.")
    elif epochs != 1:
        raise TrainingError(
            f"fit(epochs={epochs}) goes with optimizer and spec; with phases, each Phase has "
            "its own epochs (Phase(spec, optimizer, epochs=...))."
        )
    phases = list(phases)
    if not phases:
        raise TrainingError(
            "fit(phases=[]) has nothing to run: give at least one eqxtl.Phase(spec, optimizer, "
            "epochs=...), or optimizer and spec without phases."
        )
    bad = [type(p).__name__ for p in phases if not isinstance(p, Phase)]
    if bad:
        raise TrainingError(
            f"fit(phases=...) takes a list of eqxtl.Phase(spec, optimizer, epochs=...), got "
            f"{', '.join(bad)} in it."
        )
    check_phases(model, phases)
    return phases


def _data(model, task, train_data, test_data, seed: int):
    """The training and test batch sources, labels checked, each process's part."""
    if train_data is None:
        raise TrainingError("fit needs train_data.")
    train = batches_of(train_data, model, batch_size=DEFAULT_BATCH_SIZE, shuffle=True, seed=seed)
    test = None
    if test_data is not None:  # a source: preprocessed as the training Loader's examples
        same = train.preprocessing if isinstance(train, SourceBatches) else None
        test = batches_of(test_data, model, same, batch_size=DEFAULT_BATCH_SIZE)
        check_every_example(test, "test_data")
    if isinstance(task, Classification) and isinstance(model, Classifier):
        if model.num_classes < 2:
            raise TrainingError(
                f"The model's head has {model.num_classes} class: a softmax over one class "
                "is always 1, so the loss is 0 and nothing is learned. Classification needs "
                "at least 2 classes (for one score per example use task=eqxtl.Regression(), "
                "for yes/no labels eqxtl.MultiLabel())."
            )
        # labels in range, classes in the head's order (a zero-shot head's): before training
        for data, what in ((train, "train_data"), (test, "test_data")):
            check_model_classes(model, data, what)
        if isinstance(train, SourceBatches) and isinstance(test, SourceBatches):
            check_same_classes(train.source, test.source)
    if jax.process_count() > 1:  # each process reads its part of every global batch
        check_same_length(
            train_data=_length(train), test_data=-1 if test is None else _length(test)
        )
        train, test = (None if x is None else for_this_process(x) for x in (train, test))
    if len(train) == 0:
        raise DataError("The training data is empty.")
    return train, test


def _length(batches) -> int:
    """Examples (of a ``SourceBatches``) or batches (of another batch source)."""
    return len(batches.source) if isinstance(batches, SourceBatches) else len(batches)


def _best_metric(task: Task, checkpoint: Checkpoint | None, has_test: bool, callbacks):
    best = "auto" if checkpoint is None else checkpoint.best
    if best == "auto":
        if has_test:
            best = "test_accuracy" if "accuracy" in task.metrics else "test_loss"
        else:
            best = "train_loss"
    known = [f"train_{m}" for m in task.metrics]
    known += [f"test_{m}" for m in task.metrics] if has_test else []
    known += [m for cb in callbacks for m in getattr(cb, "metric_names", ())]  # FewShotEval
    for cb in callbacks:  # EarlyStopping, ReduceLROnPlateau: before any step, not after
        watched = getattr(cb, "metric", None)
        if hasattr(cb, "on_eval") and isinstance(watched, str) and watched not in known:
            raise TrainingError(
                f"{type(cb).__name__}(metric={watched!r}): not a metric this run reports; it "
                f"reports {known}" + ("" if has_test else " (test_* ones need test_data)") + "."
            )
        mode = getattr(cb, "mode", None)  # EarlyStopping, ReduceLROnPlateau: its direction
        if hasattr(cb, "on_eval") and isinstance(watched, str) and isinstance(mode, str):
            metric_mode(watched, mode, f"{type(cb).__name__}(metric={watched!r})")
    if best not in known:
        raise TrainingError(
            f"Checkpoint(best=...): {best!r} is not a metric this run reports; it reports {known}"
            + ("" if has_test else " (test_* ones need test_data)")
            + "."
        )
    mode = "auto" if checkpoint is None else checkpoint.mode
    return best, metric_mode(best, mode, f"Checkpoint(best={best!r})")


def _warn_if_evaluations_are_too_few(callbacks, runtime: Runtime, phases: int, epoch: int):
    """EarlyStopping, ReduceLROnPlateau and LRSchedule act at evaluations: without
    ``eval_every`` there is one per phase, so within a phase they never act."""
    acting = [type(cb).__name__ for cb in callbacks if isinstance(cb, _ACT_AT_EVALUATIONS)]
    if acting and runtime.eval_every is None:
        warnings.warn(
            f"{', '.join(acting)}: these callbacks act at evaluations, and with "
            "Runtime(eval_every=None) fit "
            f"evaluates only at the end of each phase ({phases} in all), so within a phase "
            f"they never act: pass Runtime(eval_every=N) to evaluate every N steps (an epoch "
            f"is {epoch}).",
            UserWarning,
            stacklevel=3,
        )


_ACT_AT_EVALUATIONS = (EarlyStopping, ReduceLROnPlateau, LRSchedule)


def _signature(model, phases, opt_init, train, task, runtime: Runtime, bounds) -> dict:
    """What a resumed run must share with the run folder's (``runs.signature``)."""
    lengths = np.diff(bounds)
    return signature(
        model,
        [
            (p.spec, jax.eval_shape(lambda m, i=i: opt_init(i, m), model))
            for i, p in enumerate(phases)
        ],
        seed=runtime.seed,
        batch_size=int(train.batch_size),
        train_length=_length(train),
        train_classes=_source_classes(train),
        phase_steps=[int(n) for n in lengths[:-1]],  # the last phase may grow
        **{
            f"phase {i} {HYPER}": optimizer_hyperparameters(p.optimizer)
            for i, p in enumerate(phases)
        },
        task=repr(task),
        bn=[p.bn for p in phases],
    )


def _resume(folder, checkpoint, sig, run, bounds, start, mesh):
    """Open the run folder: recover what a kill left, check the signature, start over or
    load ``last`` into ``run`` (onto ``mesh``; ``start``: the model, state and optimizer
    initialisation the run starts from). Returns ``(meta of last or None, the folder this process
    writes or None)``."""
    if folder is None:
        return None, None
    writer = folder.is_writer
    resume = checkpoint.resume
    if writer:
        folder.recover()
    folder.check_signature(sig, resume=resume)
    if not resume and writer:
        folder.reset()
    barrier("eqxtl-fit-start")  # the others read the folder once it is consistent
    meta = None
    if resume and folder.has_checkpoint():
        model, state, opt_init = start

        def like(meta):
            i = _saved_phase(meta, bounds)
            return model, state, eqx.filter_eval_shape(opt_init, i, model)

        found = folder.load(like, mesh)
        if found is not None:
            (run.model, run.state, run.opt_state), meta, _ = found
            run.step, run.history = meta["step"], list(meta["history"])
            run.stopped = meta.get("stopped")
    barrier("eqxtl-fit-loaded")
    if not writer:
        return meta, None  # process 0 writes
    folder.write_signature(sig)
    run.step_losses = folder.read_steps(meta["step"] if meta else 0)
    folder.write_history(meta["history"] if meta else [], steps=run.step_losses, restart=True)
    return meta, folder


def _say_resumed(out_dir, meta, run, phases, bounds, progress: bool) -> None:
    """One line (stderr, with the progress bar; the ``eqxtl`` logger always): what resumes."""
    step = int(meta["step"])
    phase = _phase_at(bounds, step)
    where = f" (phase {phase}{f', {phases[phase].name}' if phases[phase].name else ''})"
    line = (
        f"Resuming the run in {out_dir} from step {step} of {run.total_steps}"
        f"{where if len(phases) > 1 else ''}."
    )
    logging.getLogger("eqxtl").info(line)
    if progress:
        print(line, file=sys.stderr, flush=True)


def _with_info(m, train):
    """``m`` with the training class names and preprocessing (recorded in checkpoints;
    ``predict(labels=True)`` uses them)."""
    if not isinstance(m, Classifier):
        return m
    preprocessing = train.preprocessing if isinstance(train, SourceBatches) else None
    return m.with_training_info(_class_names(train, m.num_classes), preprocessing)


def _source_classes(batches) -> list[str] | None:
    """The training source's class names (a resume on other classes is refused)."""
    if not isinstance(batches, SourceBatches):
        return None
    names = getattr(batches.source, "class_names", None)
    return None if names is None else list(names)


def _class_names(batches, num_classes: int) -> list[str] | None:
    names = _source_classes(batches)
    return names if names is not None and len(names) == num_classes else None


def _saved_phase(meta: dict, bounds) -> int:
    """The phase whose optimizer state a checkpoint holds: the one it recorded. At a phase
    boundary (the last step of phase i) that is i, not the phase the next step runs in."""
    return int(meta["phase"]) if "phase" in meta else _phase_at(bounds, meta["step"])


def _phase_at(bounds, step: int) -> int:
    """The phase that step ``step`` (steps done so far) continues in."""
    return int(min(np.searchsorted(bounds, step, side="right") - 1, len(bounds) - 2))
