"""Few-shot linear probes during training (``FewShotEval``): at each evaluation, ridge
regression in closed form on the pooled backbone features of ``k`` labelled examples per
class, scored on a test set: a cheap signal of how good the representation is, as
big_vision's few-shot evaluator (``evaluators/fewshot_lsr.py``) reports it."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import numpy as np

from .._util.checks import count, real
from ..data.features import pooled_batch
from ..data.loader import Loader, SourceBatches
from ..data.sources import Subset, check_same_classes
from ..errors import DataError, TrainingError
from ..models._arch import Preprocessing
from .parallel import local

BIAS_CONSTANT = 100.0
"""The constant feature appended for the bias: large, so that the bias is almost
unregularised (big_vision's value)."""


def ridge_fit(features: np.ndarray, labels: np.ndarray, num_classes: int, l2_reg: float):
    """Least squares with an L2 penalty ``l2_reg`` from ``features (N, D)`` to one-hot
    targets in ``{-1, 1}`` ``(N, num_classes)``, after standardising each feature with the
    mean and standard deviation (``+ 1e-5``) of these ``N`` examples and appending
    ``BIAS_CONSTANT``. Returns ``(mean (1, D), std (1, D), weights (D + 1, num_classes))``
    in float64; solved in the primal (``N >= D + 1``) or the dual form, whichever is
    smaller (the same solution)."""
    x = np.asarray(features, np.float64).reshape(len(features), -1)
    mean = x.mean(axis=0, keepdims=True)
    std = x.std(axis=0, keepdims=True) + 1e-5
    z = _with_bias((x - mean) / std)
    targets = 2.0 * np.eye(num_classes)[np.asarray(labels)] - 1.0
    n, d = z.shape
    if n >= d:
        weights = np.linalg.solve(z.T @ z + l2_reg * np.eye(d), z.T @ targets)
    else:
        weights = z.T @ np.linalg.solve(z @ z.T + l2_reg * np.eye(n), targets)
    return mean, std, weights


def ridge_scores(fitted, features: np.ndarray) -> np.ndarray:
    """Class scores ``(M, num_classes)`` of ``features (M, D)`` under ``ridge_fit``'s
    ``fitted``; the prediction is their ``argmax``."""
    mean, std, weights = fitted
    x = np.asarray(features, np.float64).reshape(len(features), -1)
    return _with_bias((x - mean) / std) @ weights


def _with_bias(x: np.ndarray) -> np.ndarray:
    return np.concatenate([x, np.full((len(x), 1), BIAS_CONSTANT)], axis=1)


@dataclasses.dataclass
class FewShotEval:
    """A callback: at each evaluation, few-shot linear-probe accuracy of the backbone of the
    model the evaluation scores (``EMA``'s average when it evaluates with it), added to the
    evaluation record as ``{name}_{k}shot_accuracy`` for each ``k`` in `shots`
    (``fewshot_5shot_accuracy``): in the history, ``history.png`` and TensorBoard with the
    other metrics, before any callback's ``on_eval`` (``EarlyStopping(metric=...)`` can
    watch it), and a choice of ``Checkpoint(best=...)``.

    >>> fit(..., callbacks=[eqxtl.FewShotEval(probe_train, probe_test, shots=(1, 5, 10))])

    For each ``k``, ``k`` examples of each class of `train_source` are drawn (a fixed draw:
    ``default_rng(seed)`` permutes each class's examples, and the first ``k`` are taken, so
    the 1-shot examples are among the 5-shot ones and every evaluation sees the same
    examples); their pooled backbone features (inference mode) are standardised and fitted
    by ridge regression to one-hot targets in ``{-1, 1}`` (``ridge_fit``, with `l2_reg`);
    the accuracy is that of the ``argmax`` of the scores on every example of `test_source`.
    This is big_vision's few-shot evaluator (same standardisation, bias feature, targets,
    default ``l2_reg = 2**10``, per-class draw), with one draw (big_vision averages seeds).
    The backbone runs over ``max(shots) * num_classes`` training examples and the test set
    at every evaluation: keep them small.

    **Arguments:**

    - `train_source`, `test_source`: sources (``ArraySource``, ``ImageFolder``,
      ``HFDataset``, ...) or loaders (their source and preprocessing are used) with the same
      class names. Every class of `train_source` needs at least ``max(shots)`` examples;
      its labels are read here (one pass over a source without a ``labels`` array).
    - `shots`: the values of ``k``, each >= 1.
    - `l2_reg`: the ridge penalty, > 0.
    - `preprocessing`: default: the loaders' own, or else the backbone checkpoint's
      (``preprocessing_for``), as ``fit`` uses for a plain source.
    - `name`: the metrics' prefix (several ``FewShotEval``, one per dataset, need
      different names).
    """

    train_source: Any
    test_source: Any
    shots: Sequence[int] = (1, 5, 10)
    l2_reg: float = 2.0**10
    seed: int = 0
    batch_size: int = 32
    preprocessing: Preprocessing | None = None
    name: str = "fewshot"

    def __post_init__(self):
        what = "FewShotEval"
        shots = self.shots
        if isinstance(shots, (int, np.integer)) or not isinstance(shots, Sequence) or not shots:
            raise DataError(f"{what}(shots=...) must be a non-empty list of counts, got {shots!r}.")
        shots = [count(k, f"{what}(shots=...) (examples per class)", DataError) for k in shots]
        if len(set(shots)) != len(shots):
            raise DataError(f"{what}(shots=...) repeats a value: {shots}.")
        self.shots = tuple(sorted(shots))
        self.l2_reg = real(self.l2_reg, f"{what}(l2_reg=...)", DataError, low=0, low_open=True)
        self.seed = count(self.seed, f"{what}(seed=...)", DataError, minimum=0)
        self.batch_size = count(self.batch_size, f"{what}(batch_size=...)", DataError)
        if not (isinstance(self.name, str) and self.name.isidentifier()):
            raise DataError(
                f"{what}(name=...) must be a word such as 'fewshot', got {self.name!r}."
            )
        self._train, self._train_pp = _source_and_preprocessing(self.train_source, "train")
        self._test, self._test_pp = _source_and_preprocessing(self.test_source, "test")
        check_same_classes(self._train, self._test, "few-shot test data")
        if len(self._test) == 0:
            raise DataError(f"{what}(test_source=...) is empty.")
        self._choose_shots()

    def _choose_shots(self) -> None:
        """The draw: for each class, its examples in a ``default_rng(seed)`` order; the
        examples of ``k`` shots are the first ``k`` of each class."""
        names = list(self._train.class_names)
        if len(names) < 2:
            raise DataError(
                f"FewShotEval needs at least 2 classes; the training source has {names}."
            )
        labels = getattr(self._train, "labels", None)
        if labels is None:
            labels = [self._train[i][1] for i in range(len(self._train))]
        labels = np.asarray(labels, np.int64)
        bad = np.flatnonzero((labels < 0) | (labels >= len(names)))
        if len(bad):
            raise DataError(
                f"FewShotEval(train_source=...): label {labels[bad[0]]} of example {bad[0]} is "
                f"outside 0..{len(names) - 1} (its class names). Fix the labels."
            )
        counts = np.bincount(labels, minlength=len(names))
        k = self.shots[-1]
        short = [f"{n!r}: {c}" for n, c in zip(names, counts, strict=True) if c < k]
        if short:
            raise DataError(
                f"FewShotEval(shots={self.shots}) draws up to {k} examples of each class, but "
                f"train_source has fewer for {len(short)} classes ({', '.join(short[:10])}"
                f"{', ...' if len(short) > 10 else ''}): use at most {int(counts.min())} "
                "shots, or more examples of those classes."
            )
        rng = np.random.default_rng(self.seed)
        order = [rng.permutation(np.flatnonzero(labels == c)) for c in range(len(names))]
        # positions, in the drawn examples of max(shots), of the examples of each k
        self._drawn = np.concatenate([o[:k] for o in order])
        self._positions = {
            j: np.concatenate([np.arange(c * k, c * k + j) for c in range(len(names))])
            for j in self.shots
        }
        self._drawn_labels = labels[self._drawn]

    def on_phase_begin(self, run) -> None:
        _backbone_of(run.model)  # fail before training, not at the first evaluation

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The names this callback adds to each evaluation record."""
        return tuple(f"{self.name}_{k}shot_accuracy" for k in self.shots)

    def eval_metrics(self, run, model) -> dict[str, float]:
        return self.evaluate(model, run.state)

    def evaluate(self, model, state) -> dict[str, float]:
        """``{"{name}_{k}shot_accuracy": accuracy}`` of ``model``'s backbone (a
        ``Classifier``, or the backbone itself) with ``state``, for each ``k``."""
        model, state = local((model, state))  # this process's replica (multi-process runs)
        backbone = _backbone_of(model)
        train_x, _, train_ok = self._features(backbone, state, Subset(self._train, self._drawn))
        test_x, test_y, test_ok = self._features(backbone, state, self._test)
        num_classes = len(self._train.class_names)
        out = {}
        for k, pos in self._positions.items():
            pos = pos[train_ok[pos]]  # an undecodable drawn example drops out
            fitted = ridge_fit(train_x[pos], self._drawn_labels[pos], num_classes, self.l2_reg)
            predicted = np.argmax(ridge_scores(fitted, test_x[test_ok]), axis=1)
            out[f"{self.name}_{k}shot_accuracy"] = float(np.mean(predicted == test_y[test_ok]))
        return out

    def _features(self, backbone, state, source):
        """Pooled features ``(N, D)``, labels ``(N,)`` and validity ``(N,)`` of every example
        of ``source``; one compiled forward for every evaluation (the batch shape is
        fixed)."""
        from ..models.registry import preprocessing_for

        is_train = isinstance(source, Subset) and source.source is self._train
        preprocessing = self.preprocessing or (self._train_pp if is_train else self._test_pp)
        preprocessing = preprocessing or preprocessing_for(backbone)
        loader = Loader(source, preprocessing, self.batch_size)
        backbone = eqx.nn.inference_mode(backbone, True)
        features, labels, valid = [], [], []
        for batch in loader.epoch(0):
            features.append(np.asarray(pooled_batch(backbone, state, batch["image"])))
            labels.append(batch["label"])
            valid.append(batch["mask"])
        n = len(source)
        features = np.concatenate(features)[:n].reshape(n, -1)
        return features, np.concatenate(labels)[:n], np.concatenate(valid)[:n]


def _source_and_preprocessing(data, which: str):
    if isinstance(data, SourceBatches):
        return data.source, data.preprocessing
    if not (hasattr(type(data), "__getitem__") and hasattr(type(data), "__len__")):
        raise DataError(
            f"FewShotEval({which}_source=...) takes a source (ArraySource, ImageFolder, "
            f"HFDataset, ...) or a Loader, got {type(data).__name__}."
        )
    return data, None


def _backbone_of(model):
    from ..models.registry import architecture_of

    backbone = getattr(model, "backbone", model)
    try:
        architecture_of(backbone)
    except TypeError:
        raise TrainingError(
            f"FewShotEval pools the features of the model's backbone, but this model "
            f"({type(model).__name__}) has none: it needs an eqxtl.Classifier (or an eqxtl "
            "backbone), whose backbone(x, state) returns pooled features."
        ) from None
    return backbone
