"""Losses: ``loss(logits, labels) -> scalar``, averaged over the batch.

Every loss takes the network's raw outputs (logits) and the labels as the data set stores
them: integer class indices of shape (batch,), or one-hot / probability targets of the
logits' shape. A rule receives its loss as such a function.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

Loss = Callable[[jax.Array, jax.Array], jax.Array]


def _check_labels(logits: jax.Array, labels: jax.Array) -> None:
    """Raise ``ValueError`` unless ``labels`` are classes (batch,) or targets like ``logits``.

    Shapes are static under ``jit``, so the check runs once, while tracing. Without it,
    labels of shape (batch, 1) would broadcast against (batch, classes) logits.
    """
    if labels.shape not in (logits.shape[:-1], logits.shape):
        raise ValueError(
            f"labels of shape {labels.shape} fit neither integer classes {logits.shape[:-1]} "
            f"nor targets {logits.shape} for logits of shape {logits.shape}"
        )


def _is_class(labels: jax.Array, classes: int) -> jax.Array:
    """Return whether each label names a class in ``0 .. classes - 1``.

    The upper bound is clipped to the labels' dtype, so that 256 classes with ``uint8``
    labels do not overflow. Floating labels must also be whole numbers.
    """
    if jnp.issubdtype(labels.dtype, jnp.integer):
        highest = min(classes - 1, int(jnp.iinfo(labels.dtype).max))
        return (labels >= 0) & (labels <= highest)
    return (labels >= 0) & (labels <= classes - 1) & (labels == jnp.floor(labels))


def _targets_like(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """One-hot encode class labels; pass targets of the logits' shape through.

    A label outside ``0 .. classes - 1`` gets a row of NaN, so the loss turns NaN instead
    of silently treating that example as belonging to no class.
    """
    _check_labels(logits, labels)
    if labels.shape == logits.shape:
        return labels.astype(logits.dtype)
    classes = logits.shape[-1]
    valid = _is_class(labels, classes)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        # Whole-number floats name classes; jax.nn.one_hot wants integer indices.
        labels = jnp.where(valid, labels, 0).astype(jnp.int32)
    targets = jax.nn.one_hot(labels, classes, dtype=logits.dtype)
    return jnp.where(valid[..., None], targets, jnp.nan)


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean over the batch of ``-sum_c y_c log softmax(logits)_c``.

    Shapes: ``logits`` (batch, classes); ``labels`` (batch,) integers or (batch, classes)
    one-hot or probabilities. An integer label outside ``0 .. classes - 1`` makes the loss
    NaN (a check that raises cannot run inside ``jit``).
    """
    _check_labels(logits, labels)
    if labels.ndim == logits.ndim - 1 and jnp.issubdtype(labels.dtype, jnp.integer):
        per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        valid = _is_class(labels, logits.shape[-1])
        return jnp.where(valid, per_example, jnp.nan).mean()
    targets = _targets_like(logits, labels)
    return optax.softmax_cross_entropy(logits, targets).mean()


def binary_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Binary cross-entropy of ``sigmoid(logits)``, mean over all elements.

    Written from logits as ``max(z, 0) - z y + log(1 + exp(-|z|))``, which equals
    ``-y log sigmoid(z) - (1 - y) log(1 - sigmoid(z))`` and stays finite for any ``|z|``.
    Integer class labels are one-hot encoded, so a multi-class output is treated as
    independent sigmoid units (as in Akrout et al. 2019, arXiv:1904.05391); one outside
    ``0 .. classes - 1`` makes the loss NaN.
    """
    targets = _targets_like(logits, labels)
    losses = jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    return losses.mean()


def mean_squared_error(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """``0.5 * mean over the batch of ||outputs - targets||^2``; integer labels become one-hot
    (one outside ``0 .. classes - 1`` makes the loss NaN).

    The factor 1/2 makes the gradient with respect to the outputs ``(outputs - targets) /
    batch``, the convention of the NTK gradient-flow formulas.
    """
    targets = _targets_like(logits, labels)
    squared = jnp.sum((logits - targets) ** 2, axis=tuple(range(1, logits.ndim)))
    return 0.5 * squared.mean()


LOSSES: dict[str, Loss] = {
    "cross_entropy": softmax_cross_entropy,
    "binary_cross_entropy": binary_cross_entropy,
    "mse": mean_squared_error,
}


def _check_loss_signature(loss: Callable) -> None:
    """Raise ``ValueError`` if ``loss`` cannot be called as ``loss(logits, labels)``.

    A callable whose signature Python cannot read (some builtins) passes unchecked.
    """
    try:
        signature = inspect.signature(loss)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(None, None)
    except TypeError:
        raise ValueError(
            f"a loss is called as loss(logits, labels), but {loss!r:.80} takes {signature}"
        ) from None


def get(name: str | Loss) -> Loss:
    """Return the loss called ``name`` (``cross_entropy``, ``binary_cross_entropy``, ``mse``)."""
    if callable(name):
        _check_loss_signature(name)
        return name
    if not isinstance(name, str):
        raise ValueError(
            f"loss must be a name ({', '.join(sorted(LOSSES))}) or a callable "
            f"loss(logits, labels), got {name!r}"
        )
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; accepted: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]
