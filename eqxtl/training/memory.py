"""What a train step holds in memory, from its compiled program, before it runs.

``memory_report(step, model, state, opt_state, batch)`` lowers and compiles the step
``make_step`` built, for these arguments (arrays, or their shapes: ``jax.ShapeDtypeStruct``
leaves from ``jax.eval_shape``), runs nothing, and splits its memory into what the user holds
(parameters, optimizer state, ...) and what XLA's buffer assignment says the executable
needs (``compiled.memory_analysis()``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from .._util.sizes import is_leaf_value, nbytes
from ..errors import EqxtlError
from .packed import Packed

_MB = 2**20


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Bytes of one compiled train step (``memory_report``). ``str(report)``: a table in MB.

    What the arguments hold (computed from their leaves):

    - ``trainable`` / ``frozen``: the parameters the spec trains / leaves frozen (every
      array leaf of the model: BatchNorm running statistics live in ``model_state``);
    - ``gradients``: one gradient tree (the floating-point trainable leaves). It lives
      inside ``temp`` while the step runs, never outside it;
    - ``optimizer_state``, ``model_state`` (BatchNorm statistics), ``batch``.

    What XLA's buffer assignment of the executable says (``compiled.memory_analysis()``):

    - ``argument``: every input buffer (model, states, batch, key);
    - ``output``: every output buffer (new trainable leaves, optimizer and model state,
      metrics);
    - ``alias``: outputs written in place over donated inputs (``make_step(donate=...)``):
      counted once, in ``argument``;
    - ``temp``: everything else the step allocates while it runs: the activations the
      backward pass keeps, the gradients, the optimizer's intermediate values, and the
      temporaries of each operation;
    - ``peak``: ``argument + output - alias + temp``, what the step holds at once while it
      runs (XLA:CPU allocates ``temp`` as one block per call).

    Not counted: the compiler's own memory while compiling (once, before the first step),
    the runtime and libraries, and a second copy of the model the caller keeps alive.
    """

    trainable: int
    frozen: int
    gradients: int
    optimizer_state: int
    model_state: int
    batch: int
    argument: int
    output: int
    alias: int
    temp: int
    peak: int
    donated: bool

    def __str__(self) -> str:
        rows = [
            ("parameters, trainable", self.trainable, "arguments"),
            ("parameters, frozen", self.frozen, "arguments"),
            ("optimizer state", self.optimizer_state, "arguments"),
            ("model state (BatchNorm)", self.model_state, "arguments"),
            ("batch", self.batch, "arguments"),
            ("gradients", self.gradients, "inside temp"),
            ("argument buffers", self.argument, "XLA"),
            ("output buffers", self.output, "XLA"),
            ("aliased (donated)", self.alias, "XLA: outputs in inputs' place"),
            ("temp (activations, temporaries)", self.temp, "XLA"),
            ("peak estimate", self.peak, "argument + output - alias + temp"),
        ]
        width = max(len(name) for name, _, _ in rows)
        lines = [f"{'component':<{width}}  {'MB':>10}  note"]
        lines += [f"{name:<{width}}  {n / _MB:>10.1f}  {note}" for name, n, note in rows]
        lines.append(f"donated: {'yes' if self.donated else 'no'}")
        return "\n".join(lines)


def memory_report(
    step, model: Any, state: Any, opt_state: Any, batch: dict, key: Any = None
) -> MemoryReport:
    """Bytes per component of ``step`` (from ``make_step``) on these arguments, without
    running it: the step is lowered and compiled as its first call would compile it (same
    donation, same XLA options); nothing the size of an activation is allocated.

    **Arguments:** what you would pass the step: ``step(model, state, opt_state, batch,
    key)``. Any leaf may be a ``jax.ShapeDtypeStruct`` instead of an array (the model from
    ``eqx.filter_eval_shape(...)``, ``opt_state`` from ``jax.eval_shape(optimizer.init,
    eqx.filter(model, spec))``, ``batch = {"image": jax.ShapeDtypeStruct((B, C, H, W),
    jnp.float32), "label": jax.ShapeDtypeStruct((B,), jnp.int32)}``). ``key``: ``None``
    compiles with a PRNG key (as ``fit`` passes one).

    ``fit`` builds its step as ``make_step(task_loss(task, compute_dtype=...), optimizer,
    phase.spec, bn=phase.bn, accumulate=...)`` and runs it in step form (``step.packed``:
    trained blocks stored stacked between steps). ``model`` in step form reports that
    program (``opt_state`` is then ignored: the packed model holds its own):
    ``memory_report(step, step.pack(model, opt_state), state, None, batch)``, or from
    shapes ``eqx.filter_eval_shape(step.pack, model, opt_state)``. A model as it is
    reports ``step(model, ...)``'s program: the same parameters, gradients and optimizer
    state, with different temporaries.
    """
    lower = getattr(step, "lower", None)
    spec = getattr(step, "spec", None)
    if lower is None or spec is None:
        raise EqxtlError(
            f"memory_report takes a step built by eqxtl.make_step, got {type(step).__name__}."
        )
    if key is None:
        key = jax.random.key(0)
    if not isinstance(batch, dict):
        raise EqxtlError(
            f"memory_report: batch must be a dict of arrays or jax.ShapeDtypeStruct "
            f"(e.g. {{'image': ..., 'label': ...}}), got {type(batch).__name__}."
        )
    try:
        compiled = lower(model, state, opt_state, batch, key).compile()
    except EqxtlError:
        raise
    except (TypeError, ValueError) as e:
        raise EqxtlError(
            f"memory_report could not trace the step on batch {_shapes(batch)}: check that "
            f"these shapes and dtypes are what the model and the loss take (the model's "
            f"input size, channels first, integer labels). The error: {e}"
        ) from e
    stats = compiled.memory_analysis()
    if isinstance(model, Packed):
        trainable, frozen, opt_state = model.params, model.frozen, model.opt_state
    else:
        trainable, frozen = eqx.partition(model, spec)
    inexact = eqx.filter(trainable, lambda x: is_leaf_value(x) and _is_inexact(x))
    argument, output = stats.argument_size_in_bytes, stats.output_size_in_bytes
    alias, temp = stats.alias_size_in_bytes, stats.temp_size_in_bytes
    # Not stats.peak_memory_in_bytes: XLA:CPU's is below temp_size_in_bytes (it leaves out
    # the one temp allocation its executables make per call).
    peak = argument + output - alias + temp
    return MemoryReport(
        trainable=nbytes(trainable),
        frozen=nbytes(frozen),
        gradients=nbytes(inexact),
        optimizer_state=nbytes(opt_state),
        model_state=nbytes(state),
        batch=nbytes(batch),
        argument=int(argument),
        output=int(output),
        alias=int(alias),
        temp=int(temp),
        peak=int(peak),
        donated=alias > 0,
    )


def _is_inexact(x) -> bool:
    return jnp.issubdtype(x.dtype, jnp.inexact)


def _shapes(batch: dict) -> str:
    def one(x):
        if is_leaf_value(x):
            return f"{x.dtype}{list(x.shape)}"
        return type(x).__name__

    return "{" + ", ".join(f"{k!r}: {one(v)}" for k, v in batch.items()) + "}"
