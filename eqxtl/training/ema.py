"""Weight EMA: an exponential moving average of the trainable weights, kept in the optimizer
state and updated inside the compiled step (``EMA``).

Why an optimizer transform, driven by a callback: the average is a function of the weights
after each update, which is what an optax transformation placed last in the chain sees
(``params + updates``). In the optimizer state it is updated in the same compiled step
(no extra dispatch or host sync, donated with the rest), skipped with the step when a loss
or gradient is not finite, replicated over a mesh, saved in ``last/`` and restored on resume
(the run signature records its shapes), like every other optimizer state. The callback side
of ``EMA`` is what the loop asks: the model to evaluate and export (``eval_model``), and the
average carried from one phase's optimizer state to the next.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from .._util.checks import real
from ..errors import TrainingError


class EmaState(NamedTuple):
    """The EMA's optimizer state: the number of updates so far and the averages (the
    trainable partition's structure: ``None`` where a leaf is frozen, never copied)."""

    count: jax.Array
    ema: Any


def _lerp(avg, new, weight):
    """``torch.lerp`` as PyTorch computes it (timm updates its EMA with it): exact at
    ``weight`` 0 and 1, so the first update copies the weights bit for bit."""
    if not eqx.is_inexact_array(avg):
        return avg
    w = weight.astype(avg.dtype)
    diff = new.astype(avg.dtype) - avg
    return jnp.where(w < 0.5, avg + w * diff, new.astype(avg.dtype) - diff * (1 - w))


