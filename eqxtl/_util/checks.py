"""Checks of hyperparameters given by the user: one wording for every option that takes a
count or a real number, so that a bad value is refused where it is given (naming the
argument), not later as a ``TypeError``, a ``range()`` error or a silently wrong run.

Each check takes the error class to raise (this module sits below ``eqxtl.errors``)."""

from __future__ import annotations

import math
import numbers


def count(value, what: str, error: type[Exception], *, minimum: int = 1) -> int:
    """``value`` as an ``int`` when it is an integer (Python or numpy, not ``bool``) ``>=
    minimum``; ``error`` naming ``what`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        # an integral float such as 3.0 reads as a count; 2.5, nan and "3" do not
        if not (isinstance(value, numbers.Real) and not isinstance(value, bool)):
            raise error(f"{what} must be an integer >= {minimum}, got {value!r}.")
        if not math.isfinite(float(value)) or float(value) != int(value):
            raise error(f"{what} must be an integer >= {minimum}, got {value!r}.")
    value = int(value)
    if value < minimum:
        raise error(f"{what} must be an integer >= {minimum}, got {value}.")
    return value


def real(
    value,
    what: str,
    error: type[Exception],
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a finite ``float`` within ``[low, high]`` (``low_open``/``high_open``:
    the bound excluded); ``error`` naming ``what`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise error(f"{what} must be a real number, got {value!r}.")
    value = float(value)
    lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
    hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
    where = " and ".join(s for s in (lo, hi) if s)
    if (
        not math.isfinite(value)
        or (low is not None and (value <= low if low_open else value < low))
        or (high is not None and (value >= high if high_open else value > high))
    ):
        raise error(f"{what} must be a finite number{' ' + where if where else ''}, got {value}.")
    return value
