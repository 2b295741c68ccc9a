"""The two option objects of ``fit``: where the run is kept (``Checkpoint``, like Keras's
``ModelCheckpoint``) and how it runs (``Runtime``, like Lightning's ``Trainer(precision=,
devices=)``). Neither changes what is learned: the data pipeline belongs to the loader
(``eqxtl.Loader``), what trains and for how long to ``Phase``."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from .._util.checks import count
from ..errors import TrainingError


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """The run folder of a ``fit`` (``eqxtl.training.runs``): ``last/`` and ``best/``
    checkpoints (``save_pretrained`` layout plus the training state), ``history.json``
    (+ ``.jsonl``, ``.png``), ``run.json``; locked while the run uses it.

    **Arguments:**

    - `out_dir`: the folder.
    - `resume`: continue from ``last`` (the default) after checking that the stored
      configuration (model shapes, spec, optimizer state, the optimizer's hyperparameters
      such as the learning rate or its schedule, seed, batch size, data length, phases,
      task, BatchNorm modes) is this run's (``TrainingError`` naming the differences
      otherwise: a resume reaches the weights the uninterrupted run would have, which
      another learning rate would not); ``False`` starts over and deletes the folder's
      checkpoints. A resume says the step it resumes from (stderr, with ``progress``; the
      ``eqxtl`` logger) and ``FitResult.resumed_from``. On Ctrl-C ``fit`` finishes the
      step, writes ``last`` and re-raises ``KeyboardInterrupt`` saying how to resume; a
      second Ctrl-C stops at once. An evaluation due at the step ``last`` holds (cut, or
      not yet begun) runs first on resume.
    - `every`: also write ``last`` every N steps between evaluations (``None``: at
      evaluations only).
    - `best`: the metric whose best value ``best/`` keeps (``"test_accuracy"``,
      ``"test_loss"``, ``"train_loss"``, any ``test_``/``train_`` metric of the task, or
      one a callback adds, such as ``FewShotEval``'s ``"fewshot_5shot_accuracy"``);
      ``"auto"``: ``test_accuracy`` (``test_loss`` for tasks without accuracy) with test
      data, ``train_loss`` without. A tie goes to the later step (with a small validation
      set accuracy ties are common, and the later model has trained longer for the same
      value); a non-finite value is never best.
    - `mode`: ``"min"``, ``"max"`` or ``"auto"`` (min for losses and errors, max for
      accuracies and scores, by the words of the name; an error for a name that says
      neither).

    >>> eqxtl.fit(model, state, opt, spec, train, checkpoint=eqxtl.Checkpoint("runs/a"))
    """

    out_dir: str | os.PathLike
    resume: bool = True
    every: int | None = None
    best: str = "auto"
    mode: str = "auto"

    def __post_init__(self):
        if not isinstance(self.out_dir, str | os.PathLike) or not str(self.out_dir):
            raise TrainingError(
                f"Checkpoint(out_dir=...) must be a folder path, got {self.out_dir!r}."
            )
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        if not isinstance(self.resume, bool):
            raise TrainingError(
                f"Checkpoint(resume=...) must be True or False, got {self.resume!r}."
            )
        if self.every is not None:
            every = count(self.every, "Checkpoint(every=...) (or None)", TrainingError)
            object.__setattr__(self, "every", every)
        if not isinstance(self.best, str):
            raise TrainingError(
                f"Checkpoint(best=...) must be a metric name such as 'test_accuracy', got "
                f"{self.best!r}."
            )
        if self.mode not in ("auto", "min", "max"):
            raise TrainingError(
                f"Checkpoint(mode=...) must be auto, min or max, got {self.mode!r}."
            )


@dataclasses.dataclass(frozen=True)
class Runtime:
    """How ``fit`` runs. Only ``seed`` (recorded in the run folder: a resume must use the
    same) and ``compute_dtype`` change what the steps compute (and ``accumulate`` where
    BatchNorm statistics train).

    **Arguments:**

    - `seed`: the step keys (dropout, stochastic depth) and the shuffling of the ``Loader``
      ``fit`` builds for a plain source (a ``Loader`` you pass keeps its own seed).
    - `eval_every`: evaluate (and write ``last``) every N steps, and at the end of each
      phase (``None``: at the end of each phase only).
    - `compute_dtype`: e.g. ``jnp.bfloat16`` for mixed precision (see ``task_loss``);
      weights and optimizer state stay float32.
    - `mesh`: a ``jax.sharding.Mesh`` from ``eqxtl.make_mesh(data=..., fsdp=...)``: each
      batch is split over all its devices, the model, BatchNorm state and optimizer state are
      placed with ``eqxtl.shard`` (split along ``"fsdp"``, replicated with ``fsdp=1``) and
      stay so from step to step. ``"auto"``: ``make_mesh()`` (data parallel) over every
      device when there is more than one; ``None``: one device. The batch size must be a
      multiple of the number of devices.
    - `accumulate`: gradient accumulation: each batch runs as ``accumulate`` micro-batches
      with one optimizer update (``make_step(accumulate=...)``): the same updates with the
      activation memory of a batch ``accumulate`` times smaller (BatchNorm statistics that
      train are per micro-batch). The batch size must be a multiple of it.
    - `max_nonfinite`: a step whose loss or gradient is NaN/inf changes nothing (it is
      skipped inside the compiled step); after more than ``max_nonfinite`` such steps ``fit``
      raises ``TrainingError`` naming the first one and the last finite loss. The check
      runs where the loop already waits for the device (progress refresh every 10 steps,
      callbacks, evaluation, checkpoints, the end), so a few more steps may be skipped
      before it fires. A model with non-finite weights is never written.
    - `progress`: a tqdm progress bar.
    - `cache_features`: when nothing in the backbone trains (and there is no augmentation
      and BatchNorm is not ``"train"``), run the backbone once over the data
      (``extract_features``) and train the head on the cached features: the same result,
      epochs after the first cost only the head. ``True``: in memory; a directory: on disk,
      reused across runs; ``False``: always run the backbone. From any loader (``Loader``,
      ``GrainLoader``, ``ProcessShard``); one process only.
    """

    seed: int = 0
    eval_every: int | None = None
    compute_dtype: Any = None
    mesh: Any = "auto"
    accumulate: int = 1
    max_nonfinite: int = 0
    progress: bool = True
    cache_features: bool | str | os.PathLike = True

    def __post_init__(self):
        seed = count(self.seed, "Runtime(seed=...)", TrainingError, minimum=0)
        object.__setattr__(self, "seed", seed)
        if self.eval_every is not None:
            every = count(self.eval_every, "Runtime(eval_every=...) (or None)", TrainingError)
            object.__setattr__(self, "eval_every", every)
        accumulate = count(self.accumulate, "Runtime(accumulate=...)", TrainingError)
        object.__setattr__(self, "accumulate", accumulate)
        nonfinite = count(
            self.max_nonfinite, "Runtime(max_nonfinite=...)", TrainingError, minimum=0
        )
        object.__setattr__(self, "max_nonfinite", nonfinite)
        if not isinstance(self.progress, bool):
            raise TrainingError(
                f"Runtime(progress=...) must be True or False, got {self.progress!r}."
            )
        if not isinstance(self.cache_features, bool | str | os.PathLike):
            raise TrainingError(
                "Runtime(cache_features=...) must be True (in memory), False or a directory, "
                f"got {self.cache_features!r}."
            )
        if self.compute_dtype is not None:
            import jax.numpy as jnp

            try:
                floating = jnp.issubdtype(jnp.dtype(self.compute_dtype), jnp.floating)
            except TypeError:
                floating = False
            if not floating:
                raise TrainingError(
                    "Runtime(compute_dtype=...) must be a floating-point dtype such as "
                    f"jnp.bfloat16 (or None), got {self.compute_dtype!r}."
                )
        if not (self.mesh is None or self.mesh == "auto" or hasattr(self.mesh, "devices")):
            raise TrainingError(
                "Runtime(mesh=...) must be 'auto', None or a jax.sharding.Mesh "
                f"(eqxtl.make_mesh()), got {self.mesh!r}."
            )
