"""The update-rule protocol shared by every rule.

An update rule is an optax-style ``NamedTuple`` of pure functions:

- ``init(key, params) -> state``: the rule's own state (feedback weights, a linearisation
  point, read-out heads), never part of ``params``.
- ``update(state, params, batch, key) -> (grads, state, metrics)``: ``grads`` has the
  structure, shapes and dtypes of ``params`` and is what the rule uses in place of the loss
  gradient, so any optax optimizer turns it into a step. ``metrics`` is a flat dict of
  scalars that always contains ``"loss"``.
- ``predict(state, params, x) -> logits``.

``batch`` is a pair ``(x, y)``: inputs (batch, *input_shape) and labels (batch,) as integers.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

Batch = tuple[jax.Array, jax.Array]
Metrics = dict[str, jax.Array]


class UpdateRule(NamedTuple):
    """A learning rule as three pure, jit-compatible functions.

    Attributes:
        init: ``(key, params) -> state``.
        update: ``(state, params, batch, key) -> (grads, state, metrics)``.
        predict: ``(state, params, x) -> logits`` of shape (batch, classes).
        name: the registry name, e.g. ``"fa"``.
    """

    init: Callable[[jax.Array, Any], Any]
    update: Callable[[Any, Any, Batch, jax.Array], tuple[Any, Any, Metrics]]
    predict: Callable[[Any, Any, jax.Array], jax.Array]
    name: str = "rule"


MAX_INTEGER = 2**31 - 1
"""Largest integer hyperparameter that ``check_positive`` accepts: int32's largest value."""
MAX_REAL = float(np.finfo(np.float32).max)
"""Largest real hyperparameter that ``check_positive`` accepts: float32's largest value.
Values up to half a float32 step above it round to it, and are accepted too."""
_FLOAT32_OVERFLOW = MAX_REAL + 2.0**103
"""The smallest real that rounds to float32 infinity: half a step above ``MAX_REAL``."""


def check_positive(name: str, value, *, integer: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite positive number, or with
    ``integer=True`` a positive integer. NumPy scalars count, but ``True`` and ``False`` do not.

    Values reach JAX as int32 or float32, so larger ones are rejected: integers above
    ``MAX_INTEGER`` and reals that would round to float32 infinity.
    """
    kind = numbers.Integral if integer else numbers.Real
    is_number = isinstance(value, kind) and not isinstance(value, bool)
    if not (is_number and value > 0):
        expected = "a positive integer" if integer else "a positive number"
        raise ValueError(f"{name} must be {expected}, got {value!r}")

    if integer:
        if value > MAX_INTEGER:
            raise ValueError(
                f"{name} must be at most {MAX_INTEGER}, int32's largest value, got {value!r}"
            )
        return

    # An integer is compared as it is: a Python integer can be too large for a float. A
    # NumPy float32 is widened first, so that the comparison cannot overflow in float32.
    real = value if isinstance(value, numbers.Integral) else float(value)
    if not isinstance(real, numbers.Integral) and not math.isfinite(real):
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")
    if real >= _FLOAT32_OVERFLOW:
        raise ValueError(
            f"{name} must be at most {MAX_REAL:.8g}, float32's largest value, got {value!r}"
        )


def check_choice(name: str, value, choices) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        accepted = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {accepted}, got {value!r}")
