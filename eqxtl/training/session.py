"""The live part of a ``fit`` call: ``Run`` (what callbacks see) and the loop over the
steps of each phase (train, count non-finite steps, evaluate, checkpoint), with metric sums
kept on the device until the loop waits for it anyway."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..data.features import FeatureLoader, backbone_frozen, extract_features
from ..data.loader import SourceBatches
from ..errors import TrainingError
from ..models.heads import Classifier
from . import train_state
from .callbacks import callback_metrics, improved
from .evaluation import eval_sums, summarise
from .options import Runtime
from .packed import Packed, unpack
from .parallel import host, local, shard
from .phases import Phase
from .runs import TRAIN_STATE, RunDir, all_finite, barrier, sigint_deferred, stage
from .step import make_eval_step, make_step, task_loss
from .tasks import Task

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


class Run:
    """The live state of a ``fit`` call, as callbacks see it."""

    def __init__(self, *, total_steps: int, steps_per_epoch: int, out_dir: Path | None):
        self.step = 0
        self.phase = 0
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.out_dir = out_dir
        self.state = None
        self._model = self._opt_state = None
        self._packed: Packed | None = None  # the model and optimizer state, in step form
        self.history: list[dict] = []
        self.step_losses: list[dict] = []  # {"step", "phase", "loss"} of every step so far
        self.stopped: str | None = None
        self._lr_scale: float | None = None

    # Between steps the model and optimizer state are held in the step's form (stacked
    # blocks, training.packed). Reading or setting either puts both back in their own forms,
    # which are then the live state (edits in place count; the next step packs them again).
    @property
    def model(self):
        """The model as trained so far, in its own (per-block) form."""
        self._unpacked()
        return self._model

    @model.setter
    def model(self, value) -> None:
        self._unpacked()
        self._model = value

    @property
    def opt_state(self):
        """The optimizer state, in ``optimizer.init``'s form."""
        self._unpacked()
        return self._opt_state

    @opt_state.setter
    def opt_state(self, value) -> None:
        self._unpacked()
        self._opt_state = value

    def _unpacked(self) -> None:
        if self._packed is not None:
            packed, self._packed = self._packed, None
            self._model, self._opt_state = unpack(packed, consume=True)

    def packed(self, step_fn) -> Packed:
        """The model and optimizer state in ``step_fn``'s step form (packed again only after
        they were read or set)."""
        if self._packed is None:
            self._packed = step_fn.pack(self._model, self._opt_state)
            self._model = self._opt_state = None  # what trains may be consumed
        return self._packed

    def hold(self, packed: Packed) -> None:
        """Keep a step's result, in step form."""
        self._packed = packed
        self._model = self._opt_state = None

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

        def set_scale(scaled):
            inner, scale_state = scaled
            hyper = dict(scale_state.hyperparams)
            old = hyper["step_size"]
            hyper["step_size"] = jax.device_put(jnp.asarray(value, old.dtype), old.sharding)
            return (inner, scale_state._replace(hyperparams=hyper))

        self.opt_state = _at_scale(self.opt_state, set_scale)


def _at_scale(opt_state, fn):
    """``fn`` applied to the state of ``with_scale``'s chain, which callbacks that wrap the
    optimizer (``wrap_optimizer``: ``optax.chain(inner, ...)``) hold first in theirs."""
    if opt_state[1] is not None and hasattr(opt_state[1], "hyperparams"):
        return fn(opt_state)
    return (_at_scale(opt_state[0], fn), *opt_state[1:])


def scale_of(opt_state) -> float:
    """The update scale ``run.lr_scale`` set, from the optimizer state."""
    found = []
    _at_scale(opt_state, lambda s: found.append(s) or s)
    return float(found[0][1].hyperparams["step_size"])


def with_scale(optimizer):
    """``optimizer`` followed by a scale that ``run.lr_scale`` sets."""
    return optax.chain(optimizer, optax.inject_hyperparams(optax.scale)(step_size=1.0))


def training_optimizer(optimizer, callbacks, scales_lr: bool):
    """A phase's optimizer as ``fit`` runs it: followed by the scale ``run.lr_scale`` sets
    (with a callback that ``scales_lr``), then wrapped by each callback that defines
    ``wrap_optimizer(optimizer)`` (``EMA``: the average of the weights after the update)."""
    if scales_lr:
        optimizer = with_scale(optimizer)
    for cb in callbacks:
        wrap = getattr(cb, "wrap_optimizer", None)
        if wrap is not None:
            optimizer = wrap(optimizer)
    return optimizer


