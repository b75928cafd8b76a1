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


def check_positive(name: str, value, *, integer: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite positive number, or with
    ``integer=True`` a positive integer. NumPy scalars count, but ``True`` and ``False`` do not."""
    kind = numbers.Integral if integer else numbers.Real
    is_number = isinstance(value, kind) and not isinstance(value, bool)
    if is_number and value > 0 and (integer or math.isfinite(value)):
        return
    expected = "a positive integer" if integer else "a positive number"
    if is_number and value > 0:
        expected = "a finite positive number"
    raise ValueError(f"{name} must be {expected}, got {value!r}")


def check_choice(name: str, value, choices) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        accepted = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {accepted}, got {value!r}")
