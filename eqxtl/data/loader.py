"""Batches: the ``Loader`` yields fixed-shape batches ``{"image": float32 (B, 3, S, S),
"label": int32 (B,), "mask": bool (B,)}`` (the last partial batch is padded and masked, so a
jitted step never recompiles), in an order that is a pure function of ``(seed, epoch)``;
``ProcessShard`` is one process's part of each global batch.

What ``fit`` and ``evaluate`` read is declared once here: a ``BatchSource`` (``len``,
``epoch(e, start_step)``, ``batch_size``); the loaders of this package (``Loader``,
``ProcessShard``, ``GrainLoader``, ``FeatureLoader``) are moreover ``SourceBatches``: batches
of a known ``source`` in a known ``order``, which is what label checks, class names, feature
caching and multi-process runs need.
"""

from __future__ import annotations

import collections
import os
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol, runtime_checkable

import jax
import numpy as np

from .._util.checks import count
from ..errors import CorruptImageError, DataError
from ..models._arch import Preprocessing
from .images import Augment, preprocess
from .sources import Source


@runtime_checkable
class BatchSource(Protocol):
    """What ``fit`` and ``evaluate`` train and evaluate on: ``len(batches)`` batches per
    epoch, ``batches.epoch(e, start_step=k)`` yields batches ``k, k+1, ...`` of epoch ``e``
    (dicts ``{"image" (B, 3, S, S) | "features" (B, D), "label" (B,), "mask" (B,)}``, the
    same for the same ``(e, k)``: a resumed run reads exactly the batches it missed), and
    ``batch_size`` (the global batch size ``B``)."""

    batch_size: int

    def __len__(self) -> int: ...

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]: ...


@runtime_checkable
class SourceBatches(BatchSource, Protocol):
    """A ``BatchSource`` whose batches are the examples of ``source`` (with its
    ``class_names`` and, where cheap, ``labels``) in ``order(epoch)``, ``batch_size`` at a
    time, preprocessed with ``preprocessing`` (and ``augment``, if not ``None``); ``part``
    is ``(index, count)``: each batch holds positions ``[index * b, (index + 1) * b)`` of
    the global batch (``b = batch_size / count``; ``(0, 1)``: all of it).

    ``Loader``, ``ProcessShard``, ``GrainLoader`` and ``FeatureLoader`` are. ``fit`` checks
    their labels against the head, records their class names and preprocessing, and trains
    a frozen backbone's head on cached features (``FeatureLoader``) from any of them.
    """

    source: Source
    preprocessing: Preprocessing
    augment: Augment | None
    part: tuple[int, int]

    def order(self, epoch: int) -> np.ndarray: ...


def for_this_process(batches):
    """``batches`` as this process reads them: a ``Loader`` is wrapped in ``ProcessShard``
    when there are several processes; other batch sources must already be split
    (``GrainLoader``, ``ProcessShard``) or read the same batches everywhere."""
    if jax.process_count() > 1 and isinstance(batches, Loader):
        return ProcessShard(batches)
    return batches


