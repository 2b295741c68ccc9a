"""Robust fine-tuning: weight interpolation (WiSE-FT); linear-probe-then-fine-tune (LP-FT)
is two phases of one ``fit`` (``eqxtl.two_phases``).

WiSE-FT (Wortsman et al., 2022): ``θ = (1 − α)·θ_zero-shot + α·θ_fine-tuned`` keeps most of
the fine-tuned accuracy and recovers much of the zero-shot model's robustness::

    clip, _ = eqxtl.from_pretrained("path/to/clip", towers="both")
    zero_shot = eqxtl.zero_shot_head(clip, class_names, tokenizer="path/to/clip")
    state = eqx.nn.State(zero_shot)
    spec, opt = eqxtl.param_groups(zero_shot, [(".*", optax.adamw(1e-5))])
    fine_tuned = eqxtl.fit(zero_shot, state, opt, spec, train, epochs=2).model
    sweep = eqxtl.wise_ft(zero_shot, fine_tuned, [0, 0.25, 0.5, 0.75, 1], {"test": test})
    model = eqxtl.interpolate(zero_shot, fine_tuned, 0.5)

LP-FT (Kumar et al., 2022): train the head first with the backbone frozen (on cached
features, so it is cheap), then everything at a low learning rate, so that the first
fine-tuning steps do not distort the pretrained features through a random head. That is
``eqxtl.two_phases``, run by one ``fit`` (one history, one run folder)::

    phases = eqxtl.two_phases(model, head_epochs=10, epochs=2, head_lr=1e-3, lr=1e-5)
    tuned = eqxtl.fit(model, state, train_data=train, phases=phases)
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from .._util.checks import count, real
from .._util.pytree_paths import keypath_to_str
from ..errors import EqxtlError
from ..models.heads import Classifier


def _structure_error(a: Any, b: Any, what: str) -> EqxtlError:
    flat_a = {keypath_to_str(kp): x for kp, x in jtu.tree_flatten_with_path(a)[0]}
    flat_b = {keypath_to_str(kp): x for kp, x in jtu.tree_flatten_with_path(b)[0]}
    only_a = [p for p in flat_a if p not in flat_b]
    only_b = [p for p in flat_b if p not in flat_a]
    shapes = [
        f"{p}: shapes {np.shape(x)} and {np.shape(flat_b[p])}"
        for p, x in flat_a.items()
        if p in flat_b and np.shape(x) != np.shape(flat_b[p])
    ]
    if shapes:
        detail = "; ".join(shapes[:3])
    elif only_a or only_b:
        detail = (
            f"leaves only in the first: {only_a[:5] or 'none'}; "
            f"only in the second: {only_b[:5] or 'none'}"
        )
    else:
        detail = (
            "the same leaf paths, but a different static configuration (config, head "
            "flags, remat) or module types"
        )
    return EqxtlError(
        f"Cannot interpolate: the two {what}s do not have the same structure ({detail}). "
        "Interpolate two versions of one model: e.g. the zero-shot model and the same model "
        "after fine-tuning."
    )


def _shared_training_info(a: Any, b: Any) -> tuple[Any, Any]:
    """Two classifiers with the class names and training preprocessing that either records
    (a reloaded checkpoint records them, the model in memory may not): the same static
    fields, so that their leaves can be mixed. Class names that differ are an error: the
    head rows would mix different classes."""
    if not (isinstance(a, Classifier) and isinstance(b, Classifier)):
        return a, b
    if a.class_names is not None and b.class_names is not None:
        if a.class_names != b.class_names:
            raise EqxtlError(
                f"Cannot interpolate: the two classifiers name their head rows differently "
                f"({list(a.class_names)} and {list(b.class_names)}), so row i is another "
                "class in each. Interpolate two versions of one classifier."
            )
    names = a.class_names if a.class_names is not None else b.class_names
    preprocessing = b.preprocessing if b.preprocessing is not None else a.preprocessing
    if names is None and preprocessing is None:
        return a, b
    return a.with_training_info(names, preprocessing), b.with_training_info(names, preprocessing)


def _interpolate_tree(a: Any, b: Any, alpha: float, what: str) -> Any:
    if jtu.tree_structure(a) != jtu.tree_structure(b):
        raise _structure_error(a, b, what)

    def mix(kp, x, y):
        name = keypath_to_str(kp) or what
        if not eqx.is_array(x) or not eqx.is_array(y):
            if eqx.is_array(x) != eqx.is_array(y) or x != y:
                raise EqxtlError(f"Cannot interpolate {what} leaf {name}: {x!r} vs {y!r}.")
            return x
        if x.shape != y.shape:
            raise EqxtlError(
                f"Cannot interpolate {what} leaf {name}: shapes {x.shape} and {y.shape}."
            )
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            if not bool(jnp.array_equal(x, y)):
                raise EqxtlError(
                    f"Cannot interpolate {what} leaf {name}: it holds {x.dtype} values that "
                    "differ between the two models."
                )
            return x
        # in the wider dtype, at every alpha (the endpoints' casts up are exact): a
        # zero-shot model stored in bfloat16 must not round the float32 weights it is
        # mixed with
        dtype = jnp.promote_types(x.dtype, y.dtype)
        if alpha == 0:
            return x.astype(dtype)  # bit for bit, even -0.0 and non-finite values in y
        if alpha == 1:
            return y.astype(dtype)
        return x.astype(dtype) * (1 - alpha) + y.astype(dtype) * alpha

    return jtu.tree_map_with_path(mix, a, b)


def interpolate(
    model_a: Any,
    model_b: Any,
    alpha: float,
    state_a: eqx.nn.State | None = None,
    state_b: eqx.nn.State | None = None,
):
    """``(1 − alpha)·model_a + alpha·model_b``, leaf by leaf (WiSE-FT).

    Floating-point leaves are interpolated in the wider of the two leaves' dtypes
    (``alpha=0`` returns ``model_a``'s leaves and ``alpha=1`` ``model_b``'s, bit for bit);
    integer leaves and static fields must agree. Two classifiers keep the class names and
    training preprocessing either records (``model_b``'s preprocessing where both do);
    class names that differ are an error.
    With ``state_a`` and ``state_b`` (BatchNorm running statistics) these are
    interpolated too and ``(model, state)`` is returned; otherwise the model alone.
    Raises ``EqxtlError`` naming the first difference when the two do not have the same
    structure.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating, np.integer)):
        raise EqxtlError(f"alpha must be a real number, got {alpha!r}.")
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise EqxtlError(f"alpha must be finite, got {alpha}.")
    model = _interpolate_tree(*_shared_training_info(model_a, model_b), alpha, "model")
    if state_a is None and state_b is None:
        return model
    if state_a is None or state_b is None:
        raise EqxtlError("Pass both states (state_a and state_b) or neither.")
    return model, _interpolate_tree(state_a, state_b, alpha, "state")


