"""Static switches on modules: ``replace_static``, the opt-in flags behind
``eqxtl.with_remat`` / ``eqxtl.with_scan``, and ``checkpointed``."""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax


def checkpointed(fn, enabled: bool, policy=None):
    """``eqx.filter_checkpoint(fn)`` if ``enabled``, else ``fn`` (for the models' block loops;
    ``eqxtl.with_remat`` sets the flag); with a ``policy`` (``jax.checkpoint_policies``),
    checkpointed with it whether or not ``enabled``."""
    if policy is not None:
        return eqx.filter_checkpoint(fn, policy=policy)
    return eqx.filter_checkpoint(fn) if enabled else fn


def with_static_flag(model, name: str, value: bool, what: str, supported: str):
    """A copy of ``model`` (any pytree) with the static boolean field ``name`` set to
    ``value`` in every module that has one (arrays shared, not copied); for the opt-in
    switches ``eqxtl.with_remat`` and ``eqxtl.with_scan``.

    Raises ``EqxtlError`` if no module has the field: the option would do nothing.
    ``what`` names the option and ``supported`` the models that have it, in the message.
    """
    from ...errors import EqxtlError

    def has_flag(x) -> bool:
        return has_field(x, name)

    found = False

    def set_flag(x):
        nonlocal found
        if has_flag(x):
            found = True
            return replace_static(x, **{name: bool(value)})
        return x

    out = jax.tree_util.tree_map(set_flag, model, is_leaf=has_flag)
    if not found:
        raise EqxtlError(
            f"{type(model).__name__} has no module with a '{name}' flag: {what} is supported "
            f"for {supported} (and classifiers built on them)."
        )
    return out


def has_field(x, name: str) -> bool:
    """Whether ``x`` is an Equinox module with a field ``name`` (e.g. a ``scan`` flag)."""
    return isinstance(x, eqx.Module) and any(f.name == name for f in dataclasses.fields(x))


def replace_static(module: eqx.Module, **fields) -> eqx.Module:
    """``module`` with static fields replaced, the other fields shared.

    A static field is not a pytree leaf, so ``eqx.tree_at`` cannot reach it, and
    ``dataclasses.replace`` would call the module's own ``__init__`` (which builds layers
    from a config). This copies the fields onto a fresh instance, as Equinox's own
    unflattening does.
    """
    new = object.__new__(type(module))
    for field in dataclasses.fields(module):
        object.__setattr__(new, field.name, getattr(module, field.name))
    for name, value in fields.items():
        object.__setattr__(new, name, value)
    return new
