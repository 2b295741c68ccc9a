"""Phases: what trains, with which optimizer, for how long (``Phase``), the two-phase
recipe (``two_phases``) and a learning-rate schedule (``warmup_cosine``)."""

from __future__ import annotations

import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.tree_util as jtu
import optax

from .._util.checks import count, real
from ..errors import TrainingError


@dataclasses.dataclass(frozen=True)
class Phase:
    """One stage of a run: train the leaves ``spec`` marks with ``optimizer`` for ``epochs``
    (or ``steps``, which wins when given), with the BatchNorm mode ``bn``
    (``batchnorm_modes``: ``"auto"``, ``"frozen"``, ``"train"``).

    ``fit(model, state, optimizer, spec, train, epochs=3)`` is
    ``fit(model, state, train_data=train, phases=[Phase(spec, optimizer, epochs=3)])``.
    The Keras / fastai two-phase recipe (``eqxtl.two_phases``): the head alone on cached
    features, then everything with a small learning rate and BatchNorm frozen.
    """

    spec: Any
    optimizer: optax.GradientTransformation
    epochs: int | None = None
    steps: int | None = None
    bn: str = "auto"
    name: str | None = None

    def __post_init__(self):
        from .step import BN_MODES

        if self.bn not in BN_MODES:
            raise TrainingError(f"Phase(bn=...): bn must be one of {BN_MODES}, got {self.bn!r}.")
        if not isinstance(self.optimizer, optax.GradientTransformation):
            swapped = isinstance(self.spec, optax.GradientTransformation)
            raise TrainingError(
                f"The optimizer must be an optax transformation, got "
                f"{type(self.optimizer).__name__}"
                + (
                    ": the spec and the optimizer are swapped (eqxtl.param_groups returns "
                    "(spec, optimizer), fit takes (optimizer, spec): pass them by keyword, "
                    "fit(..., optimizer=optimizer, spec=spec))."
                    if swapped
                    else "."
                )
            )
        for what in ("epochs", "steps"):
            value = getattr(self, what)
            if value is not None:
                object.__setattr__(self, what, count(value, f"Phase({what}=...)", TrainingError))

    def num_steps(self, steps_per_epoch: int) -> int:
        """How many steps this phase runs."""
        if self.steps is not None:
            return int(self.steps)
        return int(self.epochs if self.epochs is not None else 1) * steps_per_epoch


def two_phases(
    model,
    *,
    head_epochs: int = 1,
    epochs: int = 1,
    head_lr: float = 1e-3,
    lr: float = 1e-5,
    head: str = "head",
) -> list[Phase]:
    """Keras's "freeze, train the head, unfreeze, fine-tune with a low rate" (fastai's
    ``fine_tune``; LP-FT, linear probing then fine-tuning, Kumar et al. 2022) as two
    ``Phase``s: ``head`` alone with Adam at ``head_lr`` for ``head_epochs`` (on cached
    features), then every leaf with Adam at ``lr`` for ``epochs``, BatchNorm in inference
    mode throughout (``bn="frozen"``). One ``fit`` runs both, with one history and one run
    folder that resumes in the right phase:

    >>> eqxtl.fit(model, state, train_data=train, phases=eqxtl.two_phases(model, head_epochs=10))
    """
    from ..tuning.filters import everything, trainable

    for what, value in (("head_lr", head_lr), ("lr", lr)):
        real(value, f"two_phases({what}=...)", TrainingError, low=0, low_open=True)
    return [
        Phase(trainable(model, head), optax.adam(head_lr), epochs=head_epochs, name="head"),
        Phase(everything(model), optax.adam(lr), epochs=epochs, bn="frozen", name="fine-tune"),
    ]


def warmup_cosine(peak_lr: float, total_steps: int, warmup_steps: int = 0, end_lr=0.0):
    """Linear warmup from 0 to ``peak_lr`` over ``warmup_steps``, then cosine to ``end_lr``."""
    peak_lr = real(peak_lr, "warmup_cosine(peak_lr=...)", TrainingError, low=0, low_open=True)
    end_lr = real(end_lr, "warmup_cosine(end_lr=...)", TrainingError, low=0)
    total_steps = count(total_steps, "warmup_cosine(total_steps=...)", TrainingError)
    warmup_steps = count(warmup_steps, "warmup_cosine(warmup_steps=...)", TrainingError, minimum=0)
    return optax.warmup_cosine_decay_schedule(
        0.0, peak_lr, warmup_steps, max(total_steps, warmup_steps + 1), end_lr
    )


def check_phases(model, phases) -> None:
    """``TrainingError`` unless every phase trains some floating-point leaf of ``model``."""
    for i, p in enumerate(phases):
        if not _trains_something(model, p.spec):
            where = f"Phase {i}" + (f" ({p.name})" if p.name else "") if len(phases) > 1 else ""
            raise TrainingError(
                f"{where or 'The spec'} trains nothing: no floating-point leaf is marked "
                "True. Check the rules (eqxtl.summary(model, spec) shows what trains)."
            )


def _trains_something(model, spec) -> bool:
    flat, treedef = jtu.tree_flatten(model)
    try:
        on = treedef.flatten_up_to(spec)
    except (ValueError, TypeError):
        raise TrainingError(
            "The spec does not have the model's structure: build it from this model "
            "(eqxtl.trainable(model, ...))."
        ) from None
    return any(
        bool(o) and eqx.is_inexact_array(x) and x.size for x, o in zip(flat, on, strict=True)
    )


def union(specs: list) -> Any:
    """A spec marking every leaf that some spec of ``specs`` marks."""
    return jax.tree.map(lambda *xs: any(bool(x) for x in xs), *specs)