def wise_ft(
    zero_shot: Any,
    fine_tuned: Any,
    alphas: Sequence[float],
    data: Any,
    *,
    states: tuple[eqx.nn.State, eqx.nn.State] | None = None,
    batch_size: int = 32,
    preprocessing=None,
    plot: str | os.PathLike | None = None,
    num_workers: int | None = None,
) -> list[dict]:
    """Evaluate ``interpolate(zero_shot, fine_tuned, alpha)`` for every ``alpha``.

    ``data``: one source (or ``Loader``), or ``{name: source}`` (e.g. the test split and a
    distribution shift). Returns one record per alpha, ``{"alpha", "accuracy", "loss"}`` for
    one source, ``{"alpha", "<name>_accuracy", "<name>_loss", ...}`` for several. ``plot``:
    a PNG path for the accuracy-vs-alpha curve (needs the ``plot`` extra). ``states``:
    ``(zero-shot state, fine-tuned state)`` for models with BatchNorm.
    """
    from .evaluation import evaluate
    from .step import make_eval_step

    batch_size = count(batch_size, "wise_ft(batch_size=...)", EqxtlError)
    alphas = [real(a, "wise_ft(alphas=...): each alpha", EqxtlError) for a in alphas]
    if not alphas:
        raise EqxtlError("wise_ft needs at least one alpha, e.g. [0, 0.5, 1].")
    named = isinstance(data, Mapping)
    sources = dict(data) if named else {"": data}
    if not sources:
        raise EqxtlError("wise_ft needs data: a source or a non-empty {name: source}.")
    if states is None and any(
        isinstance(x, eqx.nn.StateIndex)
        for x in jax.tree.leaves(zero_shot, is_leaf=lambda x: isinstance(x, eqx.nn.StateIndex))
    ):
        raise EqxtlError(
            "wise_ft: these models hold BatchNorm statistics: pass "
            "states=(zero_shot_state, fine_tuned_state), the states from_pretrained and fit "
            "returned with them."
        )
    eval_step = make_eval_step()  # one compilation for the whole sweep
    records = []
    for alpha in alphas:
        if states is None:
            model = interpolate(zero_shot, fine_tuned, alpha)
            state = eqx.nn.State(model)
        else:
            model, state = interpolate(zero_shot, fine_tuned, alpha, *states)
        record = {"alpha": alpha}
        for name, source in sources.items():
            result = evaluate(
                model,
                state,
                source,
                batch_size=batch_size,
                preprocessing=preprocessing,
                eval_step=eval_step,
                num_workers=num_workers,
            )
            prefix = f"{name}_" if named else ""
            record[f"{prefix}accuracy"] = result["accuracy"]
            record[f"{prefix}loss"] = result["loss"]
        records.append(record)
    if plot is not None:
        from .._util.plot import plot_wise_ft

        plot_wise_ft(records, plot)
    return records
