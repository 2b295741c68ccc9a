"""The resumable training state (model, BatchNorm state, optimizer state) of a checkpoint,
written and read shard by shard with orbax-checkpoint.

Each process writes the shards of every array that it holds (one copy of each: replica 0),
so nothing is gathered on one host, however large the state. Reading places every array
straight onto the mesh the run resumes on, split as ``shard``'s default splits it there:
the mesh may differ from the one that wrote it (8 devices to 4, another ``fsdp`` size,
another number of processes). Across processes the folder must be one that every process
sees (a shared file system or a bucket path orbax can write).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding

from .._util.pytree_paths import keypath_to_str
from ..errors import TrainingError
from .parallel import _spec


@functools.cache
def _checkpointer():
    import orbax.checkpoint as ocp

    # Replica-parallel writing (the default off GPU) cuts replicated shards into slices
    # with a jax op per array shape, each compiled: seconds for a small model. Every
    # shard is written once without it as well (by the process holding replica 0).
    arrays = ocp.type_handlers.ArrayHandler(use_replica_parallel=False)
    registry = ocp.type_handlers.create_type_handler_registry((jax.Array, arrays))
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry))


def _arrays(tree: Any) -> dict[str, Any]:
    """``{dotted path: array}`` of the array leaves of ``tree``."""
    flat, _ = jtu.tree_flatten_with_path(tree)
    return {keypath_to_str(kp): x for kp, x in flat if eqx.is_array(x)}


def write(path: Path, tree: Any) -> None:
    """Write the arrays of ``tree`` into the new folder ``path``, each process its own
    shards. A collective: every process calls it with its part of the same global arrays."""
    import orbax.checkpoint as ocp

    arrays = {
        p: x if isinstance(x, jax.Array) else jnp.asarray(x) for p, x in _arrays(tree).items()
    }
    _checkpointer().save(Path(path).absolute(), args=ocp.args.PyTreeSave(arrays))


def read(path: Path, like: Any, mesh: Mesh | None, where: str) -> Any:
    """``like`` (same structure: arrays or ``ShapeDtypeStruct``) with its arrays read from
    ``path``, each placed on ``mesh`` by ``shard``'s default (no mesh: on the first local
    device). ``TrainingError`` naming the mesh and the sizes when a device of the mesh
    cannot hold its part of the state (``where``: the run, for the message)."""
    import orbax.checkpoint as ocp

    flat, treedef = jtu.tree_flatten_with_path(like)
    target = {}
    for kp, x in flat:
        if eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct):
            p = keypath_to_str(kp)
            if mesh is None:
                sharding = SingleDeviceSharding(jax.local_devices()[0])
            else:
                sharding = NamedSharding(mesh, _spec(p, x, mesh, []))
            target[p] = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    check_fits(target, mesh, where)
    args = ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)
    )
    arrays = _checkpointer().restore(Path(path).absolute(), args=args)
    leaves = [arrays.get(keypath_to_str(kp), x) for kp, x in flat]
    return jtu.tree_unflatten(treedef, leaves)


def per_device_bytes(target: dict[str, jax.ShapeDtypeStruct]) -> int:
    """The bytes of ``target``'s arrays that one device holds (the largest share)."""
    total = 0
    for x in target.values():
        shard_shape = x.sharding.shard_shape(x.shape)
        total += math.prod(shard_shape) * x.dtype.itemsize
    return total


def device_bytes_limit(device: jax.Device) -> int | None:
    """The memory of ``device`` in bytes, where the backend reports it (not on CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # backends without memory statistics
        return None
    return None if not stats else stats.get("bytes_limit")


def check_fits(target: dict[str, jax.ShapeDtypeStruct], mesh: Mesh | None, where: str) -> None:
    device = jax.local_devices()[0]
    limit = device_bytes_limit(device)
    needed = per_device_bytes(target)
    if limit is None or needed <= limit:
        return
    total = sum(math.prod(x.shape) * x.dtype.itemsize for x in target.values())
    shape = "one device (no mesh)" if mesh is None else f"the mesh {dict(mesh.shape)}"
    raise TrainingError(
        f"Cannot resume the run in {where} onto {shape}: its training state (model, "
        f"BatchNorm and optimizer state: {_size(total)} in all) needs {_size(needed)} on "
        f"each device there, but a device ({device.device_kind}) holds {_size(limit)}. "
        "Resume onto a mesh that splits it further (Runtime(mesh=eqxtl.make_mesh(fsdp=N)) "
        "with a larger N, or more devices)."
    )


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