class Loader:
    """Fixed-shape batches from a source, decoded and preprocessed in background threads.

    ``loader.epoch(e)`` yields ``len(loader)`` dicts ``{"image": float32 (B, 3, S, S),
    "label": int32 (B,), "mask": bool (B,)}``. A last partial batch is filled with copies of
    its first example (label 0) with ``mask`` False (or dropped with ``drop_last``). With
    ``shuffle`` the order is ``np.random.default_rng((seed, epoch)).permutation(N)`` and
    ``augment`` draws from ``default_rng((seed, epoch, index))``: ``epoch(e, start_step=k)``
    yields exactly the batches ``k, k+1, ...`` of ``epoch(e)``.

    **Arguments:**

    - `num_workers`: threads decoding and preprocessing (PIL releases the GIL); ``0`` works in
      the calling thread. Default ``min(8, os.cpu_count())``.
    - `prefetch`: how many batches are prepared ahead of the consumer.
    """

    def __init__(
        self,
        source: Source,
        preprocessing: Preprocessing,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        augment: Augment | None = None,
        num_workers: int | None = None,
        drop_last: bool = False,
        prefetch: int = 2,
    ):
        batch_size = count(batch_size, "Loader(batch_size=...)", DataError)
        seed = count(seed, "Loader(seed=...) (it seeds numpy Generators)", DataError, minimum=0)
        if num_workers is not None:
            num_workers = count(num_workers, "Loader(num_workers=...)", DataError, minimum=0)
        prefetch = count(prefetch, "Loader(prefetch=...)", DataError)
        self.source = source
        self.preprocessing = preprocessing
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.augment = augment
        self.num_workers = min(8, os.cpu_count() or 1) if num_workers is None else num_workers
        self.drop_last = drop_last
        self.prefetch = max(1, int(prefetch))
        self.part = (0, 1)
        names = getattr(source, "class_names", None)
        self._num_labels = len(names) if names else np.iinfo(np.int32).max

    @property
    def class_names(self) -> list[str]:
        return list(self.source.class_names)

    def __len__(self) -> int:
        """Batches per epoch."""
        n, b = len(self.source), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def order(self, epoch: int) -> np.ndarray:
        """Source indices in the order epoch ``epoch`` visits them."""
        n = len(self.source)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng((self.seed, epoch)).permutation(n)

    def example(self, index: int, epoch: int = 0) -> tuple[np.ndarray, int]:
        """Source example ``index`` preprocessed (augmented, if any) as in epoch ``epoch``:
        ``(float32 (3, S, S), label)``."""
        image, label = self.source[int(index)]
        if not 0 <= label < self._num_labels:  # every reader of a Loader goes through here
            raise DataError(
                f"Label {label} of example {index} of {self.source!r} is outside "
                f"[0, {self._num_labels}) (the source's class_names). Fix the labels."
            )
        if self.augment is None:
            return preprocess(image, self.preprocessing), label
        rng = np.random.default_rng((self.seed, epoch, int(index)))
        return self.augment(image, self.preprocessing, rng), label

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Yield the batches of epoch ``epoch`` from batch ``start_step`` on."""
        if start_step < 0:
            raise DataError(f"start_step must be >= 0, got {start_step}.")
        order = self.order(epoch)
        chunks = [
            order[i * self.batch_size : (i + 1) * self.batch_size]
            for i in range(start_step, len(self))
        ]
        if self.num_workers == 0:
            for chunk in chunks:
                batch = self._new_batch()
                for j, index in enumerate(chunk):
                    self._fill(batch, j, index, epoch)
                yield self._finish(batch, len(chunk))
            return
        pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="eqxtl-loader")
        pending: collections.deque[tuple[dict, int, list[Future]]] = collections.deque()
        try:
            for chunk in chunks:  # fill the prefetch window, then keep it full
                pending.append(self._submit(pool, chunk, epoch))
                if len(pending) > self.prefetch:
                    yield self._wait(pending.popleft())
            while pending:
                yield self._wait(pending.popleft())
        finally:  # also on early exit (generator close): drop queued work, free threads
            pool.shutdown(wait=False, cancel_futures=True)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self.epoch(0)

    def _new_batch(self) -> dict[str, np.ndarray]:
        s, b = self.preprocessing.crop, self.batch_size
        return {
            "image": np.empty((b, 3, s, s), np.float32),
            "label": np.zeros((b,), np.int32),
            "mask": np.zeros((b,), bool),
        }

    def _fill(self, batch: dict, j: int, index: int, epoch: int) -> None:
        try:
            image, label = self.example(index, epoch)
        except CorruptImageError as e:
            warnings.warn(f"{e}; this example is masked out.", stacklevel=2)
            batch["image"][j] = 0.0
            return
        batch["image"][j] = image
        batch["label"][j] = label
        batch["mask"][j] = True

    def _submit(self, pool, chunk, epoch) -> tuple[dict, int, list[Future]]:
        batch = self._new_batch()
        futures = [pool.submit(self._fill, batch, j, i, epoch) for j, i in enumerate(chunk)]
        return batch, len(chunk), futures

    def _wait(self, item: tuple[dict, int, list[Future]]) -> dict[str, np.ndarray]:
        batch, n, futures = item
        for f in futures:
            f.result()  # re-raises a worker's error here
        return self._finish(batch, n)

    def _finish(self, batch: dict, n: int) -> dict[str, np.ndarray]:
        if n < self.batch_size:  # pad: copies of the first example, masked out
            batch["image"][n:] = batch["image"][0]
            batch["label"][n:] = 0
            batch["mask"][n:] = False
        return batch


class ProcessShard:
    """This process's part of each global batch of ``loader`` (an image ``Loader``):
    batch ``i`` of epoch ``e`` holds positions ``[p * b, (p + 1) * b)`` of the global batch
    (``b = batch_size / process_count``), so that the global batches, assembled with
    ``jax.make_array_from_process_local_data``, are exactly those of one process reading
    everything (same order, same augmentation, same padding and mask)."""

    def __init__(self, loader, index: int | None = None, count: int | None = None):
        self.loader = loader
        self.index = jax.process_index() if index is None else index
        self.count = jax.process_count() if count is None else count
        if loader.batch_size % self.count:
            raise DataError(
                f"A global batch of {loader.batch_size} cannot be split over {self.count} "
                f"processes: use a batch size that is a multiple of {self.count}."
            )
        self.batch_size = loader.batch_size
        self.local_batch_size = loader.batch_size // self.count
        self.source = loader.source
        self.preprocessing = loader.preprocessing
        self.augment = loader.augment
        self.part = (self.index, self.count)

    def __len__(self) -> int:
        return len(self.loader)

    def order(self, epoch: int) -> np.ndarray:
        return self.loader.order(epoch)

    def epoch(self, epoch: int, start_step: int = 0):
        order = self.loader.order(epoch)
        with ThreadPoolExecutor(max(1, self.loader.num_workers)) as pool:
            for i in range(start_step, len(self)):
                yield local_batch(self.loader, order, i, epoch, self.index, self.count, pool.map)


def local_batch(loader, order, i: int, epoch: int, index: int = 0, count: int = 1, map_=map):
    """Process ``index`` of ``count``'s part of batch ``i`` of ``loader``'s epoch (``order``:
    ``loader.order(epoch)``), exactly as ``Loader.epoch`` makes the global batch: a last
    partial batch is padded with copies of its first example (label 0, mask False), and an
    undecodable example is zeros with mask False."""
    big = loader.batch_size
    b = big // count
    chunk = order[i * big : (i + 1) * big]
    mine = chunk[index * b : (index + 1) * b]
    examples = list(map_(lambda j: _example(loader, j, epoch), mine))
    crop = loader.preprocessing.crop
    pad = np.zeros((3, crop, crop), np.float32)
    if len(examples) < b:  # padding copies the global batch's first example
        first = examples[0] if index == 0 and examples else _example(loader, chunk[0], epoch)
        pad = first[0] if first[0] is not None else pad
    images = np.empty((b, 3, crop, crop), np.float32)
    labels, mask = np.zeros(b, np.int32), np.zeros(b, bool)
    for j in range(b):
        if j >= len(examples):
            images[j] = pad
        elif examples[j][0] is None:
            images[j] = 0.0
        else:
            images[j], labels[j], mask[j] = examples[j][0], examples[j][1], True
    return {"image": images, "label": labels, "mask": mask}


def _example(loader, index, epoch):
    try:
        return loader.example(index, epoch)
    except CorruptImageError as e:
        warnings.warn(f"{e}; this example is masked out.", stacklevel=2)
        return None, 0