def call_hooks(callbacks, hook: str, *args) -> None:
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if fn is not None:
            fn(*args)


@dataclasses.dataclass
class Loop:
    """The loop of one ``fit`` call, one phase at a time."""

    run: Run
    task: Task
    train: Any
    test: Any
    folder: RunDir | None
    callbacks: list
    best: str
    best_mode: str
    best_value: float | None
    checkpoint_every: int | None
    runtime: Runtime
    mesh: Any
    scales_lr: bool
    with_info: Any
    bar: Any = None
    interrupt_requested: bool = False
    saved_step: int | None = None
    """The step of the newest checkpoint in the run folder (``None``: none)."""
    guard: dict | None = None
    pending: list = dataclasses.field(default_factory=list)
    train_sums: dict | None = None
    """The train metrics' sums since the last evaluation (device scalars; ``None``: none
    yet). A checkpoint written between evaluations keeps them, so that the next record
    after a resume covers the same steps as without the interruption."""
    nonfinite_before: int = 0
    """Non-finite steps skipped before a resume (the guard counts those since)."""
    eval_due: bool = False
    """``run.step`` is an evaluation step whose record is not in the history yet (restored
    from a checkpoint: a Ctrl-C stopped the run before the evaluation or during it); a
    checkpoint written now keeps the train sums it reports and asks for it."""

    def phase(self, i: int, phase: Phase, optimizer, end: int, resumed: bool) -> None:
        """Run phase ``i`` from ``run.step`` to step ``end`` (with the optimizer state of
        the run when it ``resumed`` in this phase)."""
        run, rt = self.run, self.runtime
        run.phase = i
        model, state = run.model, run.state
        features = can_cache(model, phase, self.train, self.test, rt.cache_features)
        features = features and getattr(self.task, "mix_batch", None) is None  # mixes images
        train, test = self._feature_loaders() if features else (self.train, self.test)
        loss = task_loss(self.task, compute_dtype=rt.compute_dtype, features=features)
        if self.train.batch_size % rt.accumulate:
            raise TrainingError(
                f"Runtime(accumulate={rt.accumulate}) cannot cut batches of "
                f"{self.train.batch_size} examples into {rt.accumulate} equal micro-batches: "
                f"use a batch size that is a multiple of {rt.accumulate}."
            )
        step_fn = make_step(
            loss, optimizer, phase.spec, bn=phase.bn, mesh=self.mesh, accumulate=rt.accumulate
        )
        eval_step = make_eval_step(loss, mesh=self.mesh)
        opt_state = run.opt_state if resumed else optimizer.init(eqx.filter(model, phase.spec))
        if self.mesh is not None:
            model, state, opt_state = shard((model, state, opt_state), self.mesh)
        run.model, run.state, run.opt_state = model, state, opt_state
        if self.scales_lr:
            run._lr_scale = scale_of(opt_state)
        call_hooks(self.callbacks, "on_phase_begin", run)
        self._start_guard()
        if self.eval_due:  # resumed from `last`, whose evaluation a Ctrl-C stopped
            self.evaluate(self.train_sums, None, time.perf_counter(), eval_step, test)
            if run.stopped:
                return
        self.steps(train, test, step_fn, eval_step, end)

    def _start_guard(self) -> None:
        """The non-finite guard (device scalars), counting those skipped before a resume."""
        if self.guard is None:
            self.guard = {k: jnp.asarray(v) for k, v in _GUARD0.items()}
            self.guard["first_bad"] = self.guard["first_bad"].astype(jnp.int32)
            self.guard["nonfinite"] = self.guard["nonfinite"] + self.nonfinite_before

    def eval_model(self, model, opt_state):
        """The model evaluations score and checkpoints export (``model.safetensors``; the
        training state keeps ``model``): ``model`` unless a callback defines
        ``eval_model(model, opt_state)`` (``EMA``: the averaged weights)."""
        for cb in self.callbacks:
            fn = getattr(cb, "eval_model", None)
            if fn is not None:
                model = fn(model, opt_state)
        return model

    def _feature_loaders(self):
        rt = self.runtime
        cache_dir = None if rt.cache_features is True else rt.cache_features
        return tuple(
            None
            if loader is None
            else FeatureLoader(
                extract_features(
                    self.run.model,
                    self.run.state,
                    loader,
                    cache_dir=cache_dir,
                    batch_size=self.train.batch_size,
                    progress=rt.progress,
                    mesh=self.mesh,
                ),
                loader,
            )
            for loader in (self.train, self.test)
        )

    def steps(self, train, test, step_fn, eval_step, end: int) -> None:
        """The steps of one phase, with evaluations and checkpoints, up to step ``end``."""
        run, rt = self.run, self.runtime
        state = run.state
        base_key = jax.random.key(rt.seed)
        per_step = any(getattr(cb, "on_step", None) is not None for cb in self.callbacks)
        acc, since, images = self.train_sums, time.perf_counter(), 0
        while run.step < end:
            epoch, start = divmod(run.step, run.steps_per_epoch)
            for batch in train.epoch(epoch, start_step=start):
                key = jax.random.fold_in(base_key, run.step)
                packed, state, metrics = step_fn.packed(run.packed(step_fn), state, batch, key)
                acc = self._took_step(acc, packed, state, metrics, end)
                if self.interrupt_requested:  # Ctrl-C: stop where everything agrees
                    raise KeyboardInterrupt
                images += int(np.sum(batch["mask"])) if "mask" in batch else train.batch_size
                if per_step:
                    values = host(metrics)
                    self.check()
                    call_hooks(self.callbacks, "on_step", run, values)
                if self.bar is not None:
                    if run.step % 10 == 0 or run.step == end:
                        self.check()
                        self.bar.set_postfix(self._postfix(acc, images, since), refresh=False)
                    self.bar.update(1)
                if self.eval_due:
                    record = self.evaluate(acc, images, since, eval_step, test)
                    if self.bar is not None:
                        self.bar.set_postfix(self._postfix(acc, images, since, record))
                    acc, since, images = None, time.perf_counter(), 0
                    if run.stopped:
                        return
                elif self.checkpoint_every and run.step % self.checkpoint_every == 0:
                    if run.out_dir is not None:
                        self.check()
                        self.save(("last",))
                if run.step >= end:
                    break

    def _took_step(self, acc, packed, state, metrics, end: int):
        """Record a step's results (``acc``: the train sums so far): all of them, a Ctrl-C
        held back meanwhile, so that a checkpoint never has a step count without its
        weights, train sums and due evaluation."""
        run, rt = self.run, self.runtime
        with sigint_deferred():
            acc = _zero_sums(metrics) if acc is None else acc
            run.step += 1
            acc, self.guard = _accumulate(acc, self.guard, metrics, run.step)
            self.train_sums = acc
            # a checkpoint written before this step's evaluation is done asks for it
            self.eval_due = bool(rt.eval_every and run.step % rt.eval_every == 0)
            self.eval_due = self.eval_due or run.step == end
            self.pending.append((run.step, metrics["loss"]))
            run.hold(packed)
            run.state = state
        return acc

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
        if float(guard["nonfinite"]) <= self.runtime.max_nonfinite:
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
            "NaN, or allow some skipped steps with runtime=eqxtl.Runtime(max_nonfinite=N)."
        )

    def evaluate(self, acc, images, since, eval_step, test) -> dict:
        run = self.run
        self.check()
        record: dict = {"step": run.step, "epoch": run.epoch, "phase": run.phase}
        record.update(summarise(self.task, acc, "train"))
        if images is not None:  # None: the due evaluation of a resumed run
            record["images_per_sec"] = images / max(time.perf_counter() - since, 1e-9)
        nonfinite = int(host(self.guard["nonfinite"]))
        if nonfinite:
            record["nonfinite_steps"] = nonfinite
        model = self.eval_model(run.model, run.opt_state)
        if test is not None:
            sums = eval_sums(eval_step, model, run.state, test)
            record.update(summarise(self.task, sums, "test"))
        record.update(callback_metrics(self.callbacks, run, model, record))
        with sigint_deferred():  # a checkpoint has the record or asks for it, never both
            run.history.append(record)
            # the train sums are in this record: a checkpoint written from now starts afresh
            self.train_sums, self.eval_due = None, False
        call_hooks(self.callbacks, "on_eval", run, record)
        value = record.get(self.best)
        # a tie goes to the later step: with a small validation set accuracy ties are
        # common, and the later model has trained longer for the same value
        tie = value is not None and value == self.best_value
        is_best = tie or improved(value, self.best_value, self.best_mode)
        if is_best:
            self.best_value = value
        if run.out_dir is not None:
            self.save(("last", "best") if is_best else ("last",))
        if self.folder is not None:
            self.folder.write_history(run.history, [record], steps=run.step_losses)
        return record

    def save(self, links) -> None:
        """Write a checkpoint (every process: each writes its shards of the training state
        into it; process 0, which holds ``folder``, the rest) and point ``links`` at it."""
        run = self.run
        if not all_finite((run.model, run.state)):
            raise TrainingError(
                f"The model at step {run.step} has non-finite weights or statistics; it is "
                f"not written as {' or '.join(links)} (the previous checkpoints stay)."
            )
        meta = {
            "step": run.step,
            "phase": run.phase,
            "history": run.history,
            "best": self.best_value,
            "best_metric": self.best,
            "seed": self.runtime.seed,
            "stopped": run.stopped,
            "train_sums": None
            if self.train_sums is None
            else {k: float(v) for k, v in host(self.train_sums).items()},
            "nonfinite_steps": int(host(self.guard["nonfinite"])) if self.guard else 0,
            "eval_due": self.eval_due,
            "callbacks": [
                cb.state_dict() if hasattr(cb, "state_dict") else None for cb in self.callbacks
            ],
        }
        with sigint_deferred():
            # what from_pretrained reads, gathered (a collective across processes)
            exported = self.with_info(self.eval_model(run.model, run.opt_state))
            exported, state = local((exported, run.state))
            staged = stage(run.out_dir, run.step)
            train_state.write(staged / TRAIN_STATE, (run.model, run.state, run.opt_state))
            if self.folder is not None:
                self.folder.save(links, staged, exported, state, meta)
            barrier("eqxtl-checkpoint-saved")
        self.saved_step = run.step

    def interrupted(self) -> str:
        """After Ctrl-C: write ``last`` if the run went past it (the save itself cannot be
        interrupted), and say in one line where the run stands and how to resume."""
        run = self.run
        if self.folder is None and run.out_dir is not None:  # another process writes it
            return f"Interrupted at step {run.step}; process 0 writes the run in {run.out_dir}."
        if self.folder is None:
            return (
                f"Interrupted at step {run.step} of {run.total_steps}; nothing was saved (no "
                "run folder: pass checkpoint=eqxtl.Checkpoint(out_dir) to be able to resume)."
            )
        note = ""
        # with several processes a save is a collective that the others are not in
        if run.step != self.saved_step and jax.process_count() == 1:
            try:
                with sigint_deferred():
                    # run.model unpacks the step form's stacks: inside the try, since a step
                    # cut short may have donated them
                    if run.model is not None:
                        self.flush_losses()
                        self.save(("last",))
            except KeyboardInterrupt:
                pass  # a second Ctrl-C, held back until the save above was complete
            except Exception as e:  # e.g. weights the step had donated: keep the old `last`
                note = f" (the newest steps could not be saved: {type(e).__name__})"
        if self.saved_step is None:
            return f"Interrupted at step {run.step} before any checkpoint{note}; nothing to resume."
        return (
            f"Interrupted: the run is saved at step {self.saved_step} of {run.total_steps} in "
            f"{self.folder.path / 'last'}{note}. Run the same call again to resume."
        )

    def _postfix(self, acc, images, since, record=None) -> dict:
        out = {}
        summary = summarise(self.task, acc, "train")
        for k, short in (("train_loss", "loss"), ("train_accuracy", "acc")):
            if k in summary:
                out[short] = f"{summary[k]:.3f}"
        out["img/s"] = f"{images / max(time.perf_counter() - since, 1e-9):.1f}"
        if record and self.best in record:
            out[self.best] = f"{record[self.best]:.3f}"
        return out


def can_cache(model, phase: Phase, train, test, cache_features) -> bool:
    """Whether ``phase`` can train on cached backbone features: nothing in the backbone
    trains, BatchNorm is not in training mode, and the data are ``SourceBatches`` (any
    loader of this package) without augmentation, in one process (with several, each would
    run the backbone over all the data, on a model replicated over all of them)."""
    return (
        cache_features is not False
        and jax.process_count() == 1
        and phase.bn != "train"
        and isinstance(train, SourceBatches)
        and train.augment is None
        and (test is None or isinstance(test, SourceBatches))
        and isinstance(model, Classifier)
        and backbone_frozen(model, phase.spec)
    )


def progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
