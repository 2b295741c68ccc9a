"""Data parallelism with ``jax.sharding``: the batch is split along its first axis,
parameters, BatchNorm state and optimizer state are replicated, and XLA inserts the gradient
all-reduce (and the cross-device BatchNorm reductions) itself.

``fit`` does this automatically when more than one device is present, and across processes
(one per host, ``jax.distributed.initialize()`` first): each process then reads only its
part of every global batch (``ProcessShard``), the batches are assembled into global arrays
with ``jax.make_array_from_process_local_data``, evaluation sums are reduced over all
processes by XLA, and process 0 alone writes the run folder. By hand:

>>> mesh = eqxtl.data_mesh()                      # all local devices, axis "data"
>>> model, state, opt_state = eqxtl.replicate((model, state, opt_state), mesh)
>>> step = eqxtl.make_step(loss_fn, optimizer, spec, mesh=mesh)  # shards each batch

Multi-host (one process per host): call ``jax.distributed.initialize()`` before anything
else, build the mesh over ``jax.devices()`` (``data_mesh(jax.devices())``), and give each
process its own slice of every global batch: ``shard_batch`` assembles the global array
from the process-local parts with ``jax.make_array_from_process_local_data``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .errors import CorruptImageError, DataError, TrainingError

DATA_AXIS = "data"


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis ``"data"`` over ``devices`` (default: all local devices)."""
    devices = list(jax.local_devices() if devices is None else devices)
    return Mesh(np.array(devices), (DATA_AXIS,))


def auto_mesh() -> Mesh | None:
    """A mesh over every device of every process when there is more than one process,
    over the local devices when there are several, else ``None``."""
    if jax.process_count() > 1:
        return data_mesh(jax.devices())
    return data_mesh() if jax.local_device_count() > 1 else None


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every array of ``tree`` copied to all devices of ``mesh`` (across processes: each
    process passes the same values)."""
    arrays, static = eqx.partition(tree, eqx.is_array)
    sharding = NamedSharding(mesh, PartitionSpec())
    if jax.process_count() > 1:
        put = lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(local(x)))  # noqa: E731
        return eqx.combine(jax.tree.map(put, arrays), static)
    return eqx.combine(jax.device_put(arrays, sharding), static)


def local(tree: Any) -> Any:
    """``tree`` with each replicated global array replaced by this process's copy (host
    values can then be read: ``np.asarray``, ``jax.device_get``)."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return x.addressable_data(0)
        return x

    return jax.tree.map(one, tree)


def host(tree: Any) -> Any:
    """``jax.device_get`` that also reads replicated multi-process arrays."""
    return jax.device_get(local(tree))


def check_same_length(**lengths: int) -> None:
    """Across processes: every process must see data of the same lengths
    (``TrainingError`` naming them otherwise)."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    mine = np.array(list(lengths.values()), np.int64)
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, len(mine))
    for j, name in enumerate(lengths):
        if len(set(every[:, j].tolist())) > 1:
            raise TrainingError(
                f"The processes disagree on the length of {name}: "
                f"{dict(enumerate(every[:, j].tolist()))} (process: length). Every process "
                "must open the same data (each reads its own part of every batch)."
            )


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

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int, start_step: int = 0):
        from concurrent.futures import ThreadPoolExecutor

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


class GrainLoader:
    """A ``Loader``'s batches made by grain worker processes (decode and augmentation run
    outside this process's GIL): the same batches as ``loader.epoch`` (same order,
    augmentation, padding and mask), this process's part of each when there are several
    (as ``ProcessShard``). The iterator state is ``(epoch, start_step)``, which ``fit``
    saves with every checkpoint. Needs the ``grain`` extra; the source must pickle.

    >>> fit(model, state, optimizer, spec, eqxtl.GrainLoader(eqxtl.Loader(source, p, 32)))
    """

    def __init__(
        self, loader, *, num_workers: int = 2, index: int | None = None, count: int | None = None
    ):
        self.loader = loader
        self.num_workers = num_workers
        self.index = jax.process_index() if index is None else index
        self.count = jax.process_count() if count is None else count
        if loader.batch_size % self.count:
            raise DataError(
                f"A global batch of {loader.batch_size} cannot be split over {self.count} "
                f"processes: use a batch size that is a multiple of {self.count}."
            )
        self.batch_size = loader.batch_size
        self.source = loader.source
        self.preprocessing = loader.preprocessing
        self.augment = loader.augment

    def __len__(self) -> int:
        return len(self.loader)

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


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """``batch``'s arrays split along their first axis over the ``"data"`` axis of
    ``mesh``. Each process passes its local part (on one host: the whole batch)."""
    sharding = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    n = mesh.shape[DATA_AXIS] // jax.process_count()

    def put(x):
        x = np.asarray(x)
        if x.shape[0] % n:
            raise ValueError(
                f"A batch of {x.shape[0]} examples cannot be split evenly over {n} devices: "
                f"use a batch size that is a multiple of {n}."
            )
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(put, batch)
