"""Data parallelism over local devices with ``jax.sharding``: the batch is split along its
first axis, parameters, BatchNorm state and optimizer state are replicated, and XLA inserts
the gradient all-reduce (and the cross-device BatchNorm reductions) itself.

``fit`` does this automatically when more than one device is present. By hand:

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

DATA_AXIS = "data"


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis ``"data"`` over ``devices`` (default: all local devices)."""
    devices = list(jax.local_devices() if devices is None else devices)
    return Mesh(np.array(devices), (DATA_AXIS,))


def auto_mesh() -> Mesh | None:
    """``data_mesh()`` when more than one local device is present, else ``None``."""
    return data_mesh() if jax.local_device_count() > 1 else None


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every array of ``tree`` copied to all devices of ``mesh``."""
    arrays, static = eqx.partition(tree, eqx.is_array)
    return eqx.combine(jax.device_put(arrays, NamedSharding(mesh, PartitionSpec())), static)


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
