"""``GrainLoader``: a ``Loader``'s batches made by grain worker processes."""

from __future__ import annotations

import jax

from .._util import checks
from ..errors import DataError
from .loader import Loader, local_batch


class GrainLoader:
    """A ``Loader``'s batches made by grain worker processes (decode and augmentation run
    outside this process's GIL): the same batches as ``loader.epoch`` (same order,
    augmentation, padding and mask), this process's part of each when there are several
    (as ``ProcessShard``). The iterator state is ``(epoch, start_step)``, which ``fit``
    saves with every checkpoint. Needs the ``grain`` extra; the source must pickle.

    >>> fit(model, state, optimizer, spec, eqxtl.GrainLoader(eqxtl.Loader(source, p, 32)))

    A ``SourceBatches`` (``eqxtl.data.loader``): ``fit`` checks its labels and caches
    features from it as from the ``Loader`` it wraps.
    """

    def __init__(
        self, loader, *, num_workers: int = 2, index: int | None = None, count: int | None = None
    ):
        if not isinstance(loader, Loader):
            raise DataError(
                f"GrainLoader(loader=...) takes an eqxtl.Loader(source, preprocessing, "
                f"batch_size), got {type(loader).__name__}."
            )
        self.loader = loader
        self.num_workers = checks.count(
            num_workers, "GrainLoader(num_workers=...) (0: in this process)", DataError, minimum=0
        )
        count = jax.process_count() if count is None else count
        self.count = checks.count(count, "GrainLoader(count=...)", DataError)
        index = jax.process_index() if index is None else index
        self.index = checks.count(index, "GrainLoader(index=...)", DataError, minimum=0)
        if self.index >= self.count:
            raise DataError(
                f"GrainLoader(index={index}) must be < count ({self.count}): the index of this "
                "process among the count that share each batch."
            )
        if loader.batch_size % self.count:
            raise DataError(
                f"A global batch of {loader.batch_size} cannot be split over {self.count} "
                f"processes: use a batch size that is a multiple of {self.count}."
            )
        self.batch_size = loader.batch_size
        self.source = loader.source
        self.preprocessing = loader.preprocessing
        self.augment = loader.augment
        self.part = (self.index, self.count)

    def __len__(self) -> int:
        return len(self.loader)

    def order(self, epoch: int):
        return self.loader.order(epoch)

    def epoch(self, epoch: int, start_step: int = 0):
        import grain

        if start_step >= len(self):
            return iter(())
        make = _GrainBatch(self.loader, self.loader.order(epoch), epoch, self.index, self.count)
        ds = grain.MapDataset.range(start_step, len(self)).map(make).to_iter_dataset()
        if self.num_workers > 0:
            from absl import flags

            if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (defaults)
                flags.FLAGS.mark_as_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.num_workers))
        return iter(ds)


class _GrainBatch:
    """Picklable ``batch index -> local batch`` for grain workers."""

    def __init__(self, loader, order, epoch, index, count):
        self.loader, self.order, self.epoch = loader, order, epoch
        self.index, self.count = index, count

    def __call__(self, i):
        return local_batch(self.loader, self.order, int(i), self.epoch, self.index, self.count)
