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

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ..errors import TrainingError

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
