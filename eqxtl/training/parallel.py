"""Data and fully sharded data parallelism (FSDP) with ``jax.sharding``.

A mesh has two axes: ``"data"`` and ``"fsdp"``. Every batch is split along its first axis
over both (each device sees ``B / devices`` examples); parameters, BatchNorm state and
optimizer state are split along ``"fsdp"`` (``shard``: the large leaves over their largest
axis that the axis size divides, the small ones replicated). XLA inserts the gathers of the
parameters before their use, the reduce-scatters of the gradients and the cross-device
BatchNorm reductions itself. ``fsdp=1`` (the default) is plain data parallelism: everything
replicated.

``fit`` does this with ``Runtime(mesh=...)``; with ``mesh="auto"`` (the default) and more
than one device it uses ``make_mesh()`` (data parallel over every device). Across processes
(one per host, ``jax.distributed.initialize()`` first): each process reads only its part of
every global batch (``ProcessShard``), the batches are assembled into global arrays with
``jax.make_array_from_process_local_data``, evaluation sums are reduced over all processes
by XLA, and process 0 alone writes the run folder. By hand:

>>> mesh = eqxtl.make_mesh(fsdp=8)                 # axes ("data", "fsdp") over jax.devices()
>>> model, state, opt_state = eqxtl.shard((model, state, opt_state), mesh)
>>> step = eqxtl.make_step(loss_fn, optimizer, spec, mesh=mesh)  # shards each batch
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.tree_util as jtu
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .._util.checks import count
from .._util.pytree_paths import keypath_to_str
from ..errors import RuleError, TrainingError

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)
FSDP_MIN_SIZE = 2**16
"""``shard`` splits leaves of at least this many elements over ``"fsdp"`` (big_vision's
``fsdp`` rule uses the same bound): smaller ones cost more in gathers than they save."""


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``jax.sharding.Mesh`` with axes ``("data", "fsdp")`` of sizes ``(data, fsdp)``.

    **Arguments:**

    - `data`: the number of data-parallel groups; ``-1``: every device the ``fsdp`` groups
      leave (``devices / fsdp``).
    - `fsdp`: the number of devices each parameter and optimizer state is split over
      (``1``: replicated, plain data parallelism); ``-1``: the rest.
    - `devices`: default ``jax.devices()``, every device of every process. Devices go into
      the mesh in this order, ``fsdp`` fastest, so a process's devices stay together.

    >>> eqxtl.make_mesh()            # data parallel over every device
    >>> eqxtl.make_mesh(fsdp=8)      # parameters and optimizer state split 8 ways
    >>> eqxtl.make_mesh(data=2, fsdp=4)
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = {}
    for name, value in (("data", data), ("fsdp", fsdp)):
        if value == -1:
            sizes[name] = -1
        else:
            sizes[name] = count(value, f"make_mesh({name}=...) (or -1: the rest)", TrainingError)
    if sizes["data"] == -1 and sizes["fsdp"] == -1:
        raise TrainingError("make_mesh: only one of data and fsdp can be -1 (the rest).")
    for name, other in (("data", "fsdp"), ("fsdp", "data")):
        if sizes[name] == -1:
            if sizes[other] > n or n % sizes[other]:
                raise TrainingError(
                    f"make_mesh({other}={sizes[other]}) does not divide the {n} devices: "
                    f"use a divisor of {n} (jax.devices() has {n})."
                )
            sizes[name] = n // sizes[other]
    total = sizes["data"] * sizes["fsdp"]
    if total > n:
        raise TrainingError(
            f"make_mesh(data={sizes['data']}, fsdp={sizes['fsdp']}) needs {total} devices, "
            f"but there are only {n}: make data x fsdp = {n} (or pass -1 for one of them)."
        )
    if total != n:
        raise TrainingError(
            f"make_mesh(data={sizes['data']}, fsdp={sizes['fsdp']}) covers {total} of the "
            f"{n} devices: make data x fsdp = {n} (or pass -1 for one of them), or pass the "
            f"devices to use (devices=jax.devices()[:{total}])."
        )
    grid = np.empty(n, dtype=object)
    grid[:] = devices
    return Mesh(grid.reshape(sizes["data"], sizes["fsdp"]), BATCH_AXES)


def auto_mesh() -> Mesh | None:
    """``make_mesh()`` (data parallel over every device of every process) when there is
    more than one device, else ``None``."""
    return make_mesh() if jax.device_count() > 1 else None


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The axes of ``mesh`` a batch is split over: ``"data"`` and ``"fsdp"`` where present."""
    axes = tuple(a for a in mesh.axis_names if a in BATCH_AXES)
    if not axes:
        raise TrainingError(
            f"The mesh has axes {tuple(mesh.axis_names)}, none of them 'data' or 'fsdp': "
            "build it with eqxtl.make_mesh(data=..., fsdp=...)."
        )
    return axes


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The first axis split over ``"data"`` and ``"fsdp"`` together."""
    return NamedSharding(mesh, PartitionSpec(batch_axes(mesh)))


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """``batch``'s arrays split along their first axis over the ``"data"`` and ``"fsdp"``
    axes of ``mesh`` together. Each process passes its local part (on one host: the whole
    batch)."""
    sharding = batch_sharding(mesh)
    n = math.prod(mesh.shape[a] for a in batch_axes(mesh)) // jax.process_count()

    def put(x):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        x = np.asarray(x)
        if x.shape[0] % n:
            raise ValueError(
                f"A batch of {x.shape[0]} examples cannot be split evenly over {n} devices: "
                f"use a batch size that is a multiple of {n}."
            )
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(put, batch)


def shard(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, PartitionSpec]] | None = None):
    """Every array of ``tree`` (a model, a BatchNorm state, an optimizer state, or a tuple
    of them) placed on ``mesh``.

    **Arguments:**

    - `tree`: any pytree; its non-array leaves are kept as they are. Across processes each
      process passes the same values (or arrays already on the mesh).
    - `mesh`: from ``make_mesh``.
    - `rules`: ``(pattern, PartitionSpec)`` pairs tried before the default, first match wins
      (big_vision style), e.g. ``[(r".*mlp\\.fc1\\.weight", P("fsdp", None))]`` or a tensor
      parallel split. A pattern full-matches a leaf's dotted path (``eqxtl.paths``) or one of
      its dotted suffixes.

    Default: a leaf of at least ``2**16`` elements (frozen ones too: they cost memory as
    well) is split along ``"fsdp"`` on its largest axis that the ``fsdp`` size divides (the
    first such axis on a tie); a large leaf that no axis fits is replicated with a warning
    naming it; smaller leaves are replicated. With ``fsdp=1`` everything is replicated.

    Optimizer state follows its parameter's sharding: optax keeps one leaf per parameter
    (momenta, second moments) of the parameter's shape, at a path that ends with the
    parameter's path (``0.mu.head.weight`` for ``head.weight`` in Adam's state), so the
    default, which depends on the shape only, and a rule, which also matches the path's
    suffixes, give both the same sharding. Leaves that mirror no parameter (step counts) are
    small and replicated.

    A rule whose spec has more axes than the leaf, names an axis the mesh lacks, or splits
    an axis its mesh size does not divide is a ``RuleError`` naming the rule, the path and
    the shape.

    >>> mesh = eqxtl.make_mesh(fsdp=8)
    >>> model, state, opt_state = eqxtl.shard((model, state, opt_state), mesh)
    """
    rules = _check_rules(rules)
    flat, treedef = jtu.tree_flatten_with_path(tree)
    shardings = [
        NamedSharding(mesh, _spec(keypath_to_str(kp), x, mesh, rules)) if eqx.is_array(x) else None
        for kp, x in flat
    ]
    return jtu.tree_unflatten(treedef, _place([x for _, x in flat], shardings))


def _check_rules(rules) -> list[tuple[str, re.Pattern, PartitionSpec]]:
    out = []
    for i, rule in enumerate(rules or ()):
        if not (isinstance(rule, tuple | list) and len(rule) == 2):
            raise RuleError(
                f"shard(rules=...) takes (pattern, PartitionSpec) pairs; rule {i} is {rule!r}."
            )
        pattern, spec = rule
        if not isinstance(spec, PartitionSpec):
            raise RuleError(
                f"shard(rules=...): rule {i} ({pattern!r}) needs a jax.sharding.PartitionSpec, "
                f"got {spec!r}."
            )
        try:
            out.append((pattern, re.compile(pattern), spec))
        except (re.error, TypeError) as e:
            raise RuleError(f"shard(rules=...): rule {i} pattern {pattern!r}: {e}.") from None
    return out


def _suffixes(path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[i:]) for i in range(len(parts))]


def _spec(path: str, x, mesh: Mesh, rules) -> PartitionSpec:
    shape = tuple(np.shape(x))
    for pattern, regex, spec in rules:
        if any(regex.fullmatch(s) for s in _suffixes(path)):
            _check_spec(pattern, spec, path, shape, mesh)
            return spec
    n = dict(mesh.shape).get(FSDP_AXIS, 1)
    if n == 1 or math.prod(shape) < FSDP_MIN_SIZE:
        return PartitionSpec()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % n == 0:
            return PartitionSpec(*([None] * axis), FSDP_AXIS)
    warnings.warn(
        f"shard: {path} {list(shape)} has {math.prod(shape)} elements, but fsdp={n} divides "
        "none of its axes: it is replicated on every device. Pass a rule for it, or choose "
        "an fsdp size that divides one of its axes.",
        stacklevel=3,
    )
    return PartitionSpec()


def _check_spec(pattern, spec: PartitionSpec, path: str, shape, mesh: Mesh) -> None:
    where = f"shard(rules=...): the rule {pattern!r} -> {spec} matches {path} {list(shape)}"
    if len(spec) > len(shape):
        raise RuleError(
            f"{where}, but the spec has {len(spec)} axes and the leaf {len(shape)}: give it at "
            f"most {len(shape)} (None for an axis that is not split), or make the pattern "
            "match fewer leaves."
        )
    sizes = dict(mesh.shape)
    for dim, names in zip(shape, spec, strict=False):
        names = () if names is None else (names,) if isinstance(names, str) else tuple(names)
        missing = [a for a in names if a not in sizes]
        if missing:
            raise RuleError(f"{where}, but the mesh has no axis {missing[0]!r} (it has {sizes}).")
        k = math.prod(sizes[a] for a in names)
        if dim % k:
            raise RuleError(
                f"{where}, but an axis of size {dim} cannot be split into {k} equal parts "
                f"({'x'.join(names)} of the mesh {sizes})."
            )


def _place(leaves: list, shardings: list) -> list:
    """``leaves`` placed with ``shardings`` (``None``: left as they are), in one transfer."""
    out = list(leaves)
    host_i = [i for i, s in enumerate(shardings) if s is not None and _on_host(leaves[i])]
    on_host = set(host_i)
    global_i = [i for i, s in enumerate(shardings) if s is not None and i not in on_host]
    if host_i and jax.process_count() > 1:
        for i in host_i:
            value = np.asarray(leaves[i])
            out[i] = jax.make_array_from_callback(
                value.shape, shardings[i], lambda index, v=value: v[index]
            )
    elif host_i:
        placed = jax.device_put([leaves[i] for i in host_i], [shardings[i] for i in host_i])
        for i, x in zip(host_i, placed, strict=True):
            out[i] = x
    todo = [i for i in global_i if leaves[i].sharding != shardings[i]]
    if todo:  # arrays spread over several processes: resharded by XLA, by all processes
        moved = jax.jit(lambda xs: xs, out_shardings=[shardings[i] for i in todo])(
            [leaves[i] for i in todo]
        )
        for i, x in zip(todo, moved, strict=True):
            out[i] = x
    return out


def _on_host(x) -> bool:
    """Whether this process can read ``x`` whole (numpy, or a jax array it holds all of)."""
    return not isinstance(x, jax.Array) or x.is_fully_addressable


def on_mesh(tree: Any, mesh: Mesh) -> Any:
    """``tree`` with each array that is not yet on ``mesh`` placed by ``shard``'s default
    (arrays already on it, e.g. by ``shard`` with rules, stay where they are)."""

    def placed(x):
        return isinstance(x, jax.Array) and getattr(x.sharding, "mesh", None) == mesh

    flat, treedef = jtu.tree_flatten_with_path(tree)
    shardings = [
        NamedSharding(mesh, _spec(keypath_to_str(kp), x, mesh, []))
        if eqx.is_array(x) and not placed(x)
        else None
        for kp, x in flat
    ]
    return jtu.tree_unflatten(treedef, _place([x for _, x in flat], shardings))


def shardings_of(tree: Any) -> Any:
    """The ``.sharding`` of every array of ``tree`` (``None`` elsewhere)."""
    return jax.tree.map(lambda x: x.sharding if isinstance(x, jax.Array) else None, tree)


def local(tree: Any) -> Any:
    """``tree`` with each array spread over several processes replaced by its full value
    as a local array (host values can then be read: ``np.asarray``, ``jax.device_get``).
    A sharded array is gathered (a collective: every process must call this)."""
    leaves, treedef = jax.tree.flatten(tree)
    spread = [
        i for i, x in enumerate(leaves) if isinstance(x, jax.Array) and not x.is_fully_addressable
    ]
    gather = [i for i in spread if not leaves[i].sharding.is_fully_replicated]
    gathered = set(gather)
    if gather:
        from jax.experimental import multihost_utils

        full = multihost_utils.process_allgather([leaves[i] for i in gather], tiled=True)
        for i, x in zip(gather, full, strict=True):
            leaves[i] = x
    for i in spread:
        if i not in gathered:
            leaves[i] = leaves[i].addressable_data(0)
    return jax.tree.unflatten(treedef, leaves)


def host(tree: Any) -> Any:
    """``jax.device_get`` that also reads arrays spread over several processes."""
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