@dataclasses.dataclass
class EMA:
    """An exponential moving average of the trainable weights, updated after every
    optimizer step with timm's ``ModelEmaV3`` rule and decay warmup:
    ``ema <- decay_k * ema + (1 - decay_k) * weights`` at update ``k = 1, 2, ...``, where
    ``decay_1 = 0`` (the first update copies the weights) and, for ``k > 1``,
    ``decay_k = decay`` or, with ``warmup``,
    ``clip(1 - (1 + (k - 1) / warmup_gamma) ** -warmup_power, min_decay, decay)``.

    A callback: ``fit(..., callbacks=[eqxtl.EMA(0.9998)])``. ``fit`` adds the average to each
    phase's optimizer (last in the chain: it averages the weights after the update), so it
    lives in the optimizer state: saved in ``last/`` with the run and restored on resume;
    a step skipped for a non-finite loss does not count. It covers the leaves the phase
    trains (frozen leaves do not change: their average is themselves, so none is stored) and
    carries over from one phase to the next (a leaf that starts training then starts from its
    weight, which is its average so far; one that stops training keeps its weight). BatchNorm
    statistics are not averaged (timm's ``exclude_buffers=True``): evaluation uses the
    model's own; they only change where BatchNorm trains.

    **Arguments:**

    - `decay`: in (0, 1); timm's ``--model-ema-decay`` (0.9998 by default there too).
    - `warmup`: timm's ``use_warmup`` (its ``--model-ema-warmup``); ``True`` here, as a
      fine-tune of a few hundred steps would otherwise average mostly its first weights.
    - `warmup_gamma`, `warmup_power`, `min_decay`: timm's warmup constants.
    - `evaluate_with_ema`: evaluations score the averaged weights, ``best/`` is chosen by
      them, and the checkpoints' exported ``model.safetensors`` hold them (the training state
      in ``train_state/`` keeps the raw weights, to resume). ``False``: the average is
      only kept (``averaged``).

    ``fit`` returns the raw weights; the averaged model is
    ``ema.averaged(result.model, result.opt_state)``.
    """

    decay: float = 0.9998
    warmup: bool = True
    warmup_gamma: float = 1.0
    warmup_power: float = 2 / 3
    min_decay: float = 0.0
    evaluate_with_ema: bool = True
    _carry: Any = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self):
        self.decay = real(
            self.decay,
            "EMA(decay=...)",
            TrainingError,
            low=0,
            high=1,
            low_open=True,
            high_open=True,
        )
        self.warmup_gamma = real(
            self.warmup_gamma, "EMA(warmup_gamma=...)", TrainingError, low=0, low_open=True
        )
        self.warmup_power = real(
            self.warmup_power, "EMA(warmup_power=...)", TrainingError, low=0, low_open=True
        )
        self.min_decay = real(self.min_decay, "EMA(min_decay=...)", TrainingError, low=0, high=1)
        for what in ("warmup", "evaluate_with_ema"):
            if not isinstance(getattr(self, what), bool):
                raise TrainingError(
                    f"EMA({what}=...) must be True or False, got {getattr(self, what)!r}."
                )

    def decay_at(self, k) -> jax.Array:
        """The decay of update ``k`` (1 for the first; an int or a traced integer)."""
        step = jnp.maximum(jnp.asarray(k, jnp.float32) - 1.0, 0.0)
        if self.warmup:
            d = 1.0 - (1.0 + step / self.warmup_gamma) ** -self.warmup_power
            d = jnp.maximum(jnp.minimum(d, self.decay), self.min_decay)
        else:
            d = jnp.full_like(step, self.decay)
        return jnp.where(step <= 0, 0.0, d)

    def transform(self) -> optax.GradientTransformation:
        """The average as an optax transformation, to put last in a chain (it reads the
        weights after the update: ``optax.chain(optimizer, ema.transform())``); its state is
        an ``EmaState``. It leaves the updates unchanged."""

        def init(params):
            ema = jax.tree.map(lambda x: jnp.copy(x) if eqx.is_array(x) else x, params)
            return EmaState(jnp.zeros((), jnp.int32), ema)

        def update(updates, state, params=None):
            if params is None:
                raise TrainingError(
                    "EMA needs the weights: call optimizer.update(grads, opt_state, params)."
                )
            new = eqx.apply_updates(params, updates)
            count = state.count + 1
            weight = 1.0 - self.decay_at(count)
            ema = jax.tree.map(lambda a, x: _lerp(a, x, weight), state.ema, new)
            return updates, EmaState(count, ema)

        return optax.GradientTransformation(init, update)

    def wrap_optimizer(self, optimizer: optax.GradientTransformation):
        """What ``fit`` does to each phase's optimizer: ``optax.chain(optimizer, average)``."""
        return optax.chain(optimizer, self.transform())

    def averaged(self, model, opt_state):
        """``model`` with its trained leaves replaced by their averages (from the
        ``EmaState`` in ``opt_state``)."""
        return eqx.combine(_ema_state(opt_state).ema, model)

    def eval_model(self, model, opt_state):
        """The model evaluations score and checkpoints export (a hook of ``fit``)."""
        return self.averaged(model, opt_state) if self.evaluate_with_ema else model

    # -- callback hooks: the average goes on across phases (each has its own optimizer state)

    def on_eval(self, run, record: dict) -> None:
        self._carry = _ema_state(run.opt_state)

    def reset(self) -> None:
        self._carry = None

    def on_resume(self, run) -> None:
        # what on_eval kept before the checkpoint: the average the next phase goes on from
        # when the checkpoint ends a phase (a resumed phase keeps its own: on_phase_begin)
        self._carry = _ema_state(run.opt_state)

    def on_phase_begin(self, run) -> None:
        carry, self._carry = self._carry, None
        state = _ema_state(run.opt_state)
        if carry is None or int(state.count) != 0:  # the first phase, or a resumed one
            return
        is_none = lambda x: x is None  # noqa: E731
        ema = jax.tree.map(
            lambda new, old: new if old is None or new is None else old,
            state.ema,
            carry.ema,
            is_leaf=is_none,
        )
        run.opt_state = _replace_ema(run.opt_state, EmaState(carry.count, ema))

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in _CONFIG}

    def load_state_dict(self, d: dict) -> None:
        stored = {k: d.get(k) for k in _CONFIG}
        if stored != self.state_dict():
            raise TrainingError(
                f"Cannot resume with EMA({self.state_dict()}): the run was started with "
                f"EMA({stored}). Use the same EMA settings, or start over "
                "(eqxtl.Checkpoint(out_dir, resume=False))."
            )


_CONFIG = ("decay", "warmup", "warmup_gamma", "warmup_power", "min_decay", "evaluate_with_ema")


def _is_ema(x) -> bool:
    return isinstance(x, EmaState)


def _ema_state(opt_state) -> EmaState:
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=_is_ema) if _is_ema(x)]
    if len(found) != 1:
        raise TrainingError(
            f"The optimizer state holds {len(found)} EMA states, 1 expected: pass the EMA to "
            "fit(callbacks=[...]) (or chain ema.transform() last, once)."
        )
    return found[0]


def _replace_ema(opt_state, new: EmaState):
    leaves, treedef = jax.tree.flatten(opt_state, is_leaf=_is_ema)
    return jax.tree.unflatten(treedef, [new if _is_ema(x) else x for x in leaves])
