"""Callbacks: code ``fit`` calls at fixed points of a run.

A callback is any object with some of these methods (each optional):

- ``on_phase_begin(run)``: a phase starts (``run.phase``), or a run resumes in it (also
  at its last step, when its last evaluation is still due);
- ``on_step(run, metrics)``: after each step, with that step's metrics as host values
  (this syncs with the device every step: keep it for logging and tests);
- ``eval_metrics(run, model) -> dict``: at each evaluation, before any ``on_eval``, metrics
  to add to its record (``FewShotEval``), computed on ``model``, the model the evaluation
  scores; with ``metric_names``, the names it adds (so that ``Checkpoint(best=...)``
  can choose ``best/`` by one of them, checked before training);
- ``on_eval(run, record)``: after each evaluation, with its record (``train_loss``,
  ``test_accuracy``, ``fewshot_5shot_accuracy``...);
- ``on_fit_end(run)``;
- ``on_resume(run)``: a run resumes from a checkpoint, before any phase begins (``run``
  holds the checkpoint's step, history, model, state and optimizer state; ``run.phase``
  and ``run.lr_scale`` are set when the phase begins);
- ``wrap_optimizer(optimizer) -> optimizer``: each phase's optimizer as ``fit`` builds it
  (``EMA`` chains its average last, so it lives in the optimizer state);
- ``eval_model(model, opt_state) -> model``: the model evaluations score and checkpoints
  export (``EMA``: the averaged weights; the training state keeps the raw ones).

``run`` is the live ``Run``: ``step``, ``epoch``, ``phase``, ``model``, ``state``,
``opt_state``, ``history``, ``stop()`` and ``lr_scale`` (a factor on every update, for
callbacks that declare ``scales_lr = True``). A callback with state that must survive a
resume defines ``state_dict()`` and ``load_state_dict(d)`` (JSON values), and ``reset()``,
which ``fit`` calls when it starts a run afresh (the same object may serve several runs).

``EarlyStopping``, ``ReduceLROnPlateau`` and ``LRSchedule`` act at evaluations: ``fit``
warns when ``Runtime(eval_every=None)`` leaves one evaluation per phase.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from .._util.checks import count, real
from ..errors import TrainingError

# Words of a metric's name (split at "_") that say which way is better. A name with none
# is an error under mode="auto", as in Keras 3: taking it as one to maximise kept the worst
# checkpoint of a custom `nll`.
_LOWER_IS_BETTER = ("loss", "mae", "mse", "rmse", "error", "err", "nll", "perplexity", "ppl",
                    "cer", "wer", "ece", "brier")  # fmt: skip
_HIGHER_IS_BETTER = ("accuracy", "acc", "auc", "ap", "map", "f1", "iou", "dice", "precision",
                     "recall", "score", "r2", "top1", "top5")  # fmt: skip


def metric_mode(name: str, mode: str = "auto", what: str = "mode='auto'") -> str:
    """``mode``, or with ``mode="auto"``: ``"min"`` for losses and errors, ``"max"`` for
    accuracies and scores (by the words of ``name``); a ``TrainingError`` for a name that
    says neither."""
    if mode not in ("auto", "min", "max"):
        raise TrainingError(f"mode must be 'auto', 'min' or 'max', got {mode!r}.")
    if mode != "auto":
        return mode
    words = set(name.lower().split("_"))
    if words & set(_LOWER_IS_BETTER):
        return "min"
    if words & set(_HIGHER_IS_BETTER):
        return "max"
    raise TrainingError(
        f"{what} cannot tell whether {name!r} is better lower or higher: pass mode='min' or "
        "mode='max'."
    )


def improved(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """Whether ``value`` beats ``best`` by more than ``min_delta`` (NaN never does)."""
    if value is None or not math.isfinite(value):
        return False
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


def _check_watch(self, what: str) -> None:
    """The options ``EarlyStopping`` and ``ReduceLROnPlateau`` share."""
    if not isinstance(self.metric, str):
        raise TrainingError(f"{what}(metric=...) must be a metric name, got {self.metric!r}.")
    metric_mode("loss", self.mode)  # checks mode; the metric's direction: fit, before training
    self.patience = count(self.patience, f"{what}(patience=...)", TrainingError)
    self.min_delta = real(self.min_delta, f"{what}(min_delta=...)", TrainingError, low=0)


def callback_metrics(callbacks, run, model, record: dict) -> dict:
    """What the callbacks' ``eval_metrics(run, model)`` add to an evaluation's ``record``
    (a name the record already has, or that another callback adds, is an error)."""
    added: dict = {}
    for cb in callbacks:
        fn = getattr(cb, "eval_metrics", None)
        if fn is None:
            continue
        metrics = fn(run, model)
        clash = sorted(set(metrics) & (set(record) | set(added)))
        if clash:
            raise TrainingError(
                f"{type(cb).__name__} reports {clash}, which the evaluation already has: "
                "give each callback its own metric names (FewShotEval(name=...))."
            )
        added.update(metrics)
    return added


def require_metric(name: str, record: dict, what: str) -> float:
    if name not in record:
        known = sorted(k for k, v in record.items() if isinstance(v, float) and k != "epoch")
        raise TrainingError(
            f"{what} watches the metric {name!r}, which evaluations do not report; "
            f"they report {known}."
        )
    return record[name]


@dataclasses.dataclass
class EarlyStopping:
    """Stop when ``metric`` has not improved for ``patience`` evaluations."""

    metric: str = "test_loss"
    patience: int = 3
    mode: str = "auto"
    min_delta: float = 0.0
    best: float | None = None
    wait: int = 0

    def __post_init__(self):
        _check_watch(self, "EarlyStopping")
        self._start = (self.best, self.wait)

    def reset(self) -> None:
        self.best, self.wait = self._start

    def on_eval(self, run, record: dict) -> None:
        value = require_metric(self.metric, record, "EarlyStopping")
        if improved(value, self.best, metric_mode(self.metric, self.mode), self.min_delta):
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            run.stop(f"{self.metric} did not improve for {self.patience} evaluations")

    def state_dict(self) -> dict:
        return {"best": self.best, "wait": self.wait}

    def load_state_dict(self, d: dict) -> None:
        self.best, self.wait = d["best"], d["wait"]


@dataclasses.dataclass
class ReduceLROnPlateau:
    """Multiply every update by ``factor`` when ``metric`` has not improved for
    ``patience`` evaluations (down to ``min_scale``)."""

    metric: str = "test_loss"
    factor: float = 0.5
    patience: int = 2
    mode: str = "auto"
    min_delta: float = 0.0
    min_scale: float = 1e-3
    best: float | None = None
    wait: int = 0
    scales_lr = True

    def __post_init__(self):
        _check_watch(self, "ReduceLROnPlateau")
        self._start = (self.best, self.wait)
        what = "ReduceLROnPlateau"
        self.factor = real(
            self.factor,
            f"{what}(factor=...)",
            TrainingError,
            low=0,
            high=1,
            low_open=True,
            high_open=True,
        )
        self.min_scale = real(
            self.min_scale, f"{what}(min_scale=...)", TrainingError, low=0, high=1, low_open=True
        )

    def on_eval(self, run, record: dict) -> None:
        value = require_metric(self.metric, record, "ReduceLROnPlateau")
        if improved(value, self.best, metric_mode(self.metric, self.mode), self.min_delta):
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            run.lr_scale = max(run.lr_scale * self.factor, self.min_scale)
            self.wait = 0

    def reset(self) -> None:
        self.best, self.wait = self._start

    def state_dict(self) -> dict:
        return {"best": self.best, "wait": self.wait}

    def load_state_dict(self, d: dict) -> None:
        self.best, self.wait = d["best"], d["wait"]


@dataclasses.dataclass
class LRSchedule:
    """Set the update scale from the step: ``run.lr_scale = schedule(step)`` before each
    evaluation interval's steps (e.g. a step decay on top of the optimizer's own schedule)."""

    schedule: Callable[[int], float]
    scales_lr = True

    def __post_init__(self):
        if not callable(self.schedule):
            raise TrainingError(
                f"LRSchedule(schedule=...) must be a function of the step, got {self.schedule!r}."
            )

    def _scale(self, step: int) -> float:
        value = self.schedule(step)
        try:  # a Python number, or a 0-d array (optax schedules return jax arrays)
            return real(float(value), "", TrainingError, low=0)
        except (TrainingError, TypeError, ValueError):
            raise TrainingError(
                f"LRSchedule: schedule({step}) returned {value!r}; it must return a finite "
                "scale >= 0."
            ) from None

    _set: tuple[int, int] | None = dataclasses.field(default=None, repr=False, compare=False)
    _resumed: bool = dataclasses.field(default=False, repr=False, compare=False)

    def _apply(self, run, step: int) -> None:
        run.lr_scale = self._scale(step)
        self._set = (int(run.phase), int(step))

    def on_eval(self, run, record: dict) -> None:
        self._apply(run, run.step)

    def on_phase_begin(self, run) -> None:
        # Resumed inside the phase where it last set the scale: the scale of that step (a
        # checkpoint between evaluations must not move the schedule forward).
        resumed, self._resumed = self._resumed, False
        if resumed and self._set is not None and self._set[0] == run.phase:
            self._apply(run, self._set[1])
        else:
            self._apply(run, run.step)

    def reset(self) -> None:
        self._set, self._resumed = None, False

    def state_dict(self) -> dict:
        return {"set": None if self._set is None else list(self._set)}

    def load_state_dict(self, d: dict) -> None:
        self._set = None if d.get("set") is None else (int(d["set"][0]), int(d["set"][1]))
        self._resumed = True


@dataclasses.dataclass
class Lambda:
    """A callback from plain functions: ``Lambda(on_eval=lambda run, record: ...)``."""

    on_step: Callable[[Any, dict], None] | None = None
    on_eval: Callable[[Any, dict], None] | None = None
    on_phase_begin: Callable[[Any], None] | None = None
    on_fit_end: Callable[[Any], None] | None = None
    on_resume: Callable[[Any], None] | None = None


@dataclasses.dataclass
class TensorBoard:
    """TensorBoard event files (needs the ``tensorboard`` extra: ``tensorboardX``): the
    training loss of every step (``train/step_loss``) and each evaluation's metrics
    (``train/loss``, ``test/accuracy``, ``images/per_sec``, callbacks' metrics such as
    ``fewshot/5shot_accuracy``: the first ``_`` becomes ``/``). ``log_dir`` defaults to
    ``<out_dir>/tensorboard``. Written at each evaluation, where the loop syncs anyway."""

    log_dir: str | None = None
    _writer: Any = dataclasses.field(default=None, repr=False)
    _written: int = 0

    def on_phase_begin(self, run) -> None:
        if self._writer is not None:
            return
        from tensorboardX import SummaryWriter

        log_dir = self.log_dir or (run.out_dir / "tensorboard" if run.out_dir else None)
        if log_dir is None:
            raise TrainingError(
                "TensorBoard needs log_dir= or a run folder (fit(..., checkpoint="
                "eqxtl.Checkpoint(out_dir)))."
            )
        # on resume, drop events past the resumed step (the run repeats them)
        self._writer = SummaryWriter(str(log_dir), purge_step=run.step or None)
        self._written = len(run.step_losses)

    def on_eval(self, run, record: dict) -> None:
        for s in run.step_losses[self._written :]:
            self._writer.add_scalar("train/step_loss", s["loss"], s["step"])
        self._written = len(run.step_losses)
        for key, value in record.items():
            if key != "epoch":  # step and phase are integers
                if isinstance(value, float) and math.isfinite(value):
                    self._writer.add_scalar(key.replace("_", "/", 1), value, record["step"])
        self._writer.flush()

    def on_fit_end(self, run) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
